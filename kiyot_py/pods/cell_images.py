"""Images inside the cells: putting one in a cell for its container, freeing them on
RemoveImage, and what they take (ImageFsInfo)."""

from __future__ import annotations

import asyncio

import structlog

from kiyot_py.agent_client import AgentClient, AgentError, AgentInvalid, AgentNotFound
from kiyot_py.model import Image, Sandbox
from kiyot_py.pods.cells import Cells
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.index import Index
from kiyot_py.pods.shared_images import SharedImages

log = structlog.get_logger("kiyot.pods.cell_images")


class CellImages:
    def __init__(self, index: Index, cells: Cells, images: ImageManager, shared: SharedImages | None = None) -> None:
        self._index = index
        self._cells = cells
        self._images = images
        self._shared = shared

    async def provide(self, sb: Sandbox, agent: AgentClient, record: Image, platform_digest: str) -> None:
        """Put the image's manifest `platform_digest` in the sandbox's cell: the node's own
        unpack for a cell on its disk; else the cell fetches it, from the pull path (granted
        that manifest and its blobs only) or, a cell of its own, from the registries."""
        assert sb.cell is not None
        if self._shared is not None:
            path, size = await self._shared.prepare(self._images.repository_of(record), platform_digest, record.id)
            try:
                await agent.use_shared_image(platform_digest, str(path), size)
                return
            except AgentInvalid as exc:  # a cell started before the node shared its unpacks
                log.info("the cell takes no shared images; it fetches this one", cell=sb.cell.id, error=exc.message)
        if sb.cell.pull_path:
            assert self._images.content is not None  # a provider with a pull path has a content store
            self._cells.grants.grant(sb.cell.id, self._images.content.manifest_blobs(platform_digest))
        await agent.pull(**self._images.cell_pull(record, sb.cell, platform_digest))

    async def remove(self, image: str) -> None:
        """Forget the image on the node, and free it in every cell where no container uses it
        (and the node's unpacks that neither an image on record nor a container wants: one
        removed while in use goes at a later RemoveImage)."""
        record = self._images.find(image)
        if record is None:
            await self._prune_shared()
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
        await self._prune_shared()

    async def _prune_shared(self) -> None:
        if self._shared is not None:
            wanted = {img.id for img in self._images.list()} | {c.image_id for c in self._index.containers.values()}
            await self._shared.prune(wanted)

    async def usage(self) -> dict[str, dict[str, int]]:
        """What images and containers' writable layers take in the cells, summed:
        {"images": {"bytes", "inodes"}, "containers": {...}}. A cell that does not answer
        counts as nothing (it is being torn down or is lost; its watcher will tell)."""
        sandboxes = self._index.ready_sandboxes()
        answers = await asyncio.gather(*(self._cells.agent(sb).usage() for sb in sandboxes),
                                       return_exceptions=True)
        total = {kind: {"bytes": 0, "inodes": 0} for kind in ("images", "containers")}
        if self._shared is not None:
            answers.append({"images": await asyncio.to_thread(self._shared.usage)})
        for answer in answers:
            if isinstance(answer, dict):
                for kind, counts in total.items():
                    for key in counts:
                        counts[key] += int((answer.get(kind) or {}).get(key) or 0)
        return total
