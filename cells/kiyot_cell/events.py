"""Fan-out of record changes to every open /v1/events stream."""

from __future__ import annotations

import asyncio
from typing import Any

_QUEUE_MAX = 1000


class Subscription:
    def __init__(self, stats: bool = False) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE_MAX)
        self.overflowed = False  # a reader too slow to keep up is cut off; it reconnects for a snapshot
        self.stats = stats  # whether it asked for the `stats` events (one a second)


class EventHub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def subscribe(self, stats: bool = False) -> Subscription:
        s = Subscription(stats)
        self._subs.add(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        self._subs.discard(s)

    def publish(self, event: dict[str, Any]) -> None:
        for s in list(self._subs):
            if event.get("type") == "stats" and not s.stats:
                continue
            try:
                s.queue.put_nowait(event)
            except asyncio.QueueFull:
                s.overflowed = True
                self._subs.discard(s)
