"""Choosing an EC2 cell's instance type: explicit figures, no clock, no network.

Instance types and where they are offered are AWS's own (moto's recorded
DescribeInstanceTypes and DescribeInstanceTypeOfferings data, read through an
in-process moto.mock_aws EC2 client), so no vCPU or memory figure here is typed by
hand; prices are the packaged snapshot's, or small snapshots built here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import boto3
import moto
import pytest

from kiyot_py.providers.base import ProviderConfigError
from kiyot_py.providers.ec2_catalog import (
    Catalog,
    Choice,
    InstanceType,
    PriceSnapshot,
    choose,
    instance_types_from_aws,
    offered_types,
    unmatched_allowed,
)

REGION = "us-east-1"
ZONES = ("us-east-1a", "us-east-1b")
ALLOWED = ("t3.small", "t3.medium", "t3.large", "m5.large", "c5.xlarge")
HEADROOM_MIB = 256
HEADROOM_MILLIS = 100
GIB = 1024**3
MIB = 1024**2

# The types the snapshot must price, in both regions it covers.
T_SIZES = ("nano", "micro", "small", "medium", "large", "xlarge", "2xlarge")
SIZES = ("large", "xlarge", "2xlarge", "4xlarge")
DONE_WHEN = [f"{f}.{s}" for f in ("t3", "t3a", "t4g") for s in T_SIZES] + [
    f"{f}.{s}" for f in ("m5", "m6i", "m6g", "m7g", "c5", "c6i", "c6g", "r5", "r6i", "r6g") for s in SIZES
]


@pytest.fixture(scope="module")
def aws() -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """moto's DescribeInstanceTypes and DescribeInstanceTypeOfferings pages for us-east-1."""
    with moto.mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
        type_pages = list(ec2.get_paginator("describe_instance_types").paginate())
        offering_pages = list(
            ec2.get_paginator("describe_instance_type_offerings").paginate(LocationType="availability-zone")
        )
    yield type_pages, offering_pages


@pytest.fixture(scope="module")
def catalog(aws: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> Catalog:
    type_pages, offering_pages = aws
    return Catalog.from_pages(type_pages, offering_pages, fetched_at=1000.0)


@pytest.fixture(scope="module")
def prices() -> PriceSnapshot:
    return PriceSnapshot.packaged()


def by_name(catalog: Catalog) -> dict[str, InstanceType]:
    return {t.name: t for t in catalog.types}


def snapshot(region_prices: Mapping[str, float]) -> PriceSnapshot:
    return PriceSnapshot(
        source="test figures",
        date="2026-01-01",
        currency="USD",
        terms="OnDemand, Linux, Shared tenancy, no pre-installed software",
        regions={REGION: dict(region_prices)},
    )


def pick(
    catalog: Catalog,
    prices: PriceSnapshot,
    *,
    cpu_millis: int = 0,
    memory_bytes: int = 0,
    architecture: str = "",
    explicit_type: str = "",
    allowed: tuple[str, ...] = ALLOWED,
    zones: tuple[str, ...] = ZONES,
    headroom_cpu_millis: int = HEADROOM_MILLIS,
    headroom_memory_mib: int = HEADROOM_MIB,
) -> list[Choice]:
    return choose(
        cpu_millis=cpu_millis,
        memory_bytes=memory_bytes,
        architecture=architecture,
        explicit_type=explicit_type,
        allowed=allowed,
        headroom_cpu_millis=headroom_cpu_millis,
        headroom_memory_mib=headroom_memory_mib,
        types=catalog.types,
        offered=catalog.offered,
        zones=zones,
        prices=prices,
        region=REGION,
    )


def names(choices: list[Choice]) -> list[str]:
    return [c.instance_type.name for c in choices]


# --- AWS's data, parsed ----------------------------------------------------------------


def test_instance_types_are_parsed_from_describe_instance_types(catalog: Catalog) -> None:
    types = by_name(catalog)
    assert len(types) > 500
    assert types["t3.medium"] == InstanceType("t3.medium", 2, 4096, ("amd64",), True)
    assert types["t3.small"] == InstanceType("t3.small", 2, 2048, ("amd64",), True)
    assert types["m5.large"] == InstanceType("m5.large", 2, 8192, ("amd64",), False)
    assert types["c5.xlarge"] == InstanceType("c5.xlarge", 4, 8192, ("amd64",), False)
    assert types["m7g.large"] == InstanceType("m7g.large", 2, 8192, ("arm64",), False)
    assert types["t4g.nano"] == InstanceType("t4g.nano", 2, 512, ("arm64",), True)
    # AWS says i386 and x86_64: i386 is dropped; Mac architectures are not for cells.
    assert types["t2.micro"].architectures == ("amd64",)
    assert types["mac1.metal"].architectures == ()
    assert types["t3.medium"].family == "t3"


def test_instance_types_without_a_size_are_left_out() -> None:
    page = {
        "InstanceTypes": [
            {"InstanceType": "x9.large", "ProcessorInfo": {"SupportedArchitectures": ["x86_64"]}},
            {
                "InstanceType": "x9.xlarge",
                "VCpuInfo": {"DefaultVCpus": 4},
                "MemoryInfo": {"SizeInMiB": 16384},
                "ProcessorInfo": {"SupportedArchitectures": ["i386", "x86_64", "arm64"]},
            },
        ]
    }
    assert instance_types_from_aws([page]) == [InstanceType("x9.xlarge", 4, 16384, ("amd64", "arm64"), False)]


def test_offerings_are_parsed_into_zones_per_type(catalog: Catalog) -> None:
    all_but_e = frozenset({"us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d", "us-east-1f"})
    assert catalog.offered["t3.medium"] == all_but_e  # us-east-1e (use1-az3) has no t3
    assert catalog.offered["m7g.large"] == all_but_e
    assert "us-east-1e" in catalog.offered["m4.large"]


def test_offerings_by_region_or_zone_id_are_refused() -> None:
    page = {"InstanceTypeOfferings": [{"InstanceType": "t3.small", "LocationType": "region", "Location": REGION}]}
    with pytest.raises(ValueError, match="by region"):
        offered_types([page])


def test_catalog_goes_stale_with_age_or_a_clock_gone_back(catalog: Catalog) -> None:
    assert not catalog.stale(now=1000.0, max_age=3600)
    assert not catalog.stale(now=4599.0, max_age=3600)
    assert catalog.stale(now=4600.0, max_age=3600)
    assert catalog.stale(now=999.0, max_age=3600)


# --- the packaged snapshot --------------------------------------------------------------


def test_packaged_snapshot_names_a_source_and_a_date(prices: PriceSnapshot) -> None:
    assert "aws.amazon.com/ec2/pricing" in prices.source
    assert "transcribed" in prices.source
    assert "tools/ec2_prices.py" in prices.source
    assert date.fromisoformat(prices.date)
    assert prices.currency == "USD"
    assert prices.terms == "OnDemand, Linux, Shared tenancy, no pre-installed software"


def test_packaged_snapshot_prices_the_common_types(prices: PriceSnapshot, catalog: Catalog) -> None:
    assert prices.price(REGION, "t3.small") == 0.0208
    assert prices.price(REGION, "t3.medium") == 0.0416
    assert prices.price(REGION, "t3.large") == 0.0832
    assert prices.price(REGION, "m5.large") == 0.096
    assert prices.price(REGION, "c5.xlarge") == 0.17
    for region in ("us-east-1", "us-west-2"):
        missing = [t for t in DONE_WHEN if prices.price(region, t) is None]
        assert missing == [], region
    # Every type the snapshot prices is a real one (no typo, no invented type).
    known = by_name(catalog)
    for region, by_type in prices.regions.items():
        assert [t for t in by_type if t not in known] == [], region
    assert prices.price("eu-west-1", "t3.small") is None
    assert prices.price(REGION, "t3.gigantic") is None


def test_a_bad_snapshot_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"source": "x", "date": "02/12/2026", "currency": "USD", "terms": "t", "regions": {}}))
    with pytest.raises(ProviderConfigError, match=r"prices\.json: .*isoformat"):
        PriceSnapshot.load(path)
    path.write_text(
        json.dumps(
            {"source": "x", "date": "2026-12-02", "currency": "USD", "terms": "t", "regions": {REGION: {"t3.nano": 0}}}
        )
    )
    with pytest.raises(ProviderConfigError, match=r"t3\.nano: price 0 is not a positive number"):
        PriceSnapshot.load(path)
    with pytest.raises(ProviderConfigError, match="No such file"):
        PriceSnapshot.load(tmp_path / "absent.json")


# --- choosing ---------------------------------------------------------------------------


def test_three_gib_and_one_cpu_gets_t3_medium_first(catalog: Catalog, prices: PriceSnapshot) -> None:
    choices = pick(catalog, prices, cpu_millis=1000, memory_bytes=3 * GIB)
    # 3 GiB + 256 MiB = 3328 MiB and 1.1 vCPU: t3.small (2 GiB) is too small.
    assert [(names([c])[0], c.price_per_hour) for c in choices] == [
        ("t3.medium", 0.0416),
        ("t3.large", 0.0832),
        ("m5.large", 0.096),
        ("c5.xlarge", 0.17),
    ]
    assert all(c.zones == frozenset(ZONES) for c in choices)


def test_six_gib_gets_t3_large_first(catalog: Catalog, prices: PriceSnapshot) -> None:
    choices = pick(catalog, prices, cpu_millis=1000, memory_bytes=6 * GIB)
    assert names(choices) == ["t3.large", "m5.large", "c5.xlarge"]


def test_a_pod_asking_nothing_gets_the_cheapest(catalog: Catalog, prices: PriceSnapshot) -> None:
    assert names(pick(catalog, prices))[0] == "t3.small"
    assert names(pick(catalog, prices, allowed=("t3",)))[0] == "t3.nano"  # 512 MiB holds the 256 of headroom


def test_headroom_and_rounding_count_against_the_size(catalog: Catalog, prices: PriceSnapshot) -> None:
    t3 = ("t3",)
    assert names(pick(catalog, prices, allowed=t3, memory_bytes=256 * MIB))[0] == "t3.nano"  # 512 MiB exactly
    assert names(pick(catalog, prices, allowed=t3, memory_bytes=256 * MIB + 1))[0] == "t3.micro"  # 513 MiB
    assert names(pick(catalog, prices, allowed=t3, headroom_memory_mib=600))[0] == "t3.micro"
    assert names(pick(catalog, prices, allowed=t3, cpu_millis=1900))[0] == "t3.nano"  # 2000 millicores exactly
    assert names(pick(catalog, prices, allowed=t3, cpu_millis=1901))[0] == "t3.xlarge"  # 4 vCPU


def test_a_family_allows_all_its_sizes(catalog: Catalog, prices: PriceSnapshot) -> None:
    choices = pick(catalog, prices, memory_bytes=3 * GIB, allowed=("t3",))
    assert names(choices) == ["t3.medium", "t3.large", "t3.xlarge", "t3.2xlarge"]
    assert names(pick(catalog, prices, memory_bytes=3 * GIB, allowed=("t3.*",))) == names(choices)
    # "t3" is not "t3a"; families and exact names mix.
    assert names(pick(catalog, prices, memory_bytes=3 * GIB, allowed=("t3a.large", "m5"))) == [
        "t3a.large",
        "m5.large",
        "m5.xlarge",
        "m5.2xlarge",
        "m5.4xlarge",
    ]


def test_burstable_and_fixed_types_compete_on_price(catalog: Catalog, prices: PriceSnapshot) -> None:
    choices = pick(catalog, prices, memory_bytes=3 * GIB, allowed=("m5.large", "t3.large"))
    assert names(choices) == ["t3.large", "m5.large"]
    assert [c.instance_type.burstable for c in choices] == [True, False]


def test_arm64_picks_only_arm64_types(catalog: Catalog, prices: PriceSnapshot) -> None:
    mixed = ("t3", "t4g", "m5", "m7g")
    choices = pick(catalog, prices, memory_bytes=3 * GIB, architecture="arm64", allowed=mixed)
    # m7g.medium (1 vCPU, 4 GiB) holds 3.25 GiB and 0.1 vCPU, and costs less than t4g.large.
    assert names(choices)[:4] == ["t4g.medium", "m7g.medium", "t4g.large", "m7g.large"]
    assert {c.instance_type.family for c in choices} == {"t4g", "m7g"}
    anything = pick(catalog, prices, architecture="arm64", allowed=())
    assert anything and all("arm64" in c.instance_type.architectures for c in anything)
    assert names(anything)[0] == "t4g.nano"
    # "" is amd64.
    assert {c.instance_type.family for c in pick(catalog, prices, allowed=mixed)} == {"t3", "m5"}


def test_ties_go_to_fewer_vcpus_then_less_memory_then_the_name(catalog: Catalog) -> None:
    same = snapshot({"c5.xlarge": 0.1, "r5.large": 0.1, "m5.large": 0.1, "m6i.large": 0.1})
    choices = pick(catalog, same, allowed=("c5.xlarge", "r5.large", "m6i.large", "m5.large"))
    assert names(choices) == ["m5.large", "m6i.large", "r5.large", "c5.xlarge"]


def test_a_type_not_offered_in_the_zones_is_skipped(catalog: Catalog) -> None:
    prices = snapshot({"t3.medium": 0.0416, "m4.large": 0.10})
    only_e = pick(catalog, prices, memory_bytes=3 * GIB, allowed=("t3.medium", "m4.large"), zones=("us-east-1e",))
    assert names(only_e) == ["m4.large"]
    assert only_e[0].zones == frozenset({"us-east-1e"})
    a_and_e = pick(catalog, prices, memory_bytes=3 * GIB, allowed=("t3.medium",), zones=("us-east-1a", "us-east-1e"))
    assert names(a_and_e) == ["t3.medium"]
    assert a_and_e[0].zones == frozenset({"us-east-1a"})


def test_a_type_without_a_price_is_skipped(catalog: Catalog, prices: PriceSnapshot) -> None:
    without_medium = snapshot({n: p for n, p in prices.regions[REGION].items() if n != "t3.medium"})
    choices = pick(catalog, without_medium, cpu_millis=1000, memory_bytes=3 * GIB)
    assert names(choices) == ["t3.large", "m5.large", "c5.xlarge"]
    # m5a.large is a real type, but the packaged snapshot has no price for it.
    assert names(pick(catalog, prices, allowed=("m5a.large", "m5.large"))) == ["m5.large"]


def test_an_explicit_type_bypasses_the_allow_list(catalog: Catalog, prices: PriceSnapshot) -> None:
    choices = pick(catalog, prices, memory_bytes=3 * GIB, explicit_type="r5.large")
    assert choices == [Choice(by_name(catalog)["r5.large"], 0.126, frozenset(ZONES))]
    # Returned alone even when it is smaller than the pod asks: the user named it.
    assert names(pick(catalog, prices, memory_bytes=6 * GIB, explicit_type="t3.small")) == ["t3.small"]
    # No price in the snapshot: still the user's choice, at an unknown price.
    (m4,) = pick(catalog, prices, explicit_type="m4.large")
    assert m4.price_per_hour is None
    assert names(pick(catalog, prices, explicit_type="m7g.large", architecture="arm64")) == ["m7g.large"]


def test_an_explicit_type_must_exist_run_the_architecture_and_be_offered(
    catalog: Catalog, prices: PriceSnapshot
) -> None:
    with pytest.raises(ProviderConfigError) as e:
        pick(catalog, prices, explicit_type="t3.gigantic")
    assert str(e.value) == "instance type 't3.gigantic' asked for by the pod is not an EC2 instance type in us-east-1"
    with pytest.raises(ProviderConfigError) as e:
        pick(catalog, prices, explicit_type="m7g.large")
    assert str(e.value) == "instance type m7g.large asked for by the pod runs arm64, not amd64"
    with pytest.raises(ProviderConfigError) as e:
        pick(catalog, prices, explicit_type="t3.medium", zones=("us-east-1e",))
    assert str(e.value) == (
        "instance type t3.medium asked for by the pod is not offered in us-east-1e"
        " (it is in: us-east-1a, us-east-1b, us-east-1c, us-east-1d, us-east-1f)"
    )


def test_nothing_fits_says_what_was_asked_and_why(catalog: Catalog, prices: PriceSnapshot) -> None:
    with pytest.raises(ProviderConfigError) as e:
        pick(catalog, prices, cpu_millis=1000, memory_bytes=15 * GIB)
    assert str(e.value) == (
        "no allowed instance type fits 15.25 GiB and 1.1 vCPU on amd64 in us-east-1a, us-east-1b"
        " (allowed: t3.small, t3.medium, t3.large, m5.large, c5.xlarge):"
        " too small: c5.xlarge (4 vCPU, 8 GiB), m5.large (2 vCPU, 8 GiB), t3.large (2 vCPU, 8 GiB),"
        " t3.medium (2 vCPU, 4 GiB), t3.small (2 vCPU, 2 GiB)"
        " (the pod asks for 15 GiB and 1 vCPU, the cell takes 256 MiB and 0.1 vCPU more)"
    )


def test_nothing_fits_names_every_reason(catalog: Catalog, prices: PriceSnapshot) -> None:
    allowed = ("t3.small", "m7g.large", "m5a.large", "t3.meduim")
    with pytest.raises(ProviderConfigError) as e:
        pick(catalog, prices, memory_bytes=3 * GIB, allowed=allowed)
    assert str(e.value) == (
        "no allowed instance type fits 3.25 GiB and 0.1 vCPU on amd64 in us-east-1a, us-east-1b"
        " (allowed: t3.small, m7g.large, m5a.large, t3.meduim):"
        " too small: t3.small (2 vCPU, 2 GiB); not for amd64: m7g.large;"
        " no us-east-1 price in the snapshot of " + prices.date + ": m5a.large;"
        " no such instance type in us-east-1: t3.meduim"
        " (the pod asks for 3 GiB and 0 vCPU, the cell takes 256 MiB and 0.1 vCPU more)"
    )
    with pytest.raises(ProviderConfigError, match=r"not offered in those zones: t3\.medium"):
        pick(catalog, prices, allowed=("t3.medium",), zones=("us-east-1e",))
    with pytest.raises(ProviderConfigError, match="no availability zones"):
        pick(catalog, prices, zones=())


def test_nothing_fits_with_no_allow_list_shortens_long_lists(catalog: Catalog, prices: PriceSnapshot) -> None:
    with pytest.raises(ProviderConfigError) as e:
        pick(catalog, prices, memory_bytes=1024 * GIB, allowed=())
    message = str(e.value)
    assert message.startswith("no instance type fits 1024.25 GiB and 0.1 vCPU on amd64 in us-east-1a, us-east-1b")
    assert "(allowed: any): too small: " in message
    assert "r6i.4xlarge (16 vCPU, 128 GiB)" in message  # the biggest priced ones first
    assert " more; not for amd64: " in message


def test_unmatched_allow_list_entries_are_found(catalog: Catalog) -> None:
    assert unmatched_allowed(["t3.meduim", "t3", "m9", " ", "c5.*", "m5.large"], catalog.types) == ["t3.meduim", "m9"]
