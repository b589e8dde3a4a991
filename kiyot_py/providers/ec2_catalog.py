"""Which EC2 instance type a pod's cell gets, and what it costs per hour.

A cell is a whole VM, so its instance type is the pod's size: kiyot launches the
cheapest type that holds what the pod asks for plus what the cell itself takes (its
kernel and agent: the headroom). This module only decides. It calls no AWS API: the
EC2 provider fetches DescribeInstanceTypes and DescribeInstanceTypeOfferings (rarely,
they change when AWS adds a type) and hands the response pages to
`instance_types_from_aws` and `offered_types`, which keep a `Catalog`.

Prices come from a snapshot packaged with kiyot-py, not from the Pricing API: that
API answers in a few regions only, needs a permission of its own, and on-demand
prices change about never. `tools/ec2_prices.py` regenerates the snapshot. A type the
snapshot has no price for is never chosen by size, since we cannot tell whether it is
the cheap one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from types import MappingProxyType
from typing import Any

from kiyot_py.providers.base import ProviderConfigError

DEFAULT_ARCHITECTURE = "amd64"
# AWS's names for processor architectures -> GOARCH, the names pods and images use.
# i386 (old 32-bit-capable types also say x86_64) and the Mac ones are not for cells.
_AWS_ARCHITECTURES = {"x86_64": "amd64", "arm64": "arm64"}
MIB = 1024 * 1024
PACKAGED_PRICES = "ec2-on-demand-prices.json"
# How many names an error lists per reason before it says "and N more".
_LISTED = 6


@dataclass(frozen=True)
class InstanceType:
    """An EC2 instance type's size, as DescribeInstanceTypes reports it."""

    name: str  # "t3.medium"
    vcpus: int
    memory_mib: int
    architectures: tuple[str, ...]  # GOARCH: ("amd64",), ("arm64",); () for none a cell can use
    burstable: bool  # T-families: CPU credits; allowed like any other type

    @property
    def family(self) -> str:
        """ "t3" for "t3.medium": what an allow-list entry such as "t3" or "t3.*" names."""
        return self.name.split(".", 1)[0]


def instance_types_from_aws(pages: Iterable[Mapping[str, Any]]) -> list[InstanceType]:
    """Parse DescribeInstanceTypes response pages (boto3's shape) into InstanceTypes.

    An entry without a vCPU count or a memory size cannot be sized, so it is left out.
    """
    out: list[InstanceType] = []
    for page in pages:
        for entry in page.get("InstanceTypes", ()):
            name = entry.get("InstanceType")
            vcpus = entry.get("VCpuInfo", {}).get("DefaultVCpus")
            memory = entry.get("MemoryInfo", {}).get("SizeInMiB")
            if not name or not vcpus or not memory:
                continue
            archs: list[str] = []
            for aws_arch in entry.get("ProcessorInfo", {}).get("SupportedArchitectures", ()):
                arch = _AWS_ARCHITECTURES.get(aws_arch)
                if arch and arch not in archs:
                    archs.append(arch)
            out.append(
                InstanceType(
                    name=name,
                    vcpus=int(vcpus),
                    memory_mib=int(memory),
                    architectures=tuple(archs),
                    burstable=bool(entry.get("BurstablePerformanceSupported", False)),
                )
            )
    return out


def offered_types(pages: Iterable[Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    """Parse DescribeInstanceTypeOfferings pages into instance type -> zones it is offered in.

    The pages must come from a call with LocationType="availability-zone": a zone ID
    (use1-az1) or a region would never match the subnets' zone names.
    """
    zones: dict[str, set[str]] = {}
    for page in pages:
        for offering in page.get("InstanceTypeOfferings", ()):
            kind = offering.get("LocationType", "availability-zone")
            if kind != "availability-zone":
                raise ValueError(f"instance type offerings by {kind}, not by availability-zone")
            zones.setdefault(offering["InstanceType"], set()).add(offering["Location"])
    return {name: frozenset(where) for name, where in zones.items()}


@dataclass(frozen=True)
class Catalog:
    """The instance types of a region and where they are offered, as fetched at one time.

    Both change only when AWS adds a type or a zone, so the provider fetches them at
    start and again when `stale`; `fetched_at` is on whatever clock the provider
    passes to `stale` (time.monotonic() or time.time(), the same one for both).
    """

    types: tuple[InstanceType, ...]
    offered: Mapping[str, frozenset[str]]
    fetched_at: float

    @classmethod
    def from_pages(
        cls,
        type_pages: Iterable[Mapping[str, Any]],
        offering_pages: Iterable[Mapping[str, Any]],
        fetched_at: float,
    ) -> Catalog:
        return cls(tuple(instance_types_from_aws(type_pages)), offered_types(offering_pages), fetched_at)

    def stale(self, now: float, max_age: float) -> bool:
        """Whether to fetch again: older than max_age, or the clock went back past fetched_at."""
        age = now - self.fetched_at
        return not 0 <= age < max_age


@dataclass(frozen=True)
class PriceSnapshot:
    """On-demand prices per hour (USD, Linux, shared tenancy), by region and instance type.

    A snapshot is dated and names its source, so that whoever reads a cost estimate
    can tell how old and how trustworthy its figures are.
    """

    source: str
    date: str  # ISO date the figures were taken
    currency: str
    terms: str
    regions: Mapping[str, Mapping[str, float]] = field(repr=False)

    def __post_init__(self) -> None:
        # Read-only views: the packaged snapshot is loaded once and shared.
        frozen = MappingProxyType({r: MappingProxyType(dict(p)) for r, p in self.regions.items()})
        object.__setattr__(self, "regions", frozen)

    def price(self, region: str, instance_type: str) -> float | None:
        """USD per hour, or None when the snapshot has no price (never a guess)."""
        return self.regions.get(region, {}).get(instance_type)

    @classmethod
    def from_json(cls, doc: Any) -> PriceSnapshot:
        """Check and take a snapshot document (the format tools/ec2_prices.py writes)."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        for key in ("source", "date", "currency", "terms"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise ValueError(f"{key!r} missing or not a string")
        date.fromisoformat(doc["date"])  # ValueError when not YYYY-MM-DD
        if doc["currency"] != "USD":
            raise ValueError(f"currency {doc['currency']!r}: prices are in USD")
        regions = doc.get("regions")
        if not isinstance(regions, dict) or not regions:
            raise ValueError("'regions' missing or empty")
        for region, prices in regions.items():
            if not isinstance(prices, dict):
                raise ValueError(f"region {region!r}: not an object of instance type -> price")
            for name, value in prices.items():
                if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
                    raise ValueError(f"{region} {name}: price {value!r} is not a positive number")
        return cls(
            source=doc["source"],
            date=doc["date"],
            currency=doc["currency"],
            terms=doc["terms"],
            regions={r: {n: float(v) for n, v in p.items()} for r, p in regions.items()},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PriceSnapshot:
        """Read a snapshot file; ProviderConfigError names the file and what is wrong."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(json.load(f))
        except (OSError, ValueError) as e:
            raise ProviderConfigError(f"EC2 price snapshot {os.fspath(path)}: {e}") from e

    @classmethod
    def packaged(cls) -> PriceSnapshot:
        """The snapshot shipped in kiyot_py/providers/data/."""
        with resources.as_file(resources.files(__package__ or "kiyot_py.providers") / "data" / PACKAGED_PRICES) as p:
            return cls.load(p)


@dataclass(frozen=True)
class Choice:
    """An instance type that fits, what it costs, and the zones (of those asked) that offer it."""

    instance_type: InstanceType
    # None only for a type the pod named explicitly that the snapshot has no price for.
    price_per_hour: float | None
    zones: frozenset[str]


def allows(allowed: Sequence[str], instance_type: InstanceType) -> bool:
    """Whether an allow-list lets a type in: empty allows all; "t3.medium", "t3" or "t3.*"."""
    entries = [a.strip() for a in allowed if a.strip()]
    if not entries:
        return True
    for entry in entries:
        if entry == instance_type.name:
            return True
        family = entry[:-2] if entry.endswith(".*") else entry
        if "." not in family and family == instance_type.family:
            return True
    return False


def unmatched_allowed(allowed: Sequence[str], types: Sequence[InstanceType]) -> list[str]:
    """Allow-list entries that name no type at all (a typo such as "t3.meduim"), to warn about at start."""
    return [entry for entry in (a.strip() for a in allowed) if entry and not any(allows([entry], t) for t in types)]


def choose(
    *,
    cpu_millis: int,
    memory_bytes: int,
    architecture: str,
    explicit_type: str,
    allowed: Sequence[str],
    headroom_cpu_millis: int,
    headroom_memory_mib: int,
    types: Sequence[InstanceType],
    offered: Mapping[str, frozenset[str]],
    zones: Collection[str],
    prices: PriceSnapshot,
    region: str,
) -> list[Choice]:
    """Every allowed instance type that fits the pod, cheapest first.

    The list, not just its head, so that the provider can go on to the next type when
    a zone has no capacity for the first. Ties go to fewer vCPUs, then less memory,
    then the name, so that the order is always the same.

    A type fits when its vCPUs hold cpu_millis + headroom_cpu_millis and its memory
    holds memory_bytes (rounded up to MiB) + headroom_memory_mib: a pod that asks for
    nothing gets the smallest type that holds the headroom. It must also run the
    architecture ("" means amd64), be offered in at least one of `zones` (those of the
    configured subnets) and have a price for `region` in the snapshot.

    `explicit_type` (a pod annotation) is the user's own choice: it bypasses the
    allow-list and the size check, and is returned alone, but it must exist, be
    offered in `zones` and run the architecture; its price_per_hour is None when the
    snapshot has none.

    Raises ProviderConfigError saying what was asked and why nothing fits.
    """
    arch = architecture or DEFAULT_ARCHITECTURE
    need_cpu = max(cpu_millis, 0) + max(headroom_cpu_millis, 0)
    need_mib = -(-max(memory_bytes, 0) // MIB) + max(headroom_memory_mib, 0)
    wanted = frozenset(zones)
    if not wanted:
        raise ProviderConfigError("no availability zones to launch cells in (are subnets configured?)")
    where = _zone_list(wanted)

    if explicit_type:
        return [_explicit(explicit_type, arch, types, offered, wanted, prices, region, where)]

    fits: list[Choice] = []
    # Why allowed types were left out, one list per reason, for the error when none fits.
    too_small: list[InstanceType] = []
    wrong_arch: list[str] = []
    not_offered: list[str] = []
    no_price: list[str] = []
    for t in types:
        if not allows(allowed, t):
            continue
        if arch not in t.architectures:
            wrong_arch.append(t.name)
            continue
        in_zones = offered.get(t.name, frozenset()) & wanted
        if not in_zones:
            not_offered.append(t.name)
            continue
        price = prices.price(region, t.name)
        if price is None:
            no_price.append(t.name)
            continue
        if t.vcpus * 1000 < need_cpu or t.memory_mib < need_mib:
            too_small.append(t)
            continue
        fits.append(Choice(t, price, in_zones))
    if fits:
        return sorted(fits, key=_cheapest_first)

    pod_mib = -(-max(memory_bytes, 0) // MIB)
    entries = [a.strip() for a in allowed if a.strip()]
    why: list[str] = []
    if too_small:
        too_small.sort(key=lambda t: (-t.memory_mib, -t.vcpus, t.name))  # the biggest first
        why.append("too small: " + _names([f"{t.name} ({t.vcpus} vCPU, {_memory(t.memory_mib)})" for t in too_small]))
    if wrong_arch:
        why.append(f"not for {arch}: " + _names(sorted(wrong_arch)))
    if not_offered:
        why.append("not offered in those zones: " + _names(sorted(not_offered)))
    if no_price:
        why.append(f"no {region} price in the snapshot of {prices.date}: " + _names(sorted(no_price)))
    unknown = unmatched_allowed(allowed, types)
    if unknown:
        why.append(f"no such instance type in {region}: " + _names(unknown))
    which = "allowed instance type" if entries else "instance type"
    scope = ", ".join(entries) if entries else "any"
    message = (
        f"no {which} fits {_memory(need_mib)} and {_cpu(need_cpu)} on {arch} in {where} (allowed: {scope}): "
        + "; ".join(why or ["no instance types known"])
        + f" (the pod asks for {_memory(pod_mib)} and {_cpu(max(cpu_millis, 0))}, the cell takes"
        f" {_memory(max(headroom_memory_mib, 0))} and {_cpu(max(headroom_cpu_millis, 0))} more)"
    )
    raise ProviderConfigError(message)


def _explicit(
    name: str,
    arch: str,
    types: Sequence[InstanceType],
    offered: Mapping[str, frozenset[str]],
    wanted: frozenset[str],
    prices: PriceSnapshot,
    region: str,
    where: str,
) -> Choice:
    """The type a pod named, if it can run at all; the size is the user's business."""
    t = next((t for t in types if t.name == name), None)
    if t is None:
        raise ProviderConfigError(
            f"instance type {name!r} asked for by the pod is not an EC2 instance type in {region}"
        )
    if arch not in t.architectures:
        runs = ", ".join(t.architectures) or "no architecture a cell can use"
        raise ProviderConfigError(f"instance type {name} asked for by the pod runs {runs}, not {arch}")
    in_zones = offered.get(name, frozenset()) & wanted
    if not in_zones:
        elsewhere = _zone_list(offered.get(name, frozenset())) or "no zone"
        raise ProviderConfigError(
            f"instance type {name} asked for by the pod is not offered in {where} (it is in: {elsewhere})"
        )
    return Choice(t, prices.price(region, name), in_zones)


def _cheapest_first(c: Choice) -> tuple[float, int, int, str]:
    t = c.instance_type  # (chosen by size, so price_per_hour is never None here)
    return (c.price_per_hour or 0.0, t.vcpus, t.memory_mib, t.name)


def _cpu(millis: int) -> str:
    return f"{millis / 1000:g} vCPU"


def _memory(mib: int) -> str:
    return f"{mib} MiB" if mib < 1024 else f"{round(mib / 1024, 2):g} GiB"


def _zone_list(zones: Collection[str]) -> str:
    return ", ".join(sorted(zones))


def _names(names: Sequence[str]) -> str:
    if len(names) <= _LISTED:
        return ", ".join(names)
    return ", ".join(names[:_LISTED]) + f" and {len(names) - _LISTED} more"
