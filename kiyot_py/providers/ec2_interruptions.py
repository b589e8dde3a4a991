"""EC2's own word on instances, as Karpenter hears it: EventBridge rules into an SQS queue.

The operator points EventBridge rules (spot interruption warnings, rebalance
recommendations, instance state changes, AWS Health scheduled changes) at one SQS queue
per node, and names it in `aws.interruption_queue`. The node long-polls it and hands each
event about an instance to the pods room as a `CellEvent`; every message read is deleted,
whoever's instance it names (the queue is this node's). A notice from the queue and one
from the cell's own agent (its metadata service) are the same notice: whichever comes first
is recorded.

The long poll runs in a daemon thread of its own: a 10-second ReceiveMessage never holds
one of the provider's call slots, nor the service's exit.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import structlog

from kiyot_py.providers.base import CellEvent, CellEvents

log = structlog.get_logger("kiyot.providers.ec2")

WAIT_SECONDS = 10  # SQS long poll
RETRY_SECONDS = 5.0  # after a failed receive

_NOTICES = {
    "EC2 Spot Instance Interruption Warning": "spot-interruption",
    "EC2 Instance Rebalance Recommendation": "rebalance-recommendation",
}


def cell_events_from(body: str) -> list[CellEvent]:
    """The events an EventBridge message (the SQS message's body) says about instances."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("detail"), dict):
        return []
    kind, detail, at = str(doc.get("detail-type", "")), doc["detail"], str(doc.get("time", ""))
    instance = str(detail.get("instance-id", ""))
    if kind in _NOTICES and instance:
        return [CellEvent(instance, _NOTICES[kind], action=str(detail.get("instance-action", "")), time=at,
                          source="sqs")]
    if kind == "EC2 Instance State-change Notification" and instance:
        return [CellEvent(instance, "state", state=str(detail.get("state", "")), time=at, source="sqs")]
    if kind == "AWS Health Event" and detail.get("service") == "EC2":
        return [CellEvent(str(e.get("entityValue", "")), "scheduled-change", time=at, source="sqs")
                for e in detail.get("affectedEntities", []) if str(e.get("entityValue", "")).startswith("i-")]
    return []


class InterruptionQueue:
    def __init__(self, client: Any, queue: str, sink: CellEvents, loop: asyncio.AbstractEventLoop,
                 clock_sleep: Callable[[float], bool] | None = None) -> None:
        self._client = client
        self._queue = queue
        self._sink = sink
        self._loop = loop
        self._stopping = threading.Event()
        self._sleep = clock_sleep or self._stopping.wait
        self._thread = threading.Thread(target=self._run, name="ec2-interruption-queue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()  # the thread ends after its current long poll

    def _run(self) -> None:
        url = ""
        while not self._stopping.is_set():
            try:
                if not url:
                    url = self._queue if self._queue.startswith(("https://", "http://")) else \
                        self._client.get_queue_url(QueueName=self._queue)["QueueUrl"]
                    log.info("reading EC2 events from SQS", queue=url)
                self._receive(url)
            except Exception as exc:  # the queue or its permission is missing: said, and tried again
                log.warning("reading the interruption queue failed", queue=self._queue, error=str(exc))
                self._sleep(RETRY_SECONDS)

    def _receive(self, url: str) -> None:
        answer = self._client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=WAIT_SECONDS)
        messages = answer.get("Messages", [])
        for message in messages:
            for event in cell_events_from(message.get("Body", "")):
                self._loop.call_soon_threadsafe(self._sink, event)
        if messages:
            self._client.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])
