"""Fan-out of record changes to every open /v1/events stream."""

from __future__ import annotations

import asyncio
from typing import Any

_QUEUE_MAX = 1000


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE_MAX)
        self.overflowed = False  # a reader too slow to keep up is cut off; it reconnects for a snapshot


class EventHub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        s = Subscription()
        self._subs.add(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        self._subs.discard(s)

    def publish(self, event: dict[str, Any]) -> None:
        for s in list(self._subs):
            try:
                s.queue.put_nowait(event)
            except asyncio.QueueFull:
                s.overflowed = True
                self._subs.discard(s)
