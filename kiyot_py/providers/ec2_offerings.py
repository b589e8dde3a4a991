"""Where and how a cell is launched: (instance type, zone, market) offerings, cheapest first.

`ec2_catalog.choose` says which instance types fit a pod; this module turns them into the
offerings to try, in order, and remembers which ones EC2 just refused:

- **Markets.** A pod's spot policy (`never`, `preferred`, `always`; its annotation or the
  node's default) decides which markets it may use. `preferred` tries every spot offering
  before any on-demand one. A spot offering exists where the spot price history has a
  price for the (type, zone) below the on-demand price (EC2's default maximum price).
- **Unavailable offerings.** A capacity error parks what it names for a while (3 minutes
  by default, as kip and Karpenter do): the (type, zone, market) for most codes, the zone
  for a subnet out of addresses, the whole spot market for the account's spot limit. No
  launch tries a parked offering until it expires.

It calls no AWS API: the provider fetches the spot price history and hands its pages here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kiyot_py import errors
from kiyot_py.providers.ec2_catalog import Choice

SPOT_POLICIES = ("never", "preferred", "always")
ON_DEMAND, SPOT = "on-demand", "spot"
ANY = "*"
# Capacity codes that speak of more than one (type, zone, market).
_ZONE_WIDE = {"InsufficientFreeAddressesInSubnet"}  # the subnet (its zone) is full, whatever the type
_MARKET_WIDE = {"MaxSpotInstanceCountExceeded"}  # the account's spot limit, in every zone


def spot_policy(annotation: str, default: str) -> str:
    """The pod's policy: its annotation if it has one, else the node's default."""
    policy = (annotation or default).strip().lower()
    if policy not in SPOT_POLICIES:
        raise errors.InvalidArgument(
            f"spot policy {policy!r} (annotation kiyot-py.io/spot or aws.spot) is not one of "
            f"{', '.join(SPOT_POLICIES)}")
    return policy


@dataclass(frozen=True)
class Offering:
    """One way to launch a cell: a type in a zone, on a market, at a price per hour (USD)."""

    choice: Choice
    zone: str
    market: str
    price_per_hour: float | None  # None: an explicitly named type without a known price

    @property
    def instance_type(self) -> str:
        return self.choice.instance_type.name

    def __str__(self) -> str:
        return f"{self.instance_type} in {self.zone} ({self.market})"


def spot_prices_from_aws(pages: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """(type, zone) -> the latest spot price, from DescribeSpotPriceHistory pages (Linux)."""
    latest: dict[tuple[str, str], tuple[Any, float]] = {}
    for page in pages:
        for entry in page.get("SpotPriceHistory", ()):
            if not str(entry.get("ProductDescription", "")).startswith("Linux/UNIX"):
                continue
            try:
                price = float(entry["SpotPrice"])
            except (KeyError, TypeError, ValueError):
                continue
            key = (str(entry.get("InstanceType", "")), str(entry.get("AvailabilityZone", "")))
            stamp = entry.get("Timestamp")
            seen = latest.get(key)
            if price > 0 and (seen is None or (stamp is not None and seen[0] is not None and stamp > seen[0])):
                latest[key] = (stamp, price)
    return {key: price for key, (_, price) in latest.items()}


def offerings(choices: Sequence[Choice], zones: Sequence[str], policy: str,
              spot_prices: Mapping[tuple[str, str], float]) -> list[Offering]:
    """Every offering of the fitting types in the configured zones that the policy allows,
    in the order to try them: by price (then the type's own order, then the zone), spot
    before on-demand when spot is preferred."""
    on_demand: list[Offering] = []
    spot: list[Offering] = []
    for choice in choices:
        for zone in sorted(set(zones) & choice.zones):
            if policy != "always":
                on_demand.append(Offering(choice, zone, ON_DEMAND, choice.price_per_hour))
            price = spot_prices.get((choice.instance_type.name, zone))
            cap = choice.price_per_hour
            if policy != "never" and price is not None and (cap is None or price <= cap):
                spot.append(Offering(choice, zone, SPOT, price))
    ranks = {id(c): i for i, c in enumerate(choices)}

    def order(o: Offering) -> tuple[float, int, str]:
        return (o.price_per_hour if o.price_per_hour is not None else 0.0, ranks[id(o.choice)], o.zone)
    return sorted(spot, key=order) + sorted(on_demand, key=order)


class Unavailable:
    """Offerings EC2 just refused for want of capacity, each parked until it expires."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._until: dict[tuple[str, str, str], float] = {}
        self._why: dict[tuple[str, str, str], str] = {}

    def park(self, offering: Offering, code: str, why: str = "") -> tuple[str, str, str]:
        """Park what a capacity error with this code says is out (`why`: EC2's words, for
        the error of a launch that finds nothing else); returns the key parked."""
        if code in _MARKET_WIDE:
            key = (ANY, ANY, offering.market)
        elif code in _ZONE_WIDE:
            key = (ANY, offering.zone, ANY)
        else:
            key = (offering.instance_type, offering.zone, offering.market)
        self.park_key(key, why or code)
        return key

    def park_key(self, key: tuple[str, str, str], why: str) -> None:
        """Park (type, zone, market) directly, `*` for any: a spot interruption's offering."""
        self._until[key] = self._clock() + self._ttl
        self._why[key] = why

    def why(self, offering: Offering) -> str:
        """What EC2 said when it refused this offering (or what covers it), if it is parked."""
        for key in self._keys(offering):
            if key in self._until:
                return self._why.get(key, "")
        return ""

    @staticmethod
    def _keys(offering: Offering) -> tuple[tuple[str, str, str], ...]:
        return ((offering.instance_type, offering.zone, offering.market), (ANY, offering.zone, ANY),
                (ANY, ANY, offering.market))

    def parked(self, offering: Offering) -> bool:
        now = self._clock()
        for key in self._keys(offering):
            until = self._until.get(key)
            if until is not None:
                if until > now:
                    return True
                del self._until[key]
                self._why.pop(key, None)
        return False

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for until in self._until.values() if until > now)
