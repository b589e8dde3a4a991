"""The node's own read-only unpack of each image, for cells that share its disk.

A local cell would otherwise fetch and unpack every image itself (skopeo, the layer
check, umoci: about a third of a second for each container in a new cell). The node
does it once per image with the agent's own image store (kiyot_cell.images): the same
fetch by digest from the pull path, as a client of its own (`SHARED_ID`, granted what it
fetches like a cell), the same check of every layer, the same unpack, into
<state>/shared-images. A cell's agent then takes the tree as the read-only lower layer
of its containers' overlays (POST /v1/images/shared); nothing writes to it. Cells on a
disk of their own (EC2) fetch as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kiyot_cell.config import AgentConfig
from kiyot_cell.errors import ApiError
from kiyot_cell.images import ImageStore
from kiyot_cell.records import atomic_write_json
from kiyot_py.agent_client import agent_error
from kiyot_py.pki import NodePKI
from kiyot_py.providers.base import PullEndpoint
from kiyot_py.registry.content import ContentStore
from kiyot_py.registry.pullpath import PullGrants

SHARED_ID = "node-images"  # the pull path's client name for this store (never a cell's id)


def shared_root(state_dir: Path) -> Path:
    return state_dir / "shared-images"


def unpacked_dir(state_dir: Path) -> Path:
    """Where the unpacked images are (what a local cell's agent gets as --shared-images)."""
    return _config(shared_root(state_dir)).images_dir / "unpacked"


def _config(root: Path) -> AgentConfig:
    return AgentConfig(host="", port=0, tls_dir=root / "tls", state_dir=root,
                       skopeo_path=shutil.which("skopeo") or "skopeo", umoci_path=shutil.which("umoci") or "umoci",
                       helpers_die_with_agent=False)


class SharedImages:
    def __init__(self, state_dir: Path, pki: NodePKI, pull_path: PullEndpoint, grants: PullGrants,
                 content: ContentStore) -> None:
        root = shared_root(state_dir)
        if not (root / "tls" / "cell.crt").exists():
            pki.issue_cell(SHARED_ID).write(root / "tls")
        self._store = ImageStore(_config(root))
        self._store.load()
        # Manifest digest -> the image (id) it belongs to: what says an unpack is still wanted.
        self._owners_file = root / "owners.json"
        self._owners: dict[str, str] = json.loads(self._owners_file.read_text()) if self._owners_file.exists() else {}
        self._pull_path = pull_path
        self._grants = grants
        self._content = content
        self.unpacked_dir = unpacked_dir(state_dir)

    async def prepare(self, repository: str, platform_digest: str, image_id: str) -> tuple[Path, int]:
        """The unpacked tree of manifest `platform_digest` of image `image_id` (fetched,
        checked and unpacked the first time), and the image's size."""
        if self._owners.get(platform_digest) != image_id:
            self._owners[platform_digest] = image_id  # before the unpack: a crash never hides one
            atomic_write_json(self._owners_file, self._owners)
        self._grants.grant(SHARED_ID, self._content.manifest_blobs(platform_digest))
        ref = f"{self._pull_path.host}:{self._pull_path.port}/{repository}@{platform_digest}"
        try:
            pulled = await self._store.pull({"digest": platform_digest, "ref": ref})
            return await self._store.unpacked(platform_digest), int(pulled["size"])
        except ApiError as exc:
            raise agent_error(exc.status, exc.code, exc.message) from None

    async def prune(self, wanted_images: set[str]) -> None:
        """Remove the unpacks of every image not in `wanted_images` (ids on record or of a
        container): the overlays of a container's cell read its tree for as long as it lives."""
        for digest in [d for d in self._store.images if self._owners.get(d) not in wanted_images]:
            await self._store.remove(digest, in_use=False)
            self._owners.pop(digest, None)
            atomic_write_json(self._owners_file, self._owners)

    def usage(self) -> dict[str, int]:
        return self._store.usage()
