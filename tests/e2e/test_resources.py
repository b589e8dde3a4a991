"""In-place resource changes through the socket, with the kit's crictl as an operator runs
it: `crictl update` reaches the container's cgroup in its local cell (read here on the host,
where local cells' cgroups are), and ContainerStatus reports what is in force."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import KUBELET_NAMESPACES, run, wait_state

REPO = Path(__file__).resolve().parents[2]
KITS = [Path(os.environ["KIYOTPY_CONFORMANCE_KIT"])] if os.environ.get("KIYOTPY_CONFORMANCE_KIT") else [
    REPO.parent / "shared" / "conformance", Path("/work/shared/conformance")]
KIT = next((k for k in KITS if (k / "bin" / "crictl").exists()), None)
pytestmark = pytest.mark.skipif(KIT is None, reason="the conformance kit's crictl is needed")
MiB = 1 << 20


def crictl(service, *args: str) -> subprocess.CompletedProcess:
    assert KIT is not None
    return subprocess.run([str(KIT / "bin" / "crictl"), "--config", str(KIT / "crictl-noconfig.yaml"),
                           "--runtime-endpoint", f"unix://{service.socket}", "--timeout", "60s", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def cgroup(cri, sandbox_id: str, container_id: str, controller: str, file: str) -> int:
    """A figure of the container's cgroup in its cell: kiyot/<cell id>/<container id> (v1)."""
    info = json.loads(cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                                      verbose=True)).info["info"])
    return int((Path("/sys/fs/cgroup") / controller / "kiyot" / info["cell"]["id"] / container_id / file).read_text())


@pytest.fixture
def limited(cri, pod, img, test_images) -> str:
    """A running container created with 128 MiB, 512 shares and half a CPU."""
    ref = test_images["busybox"].ref
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=128 * MiB, cpu_shares=512, cpu_quota=50000,
                                           cpu_period=100000)
    cid = run(cri, pod, "limited", ref, ["sleep", "3600"], linux=pb.LinuxContainerConfig(
        resources=resources, security_context=pb.LinuxContainerSecurityContext(namespace_options=KUBELET_NAMESPACES)))
    assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    return cid


def status_resources(cri, cid: str) -> pb.LinuxContainerResources:
    return cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.resources.linux


def test_crictl_update_memory_changes_the_limit_in_the_cells_cgroup(service, cri, pod, limited):
    sandbox_id, _ = pod
    assert cgroup(cri, sandbox_id, limited, "memory", "memory.limit_in_bytes") == 128 * MiB
    done = crictl(service, "update", "--memory", str(64 * MiB), limited)
    assert done.returncode == 0, done.stderr
    assert cgroup(cri, sandbox_id, limited, "memory", "memory.limit_in_bytes") == 64 * MiB
    now = status_resources(cri, limited)
    assert (now.memory_limit_in_bytes, now.cpu_shares, now.cpu_quota) == (64 * MiB, 512, 50000)


def test_crictl_update_cpu_changes_quota_period_and_shares(service, cri, pod, limited):
    sandbox_id, _ = pod
    done = crictl(service, "update", "--cpu-quota", "25000", "--cpu-period", "50000", "--cpu-share", "256", limited)
    assert done.returncode == 0, done.stderr
    assert cgroup(cri, sandbox_id, limited, "cpu", "cpu.cfs_quota_us") == 25000
    assert cgroup(cri, sandbox_id, limited, "cpu", "cpu.cfs_period_us") == 50000
    assert cgroup(cri, sandbox_id, limited, "cpu", "cpu.shares") == 256
    assert cgroup(cri, sandbox_id, limited, "memory", "memory.limit_in_bytes") == 128 * MiB  # left as it was
    now = status_resources(cri, limited)
    assert (now.cpu_quota, now.cpu_period, now.cpu_shares) == (25000, 50000, 256)


def test_what_the_cell_refuses_is_an_error_and_a_stopped_container_a_no_op(service, cri, pod, limited):
    bad = crictl(service, "update", "--cpu-quota", "10", limited)  # below the kernel's 1 ms
    assert bad.returncode != 0 and "cpu.quota" in bad.stderr
    assert status_resources(cri, limited).cpu_quota == 50000
    cri.StopContainer(pb.StopContainerRequest(container_id=limited, timeout=0))
    done = crictl(service, "update", "--memory", str(64 * MiB), limited)  # containerd's answer: OK
    assert done.returncode == 0, done.stderr
    assert status_resources(cri, limited).memory_limit_in_bytes == 128 * MiB


def test_update_pod_sandbox_resources_is_accepted_and_recorded(cri, pod, limited):
    sandbox_id, _ = pod
    resources = pb.LinuxContainerResources(cpu_period=100000, cpu_quota=100000, memory_limit_in_bytes=256 * MiB)
    cri.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id=sandbox_id,
                                                                      resources=resources))
    info = json.loads(cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                                      verbose=True)).info["info"])
    assert info["pod_resources"]["resources"] == {"cpu": {"quota": 100000, "period": 100000},
                                                  "memory": {"limit": 256 * MiB}}
    assert cgroup(cri, sandbox_id, limited, "memory", "memory.limit_in_bytes") == 128 * MiB  # the cell is unchanged
