"""Fixtures for the cell agent tests: a real `kiyot_cell` process on 127.0.0.1 (no netns)
with containers run by runc under conmon. Images come as in a cell: from the node's real
pull path over mutual TLS (tests/support/pullnode.py), which the node's client filled
from the real registry on 127.0.0.1:5000.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kiyot_py.pki import cell_server_name
from kiyot_py.providers.hostcell import mounts_under
from tests.support.pullnode import PullNode

ROOT = Path(__file__).resolve().parents[2]
CELLS = ROOT / "cells"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runc") or not shutil.which("conmon"),
                                reason="needs root, runc and conmon")


# The node sends the final process (args, env, cwd): the agent adds no image defaults, so
# every spec the tests send carries its own PATH.
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def process(args: list[str], env: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A spec's `process` as the node sends it: the command, PATH first, then `env`."""
    return {"args": args, "env": [PATH_ENV, *(env or [])], **extra}


def spec_of(args: list[str], **linux_or_more: Any) -> dict[str, Any]:
    """A minimal spec: `process(args)`, plus any other top-level keys given."""
    return {"process": process(args), **linux_or_more}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, tries: int = 300, delay: float = 0.1, what: str = "condition"):  # bounded: ~30 s
    for _ in range(tries):
        v = pred()
        if v:
            return v
        time.sleep(delay)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class _CellConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 that asks for the cell's own name, as the node does."""

    def __init__(self, port: int, context: ssl.SSLContext, server_name: str, timeout: float) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)  # type: ignore[attr-defined]


@dataclass
class Agent:
    """One agent process (`serve` or `supervise`) with its own state dir, port and TLS identity
    from a CA of its own (`pki`), whose node certificate the tests use as the node would."""

    workdir: Path
    mode: str = "serve"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert "node" in _NODE, "the pull_node fixture starts the node's side first"
        self.node = _NODE["node"]
        self.pki = self.node.pki
        self.cell_id = "c" + secrets.token_hex(6)
        self.pki.issue_cell(self.cell_id).write(self.tls_dir)

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "tls"

    @property
    def server_name(self) -> str:
        return cell_server_name(self.cell_id)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def log_file(self) -> Path:
        return self.workdir / "agent.log"

    def start(self, wait: bool = True) -> Agent:
        env = dict(os.environ, PYTHONPATH=str(CELLS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_file, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kiyot_cell.cli", self.mode, "--listen", f"127.0.0.1:{self.port}",
                 "--tls-dir", str(self.tls_dir), "--state-dir", str(self.state_dir),
                 "--cgroup-parent", f"kiyot-cell-tests/{self.workdir.name}", *self.extra_args],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        def ok() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited:\n{self.log_file.read_text()[-3000:]}")
            try:
                return self.call("GET", "/v1/health").status == 200
            except OSError:  # ssl.SSLError too: the agent is not listening yet
                return False
        wait_until(ok, what="agent health")

    def serve_pid(self) -> int:
        """The `serve` process: the agent itself, or the supervisor's child."""
        assert self.proc is not None
        if self.mode == "serve":
            return self.proc.pid
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(kids[0]) if kids else 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    # --- HTTP -------------------------------------------------------------------------------

    def client_context(self, identity: str = "node") -> ssl.SSLContext:
        """The TLS client side: "node" (the node's certificate), "none" (no certificate),
        or a directory holding another cell.crt/cell.key to present."""
        if identity == "node":
            return self.pki.client_context()
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
        if identity != "none":
            ctx.load_cert_chain(str(Path(identity) / "cell.crt"), str(Path(identity) / "cell.key"))
        return ctx

    def conn(self, timeout: float = 60, identity: str = "node") -> http.client.HTTPSConnection:
        return _CellConnection(self.port, self.client_context(identity), self.server_name, timeout)

    def call(self, method: str, path: str, body: Any = None, identity: str = "node",
             raw: bytes | None = None, timeout: float = 120) -> Response:
        c = self.conn(timeout, identity)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            h: dict[str, str] = {}
            if data is not None:
                h["Content-Type"] = "application/json"
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return Response(r.status, r.read(), dict(r.getheaders()))
        finally:
            c.close()

    def ok(self, method: str, path: str, body: Any = None, status: tuple[int, ...] = (200, 201)) -> Any:
        r = self.call(method, path, body)
        assert r.status in status, f"{method} {path} -> {r.status} {r.body[:2000]!r}"
        return r.json()

    # --- conveniences ---------------------------------------------------------------------

    def pull_body(self, img) -> dict[str, str]:
        """What the node sends to pull `img` (granted to this cell on the pull path)."""
        return self.node.source(img, self.cell_id)

    def digest(self, img) -> str:
        """The manifest of `img` a cell of this host's platform runs."""
        return self.node.fetch(img)

    def pull(self, img) -> dict[str, Any]:
        return self.ok("POST", "/v1/images/pull", self.pull_body(img))

    def create(self, img, args: list[str] | None, name: str = "c", **extra: Any) -> dict[str, Any]:
        cid = extra.pop("id", None) or secrets.token_hex(32)
        spec: dict[str, Any] = spec_of(args) if args else {}
        body = {"id": cid, "name": name, "image_digest": self.digest(img), "spec": spec, **extra}
        return self.ok("POST", "/v1/containers", body)

    def run(self, img, args: list[str], **extra: Any) -> dict[str, Any]:
        rec = self.create(img, args, **extra)
        return self.ok("POST", f"/v1/containers/{rec['id']}/start")

    def record(self, cid: str) -> dict[str, Any]:
        return self.ok("GET", f"/v1/containers/{cid}")

    def wait_state(self, cid: str, *states: str) -> dict[str, Any]:
        return wait_until(lambda: (r := self.record(cid))["state"] in states and r,
                          what=f"{cid[:12]} in {states}")

    def cleanup(self) -> None:
        """Delete every container through the API so no conmon/runc container outlives a test."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                for rec in self.ok("GET", "/v1/containers"):
                    self.call("DELETE", f"/v1/containers/{rec['id']}")
        except (OSError, AssertionError):
            pass
        self.stop()
        # The pod's PID-namespace init outlives agents (as in a cell, where the VM's end
        # takes it): the last agent's process group, and the one any earlier agent started.
        init = self.state_dir / "pod" / "ns" / "pid-init"
        for kill, pid in ((os.killpg, self.proc.pid if self.proc else 0),
                          (os.kill, int(init.read_text()) if init.exists() else 0)):
            try:
                if pid:
                    kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Whatever is left (an agent that died): every container dir it had, by id.
        root = ["--root", self.extra_args[self.extra_args.index("--runtime-root") + 1]] \
            if "--runtime-root" in self.extra_args else []
        cdir = self.state_dir / "containers"
        for d in cdir.iterdir() if cdir.exists() else []:
            subprocess.run(["runc", *root, "delete", "--force", d.name], check=False, capture_output=True)
        # The pod's IPC namespace is bound on a file in the state dir, as a cell's would be.
        for mount in mounts_under(self.state_dir):
            subprocess.run(["umount", "--lazy", mount], check=False, capture_output=True)
        # runc removes each container's cgroup, not the parent this agent was given.
        for parent in Path("/sys/fs/cgroup").glob(f"*/kiyot-cell-tests/{self.workdir.name}"):
            with contextlib.suppress(OSError):
                parent.rmdir()


_NODE: dict[str, PullNode] = {}  # "node": the session's, while it runs


@pytest.fixture(scope="session", autouse=True)
def pull_node(tmp_path_factory, test_images) -> Iterator[PullNode]:
    """The node's side every agent here pulls from (one CA, one store, one pull path)."""
    node = _NODE["node"] = PullNode(tmp_path_factory.mktemp("pull-node"))
    try:
        yield node
    finally:
        del _NODE["node"]
        node.close()


@pytest.fixture(scope="session")
def cell_images(test_images) -> dict[str, Any]:
    """The shared test images (tests/conftest.py): busybox, busybox-oci, busybox-index, app, evil-*."""
    return test_images


@pytest.fixture
def agent(tmp_path) -> Iterator[Agent]:
    a = Agent(tmp_path).start()
    try:
        yield a
    finally:
        a.cleanup()


@pytest.fixture
def busybox(agent, cell_images):
    img = cell_images["busybox"]
    agent.pull(img)
    return img
