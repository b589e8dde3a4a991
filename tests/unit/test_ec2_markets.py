"""Markets and capacity: the order offerings are tried in, what a capacity error parks
and for how long, spot prices read from the history, EC2's events read from SQS."""

from __future__ import annotations

import datetime
import json

import pytest

from kiyot_py import errors
from kiyot_py.providers.ec2_catalog import Choice, InstanceType
from kiyot_py.providers.ec2_interruptions import cell_events_from
from kiyot_py.providers.ec2_offerings import Unavailable, offerings, spot_policy, spot_prices_from_aws

SMALL = Choice(InstanceType("t3.small", 2, 2048, ("amd64",), True), 0.0208, frozenset({"z-a", "z-b"}))
LARGE = Choice(InstanceType("m5.large", 2, 8192, ("amd64",), False), 0.096, frozenset({"z-a", "z-b"}))
ZONES = ["z-a", "z-b"]
SPOT = {("t3.small", "z-a"): 0.0070, ("t3.small", "z-b"): 0.0062, ("m5.large", "z-a"): 0.0350,
        ("m5.large", "z-b"): 0.2}  # above its on-demand price: never a spot offering


def names(found) -> list[str]:
    return [str(o) for o in found]


def test_never_is_on_demand_cheapest_type_first_then_zone():
    assert names(offerings([SMALL, LARGE], ZONES, "never", SPOT)) == [
        "t3.small in z-a (on-demand)", "t3.small in z-b (on-demand)",
        "m5.large in z-a (on-demand)", "m5.large in z-b (on-demand)"]


def test_preferred_tries_every_spot_offering_by_price_before_on_demand():
    found = offerings([SMALL, LARGE], ZONES, "preferred", SPOT)
    assert names(found) == [
        "t3.small in z-b (spot)", "t3.small in z-a (spot)", "m5.large in z-a (spot)",
        "t3.small in z-a (on-demand)", "t3.small in z-b (on-demand)",
        "m5.large in z-a (on-demand)", "m5.large in z-b (on-demand)"]
    assert found[0].price_per_hour == 0.0062


def test_always_is_spot_only_and_may_be_nothing():
    assert names(offerings([SMALL, LARGE], ZONES, "always", SPOT)) == [
        "t3.small in z-b (spot)", "t3.small in z-a (spot)", "m5.large in z-a (spot)"]
    assert offerings([SMALL], ZONES, "always", {}) == []


def test_a_policy_comes_from_the_annotation_else_the_default_and_a_bad_one_is_refused():
    assert spot_policy("", "never") == "never"
    assert spot_policy("Preferred", "never") == "preferred"
    with pytest.raises(errors.InvalidArgument, match=r"'sometimes'.*never, preferred, always"):
        spot_policy("sometimes", "never")


def test_a_capacity_error_parks_its_offering_for_the_ttl_only():
    now = [1000.0]
    parked = Unavailable(180.0, clock=lambda: now[0])
    first, second, third, fourth = offerings([SMALL, LARGE], ZONES, "never", {})
    assert parked.park(first, "InsufficientInstanceCapacity", "AWS said so") == ("t3.small", "z-a", "on-demand")
    assert [o for o in (first, second, third, fourth) if not parked.parked(o)] == [second, third, fourth]
    assert parked.why(first) == "AWS said so" and len(parked) == 1
    now[0] += 179.9
    assert parked.parked(first)
    now[0] += 0.2
    assert not parked.parked(first) and not parked.parked(first) and len(parked) == 0


def test_a_key_parked_directly_covers_its_offering():
    parked = Unavailable(180.0, clock=lambda: 0.0)
    spot_b = offerings([SMALL], ZONES, "always", SPOT)[0]
    parked.park_key(("t3.small", "z-b", "spot"), "interrupted")
    assert parked.parked(spot_b) and parked.why(spot_b) == "interrupted"


def test_a_full_subnet_parks_its_zone_and_the_spot_limit_the_whole_spot_market():
    parked = Unavailable(180.0, clock=lambda: 0.0)
    found = offerings([SMALL, LARGE], ZONES, "preferred", SPOT)
    spot_b = found[0]
    parked.park(spot_b, "InsufficientFreeAddressesInSubnet")
    assert all(o.zone == "z-a" for o in [o for o in found if not parked.parked(o)])
    parked = Unavailable(180.0, clock=lambda: 0.0)
    parked.park(spot_b, "MaxSpotInstanceCountExceeded")
    assert {o.market for o in [o for o in found if not parked.parked(o)]} == {"on-demand"}


def test_spot_prices_are_the_latest_linux_price_per_type_and_zone():
    t = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    pages = [{"SpotPriceHistory": [
        {"InstanceType": "t3.small", "AvailabilityZone": "z-a", "ProductDescription": "Linux/UNIX",
         "SpotPrice": "0.0071", "Timestamp": t},
        {"InstanceType": "t3.small", "AvailabilityZone": "z-a", "ProductDescription": "Linux/UNIX",
         "SpotPrice": "0.0065", "Timestamp": t + datetime.timedelta(minutes=5)},
        {"InstanceType": "t3.small", "AvailabilityZone": "z-a", "ProductDescription": "Windows",
         "SpotPrice": "0.0300", "Timestamp": t + datetime.timedelta(minutes=9)},
    ]}, {"SpotPriceHistory": [
        {"InstanceType": "m5.large", "AvailabilityZone": "z-b", "ProductDescription": "Linux/UNIX (Amazon VPC)",
         "SpotPrice": "0.0340", "Timestamp": t},
        {"InstanceType": "m5.large", "AvailabilityZone": "z-a", "ProductDescription": "Linux/UNIX",
         "SpotPrice": "not a price", "Timestamp": t},
    ]}]
    assert spot_prices_from_aws(pages) == {("t3.small", "z-a"): 0.0065, ("m5.large", "z-b"): 0.034}


def _eventbridge(detail_type: str, detail: dict) -> str:
    return json.dumps({"version": "0", "id": "e", "detail-type": detail_type, "source": "aws.ec2",
                       "account": "123456789012", "time": "2026-12-02T10:00:00Z", "region": "us-east-1",
                       "resources": [], "detail": detail})


def test_eventbridge_messages_become_cell_events():
    (spot,) = cell_events_from(_eventbridge("EC2 Spot Instance Interruption Warning",
                                            {"instance-id": "i-1", "instance-action": "terminate"}))
    assert (spot.cell_id, spot.kind, spot.action, spot.source) == ("i-1", "spot-interruption", "terminate", "sqs")
    (rebalance,) = cell_events_from(_eventbridge("EC2 Instance Rebalance Recommendation", {"instance-id": "i-2"}))
    assert rebalance.kind == "rebalance-recommendation"
    (state,) = cell_events_from(_eventbridge("EC2 Instance State-change Notification",
                                             {"instance-id": "i-3", "state": "stopping"}))
    assert (state.kind, state.state) == ("state", "stopping")
    health = cell_events_from(_eventbridge("AWS Health Event", {
        "service": "EC2", "eventTypeCategory": "scheduledChange",
        "affectedEntities": [{"entityValue": "i-4"}, {"entityValue": "vol-1"}]}))
    assert [(e.cell_id, e.kind) for e in health] == [("i-4", "scheduled-change")]
    assert cell_events_from("not json") == [] and cell_events_from(json.dumps({"detail-type": "x"})) == []
    assert cell_events_from(_eventbridge("EC2 Instance State-change Notification", {"state": "stopped"})) == []


def test_the_simulators_capacity_faults_match_with_wildcards_and_count_every_attempt():
    from types import SimpleNamespace

    from kiyot_py.ec2sim.faults import Faults

    faults = Faults(SimpleNamespace(settings=SimpleNamespace(region="us-east-1")), ["us-east-1a", "us-east-1b"])
    faults.capacity = [{"type": "t3.*", "zone": "us-east-1a", "market": "spot"},
                       {"type": "m5.large", "code": "VcpuLimitExceeded"}]
    code, words = faults.attempt("t3.small", "us-east-1a", "spot")
    assert code == "InsufficientInstanceCapacity" and "t3.small capacity" in words and "(us-east-1a)" in words
    assert faults.attempt("t3.small", "us-east-1b", "spot") is None
    assert faults.attempt("t3.small", "us-east-1a", "on-demand") is None
    assert faults.attempt("m5.large", "us-east-1b", "on-demand")[0] == "VcpuLimitExceeded"
    assert [a["result"] for a in faults.attempts] == ["InsufficientInstanceCapacity", "launched", "launched",
                                                      "VcpuLimitExceeded"]
    # Spot prices: a fraction of on-demand by default, a little dearer in the second zone; a table wins.
    assert faults.spot_price("t3.small", "us-east-1a") == round(0.0208 * 0.30, 6)
    assert faults.spot_price("t3.small", "us-east-1b") == round(0.0208 * 0.32, 6)
    assert faults.spot_price("t3.small", "eu-west-1a") is None
    faults.set_spot_prices({"t3.small": 0.01, "m5.large": {"us-east-1b": 0.03}})
    assert faults.spot_price("t3.small", "us-east-1b") == 0.01
    assert faults.spot_price("m5.large", "us-east-1a") is None and faults.spot_price("m5.large", "us-east-1b") == 0.03
