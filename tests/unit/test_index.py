"""The index's sandbox gate: container verbs together, a sandbox's stop alone."""

from __future__ import annotations

import asyncio

from kiyot_py.pods.index import SandboxGate


async def test_stop_waits_for_container_verbs_and_they_wait_for_it():
    gate, order = SandboxGate(), []
    release_creates = asyncio.Event()

    async def create(name: str) -> None:
        async with gate.shared():
            order.append(f"{name} in")
            await release_creates.wait()
            order.append(f"{name} out")

    async def stop() -> None:
        async with gate.exclusive():
            order.append("stop in")
            await asyncio.sleep(0.01)
            order.append("stop out")

    creates = [asyncio.create_task(create(n)) for n in ("a", "b")]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(stop())
    await asyncio.sleep(0.01)
    assert order == ["a in", "b in"]  # two creates at once; the stop waits for both
    late = asyncio.create_task(create("late"))
    await asyncio.sleep(0.01)
    release_creates.set()
    await asyncio.gather(*creates, stopping, late)
    # The stop goes before the verb that came after it, and alone.
    assert order == ["a in", "b in", "a out", "b out", "stop in", "stop out", "late in", "late out"]
