"""The pod side of exec, attach and port-forward: what is checked when the RPC asks for a
URL, and which cell's agent each session is relayed to once the client connects."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from kiyot_py.errors import FailedPrecondition, InvalidArgument
from kiyot_py.model import CONTAINER_RUNNING, SANDBOX_READY, Container
from kiyot_py.pods.cells import Cells
from kiyot_py.pods.index import Index
from kiyot_py.streaming.relay import AgentStream
from kiyot_py.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest


class PodStreams:
    def __init__(self, index: Index, cells: Cells) -> None:
        self._index = index
        self._cells = cells

    def _running(self, container_id: str, what: str) -> Container:
        if not container_id:
            raise InvalidArgument(f"{what} needs a container_id")
        c = self._index.container(container_id)
        if c.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running: {what} needs a running container")
        return c

    @staticmethod
    def _check_streams(what: str, *, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
        if tty and stderr:
            raise InvalidArgument(f"{what}: a TTY has no stderr of its own (tty and stderr cannot both be set)")
        if not (stdin or stdout or stderr):
            raise InvalidArgument(f"{what}: at least one of stdin, stdout and stderr must be set")

    def check_exec(self, request: ExecRequest) -> ExecRequest:
        self._running(request.container_id, "exec")
        if not request.cmd:
            raise InvalidArgument("exec needs a command")
        self._check_streams("exec", tty=request.tty, stdin=request.stdin, stdout=request.stdout,
                            stderr=request.stderr)
        return request

    def check_attach(self, request: AttachRequest) -> AttachRequest:
        self._running(request.container_id, "attach")
        self._check_streams("attach", tty=request.tty, stdin=request.stdin, stdout=request.stdout,
                            stderr=request.stderr)
        return request

    def check_port_forward(self, request: PortForwardRequest) -> PortForwardRequest:
        if not request.sandbox_id:
            raise InvalidArgument("port-forward needs a pod_sandbox_id")
        sb = self._index.sandbox(request.sandbox_id)
        if sb.state != SANDBOX_READY or sb.cell is None:
            raise FailedPrecondition(f"pod sandbox {sb.id} is not ready: port-forward needs a running pod")
        bad = [p for p in request.ports if not 0 < p < 65536]
        if bad:
            raise InvalidArgument(f"port-forward: ports must be within 1-65535, got {bad}")
        return request

    # Sessions: checked again when the client connects, since the container may have
    # exited in between (the error reaches the client on its error stream).

    def exec(self, request: ExecRequest) -> AbstractAsyncContextManager[AgentStream]:
        c = self._running(request.container_id, "exec")
        agent = self._cells.agent(self._index.sandbox(c.sandbox_id))
        return agent.exec_stream(c.id, list(request.cmd), tty=request.tty, stdin=request.stdin,
                                 stdout=request.stdout, stderr=request.stderr)

    def attach(self, request: AttachRequest) -> AbstractAsyncContextManager[AgentStream]:
        c = self._running(request.container_id, "attach")
        agent = self._cells.agent(self._index.sandbox(c.sandbox_id))
        return agent.attach_stream(c.id, tty=request.tty, stdin=request.stdin, stdout=request.stdout,
                                   stderr=request.stderr)

    def port(self, sandbox_id: str, port: int) -> AbstractAsyncContextManager[AgentStream]:
        self.check_port_forward(PortForwardRequest(sandbox_id, (port,)))
        return self._cells.agent(self._index.sandbox(sandbox_id)).port_stream(port)
