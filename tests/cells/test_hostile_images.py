"""Hostile images against a real agent and real umoci: layers crafted to be read one way by
Python's tarfile and another by Go's archive/tar (umoci), device nodes and FIFOs, and
special files where the image's users and groups are read. Every one ends in a clear error
(no hang: each request is bounded), writes nothing outside the rootfs, and leaves the cell
able to pull and run the next image. How long each takes is measured in
bench/hostile_images.py, not asserted here."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from tests.cells.conftest import needs_root, spec_of
from tests.support import images as imgs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cells"))

from kiyot_cell import images as cell_images_mod
from kiyot_cell import layercheck, spec
from kiyot_cell.config import AgentConfig
from kiyot_cell.errors import ApiError

HANG_GUARD = 60  # seconds a request may stay unanswered before the test gives up on it


@pytest.fixture(scope="session")
def hostile(registry) -> dict[str, imgs.TestImage]:
    return imgs.push_hostile_images(registry)




def _escapes(agent) -> list[Path]:
    """Where `../../x` of a layer would land from the rootfs umoci unpacks into, and around."""
    images = agent.state_dir / "images"
    return [images / "unpacked" / "x", images / "x", agent.state_dir / "x", agent.workdir / "x", Path("/x")]


def _run_busybox(agent, img) -> None:
    rec = agent.run(img, ["sh", "-c", "echo still-pulls-and-runs"])
    done = agent.wait_state(rec["id"], "exited")
    assert done["exit_code"] == 0, done
    assert "still-pulls-and-runs" in agent.call("GET", f"/v1/containers/{rec['id']}/logs").body.decode()


# --- the crafted layers read what they claim to -------------------------------------------

def _python_stream_names(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|*") as tf:
        return [m.name for m in tf]


@pytest.mark.parametrize("make", [imgs.multistream_layer, imgs.nul_led_checksum_layer])
def test_python_tarfile_misses_what_the_check_sees(tmp_path, make):
    layer = make()
    assert "../../x" not in _python_stream_names(layer.blob)  # the old check's blind spot
    p = tmp_path / "blob"
    p.write_bytes(layer.blob)
    with pytest.raises(layercheck.LayerRejected, match=r"'\.\.' in path '\.\./\.\./x'"):
        layercheck.check_layer(p, imgs.OCI_LAYER, layer.diff_id)


def _check(tmp_path: Path, tar_bytes: bytes, blob: bytes | None = None, media_type: str = imgs.OCI_LAYER) -> str:
    layer = imgs.layer_of(tar_bytes, blob)
    p = tmp_path / "blob"
    p.write_bytes(layer.blob)
    return layercheck.check_layer(p, media_type, layer.diff_id)


def test_header_errors_refuse_and_never_end_the_archive(tmp_path):
    good = imgs.tar_bytes_of([imgs.File("a", b"x"), imgs.File("b", b"y")])
    assert _check(tmp_path, good) == imgs.sha256(good)
    assert _check(tmp_path, good + bytes(8192))  # NUL padding after the end blocks is fine
    bad_checksum = bytearray(good)
    bad_checksum[1024 + 148:1024 + 156] = b"0000001\x00"
    cases = {
        "bad header checksum": bytes(bad_checksum),
        "truncated tar header": good[:1024] + good[1024:1124],
        "a zero block and then a header": good[:1024] + bytes(512) + good[1024:],
        "data after the end of the archive": good + b"garbage",
        "cut short in the data": good[:600],
    }
    for why, data in cases.items():
        with pytest.raises(layercheck.LayerRejected, match=why):
            _check(tmp_path, data)
    gz = imgs.layer_of(good).blob
    for why, blob in {"cut short": gz[:-4], "not another member": gz + b"\x00" * 16, "not gzip": b"nope" * 10}.items():
        with pytest.raises(layercheck.LayerRejected, match=why):
            _check(tmp_path, good, blob)
    with pytest.raises(layercheck.LayerRejected, match="differs from the image config's diff_id"):
        p = tmp_path / "blob"
        p.write_bytes(gz)
        layercheck.check_layer(p, imgs.OCI_LAYER, "sha256:" + "0" * 64)
    with pytest.raises(layercheck.LayerRejected, match="unsupported layer media type"):
        layercheck.check_layer(p, "application/octet-stream")


@pytest.mark.parametrize(("entry", "why"), [
    (imgs.CharDevice("dev/zero", 1, 5), "char device 'dev/zero'"),
    (imgs.Entry("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8), "block device 'dev/sda'"),
    (imgs.Fifo("etc/group"), "FIFO 'etc/group'"),
    (imgs.File(".wh..", b""), "whiteout '.wh..' removes '.'"),
    (imgs.File("a/.wh...", b""), "whiteout 'a/.wh...' removes '..'"),
    (imgs.Entry("v", b"V"), "unsupported type"),
])
def test_special_entries_are_refused(tmp_path, entry, why):
    with pytest.raises(layercheck.LayerRejected, match=why):
        _check(tmp_path, imgs.tar_bytes_of([imgs.File("ok", b"fine"), entry]))


def test_whiteouts_and_pax_and_long_names_pass(tmp_path):
    ok = [imgs.File(".wh.gone", b""), imgs.File("d/.wh..wh..opq", b""), imgs.File("x" * 150 + "/y", b"long")]
    _check(tmp_path, imgs.tar_bytes_of(ok))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("ü/" + "p" * 200)
        tf.addfile(info, io.BytesIO(b""))
    _check(tmp_path, raw.getvalue())
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("q/" * 80 + "../" * 90 + "x"), io.BytesIO(b""))
    with pytest.raises(layercheck.LayerRejected, match=r"'\.\.' in path"):
        _check(tmp_path, raw.getvalue())


# --- the agent: refused at pull --------------------------------------------------------------

@needs_root
@pytest.mark.parametrize(("short", "entry"), [
    ("hostile-multistream", "'../../x'"),
    ("hostile-nulchecksum", "'../../x'"),
    ("hostile-chardev", "char device 'dev-zero'"),
])
def test_crafted_layer_is_refused_by_the_pull(agent, cell_images, hostile, short, entry):
    img = hostile[short]
    agent.pull(cell_images["busybox"])  # the shared base layer stays
    layout = agent.state_dir / "images" / "layout"
    blobs_before = set(os.listdir(layout / "blobs" / "sha256"))
    index_before = json.loads((layout / "index.json").read_text())
    r = agent.call("POST", "/v1/images/pull", agent.pull_body(img), timeout=HANG_GUARD)
    assert r.status == 422, r.body
    err = r.json()
    assert err["error"] == "pull_failed"
    msg = err["message"]
    assert "refused" in msg and img.manifest_digest in msg and "layer sha256:" in msg and entry in msg, msg
    assert set(os.listdir(layout / "blobs" / "sha256")) == blobs_before
    assert json.loads((layout / "index.json").read_text()) == index_before
    for p in _escapes(agent):
        assert not p.exists(), p
    assert not os.listdir(agent.state_dir / "tmp"), "leftovers in tmp"
    # refused again (nothing remembered as checked), and the cell goes on
    assert agent.call("POST", "/v1/images/pull", agent.pull_body(img)).status == 422
    _run_busybox(agent, cell_images["busybox"])


@needs_root
@pytest.mark.parametrize(("short", "entry"), [
    ("hostile-fifo-group", "FIFO 'etc/group'"),
    ("hostile-chardev-passwd", "char device 'etc/passwd'"),
])
def test_special_file_at_etc_is_refused_and_the_cell_goes_on(agent, cell_images, hostile, short, entry):
    img = hostile[short]
    r = agent.call("POST", "/v1/images/pull", agent.pull_body(img), timeout=HANG_GUARD)
    assert r.status == 422 and r.json()["error"] == "pull_failed", r.body
    assert entry in r.json()["message"]
    # The image lock is free: the same cell pulls (a first pull, not a cached one) and runs busybox.
    agent.pull(cell_images["busybox"])
    _run_busybox(agent, cell_images["busybox"])


# --- the agent: a special file in the unpacked rootfs, at CreateContainer ---------------------

def _unpacked_rootfs(agent, img) -> Path:
    return agent.state_dir / "images" / "unpacked" / img.manifest_digest.split(":", 1)[1] / "rootfs"


@needs_root
@pytest.mark.parametrize(("file", "make", "kind"), [
    ("group", os.mkfifo, "a FIFO"),
    ("passwd", lambda p: os.mknod(p, 0o644 | stat.S_IFCHR, os.makedev(1, 5)), "a char device"),
])
def test_special_file_in_the_rootfs_is_a_clear_error_at_create(agent, cell_images, file, make, kind):
    """However one got there (the pull refuses them now), a FIFO or device where the agent
    reads users and groups is a 400 at once: no hang, no endless read, the loop serves on."""
    app = cell_images["app"]
    agent.pull(app)
    first = agent.create(app, ["true"], name="first", user="app")  # unpacks the image once
    agent.call("DELETE", f"/v1/containers/{first['id']}")
    etc = _unpacked_rootfs(agent, app) / "etc"
    (etc / file).unlink()
    make(etc / file)
    body = {"id": "d" * 64, "name": "special", "image_digest": app.manifest_digest,
            "spec": spec_of(["true"]), "user": "app"}
    r = agent.call("POST", "/v1/containers", body, timeout=HANG_GUARD)
    assert r.status == 400, r.body
    assert r.json()["message"] == f"the image's /etc/{file} is {kind}, not a regular file: cannot resolve users from it"
    assert agent.ok("GET", "/v1/health")["ready"] is True
    assert agent.ok("GET", "/v1/containers") == []
    agent.pull(cell_images["busybox"])
    _run_busybox(agent, cell_images["busybox"])


@needs_root
def test_rootfs_is_mounted_nodev_and_nosuid_where_no_new_privs(agent, busybox):
    """nodev always; nosuid only with no_new_privs (where set-id bits give nothing anyway):
    a container allowed to escalate keeps its setuid binaries, as Kubernetes says."""
    from tests.cells.conftest import spec_of

    args = ["sh", "-c", "grep ' / / ' /proc/self/mountinfo"]
    for no_new_privs in (True, False):
        spec = spec_of(args)
        spec["process"]["noNewPrivileges"] = no_new_privs
        rec = agent.run(busybox, args, spec=spec, name=f"nnp-{no_new_privs}")
        agent.wait_state(rec["id"], "exited")
        line = agent.call("GET", f"/v1/containers/{rec['id']}/logs").body.decode()
        opts = line.split(" / / ", 1)[1].split()[0].split(",")
        assert "nodev" in opts, line
        assert ("nosuid" in opts) is no_new_privs, line


# --- resolve_user on its own --------------------------------------------------------------

def test_resolve_user_refuses_special_and_big_files(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("app:x:1000:1000::/:/bin/sh\n")
    os.mkfifo(etc / "group")
    with pytest.raises(ApiError, match="/etc/group is a FIFO") as e:  # not a read that blocks
        asyncio.run(asyncio.wait_for(asyncio.to_thread(spec.resolve_user, tmp_path, "app", []), HANG_GUARD))
    assert e.value.status == 400
    (etc / "group").unlink()
    (etc / "group").write_bytes(b"x" * (spec.ETC_DB_MAX + 1))
    with pytest.raises(ApiError, match="more than the"):
        spec.resolve_user(tmp_path, "app", [])
    (etc / "group").unlink()
    (etc / "group").mkdir()
    with pytest.raises(ApiError, match="is a directory"):
        spec.resolve_user(tmp_path, "app", [])
    (etc / "group").rmdir()
    # A symlink is never followed (it could lead out of the rootfs): as if there were none.
    outside = tmp_path / "outside"
    outside.write_text("app:x:1000:1000::/:/bin/sh\nextra:x:5:app\n")
    (etc / "group").symlink_to(outside)
    assert spec.resolve_user(tmp_path, "app", []) == {"uid": 1000, "gid": 1000}
    (etc / "passwd").unlink()
    (etc / "passwd").symlink_to(outside)
    with pytest.raises(ApiError, match="not in the image's /etc/passwd"):
        spec.resolve_user(tmp_path, "app", [])


# --- umoci bounded: killed past its timeout, the locks free again --------------------------

@needs_root
def test_umoci_past_its_timeout_is_killed_and_frees_the_locks(tmp_path, monkeypatch, cell_images, hostile,
                                                               pull_node):
    """A layer that got past the check (marked checked, as by an older check) with a FIFO at
    etc/group: umoci blocks resolving the image's User; it is killed at the bound,
    and the same store pulls and unpacks busybox."""
    monkeypatch.setattr(cell_images_mod, "UNPACK_TIMEOUT", 3.0)
    img = hostile["hostile-fifo-group"]
    fifo = imgs.make_layer(imgs.HOSTILE_LAYERS["hostile-fifo-group"] or [], sort=False)
    cell_id = "c-umoci-timeout"
    pull_node.pki.issue_cell(cell_id).write(tmp_path / "tls")
    store = cell_images_mod.ImageStore(AgentConfig(host="127.0.0.1", port=0, tls_dir=tmp_path / "tls",
                                                   state_dir=tmp_path / "state", pull_timeout=120.0))

    async def scenario() -> None:
        store.load()
        store.checked[fifo.digest] = fifo.diff_id
        await store.pull(pull_node.source(img, cell_id))
        with pytest.raises(ApiError) as e:
            await asyncio.wait_for(store.unpacked(img.manifest_digest), HANG_GUARD)
        assert e.value.code == "timeout" and "did not finish within 3s" in e.value.message, e.value.message
        assert store.lock._readers == 0 and not store.lock._writer
        assert not store._unpack_locks[img.manifest_digest].locked()
        assert not list((store.cfg.images_dir / "unpacked").iterdir())
        bb = cell_images["busybox"]
        await asyncio.wait_for(store.pull(pull_node.source(bb, cell_id)), 60)
        root = await asyncio.wait_for(store.unpacked(bb.manifest_digest), 60)
        assert (root / "rootfs" / "bin" / "busybox").is_file()

    asyncio.run(scenario())
