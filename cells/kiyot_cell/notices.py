"""What EC2 tells an instance before it takes it away, read from its metadata service.

A spot instance gets two minutes' notice: `spot/instance-action` answers (404 until then)
with the action and its time. A rebalance recommendation (`events/recommendations/
rebalance`) says the instance is at higher risk of interruption. The agent polls both
(IMDSv2, every 2 s, as AWS's node termination handler does) and publishes each new
notice on the event stream (`{"type": "notice", ...}`, cells/API.md), and keeps them for
the snapshot of every new stream: the node learns of it while the instance still runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from . import log
from .events import EventHub

INTERVAL = 2.0
TOKEN_TTL = 21600
PATHS = {
    "spot-interruption": "/latest/meta-data/spot/instance-action",
    "rebalance-recommendation": "/latest/meta-data/events/recommendations/rebalance",
}


def notice_from(kind: str, body: bytes) -> dict[str, Any]:
    """The notice as the node reads it: its kind, EC2's action and time, when it was seen."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    return {"kind": kind, "action": str(doc.get("action", "")),
            "time": str(doc.get("time") or doc.get("noticeTime") or ""), "seen_at": time.time_ns()}


class NoticeWatcher:
    def __init__(self, base: str, hub: EventHub, interval: float = INTERVAL) -> None:
        self._base = base.rstrip("/")
        self._hub = hub
        self._interval = interval
        self.notices: dict[str, dict[str, Any]] = {}  # kind -> the notice, as first seen
        self._task: asyncio.Task[None] | None = None
        self._token = ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="instance-notices")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        lg = log.get("notices")
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    await self.poll(session)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    lg.debug("metadata_unreachable", error=str(exc))
                    self._token = ""
                await asyncio.sleep(self._interval)

    async def poll(self, session: aiohttp.ClientSession) -> None:
        for kind, path in PATHS.items():
            if kind in self.notices:
                continue
            body = await self._get(session, path)
            if body is None:
                continue
            notice = notice_from(kind, body)
            self.notices[kind] = notice
            log.get("notices").warning("instance_notice", **notice)
            self._hub.publish({"type": "notice", "notice": notice})

    async def _get(self, session: aiohttp.ClientSession, path: str) -> bytes | None:
        """The body at `path`, or None where the service has nothing (404)."""
        for _ in range(2):  # a token that expired is renewed once
            if not self._token:
                async with session.put(f"{self._base}/latest/api/token",
                                       headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)}) as r:
                    r.raise_for_status()
                    self._token = await r.text()
            async with session.get(self._base + path, headers={"X-aws-ec2-metadata-token": self._token}) as r:
                if r.status == 401:
                    self._token = ""
                    continue
                if r.status == 404:
                    return None
                r.raise_for_status()
                return await r.read()
        return None
