"""The trust boundary as a pod's container sees it: what crosses its own interface."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from kiyot_py.config import LocalCellSettings
from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import cell_dir, container_config, pod_name, run, sandbox_config, wait_state

CAPTURE = Path(__file__).resolve().parents[1] / "support" / "capture.py"


@pytest.fixture
def busybox(service, test_images) -> str:
    ref = test_images["busybox"].ref
    service.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return ref


def test_the_agent_channel_on_the_pods_interface_is_tls_only(service, pod, busybox, tmp_path):
    """Everything the node says to the agent passes the pod's eth0: a container with
    CAP_NET_RAW could read it. It must read TLS records and nothing else."""
    cri, sandbox_id = service.runtime, pod[0]
    cell = json.loads((cell_dir(service.state_dir, sandbox_id) / "cell.json").read_text())
    out = tmp_path / "capture.jsonl"
    capture = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{cell['netns']}", sys.executable, str(CAPTURE), "eth0", str(out),
         "--seconds", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
        cid = run(cri, pod, "talker", busybox, ["sleep", "3600"])
        wait_state(cri, cid, pb.CONTAINER_RUNNING)
        marker = "exec-output-the-pod-must-not-see-in-clear"
        result = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", marker], timeout=10))
        assert result.stdout.decode().strip() == marker
        cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    finally:
        capture.terminate()
        capture.wait(timeout=10)
    port = LocalCellSettings().agent_port
    segments = [json.loads(line) for line in out.read_text().splitlines()]
    agent = [s for s in segments if port in (s["sport"], s["dport"])]
    assert len(agent) >= 10, "the capture saw no agent traffic: the test would prove nothing"
    stream = b"".join(bytes.fromhex(s["payload"]) for s in agent)
    for clear in (b"HTTP/1.", b"/v1/", b"Authorization", marker.encode(), busybox.encode(), b"PRIVATE KEY"):
        assert clear not in stream, clear
    # Each direction starts (the capture began on an idle channel) with a TLS record
    # header: content type 20-23 (handshake, or data on a kept-alive connection), version 3.x.
    first_out = next(bytes.fromhex(s["payload"]) for s in agent if s["dport"] == port)
    first_back = next(bytes.fromhex(s["payload"]) for s in agent if s["sport"] == port)
    for first in (first_out, first_back):
        assert 20 <= first[0] <= 23 and first[1] == 3, first[:5].hex()


def test_privileged_and_host_pid_pods_are_refused_on_local_cells_by_default(service, pod, busybox, tmp_path, request):
    """A local cell shares the node's kernel: privileged there is root on the node."""
    cri = service.runtime
    config = sandbox_config(pod_name(request.node.name), tmp_path)
    config.linux.security_context.privileged = True
    with pytest.raises(grpc.RpcError) as err:
        cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "privileged" in err.value.details() and "local.allow_privileged" in err.value.details()
    assert all(s.metadata.uid != config.metadata.uid for s in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items)

    host_pid = sandbox_config(pod_name(request.node.name) + "-pid", tmp_path)
    host_pid.linux.security_context.namespace_options.pid = pb.NODE
    with pytest.raises(grpc.RpcError) as err:
        cri.RunPodSandbox(pb.RunPodSandboxRequest(config=host_pid))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "hostPID" in err.value.details()

    sandbox_id, sandbox = pod
    ctr = container_config("root-on-the-node", busybox, ["sleep", "3600"])
    ctr.linux.security_context.privileged = True
    with pytest.raises(grpc.RpcError) as err:
        cri.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=ctr, sandbox_config=sandbox))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = cri.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id)))
    assert list(listed.containers) == []
