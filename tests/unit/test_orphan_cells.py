"""Pod cells that no sandbox owns are collected, but only after two passes agree;
another node's cells and standby cells are never touched."""

from __future__ import annotations

from pathlib import Path

from kiyot_py.pods.gc import OrphanCollector
from kiyot_py.pods.index import Index
from kiyot_py.providers.base import CellShape
from kiyot_py.store import Store
from tests.support.fakes import FakeProvider


async def test_orphans_go_after_two_passes_and_others_stay(tmp_path: Path):
    provider = FakeProvider()
    for token, tags in [
        ("orphan" * 4, {"kiyot-node": "me", "kiyot-role": "pod", "kiyot-sandbox": "a" * 64}),
        ("theirs" * 4, {"kiyot-node": "other-node", "kiyot-role": "pod", "kiyot-sandbox": "b" * 64}),
        ("standby" * 4, {"kiyot-node": "me", "kiyot-role": "standby"}),
        ("oldstyle" * 4, {"kiyot-node": "me", "kiyot-sandbox": "c" * 64}),  # before roles were tagged
    ]:
        await provider.launch(CellShape(tags=tags), token)
    collector = OrphanCollector(Index(Store(tmp_path / "state.db")), provider, "me")
    await collector.collect()
    assert provider.terminated == []  # one sighting is not enough
    await collector.collect()
    assert sorted(provider.terminated) == ["f" + ("oldstyle" * 4)[:12], "f" + ("orphan" * 4)[:12]]
    await collector.collect()
    assert len(provider.terminated) == 2
    assert {c.tags.get("kiyot-role") for c in provider.cells.values()} == {"pod", "standby"}
