"""The cell agent installs and runs on its own, without the node's package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CELLS = Path(__file__).resolve().parent.parent / "cells"


def test_agent_package_stands_alone(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(CELLS)],
        check=True, capture_output=True,
    )
    assert (target / "kiyot_cell").is_dir()
    assert not (target / "kiyot_py").exists()
    # Import it from there alone: kiyot_py must not be needed (-I ignores the repo on sys.path).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import kiyot_cell.cli, kiyot_cell.server; "
        "assert 'kiyot_py' not in sys.modules; print(kiyot_cell.cli.__file__)"
    )
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path[:0] = {site_packages!r}; " + code,
                          str(target)], check=True, capture_output=True, text=True)
    assert out.stdout.startswith(str(target))
    help_text = subprocess.run([sys.executable, "-I", "-c",
                                f"import sys; sys.path[:0] = [sys.argv[1]] + {site_packages!r}; "
                                "sys.argv = ['kiyot-cell', 'serve', '--help']; import kiyot_cell.cli as c; c.main()",
                                str(target)], check=False, capture_output=True, text=True)
    assert "--tls-dir" in help_text.stdout
