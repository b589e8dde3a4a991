"""exec, attach and port-forward through the socket with the kit's crictl, as an operator
runs them: SPDY by default and `--transport websocket`, to containers in local cells."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import hashlib
import json
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import time
import urllib.request
from pathlib import Path

import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.support.spdy_client import read_all, upgrade

from .helpers import container_config, run, start, wait_for, wait_state

REPO = Path(__file__).resolve().parents[2]
KITS = [Path(os.environ["KIYOTPY_CONFORMANCE_KIT"])] if os.environ.get("KIYOTPY_CONFORMANCE_KIT") else [
    REPO.parent / "shared" / "conformance", Path("/work/shared/conformance")]
KIT = next((k for k in KITS if (k / "bin" / "crictl").exists()), None)
pytestmark = pytest.mark.skipif(KIT is None, reason="the conformance kit's crictl is needed")
TRANSPORTS = ["spdy", "websocket"]


def crictl_argv(service, *args: str) -> list[str]:
    assert KIT is not None
    return [str(KIT / "bin" / "crictl"), "--config", str(KIT / "crictl-noconfig.yaml"),
            "--runtime-endpoint", f"unix://{service.socket}", "--timeout", "60s", *args]


def crictl(service, *args: str, data: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(crictl_argv(service, *args), input=data, capture_output=True, timeout=timeout,
                          check=False)


@pytest.fixture
def busybox(img, test_images) -> str:
    ref = test_images["busybox"].ref
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return ref


@pytest.fixture
def sleeper(cri, pod, busybox) -> str:
    cid = run(cri, pod, "sleeper", busybox, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    return cid


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_pipes_a_mebibyte_through_cat(service, sleeper, transport):
    data = os.urandom(1 << 20)
    done = crictl(service, "exec", "--transport", transport, "-i", sleeper, "cat", data=data)
    assert done.returncode == 0, done.stderr.decode()
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_keeps_stdout_and_stderr_apart_and_fails_on_a_non_zero_exit(service, sleeper, transport):
    done = crictl(service, "exec", "--transport", transport, sleeper, "sh", "-c", "echo -n out; echo -n err >&2")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"out", b"err")
    failed = crictl(service, "exec", "--transport", transport, sleeper, "sh", "-c", "exit 7")
    assert failed.returncode != 0


class Terminal:
    """crictl on a pseudo-terminal of its own, as an operator's shell runs it."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.resize(24, 80)
        # setsid --ctty: a session of its own whose terminal is this one, as a login shell's.
        self.proc = subprocess.Popen(["setsid", "--wait", "--ctty", *argv], stdin=slave, stdout=slave,
                                     stderr=slave)
        os.close(slave)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, wanted: bytes, seconds: float = 30) -> bytes:
        deadline = time.monotonic() + seconds
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} not seen in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the other side is gone
                    chunk = b""
                assert chunk, f"{wanted!r} not seen before the end: {self.seen[-2000:]!r}"
                self.seen += chunk
        return self.seen

    def wait(self, seconds: float = 30) -> int:
        try:
            return self.proc.wait(seconds)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_with_a_terminal_follows_resizes(service, sleeper, transport):
    term = Terminal(crictl_argv(service, "exec", "--transport", transport, "-it", sleeper, "sh"))
    try:
        term.send("tty\n")
        term.expect(b"/dev/pts/")
        term.resize(40, 123)  # the kernel tells crictl (SIGWINCH), which tells the cell
        term.send("stty size\n")
        term.expect(b"40 123")
        term.send("exit 7\n")
        assert term.wait() != 0
    finally:
        term.kill()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_sees_output_and_writes_stdin(service, cri, pod, busybox, transport):
    config = container_config("echo", busybox, ["sh", "-c", 'echo started; while read l; do echo "got $l"; done'],
                              stdin=True)
    cid = start(cri, pod, config)
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    argv = crictl_argv(service, "attach", "--transport", transport, "-i", cid)
    attach = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert attach.stdin is not None and attach.stdout is not None
        attach.stdin.write(b"ping\n")
        attach.stdin.flush()
        line = b""
        deadline = time.monotonic() + 30
        while b"got ping" not in line and time.monotonic() < deadline:
            ready, _, _ = select.select([attach.stdout], [], [], 1)
            if ready:
                line += os.read(attach.stdout.fileno(), 4096)
        assert b"got ping" in line
    finally:
        attach.kill()
        attach.wait(10)
    # The container outlives its attach.
    assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read()
    except OSError:
        return None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward_reaches_a_web_server_in_the_pod(service, cri, pod, busybox, transport):
    run(cri, pod, "web", busybox, ["httpd", "-f", "-p", "8080", "-h", "/www"])
    local = free_port()
    forward = subprocess.Popen(crictl_argv(service, "port-forward", "--transport", transport, pod[0],
                                           f"{local}:8080"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{local}/index.html"
        assert b"hello from kiyot" in wait_for(lambda: page(url), 30)
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            pages = list(pool.map(page, [url] * 20))
        assert all(p is not None and b"hello from kiyot" in p for p in pages), pages
    finally:
        forward.terminate()
        forward.wait(10)


def test_the_error_stream_names_the_exit_code(cri, sleeper):
    """What client-go reads at the end of an exec: the v4 status, its ExitCode cause."""
    url = cri.Exec(pb.ExecRequest(container_id=sleeper, cmd=["sh", "-c", "echo -n bye; exit 7"],
                                  stdout=True, stderr=True)).url

    async def session() -> tuple[bytes, dict]:
        status, _headers, client = await upgrade(url, ["v4.channel.k8s.io"])
        assert status == 101 and client is not None
        try:
            streams = {kind: await client.session.open_stream({"streamtype": kind})
                       for kind in ("error", "stdout", "stderr")}
            await streams["error"].close_write()
            return await read_all(streams["stdout"]), json.loads(await read_all(streams["error"]))
        finally:
            await client.close()

    out, report = asyncio.run(session())
    assert out == b"bye"
    assert report["reason"] == "NonZeroExitCode"
    assert report["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]
