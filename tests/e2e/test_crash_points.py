"""`kill -9` of the service at each step of bringing a cell up and taking it down.

The service kills itself at a named crash point (`KIYOTPY_CRASH_AT`, kiyot_py/crashpoints.py),
exactly between two steps, where a kill from outside could only land by luck. Then a
restart and the kubelet's retry: the sandbox is adopted (creation) or cleanly gone
(deletion), and nothing is left: no orphan agent, no second supervisor, no netns, veth,
mount, cgroup or process of the cell (issue #12 point 8).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.pods.cells import launch_token
from kiyot_py.providers.hostcell import mounts_under
from kiyot_py.providers.local import agent_processes

from .helpers import cell_dir, new_pod, parent_of, pod_name, processes_naming, run, sandbox_config, wait_state

CREATION = ["cell-dir-made", "cell-recorded", "cell-network-built", "cell-supervisor-spawned",
            "cell-agent-answering"]
DELETION = ["cell-containers-killed", "cell-netns-gone", "cell-record-gone"]


@pytest.fixture
def busybox(service, test_images) -> str:
    ref = test_images["busybox"].ref
    service.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return ref


def _crash_at(service, step: str, call) -> None:
    """Restart the service to die at `step`, make `call`, and see it die there."""
    service.stop()  # SIGTERM: cells keep running
    service.start(crash_at=step)
    with pytest.raises(grpc.RpcError):
        call(service.runtime)
    assert service.proc.wait(timeout=60) == -signal.SIGKILL, f"the service did not reach {step}"
    service.channel.close()
    service.start()


def _assert_nothing_left(service, token: str) -> None:
    short = token[:12]
    its_dir = service.state_dir / "cells" / f"c{short}"
    assert not its_dir.exists(), "the cell's directory is left"
    netns = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    assert f"kiyot-{short}" not in netns, "its network namespace is left"
    assert not Path(f"/sys/class/net/kv{short}").exists(), "its veth is left"
    assert processes_naming(str(its_dir)) == [], "a process of the cell is left"
    assert mounts_under(its_dir) == [], "a mount of the cell is left"
    assert list(Path("/sys/fs/cgroup").glob(f"*/kiyot/c{short}")) == [], "its cgroup is left (with processes in it)"


@pytest.mark.parametrize("step", CREATION)
def test_kill9_at_each_step_of_bringing_a_cell_up(service, busybox, tmp_path, request, step):
    config = sandbox_config(pod_name(request.node.name), tmp_path)
    token = launch_token("test-node", config.metadata.uid, config.metadata.attempt)
    _crash_at(service, step, lambda cri: cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60))

    cri = service.runtime
    sandbox_id = cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id  # the retry
    assert cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id == sandbox_id
    mine = [sb for sb in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items if sb.metadata.uid == config.metadata.uid]
    assert [sb.id for sb in mine] == [sandbox_id] and mine[0].state == pb.SANDBOX_READY
    its_dir = cell_dir(service.state_dir, sandbox_id)
    assert its_dir.name == f"c{token[:12]}"
    agents = agent_processes(its_dir)  # a supervisor and the agent it forked, same command line
    supervisors = [pid for pid in agents if parent_of(pid) not in agents]
    assert len(supervisors) == 1, "no supervisor, or a second one"
    cid = run(cri, (sandbox_id, config), "alive", busybox, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)

    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
    _assert_nothing_left(service, token)


@pytest.mark.parametrize("step", DELETION)
def test_kill9_at_each_step_of_taking_a_cell_down(service, busybox, tmp_path, request, step):
    sandbox_id, config = new_pod(service.runtime, pod_name(request.node.name), tmp_path)
    token = launch_token("test-node", config.metadata.uid, config.metadata.attempt)
    cid = run(service.runtime, (sandbox_id, config), "doomed", busybox, ["sleep", "3600"])
    wait_state(service.runtime, cid, pb.CONTAINER_RUNNING)
    _crash_at(service, step,
              lambda cri: cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60))

    cri = service.runtime
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)  # the kubelet's retry
    status = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
    assert status.state == pb.SANDBOX_NOTREADY
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
    assert all(sb.id != sandbox_id for sb in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items)
    _assert_nothing_left(service, token)
