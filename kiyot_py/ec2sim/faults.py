"""What a real cloud does that moto never does, on a test's command.

- **Capacity faults**: a launch into a (type, zone, market) that a fault names (`*` for
  any) fails with the fault's code and EC2's words for it; every launch attempt is
  counted, refused or not, so that a test can tell what the node tried.
- **Spot prices** from a table (default: a fixed fraction of the packaged on-demand price,
  a little different per zone) instead of moto's one flat price.
- **Spot interruptions**: the two-minute notice in the instance's metadata and/or on
  EventBridge, then, after a chosen delay, the termination, with EC2's spot reason.
- **Rebalance recommendations**, and **network cuts** (the instance's link down a while).
- **EventBridge**: every interruption, rebalance, stop and termination is sent, in
  EventBridge's shape, to the SQS queues a test made targets (as rules would).

Driven over a unix socket, `<state>/control.sock` (JSON over HTTP; `Control` below, or
`python -m kiyot_py.ec2sim.faults --state-dir DIR ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import fnmatch
import http.client
import json
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web

from kiyot_py.providers.ec2_catalog import PriceSnapshot

log = structlog.get_logger("kiyot.ec2sim.faults")

SPOT_FRACTION = 0.30  # of the on-demand price, in the first zone; +0.02 per zone after it
NOTICE_LEAD = 120  # seconds: the time EC2 puts in a spot notice is two minutes ahead
_CAPACITY_WORDS = {
    "InsufficientInstanceCapacity": "We currently do not have sufficient {type} capacity in the Availability Zone "
                                    "you requested ({zone}). Our system will be working on provisioning additional "
                                    "capacity.",
    "InsufficientFreeAddressesInSubnet": "There are not enough free addresses in subnet of {zone} to satisfy the "
                                         "requested number of instances.",
    "MaxSpotInstanceCountExceeded": "Max spot instance count exceeded",
    "SpotMaxPriceTooLow": "Your Spot request price is lower than the minimum required Spot request fulfillment "
                          "price for {type} in {zone}.",
    "Unsupported": "Your requested instance type ({type}) is not supported in your requested Availability Zone "
                   "({zone}).",
    "VcpuLimitExceeded": "You have requested more vCPU capacity than your current vCPU limit of 32 allows for the "
                         "instance bucket that the specified instance type belongs to.",
    "InstanceLimitExceeded": "Your quota allows for 0 more running instance(s). You requested at least 1.",
}


class Simulation(Protocol):
    """What the faults need of the simulator."""

    settings: Any
    layout: dict[str, Any]
    machines: Any
    _backend: Any


class Faults:
    def __init__(self, sim: Simulation, zones: Sequence[str]) -> None:
        self._sim = sim
        self._zones = list(zones)
        self._lock = threading.Lock()  # moto answers in threads of its own
        self.capacity: list[dict[str, str]] = []
        self.attempts: list[dict[str, Any]] = []
        self.targets: list[str] = []  # SQS queue names EventBridge sends to
        self._prices = PriceSnapshot.packaged()
        self.spot_prices: dict[str, dict[str, float]] = {}  # type -> zone -> price; else the default
        self._tasks: set[asyncio.Task[None]] = set()

    # -- from moto's threads ----------------------------------------------------------

    def attempt(self, instance_type: str, zone: str, market: str) -> tuple[str, str] | None:
        with self._lock:
            fault = next((f for f in self.capacity
                          if all(fnmatch.fnmatchcase(value, f.get(key, "*")) for key, value in
                                 (("type", instance_type), ("zone", zone), ("market", market)))), None)
            code = fault.get("code", "InsufficientInstanceCapacity") if fault else ""
            self.attempts.append({"type": instance_type, "zone": zone, "market": market,
                                  "result": code or "launched", "at": time.time()})
        if not code:
            return None
        words = _CAPACITY_WORDS.get(code, "{type} in {zone} ({market}) is out of capacity.")
        return code, words.format(type=instance_type, zone=zone, market=market)

    def spot_price(self, instance_type: str, zone: str) -> float | None:
        with self._lock:
            table = self.spot_prices.get(instance_type)
            if table is not None:
                return table.get(zone, table.get("*"))
        region = self._sim.settings.region
        on_demand = self._prices.price(region, instance_type) or self._prices.price("us-east-1", instance_type)
        if on_demand is None or zone not in self._zones:
            return None
        return round(on_demand * (SPOT_FRACTION + 0.02 * self._zones.index(zone)), 6)

    def announce(self, detail_type: str, instance_id: str, detail: dict[str, Any]) -> None:
        """An event as EventBridge sends it to its targets (SQS: the event is the body)."""
        with self._lock:
            targets = list(self.targets)
        if not targets:
            return
        from moto.sqs.models import sqs_backends

        settings = self._sim.settings
        body = json.dumps({
            "version": "0", "id": str(uuid.uuid4()), "detail-type": detail_type, "source": "aws.ec2",
            "account": "123456789012", "time": _iso(time.time()), "region": settings.region,
            "resources": [f"arn:aws:ec2:{settings.region}:123456789012:instance/{instance_id}"],
            "detail": {"instance-id": instance_id, **detail}})
        backend = sqs_backends["123456789012"][settings.region]
        for queue in targets:
            backend.send_message(queue, body)

    # -- on the loop --------------------------------------------------------------------

    async def interrupt(self, instance_id: str, after: float, imds: bool, sqs: bool, action: str = "terminate"
                        ) -> None:
        """The spot notice now (where asked), the termination `after` seconds later."""
        self._instance(instance_id)
        notice = {"action": action, "time": _iso(time.time() + NOTICE_LEAD)}
        if imds:
            self._sim.machines.post_metadata(instance_id, "/latest/meta-data/spot/instance-action",
                                             json.dumps(notice).encode())
        if sqs:
            self.announce("EC2 Spot Instance Interruption Warning", instance_id, {"instance-action": action})
        log.info("spot interruption notice", instance=instance_id, after=after, imds=imds, sqs=sqs)
        self._spawn(self._reclaim(instance_id, after), f"reclaim-{instance_id}")

    async def _reclaim(self, instance_id: str, after: float) -> None:
        from moto.ec2.models.instances import StateReason

        await asyncio.sleep(after)
        backend = self._sim._backend
        backend.terminate_instances([instance_id])  # powers it off, announces the state changes
        backend.get_instance(instance_id).state_reason = StateReason(
            "Server.SpotInstanceTermination: Spot instance termination", "Server.SpotInstanceTermination")
        log.info("spot instance reclaimed", instance=instance_id)

    def rebalance(self, instance_id: str, imds: bool, sqs: bool) -> None:
        self._instance(instance_id)
        if imds:
            self._sim.machines.post_metadata(instance_id, "/latest/meta-data/events/recommendations/rebalance",
                                             json.dumps({"noticeTime": _iso(time.time())}).encode())
        if sqs:
            self.announce("EC2 Instance Rebalance Recommendation", instance_id, {})

    def cut(self, instance_id: str, seconds: float) -> None:
        self._instance(instance_id)
        self._spawn(self._sim.machines.cut(instance_id, seconds), f"cut-{instance_id}")

    def _instance(self, instance_id: str) -> None:
        if instance_id not in self._sim.machines.machines:
            raise web.HTTPNotFound(text=json.dumps({"error": f"no machine for instance {instance_id}"}),
                                   content_type="application/json")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the control socket --------------------------------------------------------------

    async def serve(self, path: Path) -> web.AppRunner:
        app = web.Application()
        r = app.router
        r.add_put("/faults/capacity", self._put_capacity)
        r.add_get("/attempts", self._get_attempts)
        r.add_put("/spot-prices", self._put_spot_prices)
        r.add_put("/eventbridge/targets", self._put_targets)
        r.add_get("/queues/{name}", self._get_queue)
        r.add_post("/instances/{id}/spot-interruption", self._post_interruption)
        r.add_post("/instances/{id}/rebalance", self._post_rebalance)
        r.add_post("/instances/{id}/cut", self._post_cut)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        path.unlink(missing_ok=True)  # noqa: ASYNC240 - at start, a local file
        await web.UnixSite(runner, str(path)).start()
        path.chmod(0o600)  # noqa: ASYNC240
        return runner

    async def _put_capacity(self, request: web.Request) -> web.Response:
        faults = (await request.json()).get("faults", [])
        with self._lock:
            self.capacity = [{k: str(v) for k, v in f.items()} for f in faults]
        return web.json_response({"faults": self.capacity})

    async def _get_attempts(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response({"attempts": list(self.attempts)})

    async def _put_spot_prices(self, request: web.Request) -> web.Response:
        try:
            self.set_spot_prices((await request.json()).get("prices", {}))
        except (ValueError, TypeError, AttributeError) as exc:
            raise web.HTTPBadRequest(text=f"spot prices: {exc}") from None
        return web.json_response({"prices": self.spot_prices})

    def set_spot_prices(self, prices: dict[str, Any]) -> None:
        """type -> price (in every zone), or type -> zone -> price; {}: the default table."""
        table = {str(t): {str(z): float(p) for z, p in (v if isinstance(v, dict) else {"*": v}).items()}
                 for t, v in prices.items()}
        with self._lock:
            self.spot_prices = table

    async def _put_targets(self, request: web.Request) -> web.Response:
        """The SQS queues EventBridge sends to; each is made if it is not there."""
        from moto.sqs.models import sqs_backends

        names = [str(n) for n in (await request.json()).get("queues", [])]
        backend = sqs_backends["123456789012"][self._sim.settings.region]
        endpoint = urllib.parse.urlparse(self._sim.layout["endpoint_url"])
        urls = [backend.create_queue(name).url(endpoint) for name in names]
        with self._lock:
            self.targets = names
        return web.json_response({"queues": urls})

    async def _get_queue(self, request: web.Request) -> web.Response:
        """How many messages a queue holds: waiting, and read but not deleted (in flight)."""
        from moto.sqs.models import sqs_backends

        queue = sqs_backends["123456789012"][self._sim.settings.region].get_queue(request.match_info["name"])
        return web.json_response({"waiting": queue.approximate_number_of_messages,
                                  "in_flight": queue.approximate_number_of_messages_not_visible})

    async def _post_interruption(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self.interrupt(request.match_info["id"], float(body.get("after", NOTICE_LEAD)),
                             bool(body.get("imds", True)), bool(body.get("sqs", True)),
                             str(body.get("action", "terminate")))
        return web.json_response({"ok": True})

    async def _post_rebalance(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.rebalance(request.match_info["id"], bool(body.get("imds", True)), bool(body.get("sqs", True)))
        return web.json_response({"ok": True})

    async def _post_cut(self, request: web.Request) -> web.Response:
        self.cut(request.match_info["id"], float((await request.json()).get("seconds", 10)))
        return web.json_response({"ok": True})


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("simulator", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(self._path))


class Control:
    """The simulator's control socket, from a test or a shell (synchronous)."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / "control.sock"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        conn = _UnixConnection(self._path)
        try:
            conn.request(method, path, body=json.dumps(body or {}), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise RuntimeError(f"simulator: {method} {path}: {resp.status} {data.decode(errors='replace')}")
        answer: dict[str, Any] = json.loads(data)
        return answer

    def capacity(self, *faults: dict[str, str]) -> None:
        self.call("PUT", "/faults/capacity", {"faults": list(faults)})

    def attempts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", "/attempts")["attempts"]
        return found

    def spot_prices(self, prices: dict[str, Any]) -> None:
        self.call("PUT", "/spot-prices", {"prices": prices})

    def eventbridge(self, *queues: str) -> list[str]:
        urls: list[str] = self.call("PUT", "/eventbridge/targets", {"queues": list(queues)})["queues"]
        return urls

    def queue(self, name: str) -> dict[str, int]:
        """{"waiting": n, "in_flight": m} of an SQS queue."""
        counts: dict[str, int] = self.call("GET", f"/queues/{name}")
        return counts

    def interrupt(self, instance_id: str, after: float, imds: bool = True, sqs: bool = True) -> None:
        self.call("POST", f"/instances/{instance_id}/spot-interruption", {"after": after, "imds": imds, "sqs": sqs})

    def rebalance(self, instance_id: str, imds: bool = True, sqs: bool = True) -> None:
        self.call("POST", f"/instances/{instance_id}/rebalance", {"imds": imds, "sqs": sqs})

    def cut(self, instance_id: str, seconds: float) -> None:
        self.call("POST", f"/instances/{instance_id}/cut", {"seconds": seconds})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiyot_py.ec2sim.faults",
                                 description="Inject faults into a running kiyot-ec2sim (its control socket).")
    ap.add_argument("--state-dir", type=Path, default=Path("/var/lib/kiyot-ec2sim"), metavar="DIR")
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("capacity", help="refuse launches into TYPE ZONE MARKET (each may be *); none: clear")
    c.add_argument("fault", nargs="*", metavar="TYPE:ZONE:MARKET[:CODE]")
    sub.add_parser("attempts", help="every launch attempt so far, and its result")
    i = sub.add_parser("interrupt", help="a spot notice now, the termination after --after seconds")
    i.add_argument("instance")
    i.add_argument("--after", type=float, default=NOTICE_LEAD)
    i.add_argument("--no-imds", action="store_true", help="not in the instance's metadata")
    i.add_argument("--no-sqs", action="store_true", help="not on EventBridge")
    r = sub.add_parser("rebalance", help="a rebalance recommendation")
    r.add_argument("instance")
    k = sub.add_parser("cut", help="the instance's network down for --seconds")
    k.add_argument("instance")
    k.add_argument("--seconds", type=float, default=10.0)
    q = sub.add_parser("eventbridge", help="send EC2's events to these SQS queues (made if missing)")
    q.add_argument("queue", nargs="*")
    ns = ap.parse_args(argv)
    try:
        return _run(ap, ns, Control(ns.state_dir))
    except (OSError, RuntimeError) as exc:
        sys.exit(f"kiyot-ec2sim faults: {ns.state_dir / 'control.sock'}: {exc} (is kiyot-ec2sim running there?)")


def _run(ap: argparse.ArgumentParser, ns: argparse.Namespace, control: Control) -> int:
    if ns.what == "capacity":
        faults = []
        for text in ns.fault:
            parts = text.split(":")
            if len(parts) not in (3, 4):
                ap.error(f"a fault is TYPE:ZONE:MARKET[:CODE], got {text!r}")
            faults.append(dict(zip(("type", "zone", "market", "code"), parts, strict=False)))
        control.capacity(*faults)
    elif ns.what == "attempts":
        print(json.dumps(control.attempts(), indent=2))
    elif ns.what == "interrupt":
        control.interrupt(ns.instance, ns.after, imds=not ns.no_imds, sqs=not ns.no_sqs)
    elif ns.what == "rebalance":
        control.rebalance(ns.instance)
    elif ns.what == "cut":
        control.cut(ns.instance, ns.seconds)
    elif ns.what == "eventbridge":
        print("\n".join(control.eventbridge(*ns.queue)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
