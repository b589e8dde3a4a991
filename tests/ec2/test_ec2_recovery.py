"""EC2 cells survive the node: kill -9 at any point of a launch or a stop, then a restart
and the kubelet's retry, leave no orphan and no duplicate; orphans are collected, other
nodes' instances never touched; AWS's refusals reach the kubelet with AWS's own words."""

from __future__ import annotations

import threading

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.helpers import wait_for

from .conftest import cleanup, new_ec2_service
from .test_ec2_cells import GiB, run_pod, sized_pod


def _uid_instances(sim, config) -> list[dict]:
    return sim.instances(**{"kiyot-pod-uid": config.metadata.uid})


def _finish(svc, sandbox_id: str) -> None:
    svc.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    svc.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


@pytest.fixture
def node(tmp_path, sim, request):
    """A service of the test's own (its own node name and state), stopped afterwards."""
    svc = new_ec2_service(tmp_path / "node", sim, node=f"node-{abs(hash(request.node.name)) % 10**8}")
    yield svc
    if svc.proc is not None and svc.proc.poll() is None:
        cleanup(svc)
        svc.stop()


def test_kill9_while_the_instance_boots_then_retry_adopts_it(node, sim, tmp_path):
    config = sized_pod("boots", tmp_path, GiB)
    sim.set_boot_delay(3.0)
    try:
        node.start()
        failed: list[Exception] = []

        def first_try() -> None:
            try:
                run_pod(node.runtime, config)
            except grpc.RpcError as exc:  # the service died under it, as the kubelet would see
                failed.append(exc)

        kubelet = threading.Thread(target=first_try)
        kubelet.start()
        assert wait_for(lambda: [i for i in _uid_instances(sim, config) if i["State"]["Name"] == "pending"])
        node.kill9()
        kubelet.join()
        assert failed
        node.start()
        sandbox_id = run_pod(node.runtime, config)  # the kubelet's retry: same uid, same attempt
    finally:
        sim.set_boot_delay(0.0)
    instances = _uid_instances(sim, config)
    assert len(instances) == 1 and instances[0]["State"]["Name"] == "running"
    assert {"Key": "kiyot-sandbox", "Value": sandbox_id} in instances[0]["Tags"]
    _finish(node, sandbox_id)
    assert [i["State"]["Name"] for i in _uid_instances(sim, config)] == ["terminated"]


def test_kill9_between_the_launch_and_its_record_makes_no_second_instance(node, sim, tmp_path):
    """Even once EC2 has forgotten the client token, the tag lookup finds the instance."""
    config = sized_pod("unrecorded", tmp_path, GiB)
    node.start(crash_at="instance-launched")
    with pytest.raises(grpc.RpcError):
        run_pod(node.runtime, config)
    node.proc.wait()
    assert len(_uid_instances(sim, config)) == 1
    expired = sim.state_dir / "client-tokens-expired"
    expired.touch()
    try:
        node.start()
        sandbox_id = run_pod(node.runtime, config)
    finally:
        expired.unlink()
    instances = _uid_instances(sim, config)
    assert len(instances) == 1 and instances[0]["State"]["Name"] == "running"
    _finish(node, sandbox_id)


def test_kill9_during_stop_then_the_retry_terminates(node, sim, tmp_path):
    config = sized_pod("stopping", tmp_path, GiB)
    node.start(crash_at="cell-terminating")
    sandbox_id = run_pod(node.runtime, config)
    with pytest.raises(grpc.RpcError):
        node.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    node.proc.wait()
    assert [i["State"]["Name"] for i in _uid_instances(sim, config)] == ["running"]
    node.start()
    node.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))  # the kubelet's retry
    assert [i["State"]["Name"] for i in _uid_instances(sim, config)] == ["terminated"]
    node.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


def test_orphans_of_this_node_go_after_two_passes_and_other_nodes_stay(tmp_path, sim):
    svc = new_ec2_service(tmp_path / "gc", sim, node="gc-node", gc_interval=0.5, gc_grace=1.0)
    lay = sim.layout
    ec2 = sim.client()

    def launch(node_name: str) -> str:
        tags = [{"Key": "kiyot-node", "Value": node_name}, {"Key": "kiyot-role", "Value": "pod"},
                {"Key": "kiyot-sandbox", "Value": "f" * 64}]
        return ec2.run_instances(ImageId=lay["image"], MinCount=1, MaxCount=1, InstanceType="t3.small",
                                 SubnetId=lay["subnets"][0],
                                 TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
                                 )["Instances"][0]["InstanceId"]

    mine, theirs = launch("gc-node"), launch("another-node")
    try:
        svc.start()

        def state(instance_id: str) -> str:
            found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
            return found["State"]["Name"]

        assert wait_for(lambda: state(mine) == "terminated", seconds=30)
        assert state(theirs) in ("pending", "running")
        log = svc.log_file.read_text()
        assert log.count("terminating orphan cell") == 1 and mine in log and theirs not in log
    finally:
        ec2.terminate_instances(InstanceIds=[theirs])
        if svc.proc is not None and svc.proc.poll() is None:
            svc.stop()


def test_a_sandbox_whose_instance_vanished_turns_not_ready(tmp_path, sim, test_images):
    from tests.e2e.helpers import container_config, start, wait_state

    from .test_ec2_cells import busybox

    svc = new_ec2_service(tmp_path / "lost", sim, node="lost-node", gc_interval=0.5)
    svc.start()
    try:
        config = sized_pod("vanishing", tmp_path, GiB)
        sandbox_id = run_pod(svc.runtime, config)
        image = busybox(test_images)
        svc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config))
        cid = start(svc.runtime, (sandbox_id, config), container_config("sleeper", image, ["sleep", "3600"]))
        assert wait_state(svc.runtime, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
        (instance,) = sim.live(**{"kiyot-sandbox": sandbox_id})
        sim.client().terminate_instances(InstanceIds=[instance["InstanceId"]])  # behind the node's back

        def status():
            return svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
        assert wait_for(lambda: status().state == pb.SANDBOX_NOTREADY, seconds=30)
        container = svc.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
        assert (container.state, container.exit_code, container.reason) == (
            pb.CONTAINER_EXITED, 137, "InstanceTerminated")
        _finish(svc, sandbox_id)
    finally:
        cleanup(svc)
        svc.stop()


def test_an_instance_past_the_boot_timeout_is_terminated_and_run_fails(tmp_path, sim):
    svc = new_ec2_service(tmp_path / "slow", sim, node="slow-node", boot_timeout=2.0)
    config = sized_pod("slow", tmp_path, GiB)
    sim.set_boot_delay(6.0)
    try:
        svc.start()
        with pytest.raises(grpc.RpcError) as failed:
            run_pod(svc.runtime, config)
    finally:
        sim.set_boot_delay(0.0)
    try:
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "still pending after 2s" in failed.value.details()
        assert [i["State"]["Name"] for i in _uid_instances(sim, config)] == ["terminated"]
        assert list(svc.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
    finally:
        svc.stop()


@pytest.mark.parametrize(("what", "code", "grpc_code"), [
    ("credentials", "AuthFailure", grpc.StatusCode.PERMISSION_DENIED),
    ("image", "InvalidAMIID", grpc.StatusCode.FAILED_PRECONDITION),
])
def test_aws_refusals_fail_run_with_aws_words_and_leave_nothing(tmp_path, sim, what, code, grpc_code):
    if what == "credentials":
        bogus = tmp_path / "credentials"
        bogus.write_text("[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\n"
                         "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
        # The image by its id: EC2 is the first API asked (moto answers an SSM call with bad
        # credentials in XML, which no SSM client can read; AWS's SSM answers in JSON).
        svc = new_ec2_service(tmp_path / "n", sim, node="refused-node", credentials=bogus, image=sim.layout["image"])
    else:
        svc = new_ec2_service(tmp_path / "n", sim, node="refused-node", image="ami-0123456789abcdef0")
    config = sized_pod("refused", tmp_path, GiB)
    svc.start()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            run_pod(svc.runtime, config)
        assert refused.value.code() == grpc_code
        assert code in refused.value.details()
        assert _uid_instances(sim, config) == []
        assert list(svc.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
    finally:
        svc.stop()


def test_reset_terminates_this_nodes_instances_only(tmp_path, sim):
    import os
    import subprocess
    import sys

    svc = new_ec2_service(tmp_path / "reset", sim, node="reset-node")
    config = sized_pod("reset-me", tmp_path, GiB)
    svc.start()
    run_pod(svc.runtime, config)
    assert svc.stop() == 0  # the service stops; its instance runs on, as a VM would
    assert [i["State"]["Name"] for i in _uid_instances(sim, config)] == ["running"]
    done = subprocess.run([sys.executable, "-m", "kiyot_py.cli", "reset", "--yes", "--config", str(svc.config)],
                          env=dict(os.environ, **(svc.env or {})), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert [i["State"]["Name"] for i in _uid_instances(sim, config)] == ["terminated"]
