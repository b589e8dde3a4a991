#!/usr/bin/env python3
"""Generate the Python gRPC stubs for the CRI v1 wire contract.

    python tools/gen_proto.py           # (re)write kiyot_py/gen/runtime/v1/api_pb2*.py[i]
    python tools/gen_proto.py --check   # exit 1 if the committed stubs are stale

Source: proto/runtime/v1/api.proto. Output: kiyot_py/gen/runtime/v1/{api_pb2.py,
api_pb2_grpc.py, api_pb2.pyi}. The proto is fed to protoc under the virtual
path kiyot_py/gen/runtime/v1/api.proto (include mapping ``kiyot_py/gen=proto``)
so the generated modules import each other as ``kiyot_py.gen.runtime.v1``.

Generated files are never edited by hand; change the proto and rerun this.
Needs only the standard library and grpcio-tools.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = "proto"
VIRTUAL_ROOT = "kiyot_py/gen"
PROTO_REL = "runtime/v1/api.proto"
OUT_DIR_REL = "kiyot_py/gen/runtime/v1"
GENERATED = ("api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi")


def run_protoc(out_root: Path) -> None:
    """Run grpc_tools.protoc, writing the stubs under out_root/kiyot_py/gen/..."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - environment problem
        sys.exit("gen_proto: grpcio-tools is not installed (pip install grpcio-tools)")

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{VIRTUAL_ROOT}={REPO / PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        f"{VIRTUAL_ROOT}/{PROTO_REL}",
    ]
    rc = protoc.main(args)
    if rc != 0:
        sys.exit(f"gen_proto: protoc failed with exit code {rc}")


def generate() -> None:
    run_protoc(REPO)
    for name in GENERATED:
        print(f"gen_proto: wrote {OUT_DIR_REL}/{name}")


def check() -> int:
    with tempfile.TemporaryDirectory(prefix="kiyot-gen-proto-") as tmp:
        run_protoc(Path(tmp))
        stale = []
        for name in GENERATED:
            fresh = Path(tmp) / OUT_DIR_REL / name
            committed = REPO / OUT_DIR_REL / name
            if not committed.is_file():
                stale.append(f"{OUT_DIR_REL}/{name} (missing)")
            elif not filecmp.cmp(fresh, committed, shallow=False):
                stale.append(f"{OUT_DIR_REL}/{name} (differs)")
    if stale:
        print(
            "gen_proto: generated stubs are stale relative to "
            f"{PROTO_ROOT}/{PROTO_REL}:\n  " + "\n  ".join(stale)
            + "\nRun: python tools/gen_proto.py",
            file=sys.stderr,
        )
        return 1
    print("gen_proto: stubs are up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail if the committed stubs differ",
    )
    ns = parser.parse_args(argv)
    if ns.check:
        return check()
    generate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
