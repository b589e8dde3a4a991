"""Cells that no sandbox owns are collected, but only after two passes agree."""

from __future__ import annotations

from pathlib import Path

from kiyot_py.config import Settings
from kiyot_py.model import Cell
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.runtime import PodRuntime
from kiyot_py.providers.base import TAG_NODE, TAG_SANDBOX
from kiyot_py.registry.client import RegistryClient
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.store import Store


class ProviderDouble:
    """Just enough of a provider: a list of cells, and the deletions asked for."""

    name = "double"

    def __init__(self, cells: list[Cell]) -> None:
        self.cells = cells
        self.deleted: list[str] = []

    async def list_cells(self, tags):
        return [c for c in self.cells if all(c.tags.get(k) == v for k, v in tags.items())]

    async def delete_cell(self, cell_id):
        self.deleted.append(cell_id)
        self.cells = [c for c in self.cells if c.id != cell_id]


def _cell(cell_id: str, node: str) -> Cell:
    return Cell(id=cell_id, sandbox_id=cell_id * 4, address="10.0.0.2", agent_url="http://x",
                token="t", tags={TAG_NODE: node, TAG_SANDBOX: cell_id * 4})


async def test_orphans_go_after_two_passes_and_others_stay(tmp_path: Path):
    settings = Settings(state_dir=tmp_path, node_name="me")
    store = Store(tmp_path / "state.db")
    provider = ProviderDouble([_cell("orphan", "me"), _cell("theirs", "other-node")])
    runtime = PodRuntime(settings, store, provider, ImageManager(store, RegistryClient(), RegistriesConfig.load(None)),
                         http=None)
    await runtime.collect_orphan_cells()
    assert provider.deleted == []  # one sighting is not enough
    await runtime.collect_orphan_cells()
    assert provider.deleted == ["orphan"]  # another node's cell is never touched
    await runtime.collect_orphan_cells()
    assert provider.deleted == ["orphan"]
