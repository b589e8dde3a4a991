"""The pod's volumes in a cell (PUT/GET/DELETE /v1/volumes): layout, memory, atomic swaps, refusals."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tests.cells.conftest import needs_root

pytestmark = needs_root

NAME = "ab" * 16


def _file(path: str, text: str, mode: int = 0o644) -> dict:
    return {"path": path, "data": base64.b64encode(text.encode()).decode(), "mode": mode}


def _fstype(path: str) -> str:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == path:
                return fields[fields.index("-") + 1]
    return ""


def test_atomic_volume_keeps_the_kubelets_layout_and_swaps_whole(agent):
    v1 = {"kind": "atomic", "medium": "memory", "size_limit": 1 << 20, "version": "..2026_12_02_10_00_00.1",
          "files": [_file("token", "one"), _file("ca.crt", "ca-one", 0o600)]}
    home = agent.ok("PUT", f"/v1/volumes/{NAME}", v1)["path"]
    assert _fstype(home) == "tmpfs"  # a memory volume: its files never touch the disk
    assert os.readlink(os.path.join(home, "..data")) == "..2026_12_02_10_00_00.1"
    assert os.readlink(os.path.join(home, "token")) == "..data/token"
    assert Path(home, "token").read_text() == "one"
    assert os.stat(os.path.join(home, "..data", "ca.crt")).st_mode & 0o777 == 0o600
    assert agent.ok("PUT", f"/v1/volumes/{NAME}", v1)["path"] == home  # the same version again: nothing moves

    v2 = {**v1, "version": "..2026_12_02_10_00_01.2", "files": [_file("token", "two"), _file("extra", "new")]}
    agent.ok("PUT", f"/v1/volumes/{NAME}", v2)
    assert Path(home, "token").read_text() == "two"
    assert Path(home, "extra").read_text() == "new"
    assert sorted(os.listdir(home)) == ["..2026_12_02_10_00_01.2", "..data", "extra", "token"]  # ca.crt and v1 gone
    agent.ok("DELETE", f"/v1/volumes/{NAME}")
    assert not os.path.exists(home) and _fstype(home) == ""


def test_disk_empty_and_file_volumes(agent):
    empty = agent.ok("PUT", "/v1/volumes/" + "01" * 16, {"kind": "empty", "medium": "disk"})["path"]
    assert os.path.isdir(empty) and os.listdir(empty) == [] and _fstype(empty) == ""
    log = agent.ok("PUT", "/v1/volumes/" + "02" * 16, {"kind": "file", "medium": "disk"})["path"]
    assert os.path.isfile(log) and os.path.getsize(log) == 0
    with open(log, "w") as fh:  # what a container writes to /dev/termination-log
        fh.write("x" * 5000)
    data = agent.ok("GET", "/v1/volumes/" + "02" * 16 + "/file")["data"]
    assert base64.b64decode(data) == b"x" * 4096  # the kubelet's 4 KiB, no more
    assert agent.call("GET", "/v1/volumes/" + "03" * 16 + "/file").status == 404


def test_volumes_that_would_leave_their_directory_are_refused(agent, tmp_path):
    base = {"kind": "atomic", "medium": "disk", "version": "..v1"}
    for files in ([_file("../escape", "x")], [_file("/etc/escape", "x")], [_file("a/../../escape", "x")],
                  [{"path": "link", "symlink": "../../../etc/shadow"}], [{"path": "link", "symlink": "/etc/shadow"}]):
        r = agent.call("PUT", "/v1/volumes/" + "04" * 16, {**base, "files": files})
        assert r.status == 400, (files, r.body)
    for version in ("..data", "v1", "../..", "..a/b"):
        assert agent.call("PUT", "/v1/volumes/" + "05" * 16, {**base, "version": version, "files": []}).status == 400
    assert agent.call("PUT", "/v1/volumes/NOT-HEX", {"kind": "empty"}).status == 400
    assert agent.call("PUT", "/v1/volumes/" + "06" * 16, {"kind": "nfs"}).status == 400
    assert not (tmp_path / "escape").exists()
