"""The cell collector: what the records and the provider disagree on, made right.

- Pod cells of this node that no sandbox owns are terminated. Only cells tagged as a
  pod's are ever touched (a standby cell is the warm pool's), never another node's, only
  once two passes in a row saw them orphaned, and only once older than a grace period: a
  cell being launched is recorded on its sandbox only after the provider answers.

Ready sandboxes whose cell went away are cellwatch.py's business.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from kiyot_py.pods.index import Index
from kiyot_py.providers.base import ROLE_POD, TAG_NODE, TAG_ROLE, TAG_SANDBOX, Provider

log = structlog.get_logger("kiyot.pods.gc")

GC_INTERVAL = 60.0
GC_GRACE = 120.0  # seconds a cell is left alone after its launch


class OrphanCollector:
    def __init__(self, index: Index, provider: Provider, node_name: str, interval: float = GC_INTERVAL,
                 grace: float = GC_GRACE) -> None:
        self._interval = interval
        self._grace = grace
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
        log.debug("orphan collection pass", cells=len(cells), orphans=len(orphans & self._suspects))
        for cell_id in orphans & self._suspects:
            log.info("terminating orphan cell", cell=cell_id)
            await self._provider.terminate(cell_id)
        self._suspects = orphans - self._suspects
