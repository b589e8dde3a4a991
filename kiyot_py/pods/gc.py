"""The cell collector: what the records and the provider disagree on, made right.

- Pod cells of this node that no sandbox owns are terminated. Only cells tagged as a
  pod's are ever touched (a standby cell is the warm pool's), never another node's, only
  once two passes in a row saw them orphaned, and only once older than a grace period: a
  cell being launched is recorded on its sandbox only after the provider answers.
- Ready sandboxes whose cell is gone (an instance terminated behind the node's back) are
  marked lost, also after two passes in a row: not ready, their containers not running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from kiyot_py.model import Sandbox
from kiyot_py.pods.index import Index
from kiyot_py.providers.base import ROLE_POD, TAG_NODE, TAG_ROLE, TAG_SANDBOX, Provider

log = structlog.get_logger("kiyot.pods.gc")

GC_INTERVAL = 60.0
GC_GRACE = 120.0  # seconds a cell is left alone after its launch


class OrphanCollector:
    def __init__(self, index: Index, provider: Provider, node_name: str, interval: float = GC_INTERVAL,
                 grace: float = GC_GRACE, lost: Callable[[Sandbox], Awaitable[None]] | None = None) -> None:
        self._interval = interval
        self._grace = grace
        self._lost = lost
        self._missing: set[str] = set()  # sandboxes whose cell the last pass did not find
        self._index = index
        self._provider = provider
        self._node = node_name
        self._suspects: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cell-gc")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.collect()
            except Exception:
                log.exception("cell garbage collection failed")
            await asyncio.sleep(self._interval)

    async def collect(self) -> None:
        sandboxes = self._index.sandboxes.values()
        owned = {sb.cell.id for sb in sandboxes if sb.cell is not None}
        creating = {sb.id for sb in sandboxes if sb.phase == "creating"}
        cells = await self._provider.list_cells({TAG_NODE: self._node})
        young = time.time_ns() - int(self._grace * 1e9)
        orphans = {
            cell.id for cell in cells
            # Cells from before roles were tagged are pods' too.
            if cell.tags.get(TAG_ROLE, ROLE_POD) == ROLE_POD
            and cell.id not in owned and cell.tags.get(TAG_SANDBOX, cell.sandbox_id) not in creating
            and cell.launched_at <= young
        }
        for cell_id in orphans & self._suspects:
            log.info("terminating orphan cell", cell=cell_id)
            await self._provider.terminate(cell_id)
        self._suspects = orphans - self._suspects
        await self._find_lost({c.id for c in cells if c.state != "terminated"})

    async def _find_lost(self, live: set[str]) -> None:
        ready = {sb.id: sb for sb in self._index.ready_sandboxes()}
        missing = {sb_id for sb_id, sb in ready.items() if sb.cell is not None and sb.cell.id not in live}
        confirmed = [ready[sb_id] for sb_id in missing & self._missing]
        self._missing = missing - self._missing
        if not confirmed or self._lost is None:
            return
        described = await self._provider.describe([sb.cell.id for sb in confirmed if sb.cell is not None])
        for sb in confirmed:
            assert sb.cell is not None
            cell = described.get(sb.cell.id)
            if cell is None or cell.state == "terminated":
                log.warning("the cell of a ready sandbox is gone", sandbox=sb.id, cell=sb.cell.id)
                await self._lost(sb)
