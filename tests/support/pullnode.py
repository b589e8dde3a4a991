"""The node's side of image pulls, for tests and benches that run an agent with no node.

A content store filled from the test registry by the node's own client, served by the
node's real pull path over mutual TLS on 127.0.0.1, with a CA (NodePKI) whose cell
identities the agents use. `source(img, cell_id)` fetches an image into the store,
grants that cell its blobs, and gives the body of the agent's pull request.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from kiyot_py.pki import NodePKI
from kiyot_py.platforms import Platform
from kiyot_py.registry.client import RegistryClient
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.content import ContentStore
from kiyot_py.registry.pullpath import PullGrants, PullPath
from kiyot_py.registry.reference import parse_reference
from tests.support.images import TestImage, host_arch


class PullNode:
    def __init__(self, workdir: Path, node_name: str = "test-node") -> None:
        self.pki = NodePKI(workdir / "pki", node_name)
        self.content = ContentStore(workdir / "content")
        self.grants = PullGrants()
        self._fetched: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pull-node", daemon=True)
        self._thread.start()
        self.pull_path = PullPath(self.content, self.grants, self.pki.pull_path_context(["127.0.0.1"]))
        self._run(self.pull_path.start("127.0.0.1", 0))
        self._client = RegistryClient()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(300)

    @property
    def address(self) -> str:
        return self.pull_path.address

    def fetch(self, img: TestImage) -> str:
        """Fetch `img` (this host's platform) into the store, as PullImage does; its
        platform manifest digest, what a cell pulls and runs."""
        if img.digest_ref not in self._fetched:
            resolved = self._run(self._client.resolve(
                parse_reference(img.digest_ref), platform=Platform("linux", host_arch()),
                config=RegistriesConfig(), store=self.content))
            self._fetched[img.digest_ref] = resolved.platform_manifest_digest
        return self._fetched[img.digest_ref]

    def source(self, img: TestImage, cell_id: str) -> dict[str, str]:
        """The agent's pull body for `img`, the image granted to `cell_id` first."""
        digest = self.fetch(img)
        self.grants.grant(cell_id, self.content.manifest_blobs(digest))
        repository = parse_reference(img.digest_ref).repository
        return {"ref": f"{self.address}/{repository}@{digest}", "digest": digest}

    def close(self) -> None:
        self._run(self.pull_path.stop())
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
