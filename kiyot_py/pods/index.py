"""The node's records of sandboxes and containers: in memory, saved on every change.

List and Status answer from here, never by a round trip to a cell: the kubelet relists
every second. Each sandbox has a gate: container verbs pass it together, stopping or
removing the sandbox passes it alone, so that no container is made in a cell that is
being torn down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from kiyot_py.errors import NotFound
from kiyot_py.model import SANDBOX_READY, Container, Sandbox
from kiyot_py.pods.events import LifecycleEvents
from kiyot_py.store import Store

R = TypeVar("R", Sandbox, Container)


class SandboxGate:
    """Many shared holders at once, or one exclusive holder (a small readers-writer lock).

    An exclusive waiter goes first: verbs that arrive after a stop wait for it, so a
    stream of container verbs cannot hold a sandbox's stop off for ever."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive and not self._exclusive_waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._exclusive_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()


class Index:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.sandboxes: dict[str, Sandbox] = {s.id: s for s in store.load(Sandbox)}
        self.containers: dict[str, Container] = {c.id: c for c in store.load(Container)}
        self._gates: dict[str, SandboxGate] = {}
        self.events = LifecycleEvents([*self.sandboxes.values(), *self.containers.values()],
                                      lambda sandbox_id: (self.find_sandbox(sandbox_id),
                                                          self.containers_of(sandbox_id)))

    # -- writes -----------------------------------------------------------------------

    def save(self, record: Sandbox | Container) -> None:
        """Keep a record (new or changed) in memory and on disk."""
        target: dict = self.sandboxes if isinstance(record, Sandbox) else self.containers
        target[record.id] = record
        self._store.put(record)
        self.events.changed(record)

    def save_if_known(self, record: Container) -> None:
        """Save a container's progress unless it was removed meanwhile."""
        if record.id in self.containers:
            self._store.put(record)
            self.events.changed(record)

    def forget(self, record: Sandbox | Container) -> None:
        if isinstance(record, Sandbox):
            self.sandboxes.pop(record.id, None)
            self._gates.pop(record.id, None)
        else:
            self.containers.pop(record.id, None)
        self._store.delete(type(record), record.id)
        self.events.forgotten(record)

    def gate(self, sandbox_id: str) -> SandboxGate:
        return self._gates.setdefault(sandbox_id, SandboxGate())

    # -- reads ------------------------------------------------------------------------

    def find_sandbox(self, sandbox_id: str) -> Sandbox | None:
        return _find(self.sandboxes, sandbox_id)

    def find_container(self, container_id: str) -> Container | None:
        return _find(self.containers, container_id)

    def sandbox(self, sandbox_id: str) -> Sandbox:
        sb = self.find_sandbox(sandbox_id)
        if sb is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return sb

    def container(self, container_id: str) -> Container:
        c = self.find_container(container_id)
        if c is None:
            raise NotFound(f"container {container_id!r} not found")
        return c

    def containers_of(self, sandbox_id: str) -> list[Container]:
        return [c for c in self.containers.values() if c.sandbox_id == sandbox_id]

    def sandbox_by_key(self, key: tuple[str, str, str, int]) -> Sandbox | None:
        return next((sb for sb in self.sandboxes.values() if sb.key == key), None)

    def ready_sandboxes(self) -> list[Sandbox]:
        """Sandboxes whose cell should answer now."""
        return [sb for sb in self.sandboxes.values()
                if sb.state == SANDBOX_READY and sb.cell is not None and not sb.cell.gone]

    def list_sandboxes(
        self, id_prefix: str = "", state: str | None = None, labels: dict[str, str] | None = None
    ) -> list[Sandbox]:
        return [
            sb for sb in self.sandboxes.values()
            if sb.phase != "creating"  # the kubelet has not been told of it yet
            and sb.id.startswith(id_prefix)
            and (state is None or sb.state == state)
            and _labels_match(sb.labels, labels)
        ]

    def list_containers(
        self,
        id_prefix: str = "",
        sandbox_prefix: str = "",
        state: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[Container]:
        return [
            c for c in self.containers.values()
            if c.id.startswith(id_prefix)
            and c.sandbox_id.startswith(sandbox_prefix)
            and (state is None or c.state == state)
            and _labels_match(c.labels, labels)
        ]


def _find(records: dict[str, R], wanted: str) -> R | None:
    """Exact id, or a prefix that names exactly one record (as crictl allows)."""
    if not wanted:
        return None
    if wanted in records:
        return records[wanted]
    matches = [r for key, r in records.items() if key.startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def _labels_match(labels: dict[str, str], selector: dict[str, str] | None) -> bool:
    return not selector or all(labels.get(k) == v for k, v in selector.items())
