"""EC2 cells: every pod its own instance, launched from the cell image with boto3.

- **One instance per pod attempt.** A launch first looks the attempt's token up in the
  instances' tags (so that a crash between a launch and its record never makes a second
  one, even after EC2 has forgotten the token), then calls RunInstances with that token as
  its `ClientToken` (so that a retry returns the same reservation). An instance that the
  token names but that was terminated meanwhile is launched again under a token derived
  from it: deterministic, so a restart derives the same one.
- **Tagged on create**, instance and volume alike: the node, the sandbox, the pod, the
  launch token, the pod's labels (shortened deterministically past EC2's limits; at most
  50 tags). IMDSv2 required with a hop limit of 1; the root volume goes with the instance.
- **The cheapest type that fits** (`ec2_catalog.py`), from DescribeInstanceTypes and the
  offerings in the subnets' zones (cached), priced from the packaged snapshot.
- **The node reaches a cell at its private address only**, in the configured subnets.
- **boto3 off the event loop**: at most `max_concurrent_calls` calls in threads at once,
  standard retry mode; every AWS error keeps AWS's code and message, as a typed error.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import structlog

from kiyot_cell.boot import UserData
from kiyot_py import errors
from kiyot_py.config import AwsSettings
from kiyot_py.crashpoints import crash_point
from kiyot_py.enrollment import console_fingerprint
from kiyot_py.model import Cell
from kiyot_py.pki import NodePKI, cell_server_name
from kiyot_py.providers import ec2_interruptions
from kiyot_py.providers.base import (
    TAG_NODE,
    TAG_ROLE,
    TAG_SANDBOX,
    CapacityError,
    CellEvents,
    CellFeatures,
    CellNotFound,
    CellShape,
    ProviderConfigError,
    ProviderError,
    ProviderPermissionDenied,
    ProviderUnavailable,
    QuotaError,
    Readiness,
)
from kiyot_py.providers.ec2_catalog import Catalog, Choice, PriceSnapshot, choose
from kiyot_py.providers.ec2_offerings import (
    SPOT,
    Offering,
    Unavailable,
    offerings,
    spot_policy,
    spot_prices_from_aws,
)

log = structlog.get_logger("kiyot.providers.ec2")

TAG_TOKEN = "kiyot-launch-token"  # noqa: S105 - a tag name, not a secret
MAX_TAGS = 50
MAX_KEY, MAX_VALUE = 128, 256
POLL_INTERVAL = 0.25  # seconds between describes of the instances being waited for (all in one call)
CONSOLE_INTERVAL = 0.25  # seconds between reads of a booting cell's console
DEFAULT_ROOT_VOLUME_GIB = 8  # an image that names no size for its root volume
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# Pod annotations that steer the choice.
ANNOTATION_INSTANCE_TYPE = "kiyot-py.io/instance-type"
ANNOTATION_ARCHITECTURE = "kiyot-py.io/architecture"
ANNOTATION_SPOT = "kiyot-py.io/spot"  # never | preferred | always (default: aws.spot)
# The market and the hourly price at launch (USD; spot: the price history's then), on the
# instance itself: found again after a restart, and in the account's own listing.
TAG_MARKET = "kiyot-market"
TAG_PRICE = "kiyot-price-per-hour"
LAUNCH_ATTEMPTS = 12  # offerings one launch tries at most before it gives up

_CAPACITY = {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
             "InsufficientFreeAddressesInSubnet", "Unsupported", "MaxSpotInstanceCountExceeded",
             "SpotMaxPriceTooLow"}
_QUOTA = {"VcpuLimitExceeded", "InstanceLimitExceeded", "RequestLimitExceeded"}
_PERMISSION = {"AuthFailure", "UnauthorizedOperation", "AccessDenied", "AccessDeniedException",
               "InvalidClientTokenId", "SignatureDoesNotMatch", "OptInRequired", "Blocked",
               "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException"}
_TRANSIENT = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "InternalError", "InternalFailure",
              "ServiceUnavailable", "Unavailable"}


def aws_error(exc: Exception, what: str) -> ProviderError:
    """An AWS failure as one of the typed errors, with AWS's own code and message."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code, message = str(err.get("Code", "")), str(err.get("Message", ""))
        text = f"{what}: {code}: {message}"
        if code in _TRANSIENT:
            return ProviderUnavailable(text, code)
        if code in _CAPACITY:
            return CapacityError(text, code)
        if code in _QUOTA:
            return QuotaError(text, code)
        if code in _PERMISSION:
            return ProviderPermissionDenied(text, code)
        if code.endswith(".NotFound") and code.startswith("InvalidInstanceID"):
            return CellNotFound(text, code)
        return ProviderConfigError(text, code)  # InvalidAMIID.*, InvalidSubnetID.*, InvalidParameterValue, ...
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return ProviderPermissionDenied(f"{what}: {exc}")
    return ProviderUnavailable(f"{what}: {type(exc).__name__}: {exc}")


def ec2_tags(tags: dict[str, str]) -> list[dict[str, str]]:
    """The cell's tags as EC2 takes them: ours first, then the pod's labels, at most 50.

    A key past 128 characters (or a value past 256) is cut and given a digest of the whole,
    so that two long labels never collide; `aws:` keys are EC2's own and skipped."""
    def fit(text: str, limit: int) -> str:
        if len(text) <= limit:
            return text
        return text[: limit - 13] + "~" + hashlib.sha256(text.encode()).hexdigest()[:12]

    ours = sorted((k, v) for k, v in tags.items() if k.startswith("kiyot-"))
    labels = sorted((k, v) for k, v in tags.items() if not k.startswith("kiyot-"))
    out: list[dict[str, str]] = []
    for key, value in ours + labels:
        if key.lower().startswith("aws:") or len(out) == MAX_TAGS:
            continue
        out.append({"Key": fit(key, MAX_KEY), "Value": fit(value, MAX_VALUE)})
    return out


READY_RETRY = 30.0  # seconds between tries to get ready, when Status finds the provider not ready


class Ec2Provider:
    name = "aws"

    def __init__(self, settings: AwsSettings, pki: NodePKI, node_name: str,
                 session_factory: Callable[[], Any] | None = None) -> None:
        self._s = settings
        self._pki = pki
        self._node = node_name
        self._session_factory = session_factory or (lambda: boto3.session.Session(region_name=settings.region))
        self._calls = asyncio.Semaphore(settings.max_concurrent_calls)
        self._ec2: Any = None
        self._ssm: Any = None
        self._image = ""
        self._root_device = ""
        self._root_volume_gib = DEFAULT_ROOT_VOLUME_GIB
        self._zones: dict[str, str] = {}  # subnet id -> zone
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []  # the subnets' CIDRs
        self._catalog: Catalog | None = None
        self._prices = PriceSnapshot.packaged()
        self._unavailable = Unavailable(settings.unavailable_offering_ttl)
        self._spot_price_table: dict[tuple[str, str], float] = {}
        self._spot_fetched_at: float | None = None
        self._queue: ec2_interruptions.InterruptionQueue | None = None
        self._readying = asyncio.Lock()
        self._not_ready = "not started"  # why the last try to get ready failed
        self._retrying: asyncio.Task[None] | None = None
        self._next_retry = 0.0
        self._observers: dict[str, list[asyncio.Future[dict[str, Any] | None]]] = {}
        self._poller: asyncio.Task[None] | None = None

    # -- the interface -------------------------------------------------------------------

    @property
    def features(self) -> CellFeatures:
        # A VM of its own: a privileged container is so in that VM only.
        return CellFeatures(privileged=True)

    @property
    def default_architecture(self) -> str:
        return "amd64"

    @property
    def pull_path(self) -> None:
        return None  # EC2 cells pull from the registries themselves

    @property
    def reserved_ports(self) -> frozenset[int]:
        return frozenset({self._s.agent_port})

    async def start(self) -> None:
        """Make the clients and learn the image, subnets and types. An AWS failure here
        (wrong credentials, an unknown image) does not stop the node: it is logged, and
        every launch tries again and fails with AWS's answer until it succeeds."""
        try:
            await self._ready()
        except ProviderError as exc:
            log.error("the EC2 provider is not ready; launches will try again", error=str(exc))

    async def _ready(self) -> None:
        async with self._readying:
            if self._catalog is None:
                try:
                    await self._prepare()
                except ProviderError as exc:
                    self._not_ready = str(exc)
                    raise

    async def readiness(self) -> Readiness:
        """Ready once the image, subnets and instance types are known. Until then the
        kubelet reads AWS's own answer, and a try again starts in the background (at most
        one every READY_RETRY seconds): the answer never waits for AWS."""
        if self._catalog is not None:
            return Readiness()
        now = time.monotonic()
        if (self._retrying is None or self._retrying.done()) and now >= self._next_retry:
            self._next_retry = now + READY_RETRY
            self._retrying = asyncio.create_task(self._try_ready())
        return Readiness(runtime_reason="ProviderNotReady",
                         runtime_message=f"EC2 cells cannot be launched yet: {self._not_ready}")

    async def _try_ready(self) -> None:
        try:
            await self._ready()
        except ProviderError as exc:
            log.info("the EC2 provider is still not ready", error=str(exc))

    async def _prepare(self) -> None:
        config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5},
                                        connect_timeout=5, read_timeout=30,
                                        max_pool_connections=self._s.max_concurrent_calls)
        session = self._session_factory()
        endpoint = self._s.endpoint_url or None
        self._ec2 = session.client("ec2", endpoint_url=endpoint, config=config)
        self._ssm = session.client("ssm", endpoint_url=endpoint, config=config)
        self._image = await self._resolve_image()
        images = (await self._call("describing the cell image", self._ec2.describe_images,
                                   ImageIds=[self._image]))["Images"]
        if not images:
            raise ProviderConfigError(f"the cell image {self._image} does not exist")
        self._root_device = images[0].get("RootDeviceName") or "/dev/xvda"
        # The root volume: the image's size unless the config asks for more (gp3, deleted
        # with the instance). EC2 takes the size from the image's snapshot when none is
        # named; naming it keeps the request complete for every EC2-compatible API.
        image_size = max([int(m.get("Ebs", {}).get("VolumeSize") or 0) for m in images[0].get("BlockDeviceMappings", [])
                          if m.get("DeviceName") == self._root_device] or [0])
        self._root_volume_gib = max(self._s.root_volume_gib, image_size) or DEFAULT_ROOT_VOLUME_GIB
        subnet_ids = [s.strip() for s in self._s.subnets.split(",") if s.strip()]
        subnets = (await self._call("describing the subnets", self._ec2.describe_subnets,
                                    SubnetIds=subnet_ids))["Subnets"]
        self._zones = {s["SubnetId"]: s["AvailabilityZone"] for s in subnets}
        self._networks = [ipaddress.ip_network(s["CidrBlock"]) for s in subnets]
        await self._refresh_catalog()
        log.info("ec2 provider ready", region=self._s.region, image=self._image,
                 zones=self._zone_names, types=len(self._catalog.types) if self._catalog else 0)

    def watch_events(self, sink: CellEvents) -> None:
        """EC2's events through the configured SQS queue (ec2_interruptions.py), if any."""
        if not self._s.interruption_queue or self._queue is not None:
            return
        config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5,
                                        read_timeout=ec2_interruptions.WAIT_SECONDS + 10)
        client = self._session_factory().client("sqs", endpoint_url=self._s.endpoint_url or None, config=config)
        self._queue = ec2_interruptions.InterruptionQueue(client, self._s.interruption_queue, sink,
                                                          asyncio.get_running_loop())
        self._queue.start()

    def interrupted(self, cell: Cell) -> None:
        """EC2 takes a spot instance back: its (type, zone, spot) is short of capacity, and
        a new cell is not launched into it for a while (as Karpenter does)."""
        offer = cell.offering
        if offer.get("market") != SPOT or not offer.get("instance_type") or not offer.get("zone"):
            return
        self._unavailable.park_key((offer["instance_type"], offer["zone"], SPOT),
                                   f"spot instance {cell.id} of this offering is being interrupted")
        log.info("offering parked after a spot interruption", type=offer["instance_type"], zone=offer["zone"])

    async def close(self) -> None:
        if self._queue is not None:
            self._queue.stop()
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)

    async def launch(self, shape: CellShape, token: str) -> Cell:
        await self._ready()
        existing = await self._by_token(token)
        if existing is not None:
            log.info("instance found by its launch token", instance=existing.id, token=token[:12])
            return existing
        policy = spot_policy(shape.annotations.get(ANNOTATION_SPOT, ""), self._s.spot)
        every = await self._offerings(shape, policy)
        refused: list[str] = []
        last_code = ""
        parked_before = [o for o in every if self._unavailable.parked(o)]
        for offer in every:
            # Parked before this launch, or by a refusal of this one that spoke of more than
            # its own offering (a full subnet, the account's spot limit).
            if self._unavailable.parked(offer) or len(refused) == LAUNCH_ATTEMPTS:
                continue
            try:
                instance = await self._run(offer, shape, token)
            except CapacityError as exc:
                parked = self._unavailable.park(offer, exc.code, str(exc))
                log.warning("no capacity; trying the next offering", offering=str(offer), code=exc.code,
                            parked="/".join(parked), seconds=self._s.unavailable_offering_ttl)
                refused.append(f"{offer}: {exc}")
                last_code = exc.code
                continue
            cell = self._cell(instance)
            log.info("instance launched", instance=cell.id, type=offer.instance_type, zone=offer.zone,
                     market=offer.market, address=cell.address, price_per_hour=offer.price_per_hour,
                     refused=len(refused))
            return cell
        # Nothing left to try: say what EC2 said, of each offering tried now or parked before.
        markets = {"never": "on-demand", "always": "spot", "preferred": "spot or on-demand"}[policy]
        said = refused + [f"{o}: {self._unavailable.why(o)}" for o in parked_before]
        shown = "; ".join(said[:6]) + (f"; and {len(said) - 6} more" if len(said) > 6 else "")
        raise CapacityError(
            f"no {markets} capacity for this pod in {', '.join(self._zone_names)}: "
            f"{len(every)} offerings fit, {len(refused)} tried now, {len(parked_before)} refused "
            f"within the last {self._s.unavailable_offering_ttl:.0f}s ({shown})", last_code)

    async def _run(self, offer: Offering, shape: CellShape, token: str) -> dict[str, Any]:
        """RunInstances for one offering: its own client token (derived from the attempt's
        and the offering), so that a retry of the same offering gets the same reservation."""
        subnet = next(s for s, zone in self._zones.items() if zone == offer.zone)
        price = "" if offer.price_per_hour is None else f"{offer.price_per_hour:.5f}"
        tags = ec2_tags({**shape.tags, TAG_TOKEN: token, TAG_MARKET: offer.market, TAG_PRICE: price})
        user_data = UserData(node=self._node, ca=self._pki.ca_pem.decode(), agent_port=self._s.agent_port).encode()
        request: dict[str, Any] = {
            "ImageId": self._image, "InstanceType": offer.instance_type, "MinCount": 1, "MaxCount": 1,
            "UserData": user_data.decode(),
            "NetworkInterfaces": [{
                "DeviceIndex": 0, "SubnetId": subnet, "AssociatePublicIpAddress": False,
                # The pod's own address: the agent keeps the primary one (cells/API.md, Boot).
                "SecondaryPrivateIpAddressCount": 1, "DeleteOnTermination": True,
                **({"Groups": self._groups()} if self._groups() else {}),
            }],
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [{"DeviceName": self._root_device, "Ebs": {
                "DeleteOnTermination": True, "VolumeSize": self._root_volume_gib, "VolumeType": "gp3"}}],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
        }
        if offer.market == SPOT:
            # One-time, terminated when EC2 takes the capacity back; no maximum price (EC2's
            # default: the on-demand price).
            request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        if self._s.instance_profile:
            request["IamInstanceProfile"] = {"Name": self._s.instance_profile}
        client_token = hashlib.sha256(f"{token}/{offer.instance_type}/{offer.zone}/{offer.market}".encode()
                                      ).hexdigest()[:32]
        for _ in range(3):  # bounded: each terminated instance gives the next token
            try:
                reservation = await self._call("launching the cell", self._ec2.run_instances,
                                               ClientToken=client_token, **request)
            except ProviderConfigError as exc:
                if exc.code != "IdempotentParameterMismatch":
                    raise
                # The token launched with other parameters (the config or the price list
                # changed since), and none of its instances lives (the tag lookup above):
                # a token derived from this request, the same for any retry of it.
                digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
                client_token = hashlib.sha256(f"{client_token}/{digest}".encode()).hexdigest()[:32]
                continue
            instance: dict[str, Any] = reservation["Instances"][0]
            crash_point("instance-launched")  # launched, not recorded on the sandbox yet
            if instance["State"]["Name"] not in ("shutting-down", "terminated"):
                return instance
            # The token's instance is gone (its earlier boot failed): the next one's token
            # is derived from it, the same after any restart.
            client_token = hashlib.sha256(f"{client_token}/{instance['InstanceId']}".encode()).hexdigest()[:32]
        raise CellNotFound("every instance launched for this pod attempt was terminated (or its "
                           "launch refused as another request's)")

    def fits(self, cell: Cell, shape: CellShape) -> bool:
        """A running instance fits a pod when its type is one a launch for the pod might
        choose (size, architecture, allow-list, an explicit type) in a market the pod's
        spot policy takes."""
        if self._catalog is None:
            return False
        policy = spot_policy(shape.annotations.get(ANNOTATION_SPOT, ""), self._s.spot)
        market = cell.offering.get("market", "")
        if (policy == "never" and market == "spot") or (policy == "always" and market != "spot"):
            return False
        try:
            choices = self._choices(shape)
        except errors.KiyotError:
            return False
        return cell.offering.get("instance_type", "") in {c.instance_type.name for c in choices}

    async def retag(self, cell_id: str, tags: dict[str, str]) -> None:
        await self._call("tagging the cell", self._ec2.create_tags, Resources=[cell_id], Tags=ec2_tags(tags))
        log.info("instance retagged", instance=cell_id, role=tags.get(TAG_ROLE, ""))

    async def wait_running(self, cell_id: str, timeout: float) -> Cell:
        state = "pending"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    instance = await self._observe(cell_id)
                    if instance is None:
                        raise CellNotFound(f"instance {cell_id} does not exist")
                    state = instance["State"]["Name"]
                    if state == "running" and instance.get("PrivateIpAddress"):
                        cell = self._cell(instance)
                        self._check_private(cell)
                        return cell
                    if state in ("shutting-down", "terminated", "stopping", "stopped"):
                        reason = instance.get("StateReason", {}).get("Message", "")
                        raise CellNotFound(f"instance {cell_id} is {state}" + (f": {reason}" if reason else ""))
        except TimeoutError:
            raise errors.DeadlineExceeded(f"instance {cell_id} was still {state} after {timeout:.0f}s") from None

    async def _observe(self, cell_id: str) -> dict[str, Any] | None:
        """The instance as the next round of the shared poll sees it (None: it does not exist).

        Every instance being waited for is described in one call per round (200 a call),
        every POLL_INTERVAL: a burst of launches costs the API one call a round, not one per
        instance, and no instance waits longer than a round once it runs."""
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._observers.setdefault(cell_id, []).append(future)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="ec2-instance-poll")
        return await future

    async def _poll(self) -> None:
        while self._observers:
            await asyncio.sleep(POLL_INTERVAL)
            batch, self._observers = self._observers, {}
            ids = list(batch)
            try:
                found = await self._describe_by_id(ids)
            except ProviderError as exc:
                for futures in batch.values():
                    for f in futures:
                        if not f.done():
                            f.set_exception(exc)
                continue
            for cell_id, futures in batch.items():
                for f in futures:
                    if not f.done():
                        f.set_result(found.get(cell_id))

    async def identity_fingerprint(self, cell_id: str, timeout: float) -> str:
        """The fingerprint of the key the cell made itself, from its console (boot contract)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            answer = await self._call("reading the cell's console", self._ec2.get_console_output,
                                      InstanceId=cell_id, Latest=True)
            found = console_fingerprint(answer.get("Output") or "")
            if found is not None:
                return found
            if loop.time() > deadline:
                raise errors.DeadlineExceeded(f"instance {cell_id} showed no identity on its console in {timeout:.0f}s")
            await asyncio.sleep(CONSOLE_INTERVAL)

    async def terminate(self, cell_id: str) -> None:
        try:
            await self._call("terminating the cell", self._ec2.terminate_instances, InstanceIds=[cell_id])
        except CellNotFound:
            return  # already gone
        except ProviderConfigError as exc:
            if "InvalidInstanceID" in str(exc):
                return
            raise
        log.info("instance terminated", instance=cell_id)

    async def describe(self, cell_ids: list[str]) -> dict[str, Cell]:
        return {i: self._cell(instance) for i, instance in (await self._describe_by_id(cell_ids)).items()}

    async def list_cells(self, tags: dict[str, str]) -> list[Cell]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        filters.append({"Name": "instance-state-name", "Values": list(LIVE_STATES)})
        return [self._cell(i) for i in await self._describe_instances(filters)]

    async def reset(self) -> int:
        await self._ready()
        cells = await self.list_cells({TAG_NODE: self._node})
        for cell in cells:
            await self.terminate(cell.id)
        return len(cells)

    # -- pieces -------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        async with self._calls:
            try:
                return await asyncio.to_thread(fn, **kwargs)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise aws_error(exc, what) from None

    async def _describe_instances(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        def pages() -> list[dict[str, Any]]:
            paginator = self._ec2.get_paginator("describe_instances")
            return [i for page in paginator.paginate(Filters=filters)
                    for r in page["Reservations"] for i in r["Instances"]]
        result: list[dict[str, Any]] = await self._call("describing instances", pages)
        return result

    async def _describe_by_id(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The instances that exist of `ids` (by a filter, 200 a call: an id EC2 no longer
        knows is left out instead of failing the call)."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 200):
            for instance in await self._describe_instances([{"Name": "instance-id", "Values": ids[start:start + 200]}]):
                found[instance["InstanceId"]] = instance
        return found

    async def _by_token(self, token: str) -> Cell | None:
        found = await self._describe_instances([{"Name": f"tag:{TAG_TOKEN}", "Values": [token]},
                                                {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
        return self._cell(found[0]) if found else None

    async def _resolve_image(self) -> str:
        image = self._s.image.strip()
        if image.startswith("ami-"):
            return image
        name = image.removeprefix("resolve:ssm:")
        answer = await self._call(f"reading the cell image's SSM parameter {name}", self._ssm.get_parameter, Name=name)
        value = str(answer["Parameter"]["Value"])
        if not value.startswith("ami-"):
            raise ProviderConfigError(f"SSM parameter {name} holds {value!r}, not an AMI id")
        return value

    async def _refresh_catalog(self) -> None:
        zones = self._zone_names

        def fetch() -> Catalog:
            types = list(self._ec2.get_paginator("describe_instance_types").paginate())
            offers = list(self._ec2.get_paginator("describe_instance_type_offerings").paginate(
                LocationType="availability-zone", Filters=[{"Name": "location", "Values": zones}]))
            return Catalog.from_pages(types, offers, time.time())
        self._catalog = await self._call("describing instance types", fetch)

    async def _offerings(self, shape: CellShape, policy: str) -> list[Offering]:
        """Every offering that fits the pod under its spot policy, in the order to try them."""
        if self._catalog is None or self._catalog.stale(time.time(), self._s.catalog_max_age):
            await self._refresh_catalog()
        choices = self._choices(shape)
        spot_prices = await self._spot_prices(policy)
        found = offerings(choices, list(self._zones.values()), policy, spot_prices)
        if not found:  # only spot can come to nothing: every fitting type is offered on demand
            raise CapacityError(
                f"no spot price is known for {', '.join(c.instance_type.name for c in choices[:6])}"
                f"{' and more' if len(choices) > 6 else ''} in {', '.join(self._zone_names)} "
                "at or below the on-demand price, and the pod's spot policy is 'always'")
        return found

    def _choices(self, shape: CellShape) -> list[Choice]:
        """The instance types that fit the pod, cheapest first (the catalog is loaded)."""
        assert self._catalog is not None
        annotations = shape.annotations
        return choose(
            cpu_millis=shape.cpu_millis, memory_bytes=shape.memory_bytes,
            architecture=annotations.get(ANNOTATION_ARCHITECTURE, shape.architecture),
            explicit_type=annotations.get(ANNOTATION_INSTANCE_TYPE, ""),
            allowed=[t.strip() for t in self._s.instance_types.split(",") if t.strip()],
            headroom_cpu_millis=self._s.headroom_cpu_millis, headroom_memory_mib=self._s.headroom_memory_mib,
            types=self._catalog.types, offered=self._catalog.offered, zones=set(self._zones.values()),
            prices=self._prices, region=self._s.region)

    async def _spot_prices(self, policy: str) -> dict[tuple[str, str], float]:
        """The current spot price of every (type, zone) of the subnets' zones, read again
        after spot_price_max_age. For a pod that only prefers spot, a failure to read them
        is a warning (it runs on demand); for one that insists, it is its error."""
        if policy == "never":
            return {}
        now = time.monotonic()
        if self._spot_fetched_at is not None and now - self._spot_fetched_at < self._s.spot_price_max_age:
            return self._spot_price_table
        zones = self._zone_names

        def fetch() -> dict[tuple[str, str], float]:
            paginator = self._ec2.get_paginator("describe_spot_price_history")
            return spot_prices_from_aws(paginator.paginate(
                StartTime=datetime.datetime.now(datetime.UTC), ProductDescriptions=["Linux/UNIX"],
                Filters=[{"Name": "availability-zone", "Values": zones}]))
        try:
            self._spot_price_table = await self._call("reading the spot price history", fetch)
        except ProviderError as exc:
            if policy == "always":
                raise
            log.warning("spot prices unknown: pods that prefer spot run on demand", error=str(exc))
            return {}
        self._spot_fetched_at = now
        return self._spot_price_table

    def _check_private(self, cell: Cell) -> None:
        """The node talks to a cell at private addresses of its configured subnets only."""
        agent = urllib.parse.urlsplit(cell.agent_url).hostname or ""
        for address in (cell.address, agent):
            if not any(ipaddress.ip_address(address) in net for net in self._networks):
                raise ProviderConfigError(
                    f"instance {cell.id} has address {address}, outside the configured subnets "
                    f"({', '.join(map(str, self._networks))}): the node does not talk to it")

    @property
    def _zone_names(self) -> list[str]:
        """The configured subnets' zones, sorted."""
        return sorted(set(self._zones.values()))

    def _groups(self) -> list[str]:
        return [g.strip() for g in self._s.security_groups.split(",") if g.strip()]

    def _cell(self, instance: dict[str, Any]) -> Cell:
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        primary = instance.get("PrivateIpAddress", "")
        # The pod IP: the primary interface's second address (the pod's network in the
        # cell), the agent on the primary one.
        interfaces = [n for n in instance.get("NetworkInterfaces", [])
                      if n.get("Attachment", {}).get("DeviceIndex", 0) == 0]
        secondary = [a["PrivateIpAddress"] for n in interfaces for a in n.get("PrivateIpAddresses", [])
                     if not a.get("Primary") and a.get("PrivateIpAddress")]
        address = secondary[0] if secondary else primary
        state = instance["State"]["Name"]
        instance_type = instance.get("InstanceType", "")
        on_demand = self._prices.price(self._s.region, instance_type)
        market = "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"
        offering = {
            "instance_type": instance_type, "zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
            "market": market,
            # USD per hour at launch: the spot price then, or the on-demand price.
            "price_per_hour": tags.get(TAG_PRICE) or ("" if on_demand is None or market == "spot"
                                                      else f"{on_demand:.5f}"),
            "on_demand_price_per_hour": "" if on_demand is None else f"{on_demand:.5f}",
            "price_snapshot": self._prices.date,
        }
        launched = instance.get("LaunchTime")
        return Cell(
            offering=offering, launched_at=int(launched.timestamp() * 1e9) if launched is not None else 0,
            id=instance["InstanceId"], sandbox_id=tags.get(TAG_SANDBOX, ""), address=address,
            agent_url=f"https://{primary}:{self._s.agent_port}", server_name=cell_server_name(instance["InstanceId"]),
            state={"pending": "pending", "running": "running", "stopping": "stopped",
                   "stopped": "stopped"}.get(state, "terminated"),
            state_reason=str(instance.get("StateReason", {}).get("Message", "")),
            tags=tags, pull_path="", enrollment="console",
            # The cell's own host name, as EC2 names its instances (ip-10-0-1-5).
            hostname=("ip-" + primary.replace(".", "-")) if primary else instance["InstanceId"],
        )

