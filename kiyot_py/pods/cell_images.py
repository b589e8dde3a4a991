"""Images inside the cells: freeing them on RemoveImage, and what they take (ImageFsInfo)."""

from __future__ import annotations

import asyncio

import structlog

from kiyot_py.agent_client import AgentError, AgentNotFound
from kiyot_py.pods.cells import Cells
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.index import Index

log = structlog.get_logger("kiyot.pods.cell_images")


class CellImages:
    def __init__(self, index: Index, cells: Cells, images: ImageManager) -> None:
        self._index = index
        self._cells = cells
        self._images = images

    async def remove(self, image: str) -> None:
        """Forget the image on the node, and free it in every cell where no container uses it."""
        record = self._images.find(image)
        if record is None:
            return  # RemoveImage is idempotent
        self._images.remove(image)
        users = {c.sandbox_id for c in self._index.containers.values() if c.image_id == record.id}
        cells = [sb for sb in self._index.ready_sandboxes() if sb.id not in users]
        digests = record.platform_digests()  # a cell holds its own platform's
        asks = [(sb, digest) for sb in cells for digest in digests]
        results = await asyncio.gather(
            *(self._cells.agent(sb).remove_image(digest) for sb, digest in asks), return_exceptions=True)
        for (sb, digest), result in zip(asks, results, strict=True):
            if isinstance(result, AgentError) and not isinstance(result, AgentNotFound):
                log.warning("freeing an image in a cell failed", sandbox=sb.id, digest=digest,
                            error=result.message)

    async def usage(self) -> dict[str, dict[str, int]]:
        """What images and containers' writable layers take in the cells, summed:
        {"images": {"bytes", "inodes"}, "containers": {...}}. A cell that does not answer
        counts as nothing (it is being torn down or is lost; its watcher will tell)."""
        sandboxes = self._index.ready_sandboxes()
        answers = await asyncio.gather(*(self._cells.agent(sb).usage() for sb in sandboxes),
                                       return_exceptions=True)
        total = {kind: {"bytes": 0, "inodes": 0} for kind in ("images", "containers")}
        for answer in answers:
            if isinstance(answer, dict):
                for kind, counts in total.items():
                    for key in counts:
                        counts[key] += int((answer.get(kind) or {}).get(key) or 0)
        return total
