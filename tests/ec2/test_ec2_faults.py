"""A cloud that says no, and takes back what it gave: capacity errors, spot markets and
interruptions, instances terminated or stopped behind the node's back, a cell cut off a
while. Each through the CRI socket, against the simulator's faults; each scenario prints
the time from the event to the state the kubelet sees (`pytest -s` shows them)."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.helpers import container_config, start, wait_for, wait_state

from .conftest import cleanup, new_ec2_service
from .test_ec2_cells import GiB, busybox, run_pod, sized_pod

ZONE_A, ZONE_B = "us-east-1a", "us-east-1b"
WATCH = 2.0  # the tests' cell_watch_interval


@pytest.fixture
def faults(sim):
    """The simulator's control socket, with every fault cleared afterwards."""
    yield sim.control
    sim.control.capacity()
    sim.control.spot_prices({})
    sim.control.eventbridge()


def _node(tmp_path, sim, request, *, watch: float = WATCH, aws: str = ""):
    svc = new_ec2_service(tmp_path / "node", sim, node=f"faults-{abs(hash(request.node.name)) % 10**8}",
                          settings=f"cell_watch_interval = {watch}", aws=aws)
    request.addfinalizer(lambda: _stop(svc))
    svc.start()
    return svc


def _stop(svc) -> None:
    if svc.proc is not None and svc.proc.poll() is None:
        cleanup(svc)
        svc.stop()


def _spot_pod(name: str, tmp_path, policy: str) -> pb.PodSandboxConfig:
    config = sized_pod(name, tmp_path, GiB)
    config.annotations["kiyot-py.io/spot"] = policy
    return config


def _instance(sim, sandbox_id: str) -> dict:
    (instance,) = sim.instances(**{"kiyot-sandbox": sandbox_id})
    return instance


def _info(svc, sandbox_id: str) -> dict:
    status = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
    return json.loads(status.info["info"])["cell"]


def _attempts(faults, since: int = 0) -> list[tuple[str, str, str, str]]:
    return [(a["type"], a["zone"], a["market"], a["result"]) for a in faults.attempts()[since:]]


def _finish(svc, sandbox_id: str) -> None:
    svc.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    svc.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


# -- capacity and markets -------------------------------------------------------------------

def test_no_capacity_in_one_zone_launches_the_next_cheapest_and_parks_the_refused(tmp_path, sim, faults, request):
    svc = _node(tmp_path, sim, request)
    faults.capacity({"type": "t3.small", "zone": ZONE_A, "market": "on-demand"})
    before = len(faults.attempts())
    first = run_pod(svc.runtime, sized_pod("parked-1", tmp_path, GiB))
    assert _attempts(faults, before) == [("t3.small", ZONE_A, "on-demand", "InsufficientInstanceCapacity"),
                                         ("t3.small", ZONE_B, "on-demand", "launched")]
    instance = _instance(sim, first)
    assert (instance["InstanceType"], instance["Placement"]["AvailabilityZone"]) == ("t3.small", ZONE_B)
    assert _info(svc, first)["offering"]["zone"] == ZONE_B
    # Within the 3 minutes, no launch tries the parked offering again, even once it is back.
    faults.capacity()
    before = len(faults.attempts())
    second = run_pod(svc.runtime, sized_pod("parked-2", tmp_path, GiB))
    assert _attempts(faults, before) == [("t3.small", ZONE_B, "on-demand", "launched")]
    assert "no capacity; trying the next offering" in svc.log_file.read_text()
    _finish(svc, first)
    _finish(svc, second)


def test_preferred_spot_runs_on_spot_at_the_history_price_and_falls_back_to_on_demand(tmp_path, sim, faults,
                                                                                     request):
    svc = _node(tmp_path, sim, request)
    faults.spot_prices({"t3.small": {ZONE_A: 0.0071, ZONE_B: 0.0065}})
    on_spot = run_pod(svc.runtime, _spot_pod("spot", tmp_path, "preferred"))
    instance = _instance(sim, on_spot)
    assert instance.get("InstanceLifecycle") == "spot" and instance["Placement"]["AvailabilityZone"] == ZONE_B
    offering = _info(svc, on_spot)["offering"]
    assert (offering["market"], offering["price_per_hour"], offering["on_demand_price_per_hour"]) == (
        "spot", "0.00650", "0.02080")
    assert {"Key": "kiyot-market", "Value": "spot"} in instance["Tags"]

    faults.capacity({"market": "spot"})  # no spot capacity anywhere
    before = len(faults.attempts())
    fallback = run_pod(svc.runtime, _spot_pod("fallback", tmp_path, "preferred"))
    tried = _attempts(faults, before)
    assert tried[-1][2:] == ("on-demand", "launched")
    assert {t[2] for t in tried[:-1]} == {"spot"} and all(t[3] == "InsufficientInstanceCapacity" for t in tried[:-1])
    assert "InstanceLifecycle" not in _instance(sim, fallback)
    assert _info(svc, fallback)["offering"]["market"] == "on-demand"
    _finish(svc, on_spot)
    _finish(svc, fallback)


def test_the_accounts_spot_limit_parks_all_of_spot_at_once(tmp_path, sim, faults, request):
    svc = _node(tmp_path, sim, request)
    faults.capacity({"market": "spot", "code": "MaxSpotInstanceCountExceeded"})
    before = len(faults.attempts())
    sandbox_id = run_pod(svc.runtime, _spot_pod("spot-limit", tmp_path, "preferred"))
    tried = _attempts(faults, before)
    assert [t[2:] for t in tried] == [("spot", "MaxSpotInstanceCountExceeded"), ("on-demand", "launched")]
    _finish(svc, sandbox_id)


def test_always_spot_without_spot_capacity_is_resource_exhausted_with_aws_words(tmp_path, sim, faults, request):
    svc = _node(tmp_path, sim, request)
    faults.capacity({"market": "spot"})
    config = _spot_pod("always", tmp_path, "always")
    with pytest.raises(grpc.RpcError) as refused:
        run_pod(svc.runtime, config)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no spot capacity" in refused.value.details()
    assert "We currently do not have sufficient" in refused.value.details()  # AWS's own words
    assert sim.live(**{"kiyot-pod-uid": config.metadata.uid}) == []
    assert list(svc.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []


def test_an_account_limit_fails_at_once_without_burning_through_every_type(tmp_path, sim, faults, request):
    svc = _node(tmp_path, sim, request)
    faults.capacity({"code": "VcpuLimitExceeded"})
    before = len(faults.attempts())
    with pytest.raises(grpc.RpcError) as refused:
        run_pod(svc.runtime, sized_pod("limited", tmp_path, GiB))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "VcpuLimitExceeded: You have requested more vCPU capacity" in refused.value.details()
    assert len(_attempts(faults, before)) == 1


def test_a_bad_spot_annotation_is_refused_before_any_launch(tmp_path, sim, faults, request):
    svc = _node(tmp_path, sim, request)
    before = len(faults.attempts())
    with pytest.raises(grpc.RpcError) as refused:
        run_pod(svc.runtime, _spot_pod("typo", tmp_path, "sometimes"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'sometimes'" in refused.value.details()
    assert _attempts(faults, before) == []


# -- interruptions and lost instances --------------------------------------------------------

def _running(svc, tmp_path, test_images, name: str, policy: str = "never") -> tuple[str, str, str]:
    config = _spot_pod(name, tmp_path, policy)
    sandbox_id = run_pod(svc.runtime, config)
    image = busybox(test_images)
    svc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config))
    cid = start(svc.runtime, (sandbox_id, config), container_config("sleeper", image, ["sleep", "3600"]))
    assert wait_state(svc.runtime, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    return sandbox_id, cid, config.metadata.uid


def _until_not_ready(svc, sandbox_id: str, since: float) -> float:
    """Seconds from `since` until the kubelet would see the sandbox NOTREADY."""
    def not_ready() -> bool:
        status = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
        return status.state == pb.SANDBOX_NOTREADY
    assert wait_for(not_ready, seconds=60, every=0.02)
    return time.monotonic() - since


def _end_behind_its_back(svc, sim, faults, sandbox_id: str, how: str, silently: bool) -> float:
    """Terminate or stop the sandbox's instance through EC2's API (first cut off, if
    `silently`: no FIN ever reaches the node); seconds until the kubelet sees NOTREADY."""
    instance_id = _instance(sim, sandbox_id)["InstanceId"]
    if silently:
        faults.cut(instance_id, 60.0)
        time.sleep(0.5)
    since = time.monotonic()
    if how == "stop":
        sim.client().stop_instances(InstanceIds=[instance_id])
    else:
        sim.client().terminate_instances(InstanceIds=[instance_id])
    return _until_not_ready(svc, sandbox_id, since)


def _container(svc, cid: str) -> pb.ContainerStatus:
    return svc.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status


def _spot_interruption(svc, sim, faults, tmp_path, test_images, *, imds: bool, sqs: bool) -> None:
    faults.spot_prices({"t3.small": 0.0065})
    sandbox_id, cid, _ = _running(svc, tmp_path, test_images, "reclaimed", "always")
    instance = _instance(sim, sandbox_id)
    instance_id = instance["InstanceId"]
    source = "agent" if imds else "sqs"
    noticed_at = time.monotonic()
    faults.interrupt(instance_id, after=5.0, imds=imds, sqs=sqs)
    assert wait_for(lambda: _info(svc, sandbox_id)["notices"], seconds=10, every=0.02)
    heard = time.monotonic() - noticed_at
    notice = _info(svc, sandbox_id)["notices"][0]
    assert (notice["kind"], notice["action"], notice["source"]) == ("spot-interruption", "terminate", source)
    assert sim.live(**{"kiyot-sandbox": sandbox_id})  # heard before the end
    if not imds:
        # Heard through SQS only: the cell is cut off first, so that no broken connection
        # tells the node anything; the queue's state change alone brings the check forward.
        faults.cut(instance_id, 60.0)
    terminated_at = noticed_at + 5.0
    seen = _until_not_ready(svc, sandbox_id, terminated_at)
    status = _container(svc, cid)
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 137, "SpotInterrupted")
    assert "Spot instance termination" in status.message and f"notice via {source}" in status.message
    if not imds:
        assert "reading the interruption queue failed" not in svc.log_file.read_text()
    print(f"\nspot interruption via {source}: notice reached the node after {heard:.2f}s; "
          f"NOTREADY/EXITED {seen:.2f}s after the termination")
    _finish(svc, sandbox_id)
    # The kubelet's new sandbox is not launched into the capacity being taken back.
    zone = instance["Placement"]["AvailabilityZone"]
    before = len(faults.attempts())
    replacement = run_pod(svc.runtime, _spot_pod("replacement", tmp_path, "always"))
    assert ("t3.small", zone, "spot") not in [a[:3] for a in _attempts(faults, before)]
    assert _instance(sim, replacement)["Placement"]["AvailabilityZone"] != zone
    _finish(svc, replacement)


def test_a_spot_notice_through_the_agent_then_the_termination(tmp_path, sim, faults, request, test_images):
    svc = _node(tmp_path, sim, request)
    _spot_interruption(svc, sim, faults, tmp_path, test_images, imds=True, sqs=False)


def test_a_rebalance_recommendation_is_recorded_and_ends_nothing(tmp_path, sim, faults, request, test_images):
    svc = _node(tmp_path, sim, request)
    sandbox_id, cid, _ = _running(svc, tmp_path, test_images, "rebalanced")
    faults.rebalance(_instance(sim, sandbox_id)["InstanceId"], imds=True, sqs=False)
    assert wait_for(lambda: _info(svc, sandbox_id)["notices"], seconds=10, every=0.05)
    (notice,) = _info(svc, sandbox_id)["notices"]
    assert (notice["kind"], notice["source"]) == ("rebalance-recommendation", "agent") and notice["time"]
    time.sleep(2 * WATCH)
    status = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
    assert status.state == pb.SANDBOX_READY and _container(svc, cid).state == pb.CONTAINER_RUNNING
    _finish(svc, sandbox_id)


@pytest.mark.parametrize("how", ["terminate", "stop", "terminate-silently"])
def test_an_instance_ended_behind_the_nodes_back_is_seen_within_one_watch_period(tmp_path, sim, faults, request,
                                                                                test_images, how):
    """Its agent's connection breaks as the machine goes down, which brings the check forward;
    one that dies silently (cut off first: no FIN ever reaches the node) waits for the period."""
    svc = _node(tmp_path, sim, request)
    sandbox_id, cid, _ = _running(svc, tmp_path, test_images, f"ended-{how}")
    seen = _end_behind_its_back(svc, sim, faults, sandbox_id, how.removesuffix("-silently"),
                                silently=how.endswith("-silently"))
    reason = "InstanceStopped" if how == "stop" else "InstanceTerminated"
    status = _container(svc, cid)
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 137, reason)
    print(f"\ninstance ended behind the node's back ({how}): NOTREADY after {seen:.2f}s (watch period {WATCH}s)")
    if how == "stop":  # what is left of a stopped instance (its disk) is released
        assert wait_for(lambda: _instance(sim, sandbox_id)["State"]["Name"] == "terminated", seconds=30)
    _finish(svc, sandbox_id)


def test_a_cell_cut_off_for_ten_seconds_changes_nothing_the_kubelet_sees(tmp_path, sim, faults, request,
                                                                        test_images):
    svc = _node(tmp_path, sim, request)
    sandbox_id, cid, _ = _running(svc, tmp_path, test_images, "blip")
    instance_id = _instance(sim, sandbox_id)["InstanceId"]
    faults.cut(instance_id, 10.0)
    seen = set()
    deadline = time.monotonic() + 14.0
    while time.monotonic() < deadline:  # bounded: the cut and a few seconds after it
        sandbox = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
        container = _container(svc, cid)
        seen.add((sandbox.state, container.state, container.reason))
        time.sleep(0.1)
    assert seen == {(pb.SANDBOX_READY, pb.CONTAINER_RUNNING, "")}
    # And the cell is reachable again: a container starts in it.
    image = busybox(test_images)
    config = _spot_pod("blip", tmp_path, "never")
    after = start(svc.runtime, (sandbox_id, config), container_config("after", image, ["sleep", "3600"]))
    assert wait_state(svc.runtime, after, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    _finish(svc, sandbox_id)


# -- the same through SQS (EventBridge's rules feed a queue) -----------------------------------

def _queue_node(tmp_path, sim, faults, request, name: str):
    """A node that hears EC2 through SQS only: its watch period is far longer than any test."""
    faults.eventbridge(name)
    return _node(tmp_path, sim, request, watch=600.0, aws=f'interruption_queue = "{name}"')


def test_through_sqs_a_spot_interruption(tmp_path, sim, faults, request, test_images):
    svc = _queue_node(tmp_path, sim, faults, request, "kiyot-test-spot")
    _spot_interruption(svc, sim, faults, tmp_path, test_images, imds=False, sqs=True)


@pytest.mark.parametrize("how", ["terminate", "stop"])
def test_through_sqs_an_instance_ended_behind_the_nodes_back(tmp_path, sim, faults, request, test_images, how):
    svc = _queue_node(tmp_path, sim, faults, request, f"kiyot-test-{how}")
    sandbox_id, cid, _ = _running(svc, tmp_path, test_images, f"sqs-{how}")
    # Cut off first: no broken connection tells the node, only the queue can.
    seen = _end_behind_its_back(svc, sim, faults, sandbox_id, how, silently=True)
    reason = {"terminate": "InstanceTerminated", "stop": "InstanceStopped"}[how]
    assert _container(svc, cid).reason == reason
    print(f"\ninstance ended behind the node's back ({how}), heard through SQS: NOTREADY after {seen:.2f}s "
          "(watch period 600s)")
    # Every message read was deleted: nothing waits in the queue, nothing is read and kept.
    assert wait_for(lambda: faults.queue(f"kiyot-test-{how}") == {"waiting": 0, "in_flight": 0}, seconds=15)
    assert "reading the interruption queue failed" not in svc.log_file.read_text()
    _finish(svc, sandbox_id)
