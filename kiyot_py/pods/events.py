"""Lifecycle events of sandboxes and containers (created, started, stopped, deleted), as
GetContainerEvents streams them to the kubelet's evented PLEG.

The index reports every record it saves or forgets; an event is made when a record
reaches a later phase than the last one seen (a state never goes back). As containerd
does, a sandbox's own events carry its id as the container id. A subscriber that falls
more than QUEUE_LIMIT events behind is dropped: its stream ends, and the kubelet relists
and subscribes again, which loses nothing.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from kiyot_py.errors import ResourceExhausted
from kiyot_py.model import (
    CONTAINER_CREATED,
    CONTAINER_RUNNING,
    SANDBOX_READY,
    Container,
    Sandbox,
    now_ns,
)

CREATED, STARTED, STOPPED, DELETED = "created", "started", "stopped", "deleted"
_RANK = {CREATED: 0, STARTED: 1, STOPPED: 2}
QUEUE_LIMIT = 1000


@dataclass(frozen=True)
class LifecycleEvent:
    kind: str
    id: str  # the container's, or the sandbox's for its own events
    at: int  # ns
    sandbox: Sandbox | None  # copies as they were at the event
    containers: tuple[Container, ...]


@dataclass(eq=False)  # each subscriber is itself (hashed by identity)
class _Subscriber:
    queue: asyncio.Queue[LifecycleEvent | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    overflowed: bool = False


def _phase(record: Sandbox | Container, before: str | None) -> str:
    if isinstance(record, Sandbox):
        if record.state == SANDBOX_READY:
            return STARTED
        return STOPPED if before in (STARTED, STOPPED) else CREATED
    if record.state == CONTAINER_CREATED:
        return CREATED
    return STARTED if record.state == CONTAINER_RUNNING else STOPPED


Snapshot = Callable[[str], tuple[Sandbox | None, list[Container]]]


class LifecycleEvents:
    def __init__(self, known: Iterable[Sandbox | Container], snapshot: Snapshot) -> None:
        # What a restart finds is not news: only later changes are events.
        self._phases: dict[str, str] = {r.id: _phase(r, None) for r in known}
        self._snapshot = snapshot  # a sandbox id -> its sandbox and containers, now
        self._subscribers: set[_Subscriber] = set()

    def changed(self, record: Sandbox | Container) -> None:
        before = self._phases.get(record.id)
        phase = _phase(record, before)
        if before is not None and _RANK[phase] <= _RANK[before]:
            return
        self._phases[record.id] = phase
        self._publish(phase, record)

    def forgotten(self, record: Sandbox | Container) -> None:
        if self._phases.pop(record.id, None) is not None:
            self._publish(DELETED, record)

    def _publish(self, kind: str, record: Sandbox | Container) -> None:
        if not self._subscribers:
            return
        sandbox_id = record.id if isinstance(record, Sandbox) else record.sandbox_id
        sandbox, containers = self._snapshot(sandbox_id)
        if sandbox is None and isinstance(record, Sandbox):
            sandbox = record
        event = LifecycleEvent(kind, record.id, now_ns(), copy.copy(sandbox),
                               tuple(copy.copy(c) for c in containers))
        for sub in list(self._subscribers):
            if sub.queue.full():
                sub.overflowed = True
                self._subscribers.discard(sub)
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)  # wakes the reader, which ends its stream
            else:
                sub.queue.put_nowait(event)

    async def stream(self) -> AsyncIterator[LifecycleEvent]:
        """Every event from now on, until the caller stops (or falls too far behind)."""
        sub = _Subscriber()
        self._subscribers.add(sub)
        try:
            while (event := await sub.queue.get()) is not None:
                yield event
            if sub.overflowed:
                raise ResourceExhausted(
                    f"this event stream fell {QUEUE_LIMIT} events behind and was dropped; list and subscribe again")
        finally:
            self._subscribers.discard(sub)
