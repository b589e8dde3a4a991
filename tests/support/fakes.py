"""A fake provider and a fake agent, for unit tests of the pod lifecycle without root.

They keep the contracts the real ones keep (providers/base.py, cells/API.md) in memory:
an idempotent launch by token, cells described and listed by tags; an agent whose
containers move created → running → exited, with an event stream and logs. Each can be
told to fail the next call of a kind, as a cloud or a cell would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kiyot_py.agent_client import AgentConflict, AgentNotFound, AgentTimeout, AgentUnreachable, ExecResult
from kiyot_py.model import Cell, CellFacts, now_ns, to_json
from kiyot_py.providers.base import CellEvent, CellEvents, CellFeatures, CellNotFound, CellShape, Readiness

AGENT_PORT = 9276


class FakeProvider:
    name = "fake"

    def __init__(self, architecture: str = "amd64") -> None:
        self.cells: dict[str, Cell] = {}
        self.launches: dict[str, int] = {}  # token -> times launch was called
        self.terminated: list[str] = []
        self.shapes: list[CellShape] = []
        self.fail_launch: Exception | None = None  # raised by the next launch
        self.fail_terminate: Exception | None = None  # raised by the next terminate
        self.architecture = architecture
        self.allow_privileged = False
        self._next_address = 2
        self.sink: CellEvents | None = None  # where the provider's feed goes (watch_events)
        self.interruptions: list[str] = []  # cells the provider was told are being taken back
        self.ready = Readiness()  # what readiness() answers
        self.running_delay = 0.0  # seconds wait_running takes (a VM's boot)

    @property
    def features(self) -> CellFeatures:
        return CellFeatures(recursive_read_only_mounts=True, privileged=self.allow_privileged, shares_node_disk=True)

    @property
    def default_architecture(self) -> str:
        return self.architecture

    @property
    def pull_path(self) -> None:
        return None

    @property
    def reserved_ports(self) -> frozenset[int]:
        return frozenset({AGENT_PORT})

    async def start(self) -> None:
        pass

    async def readiness(self) -> Readiness:
        return self.ready

    async def launch(self, shape: CellShape, token: str) -> Cell:
        self.launches[token] = self.launches.get(token, 0) + 1
        if self.fail_launch is not None:
            exc, self.fail_launch = self.fail_launch, None
            raise exc
        cell_id = "f" + token[:12]
        if cell_id not in self.cells:
            self.shapes.append(shape)
            address = f"10.0.0.{self._next_address}"
            self._next_address += 1
            self.cells[cell_id] = Cell(
                id=cell_id, sandbox_id=shape.tags.get("kiyot-sandbox", ""), address=address,
                agent_url=f"https://{address}:{AGENT_PORT}", server_name=f"{cell_id}.cells.kiyot", state="pending",
                tags=dict(shape.tags), hostname=cell_id, pull_path="10.0.0.1:5380")
        return _copy(self.cells[cell_id])

    def fits(self, cell: Cell, shape: CellShape) -> bool:
        return shape.architecture in ("", self.architecture)

    async def retag(self, cell_id: str, tags: dict[str, str]) -> None:
        cell = self.cells.get(cell_id)
        if cell is None:
            raise CellNotFound(f"cell {cell_id} does not exist")
        cell.tags.update(tags)
        cell.sandbox_id = cell.tags.get("kiyot-sandbox", "")

    async def wait_running(self, cell_id: str, timeout: float) -> Cell:
        await asyncio.sleep(self.running_delay)
        cell = self.cells.get(cell_id)
        if cell is None:
            raise CellNotFound(f"cell {cell_id} does not exist")
        cell.state = "running"
        return _copy(cell)

    async def terminate(self, cell_id: str) -> None:
        if self.fail_terminate is not None:
            exc, self.fail_terminate = self.fail_terminate, None
            raise exc
        if self.cells.pop(cell_id, None) is not None:
            self.terminated.append(cell_id)

    async def describe(self, cell_ids: list[str]) -> dict[str, Cell]:
        return {i: _copy(self.cells[i]) for i in cell_ids if i in self.cells}

    async def list_cells(self, tags: dict[str, str]) -> list[Cell]:
        return [_copy(c) for c in self.cells.values() if all(c.tags.get(k) == v for k, v in tags.items())]

    def watch_events(self, sink: CellEvents) -> None:
        self.sink = sink

    def interrupted(self, cell: Cell) -> None:
        self.interruptions.append(cell.id)

    def post(self, event: CellEvent) -> None:
        """An event on the provider's feed, as EC2's would arrive through SQS."""
        assert self.sink is not None, "nothing watches the provider's events"
        self.sink(event)

    async def reset(self) -> int:
        n = len(self.cells)
        self.cells.clear()
        return n

    async def close(self) -> None:
        pass


def _copy(cell: Cell) -> Cell:
    return Cell(**{k: getattr(cell, k) for k in cell.__dataclass_fields__})


@dataclass
class FakeContainer:
    body: dict[str, Any]
    state: str = "created"
    exit_code: int = 0
    started_at: int = 0
    finished_at: int = 0
    log: bytearray = field(default_factory=bytearray)
    resources: dict[str, Any] = field(default_factory=dict)  # the limits in force, as the agent records them

    def __post_init__(self) -> None:
        given = self.body.get("spec", {}).get("linux", {}).get("resources", {})
        self.resources = {k: dict(given[k]) for k in ("cpu", "memory", "pids") if k in given}

    def record(self) -> dict[str, Any]:
        return {"id": self.body["id"], "state": self.state, "exit_code": self.exit_code,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "pid": 42 if self.state == "running" else 0,
                "user": {"uid": 0, "gid": 0, "groups": [0]}, "resources": self.resources}


class FakeAgent:
    """One cell's agent, in memory. `facts` is what GET /v1/facts answers."""

    def __init__(self, facts: CellFacts) -> None:
        self.facts_answer = facts
        self.pod: dict[str, Any] | None = None
        self.pulls: list[dict[str, Any]] = []
        self.containers: dict[str, FakeContainer] = {}
        self.removed_images: list[str] = []
        self.unreachable = False  # every call fails as if the cell were gone
        self.exec_answer = ExecResult(0, b"", b"")
        self.exec_times_out = False
        self.resource_updates: list[tuple[str, dict[str, Any]]] = []  # (container id, body) of each update
        self._changed = asyncio.Condition()
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def _reach(self) -> None:
        if self.unreachable:
            raise AgentUnreachable("cell agent http://fake: connection refused")

    def _get(self, cid: str) -> FakeContainer:
        if cid not in self.containers:
            raise AgentNotFound(f"container {cid} not found", status=404, code="not_found")
        return self.containers[cid]

    async def _changed_record(self, c: FakeContainer) -> dict[str, Any]:
        self._events.put_nowait({"type": "container", "container": c.record()})
        async with self._changed:
            self._changed.notify_all()
        return c.record()

    async def health(self, timeout: float = 2.0) -> dict[str, Any]:
        self._reach()
        return {"version": "0.1.0", "api": "v1", "ready": True}

    async def facts(self) -> dict[str, Any]:
        self._reach()
        return to_json(self.facts_answer)

    async def put_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        self._reach()
        self.pod = pod
        return {"etc_dir": "/fake/etc"}

    async def pull(self, **kwargs: Any) -> dict[str, Any]:
        self._reach()
        self.pulls.append(kwargs)
        return {"digest": kwargs.get("digest")}

    async def remove_image(self, digest: str) -> None:
        self._reach()
        self.removed_images.append(digest)

    async def usage(self, timeout: float = 5.0) -> dict[str, Any]:
        self._reach()
        return {"images": {"bytes": 1000, "inodes": 10}, "containers": {"bytes": 50, "inodes": 5}}

    async def create_container(self, body: dict[str, Any]) -> dict[str, Any]:
        self._reach()
        c = self.containers.setdefault(body["id"], FakeContainer(body))
        return c.record()

    async def get_container(self, cid: str) -> dict[str, Any]:
        self._reach()
        return self._get(cid).record()

    async def start_container(self, cid: str) -> dict[str, Any]:
        self._reach()
        c = self._get(cid)
        if c.state != "created":
            raise AgentConflict(f"container {cid} is {c.state}", status=409, code="conflict")
        c.state, c.started_at = "running", now_ns()
        c.log += b"2026-12-01T00:00:00.000000000Z stdout F hello from the fake\n"
        return await self._changed_record(c)

    async def stop_container(self, cid: str, timeout: int, signal: str) -> dict[str, Any]:
        self._reach()
        c = self._get(cid)
        if c.state in ("created", "running"):
            c.state, c.finished_at = "exited", now_ns()
            c.exit_code = 137 if signal == "SIGKILL" or c.body.get("stop_signal") == "SIGKILL" else 143
        return await self._changed_record(c)

    async def delete_container(self, cid: str) -> None:
        self._reach()
        self.containers.pop(cid, None)

    async def update_resources(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        self._reach()
        c = self._get(cid)
        self.resource_updates.append((cid, body))
        if c.state not in ("created", "running"):
            raise AgentConflict(f"container {cid} is {c.state}", status=409, code="conflict")
        c.resources = {k: {**c.resources.get(k, {}), **body.get(k, {})} for k in {*c.resources, *body}}
        return await self._changed_record(c)

    async def exec_sync(self, cid: str, cmd: list[str], timeout: int) -> ExecResult:
        self._reach()
        c = self._get(cid)
        if c.state != "running":
            raise AgentConflict(f"container {cid} is not running", status=409, code="conflict")
        if self.exec_times_out:
            raise AgentTimeout("timed out", status=504, code="timeout")
        return self.exec_answer

    async def logs(self, cid: str, offset: int, follow: bool) -> AsyncIterator[tuple[int, bytes]]:
        self._reach()
        c = self._get(cid)
        at = offset
        while True:
            if at < len(c.log):
                chunk = bytes(c.log[at:])
                yield at, chunk
                at += len(chunk)
            if not follow or c.state == "exited":
                return
            async with self._changed:
                await self._changed.wait()

    async def events(self, heartbeat_timeout: float = 15.0) -> AsyncIterator[dict[str, Any]]:
        self._reach()
        yield {"type": "snapshot", "containers": [c.record() for c in self.containers.values()]}
        while True:
            event = await self._events.get()
            if event.get("type") == "break":
                raise AgentUnreachable("cell agent http://fake: events: connection reset")
            yield event

    def break_stream(self) -> None:
        """Cut the event stream: the node reconnects and gets a new snapshot."""
        self._events.put_nowait({"type": "break"})

    def announce(self, kind: str, action: str = "terminate", when: str = "2026-12-02T10:00:00Z") -> None:
        """A notice from the instance's metadata service, as the agent reports it."""
        self._events.put_nowait({"type": "notice", "notice": {"kind": kind, "action": action, "time": when,
                                                              "seen_at": now_ns()}})

    def push_stats(self, body: Any) -> None:
        """A sample of the cell, as the agent pushes it (the body of GET /v1/stats)."""
        self._events.put_nowait({"type": "stats", "stats": body})


class FakeAgents:
    """The agent factory: one FakeAgent per cell, made on first use."""

    def __init__(self, facts: CellFacts | None = None) -> None:
        self.facts = facts or CellFacts(architecture="amd64", kernel="6.1.0",
                                        capabilities=["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"])
        self.by_cell: dict[str, FakeAgent] = {}
        self.new_ones_unreachable = False  # cells whose agent never comes up

    def __call__(self, cell: Cell) -> FakeAgent:
        if cell.id not in self.by_cell:
            self.by_cell[cell.id] = FakeAgent(self.facts)
            self.by_cell[cell.id].unreachable = self.new_ones_unreachable
        return self.by_cell[cell.id]


