"""POST /v1/images/shared: a cell on the node's disk takes the node's unpack of an image
(from under --shared-images only) as its containers' read-only lower layer, and never
writes to it; forgetting the image leaves the node's tree alone."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import Agent, needs_root


@pytest.fixture
def node_unpack(tmp_path, agent, busybox):
    """A tree as the node's store leaves it: an unpack made by a cell, copied under shared/."""
    digest = agent.digest(busybox)
    made = agent.run(busybox, ["true"])
    agent.wait_state(made["id"], "exited")
    tag = digest.split(":", 1)[1]
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["cp", "-a", str(agent.state_dir / "images" / "unpacked" / tag), str(shared / tag)], check=True)
    return digest, shared


@pytest.fixture
def sharing_agent(tmp_path, node_unpack):
    _, shared = node_unpack
    a = Agent(tmp_path / "sharing", extra_args=["--shared-images", str(shared)])
    a.start()
    try:
        yield a
    finally:
        a.cleanup()


def test_a_cell_without_shared_images_refuses_one(agent, node_unpack):
    digest, shared = node_unpack
    r = agent.call("POST", "/v1/images/shared", {"digest": digest, "path": str(shared / digest[7:])})
    assert r.status == 400 and "--shared-images" in r.json()["message"]


def test_only_the_images_own_tree_under_the_shared_dir_is_taken(tmp_path, sharing_agent, node_unpack):
    digest, shared = node_unpack
    tag = digest[7:]
    outside = tmp_path / "outside" / tag
    shutil.copytree(shared / tag, outside, symlinks=True)
    (shared / ("0" * 64)).symlink_to(outside)  # a name under the dir that leads out of it
    for path in (str(outside), str(shared / ("0" * 64)), f"{shared}/../outside/{tag}", "relative/path"):
        r = sharing_agent.call("POST", "/v1/images/shared", {"digest": digest, "path": path})
        assert r.status == 400, (path, r.body)
    r = sharing_agent.call("POST", "/v1/images/shared", {"digest": digest, "path": str(shared / tag), "size": "big"})
    assert r.status == 400 and "'size'" in r.json()["message"]
    empty = shared / ("1" * 64)
    empty.mkdir()
    r = sharing_agent.call("POST", "/v1/images/shared", {"digest": "sha256:" + "1" * 64, "path": str(empty)})
    assert r.status == 409 and "no unpacked image" in r.json()["message"]
    assert sharing_agent.ok("GET", "/v1/containers") == []


@needs_root
def test_containers_run_on_the_shared_tree_and_never_change_it(sharing_agent, node_unpack, busybox):
    digest, shared = node_unpack
    tree = shared / digest[7:]
    before = sorted(p.name for p in (tree / "rootfs").iterdir())
    sharing_agent.ok("POST", "/v1/images/shared", {"digest": digest, "path": str(tree), "size": 123})

    rec = sharing_agent.run(busybox, ["sh", "-c", "echo changed > /etc/motd && rm -rf /bin/ls && test ! -e /bin/ls"])
    assert sharing_agent.wait_state(rec["id"], "exited")["exit_code"] == 0

    assert sorted(p.name for p in (tree / "rootfs").iterdir()) == before
    assert (tree / "rootfs" / "bin" / "ls").exists() and not (tree / "rootfs" / "etc" / "motd").exists()
    assert not (sharing_agent.state_dir / "images" / "unpacked" / digest[7:]).exists()  # no unpack of its own
    # Its container still has it as its lower layer.
    assert sharing_agent.call("DELETE", f"/v1/images/{digest}").status == 409
    sharing_agent.ok("DELETE", f"/v1/containers/{rec['id']}")
    sharing_agent.ok("DELETE", f"/v1/images/{digest}")
    assert (tree / "rootfs" / "bin" / "ls").exists()  # forgotten in the cell, the node's tree stays
