"""Whether the cells of ready sandboxes still run, and why not when they stop.

A cell is a VM that the cloud may take away: a spot instance reclaimed, an instance
terminated or stopped by someone else. Only the provider's word on the instance decides
that a cell is gone, never a silent agent (a network blip is not a dead container):

- **Every `cell_watch_interval`** the cells of all ready sandboxes are described in one
  provider call. A cell the provider says is terminated or stopped is lost at once; one
  it no longer knows at all, after two rounds in a row.
- **Sooner** when something hints at it: a cell's event stream broke (the round comes
  early, at most once a second), or the provider's own event feed (EC2's via SQS) says an
  instance is stopping or terminating.
- **Notices** (a spot interruption two minutes ahead, a rebalance recommendation), from
  the cell's agent or the provider's feed, are recorded on the sandbox's cell as heard; a
  spot interruption also tells the provider, which keeps new cells off that capacity.

A lost sandbox turns NOTREADY and its containers EXITED with 137 and a reason that says
what happened, so that the kubelet makes the pod a new sandbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from kiyot_py.model import SANDBOX_READY, Cell, Sandbox
from kiyot_py.pods.index import Index
from kiyot_py.providers.base import CellEvent, Provider

log = structlog.get_logger("kiyot.pods.cellwatch")

SPOT_INTERRUPTED = "SpotInterrupted"
INSTANCE_TERMINATED = "InstanceTerminated"
INSTANCE_STOPPED = "InstanceStopped"
EARLIEST_RECHECK = 1.0  # seconds between rounds brought forward by hints

# What happened to a lost sandbox's cell: its containers' reason and message.
Lost = Callable[[Sandbox, Cell | None, str, str], Awaitable[None]]


def why_gone(recorded: Cell, now: Cell | None) -> tuple[str, str]:
    """(reason, message) for a cell that runs no more: `recorded` as the node knew it,
    `now` as the provider describes it (None: it knows it no more)."""
    what = f"the cell's instance {recorded.id}"
    spot = [n for n in recorded.notices if n.get("kind") == "spot-interruption"]
    said = now.state_reason if now is not None else ""
    if now is not None and now.state == "stopped":
        reason, message = INSTANCE_STOPPED, f"{what} was stopped"
    elif spot or said.startswith("Server.SpotInstance"):
        reason, message = SPOT_INTERRUPTED, f"{what} was taken back by EC2 (spot interruption)"
    elif now is None:
        reason, message = INSTANCE_TERMINATED, f"{what} no longer exists"
    else:
        reason, message = INSTANCE_TERMINATED, f"{what} was terminated"
    if said:
        message += f": {said}"
    if spot:
        first = spot[0]
        message += f" (notice via {first.get('source', '?')}: {first.get('action', '')} at {first.get('time', '?')})"
    return reason, message


class CellWatch:
    def __init__(self, index: Index, provider: Provider, interval: float, lost: Lost) -> None:
        self._index = index
        self._provider = provider
        self._interval = interval
        self._lost = lost
        self._missing: set[str] = set()  # cells of ready sandboxes the last round did not find
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._provider.watch_events(self.provider_event)
        self._task = asyncio.create_task(self._loop(), name="cell-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- hints ----------------------------------------------------------------------------

    def check_soon(self) -> None:
        """Something suggests a cell may be gone (its event stream broke): look now."""
        self._wake.set()

    def notice(self, sb: Sandbox, notice: dict[str, Any], source: str) -> None:
        """The provider announced it will take the cell: recorded on it, once per kind."""
        cell = sb.cell
        if cell is None or any(n.get("kind") == notice.get("kind") for n in cell.notices):
            return
        heard = {"kind": str(notice.get("kind", "")), "action": str(notice.get("action", "")),
                 "time": str(notice.get("time", "")), "source": source, "heard_at": str(time.time_ns())}
        cell.notices.append(heard)
        self._index.save(sb)
        if heard["kind"] == "spot-interruption":
            self._provider.interrupted(cell)
        log.warning("the cell's provider announced it will take it", sandbox=sb.id, cell=cell.id, **heard)

    def provider_event(self, event: CellEvent) -> None:
        """What the provider's own feed says of a cell (EC2: EventBridge through SQS)."""
        sb = self._sandbox_of(event.cell_id)
        if sb is None:
            return
        if event.kind == "state":
            if event.state in ("stopping", "stopped", "shutting-down", "terminated"):
                log.info("the provider says a cell is going", sandbox=sb.id, cell=event.cell_id, state=event.state)
                self.check_soon()
            return
        self.notice(sb, {"kind": event.kind, "action": event.action, "time": event.time}, event.source)

    # -- rounds ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            wait = last + EARLIEST_RECHECK - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last = loop.time()
            try:
                await self.check()
            except Exception as exc:  # the provider is unreachable: the next round asks again
                log.warning("cannot tell whether cells still run", error=str(exc))

    async def check(self) -> None:
        ready = {sb.cell.id: sb for sb in self._index.ready_sandboxes() if sb.cell is not None}
        if not ready:
            self._missing = set()
            return
        described = await self._provider.describe(list(ready))
        missing = set()
        for cell_id, sb in ready.items():
            now = described.get(cell_id)
            if now is None:
                missing.add(cell_id)
                if cell_id not in self._missing:
                    continue  # not yet: EC2 may not list an instance it just made (eventual consistency)
            elif not now.gone:
                continue
            if sb.cell is None or sb.state != SANDBOX_READY:
                continue  # stopped meanwhile, by the kubelet
            reason, message = why_gone(sb.cell, now)
            log.warning("the cell of a ready sandbox is gone", sandbox=sb.id, cell=cell_id, reason=reason,
                        message=message)
            await self._lost(sb, now, reason, message)
        self._missing = missing

    def _sandbox_of(self, cell_id: str) -> Sandbox | None:
        return next((sb for sb in self._index.ready_sandboxes() if sb.cell is not None and sb.cell.id == cell_id),
                    None)
