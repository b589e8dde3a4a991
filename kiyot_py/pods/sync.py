"""Keeping the node's records in step with the cells: a watcher per cell, a log shipper
per container, and what the node does when a cell is lost.

A cell's agent streams every change of its container records; the watcher applies them
(states only move forward), keeps the usage figures it pushes (`stats.py`) and removes
containers the node never recorded. Each started container's log is copied to the
kubelet's file on the node by a LogShipper.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from kiyot_py.agent_client import AgentClient, AgentError, AgentNotFound
from kiyot_py.model import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    SANDBOX_NOTREADY,
    Container,
    Sandbox,
    now_ns,
)
from kiyot_py.pods.cells import Cells
from kiyot_py.pods.cellwatch import CellWatch
from kiyot_py.pods.index import Index
from kiyot_py.pods.logs import LogShipper
from kiyot_py.pods.stats import StatsCache

log = structlog.get_logger("kiyot.pods.sync")

_AGENT_STATES = {
    "created": CONTAINER_CREATED,
    "running": CONTAINER_RUNNING,
    "exited": CONTAINER_EXITED,
    "unknown": CONTAINER_UNKNOWN,
}
# States only move forward; an event that arrives late never undoes a newer one.
_RANK = {CONTAINER_CREATED: 0, CONTAINER_RUNNING: 1, CONTAINER_EXITED: 2, CONTAINER_UNKNOWN: 2}

BeforeExit = Callable[[Container, Sandbox, AgentClient], Awaitable[None]]
LOG_SETTLE_TIMEOUT = 2.0  # seconds an exit waits for the container's last log bytes
LOG_DRAIN_TIMEOUT = 5.0  # seconds a stopping sandbox waits for its logs


class CellSync:
    def __init__(self, index: Index, cells: Cells, stats: StatsCache, watch: CellWatch | None = None,
                 before_exit: BeforeExit | None = None) -> None:
        self._index = index
        self.stats = stats  # fed by the watchers
        # What must happen before the node reports a container exited (a remote cell's
        # termination message read back into the kubelet's file).
        self._before_exit = before_exit
        self._cells = cells
        self._cellwatch = watch  # told of notices and of broken streams
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._shippers: dict[str, LogShipper] = {}
        # Containers asked of an agent and not recorded yet: not strays.
        self.in_flight: set[str] = set()

    async def close(self) -> None:
        """Stop watching and shipping; cells and containers keep running."""
        tasks = list(self._watchers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self._shippers.values()), return_exceptions=True)

    # -- records ----------------------------------------------------------------------

    def apply(self, c: Container, record: dict[str, Any], save: bool = True) -> None:
        """Take what the agent says of a container, unless it is older than what we know."""
        state = _AGENT_STATES.get(record.get("state", ""), CONTAINER_UNKNOWN)
        if _RANK[state] < _RANK[c.state]:
            return
        before = (c.state, c.pid, c.exit_code, c.reason, c.started_at, c.finished_at, c.resources)
        c.state = state
        c.pid = int(record.get("pid") or 0)
        c.exit_code = int(record.get("exit_code") or 0)
        c.reason = record.get("reason") or ""
        c.message = record.get("message") or ""
        c.started_at = int(record.get("started_at") or 0)
        c.finished_at = int(record.get("finished_at") or 0)
        user = record.get("user") or {}
        if user:
            c.uid, c.gid, c.groups = int(user["uid"]), int(user["gid"]), [int(g) for g in user["groups"]]
        if isinstance(record.get("resources"), dict):  # the limits in force in the cell
            c.resources = record["resources"]
        if save and before != (c.state, c.pid, c.exit_code, c.reason, c.started_at, c.finished_at, c.resources):
            self._index.save_if_known(c)

    async def apply_exit(self, c: Container, record: dict[str, Any]) -> None:
        """Apply a record; an exit only once its log is on the node (bounded wait).

        A reader that sees the container exited reads its log file next, as the kubelet
        and critest do: with containerd the last line is there by then, so here too."""
        ending = record.get("state") in ("exited", "unknown") and c.state not in (CONTAINER_EXITED, CONTAINER_UNKNOWN)
        shipper = self._shippers.get(c.id)
        if shipper is not None and ending:
            await shipper.wait(LOG_SETTLE_TIMEOUT)
        if ending and self._before_exit is not None:
            sb = self._index.find_sandbox(c.sandbox_id)
            if sb is not None and sb.cell is not None:
                try:
                    await self._before_exit(c, sb, self._cells.agent(sb))
                except OSError as exc:
                    log.warning("before the exit of a container", container=c.id, error=str(exc))
        self.apply(c, record)

    def cell_lost(self, sb: Sandbox, reason: str, message: str = "", cell_state: str = "terminated") -> None:
        """The cell runs no more: its sandbox is not ready, and what ran in it was killed
        with it (EXITED 137, as a container killed by SIGKILL), for `reason`."""
        for c in self._index.containers_of(sb.id):
            if c.state in (CONTAINER_CREATED, CONTAINER_RUNNING):
                c.state = CONTAINER_EXITED
                c.finished_at = c.finished_at or now_ns()
                c.exit_code = c.exit_code or 137
                c.reason = reason
                c.message = message
                self._index.save(c)
        sb.state = SANDBOX_NOTREADY
        if sb.cell is not None:
            sb.cell.state = cell_state
        self._index.save(sb)
        self.stats.forget_sandbox(sb.id)

    # -- watchers ---------------------------------------------------------------------

    def watch(self, sb: Sandbox) -> None:
        self._watchers[sb.id] = asyncio.create_task(self._watch(sb), name=f"watch-{sb.id[:12]}")

    async def unwatch(self, sandbox_id: str) -> None:
        task = self._watchers.pop(sandbox_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self, sb: Sandbox) -> None:
        agent = self._cells.agent(sb)
        delay = 0.1
        while True:
            try:
                async for event in agent.events():
                    delay = 0.1
                    if event.get("type") == "snapshot":
                        records = event.get("containers", [])
                        for notice in event.get("notices", []):
                            self._notice(sb, notice)
                        await self._remove_strays(sb, agent, records)
                        await self._mark_missing(sb, agent, records)
                    elif event.get("type") == "container":
                        records = [event["container"]]
                    elif event.get("type") == "notice":
                        self._notice(sb, event.get("notice") or {})
                        continue
                    elif event.get("type") == "stats":
                        self.stats.apply(sb.id, event.get("stats"))
                        continue
                    else:
                        continue
                    for record in records:
                        c = self._index.containers.get(record.get("id", ""))
                        if c is not None:
                            await self.apply_exit(c, record)
            except AgentError as exc:
                log.debug("event stream broke; reconnecting", sandbox=sb.id, error=exc.message)
                if self._cellwatch is not None:
                    self._cellwatch.check_soon()  # is its cell still there? the provider says
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _notice(self, sb: Sandbox, notice: dict[str, Any]) -> None:
        if self._cellwatch is not None and isinstance(notice, dict):
            self._cellwatch.notice(sb, notice, source="agent")

    async def _remove_strays(self, sb: Sandbox, agent: AgentClient, records: list[dict[str, Any]]) -> None:
        """Containers a cell holds that the node never recorded (a crash cut a create short).

        The kubelet never heard of them and makes its own again, so they would only run on
        unseen; every snapshot (each time the watcher connects) clears them.
        """
        for record in records:
            cid = record.get("id", "")
            if cid and cid not in self._index.containers and cid not in self.in_flight:
                log.info("removing a container the node never recorded", sandbox=sb.id, container=cid)
                try:
                    await agent.delete_container(cid)
                except AgentError as exc:
                    log.warning("removing stray container failed", container=cid, error=exc.message)

    async def _mark_missing(self, sb: Sandbox, agent: AgentClient, records: list[dict[str, Any]]) -> None:
        """Containers the node recorded that the cell no longer holds (its agent's state
        was lost): they run no more, and saying so beats reporting them running for ever.

        A snapshot may predate a create that the node recorded since: the agent is asked
        once more about each one, and only a 404 counts."""
        held = {record.get("id", "") for record in records}
        for c in self._index.containers_of(sb.id):
            if c.state not in (CONTAINER_CREATED, CONTAINER_RUNNING) or c.id in held or c.id in self.in_flight:
                continue
            try:
                await agent.get_container(c.id)
                continue
            except AgentNotFound:
                pass
            except AgentError as exc:
                log.debug("cannot tell whether the cell holds a container", container=c.id, error=exc.message)
                continue
            if c.state in (CONTAINER_CREATED, CONTAINER_RUNNING):
                log.warning("the cell no longer holds a container", sandbox=sb.id, container=c.id)
                c.state = CONTAINER_UNKNOWN
                c.finished_at = c.finished_at or now_ns()
                c.reason = "NotInCell"
                c.message = "the cell's agent no longer holds this container"
                self._index.save(c)

    # -- logs ---------------------------------------------------------------------------

    def ship_logs(self, c: Container, sb: Sandbox) -> None:
        if c.log_path and c.id not in self._shippers:
            shipper = LogShipper(c, self._cells.agent(sb), self._index.save_if_known)
            self._shippers[c.id] = shipper
            shipper.start()

    async def drain_logs(self, sandbox_id: str) -> None:
        """Let the last log lines of a sandbox reach the node (bounded) before its cell goes."""
        shippers = [self._shippers[c.id] for c in self._index.containers_of(sandbox_id) if c.id in self._shippers]
        await asyncio.gather(*(s.wait(LOG_DRAIN_TIMEOUT) for s in shippers))

    async def reopen_log(self, container_id: str) -> None:
        shipper = self._shippers.get(container_id)
        if shipper is not None:
            await shipper.reopen()

    async def stop_logs(self, container_id: str) -> None:
        shipper = self._shippers.pop(container_id, None)
        if shipper is not None:
            await shipper.stop()
