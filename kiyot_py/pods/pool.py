"""Warm pools: standby cells, launched and their agents answering, that RunPodSandbox
claims instead of waiting for a boot (`[[pools]]` in the settings).

A standby cell is tagged as its pool's (role "standby", the pool's name, the node) and
is owned by no sandbox; the provider's tags are the pool's only record, so a restart
finds the pool again by them. A claim takes a cell out of the ready list at once (one
event loop: two claims never get one cell) and the sandbox records it before anything
else (cells.py): after a kill -9, a standby-tagged cell that a sandbox record names is
that sandbox's, never the pool's. Each pool refills in the background to its size. The
orphan collector never touches a standby cell; the pool terminates the ones it does not
keep (a pool that shrank or went away, a cell that never came up).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field

import structlog

from kiyot_py.config import PoolSettings, Settings
from kiyot_py.errors import KiyotError
from kiyot_py.model import Cell
from kiyot_py.pods.cells import Cells
from kiyot_py.pods.index import Index
from kiyot_py.providers.base import ROLE_STANDBY, TAG_NODE, TAG_POOL, TAG_ROLE, CellShape

log = structlog.get_logger("kiyot.pods.pool")

RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # seconds between refills that failed, doubling


@dataclass
class _Pool:
    settings: PoolSettings
    ready: list[Cell] = field(default_factory=list)  # oldest first: claimed first
    warming: int = 0  # cells being launched or brought up
    coming: dict[str, Cell] = field(default_factory=dict)  # of those, the ones launched: id -> cell
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.settings.name


class WarmPools:
    def __init__(self, settings: Settings, cells: Cells, index: Index) -> None:
        self._node = settings.node_name
        self._cells = cells
        self._index = index
        # The smallest shape first: a pod gets the smallest standby cell that fits it.
        ordered = sorted((p for p in settings.pools if p.size > 0), key=lambda p: (p.cpu_millis, p.memory_mib))
        self._pools = {p.name: _Pool(p) for p in ordered}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()  # a standby cell came up, or one coming up failed

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Each pool's (ready, configured size)."""
        return {name: (len(p.ready), p.settings.size) for name, p in self._pools.items()}

    async def claim(self, shape: CellShape, wait: float) -> Cell | None:
        """A ready standby cell that fits the shape, now out of its pool. When none is ready
        but one that fits is coming up, that one once it is up (for at most `wait` seconds):
        it is further along than a launch for the pod would be. None when none fits."""
        deadline = asyncio.get_running_loop().time() + wait
        async with self._changed:
            while True:
                cell = self._take(shape)
                left = deadline - asyncio.get_running_loop().time()
                if cell is not None or left <= 0 or not self._coming_fits(shape):
                    return cell
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    def _take(self, shape: CellShape) -> Cell | None:
        provider = self._cells.provider
        for pool in self._pools.values():
            for i, cell in enumerate(pool.ready):
                if provider.fits(cell, shape):
                    del pool.ready[i]
                    pool.wake.set()
                    return cell
        return None

    def _coming_fits(self, shape: CellShape) -> bool:
        provider = self._cells.provider
        return any(provider.fits(cell, shape) for pool in self._pools.values() for cell in pool.coming.values())

    async def start(self) -> None:
        """Take back the standby cells a previous run left, then keep each pool full."""
        provider = self._cells.provider
        found = await provider.list_cells({TAG_NODE: self._node, TAG_ROLE: ROLE_STANDBY})
        owned = {sb.cell.id for sb in self._index.sandboxes.values() if sb.cell is not None}
        kept: dict[str, int] = {}
        for cell in sorted(found, key=lambda c: c.launched_at):
            if cell.id in owned:
                continue  # claimed just before a restart: its sandbox's (cells.py takes it over)
            pool = self._pools.get(cell.tags.get(TAG_POOL, ""))
            if pool is None or kept.get(pool.name, 0) >= pool.settings.size:
                log.info("terminating a standby cell no pool keeps", cell=cell.id, pool=cell.tags.get(TAG_POOL, ""))
                self._spawn(self._terminate(cell.id))
                continue
            kept[pool.name] = kept.get(pool.name, 0) + 1
            pool.warming += 1
            self._spawn(self._bring_up(pool, cell))
        for pool in self._pools.values():
            self._spawn(self._fill(pool))

    async def close(self) -> None:
        """Stop refilling; standby cells keep running (a restart finds them by their tags)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- pieces -------------------------------------------------------------------------

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, pool: _Pool) -> None:
        delay = RETRY_FIRST
        while True:
            missing = pool.settings.size - len(pool.ready) - pool.warming
            if missing <= 0:
                pool.wake.clear()
                await pool.wake.wait()
                continue
            pool.warming += missing
            results = await asyncio.gather(*(self._add(pool) for _ in range(missing)))
            if all(results):
                delay = RETRY_FIRST
                continue
            await asyncio.sleep(delay)  # a cloud out of capacity is not asked again at once
            delay = min(delay * 2, RETRY_MAX)

    async def _add(self, pool: _Pool) -> bool:
        """Launch one standby cell for the pool (counted in `warming` by the caller)."""
        s = pool.settings
        shape = CellShape(cpu_millis=s.cpu_millis, memory_bytes=s.memory_mib * 2**20, architecture=s.architecture,
                          tags={TAG_NODE: self._node, TAG_ROLE: ROLE_STANDBY, TAG_POOL: s.name})
        try:
            cell = await self._cells.provider.launch(shape, uuid.uuid4().hex)
        except KiyotError as exc:
            pool.warming -= 1
            log.warning("launching a standby cell failed", pool=s.name, error=str(exc))
            return False
        return await self._bring_up(pool, cell)

    async def _bring_up(self, pool: _Pool, cell: Cell) -> bool:
        """Bring a standby cell up and into the ready list (counted in `warming`)."""
        t0 = time.monotonic()
        pool.coming[cell.id] = cell
        up: Cell | None = None
        try:
            up = await self._cells.bring_up(cell, lambda _: None)
        except KiyotError as exc:
            log.warning("a standby cell did not come up; terminating it", pool=pool.name, cell=cell.id,
                        error=str(exc))
        finally:
            pool.warming -= 1
            del pool.coming[cell.id]
            if up is not None:
                pool.ready.append(up)
            async with self._changed:  # claims waiting for it (or, if it failed, for nothing now)
                self._changed.notify_all()
        if up is None:
            await self._terminate(cell.id)
            return False
        log.info("standby cell ready", pool=pool.name, cell=cell.id, seconds=round(time.monotonic() - t0, 3),
                 ready=len(pool.ready), size=pool.settings.size)
        return True

    async def _terminate(self, cell_id: str) -> None:
        try:
            await asyncio.shield(self._cells.terminate(cell_id))
        except KiyotError as exc:  # still tagged standby: the next start terminates it
            log.warning("terminating a standby cell failed", cell=cell_id, error=str(exc))
