"""The trust boundary as a pod's container sees it: what crosses its own interface."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from kiyot_py.config import LocalCellSettings
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.support.hostnet import Canary

from .helpers import (
    cell_dir,
    cell_init,
    container_config,
    pod_name,
    remove_pod,
    run,
    sandbox_config,
    start,
    wait_for,
    wait_state,
)

CAPTURE = Path(__file__).resolve().parents[1] / "support" / "capture.py"
PROBE = Path(__file__).resolve().parents[1] / "support" / "pull_probe.py"
PULL_PATH = f"10.123.0.1:{LocalCellSettings().pull_path_port}"  # the e2e bridge's gateway
CANARY_PASSWORD = "pw-that-must-never-cross-a-pods-interface"


@pytest.fixture
def busybox(service, test_images) -> str:
    """busybox, pulled as a kubelet does for a pod with an image pull secret."""
    ref = test_images["busybox"].ref
    service.images.PullImage(pb.PullImageRequest(
        image=pb.ImageSpec(image=ref),
        auth=pb.AuthConfig(username="puller", password=CANARY_PASSWORD, server_address=ref.split("/", 1)[0])))
    return ref


def _zombies_under(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"]


def _manifest(state_dir: Path, digest: str) -> dict:
    """A manifest from the node's content store."""
    return json.loads((state_dir / "content" / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())


def _blobs(state_dir: Path, digest: str) -> list[str]:
    m = _manifest(state_dir, digest)
    return [digest, m["config"]["digest"], *(layer["digest"] for layer in m["layers"])]


def _probe(netns: str, tls_dir: str, paths: list[str]) -> dict[str, object]:
    out = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", sys.executable, str(PROBE), PULL_PATH, tls_dir,
                          *paths], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_the_pull_path_gives_a_cell_its_own_pods_image_and_nothing_more(service, pod, busybox, test_images,
                                                                         tmp_path):
    """From the pod's network namespace: with no cell certificate (all a container has)
    the pull path answers nothing; with the cell's own, nothing either (a local cell runs
    the node's own unpack: pods/shared_images.py); with that store's identity, only the
    blobs of the pod's image it was granted; no path makes the node reach a canary on its
    own loopback (the old pull path forwarded `/v2/127.0.0.1_<port>/…` there, issue #12
    point 1)."""
    cri, sandbox_id = service.runtime, pod[0]
    app = test_images["app"]  # on the node, pulled for no container of this pod
    service.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=app.ref)))
    wait_state(cri, run(cri, pod, "fetched", busybox, ["true"]), pb.CONTAINER_EXITED)
    canary = Canary("pull-path-loopback", "127.0.0.1", tmp_path).start()
    try:
        own = _blobs(service.state_dir, test_images["busybox"].manifest_digest)
        others = [d for d in _blobs(service.state_dir, app.manifest_digest) if d not in own]
        assert len(others) >= 2  # app's manifest, its config and its own layer at least
        owned = [f"/v2/test/busybox/manifests/{own[0]}", *(f"/v2/test/busybox/blobs/{d}" for d in own[1:])]
        foreign = [f"/v2/test/app/blobs/{d}" for d in others] + [f"/v2/test/app/manifests/{others[0]}"]
        forwarded = [f"/v2/127.0.0.1_{canary.port}/x/manifests/latest",
                     f"/v2/127.0.0.1_{canary.port}/latest/meta-data/iam/security-credentials/node-role",
                     "/v2/test/busybox/manifests/latest"]
        # Its own blob under a name that points at the canary: served from the store (the
        # name is never looked at), and still nothing goes to the canary.
        owned.append(f"/v2/127.0.0.1:{canary.port}/x/blobs/{own[1]}")
        cell = json.loads((cell_dir(service.state_dir, sandbox_id) / "cell.json").read_text())
        as_pod = _probe(cell["netns"], "-", owned + foreign + forwarded)
        assert all(str(v).startswith("tls:") for v in as_pod.values()), as_pod
        identity = str(cell_dir(service.state_dir, sandbox_id) / "tls")
        as_cell = _probe(cell["netns"], identity, owned + foreign + forwarded)
        assert as_cell == dict.fromkeys(owned + foreign + forwarded, 404), as_cell
        as_store = _probe(cell["netns"], str(service.state_dir / "shared-images" / "tls"), owned + foreign + forwarded)
        assert {p: as_store[p] for p in owned} == dict.fromkeys(owned, 200), as_store
        assert {p: as_store[p] for p in foreign + forwarded} == dict.fromkeys(foreign + forwarded, 404), as_store
        assert canary.hits() == []
        # The control: the canary answers whoever asks it directly.
        import urllib.request
        assert urllib.request.urlopen(f"http://127.0.0.1:{canary.port}/probe", timeout=10).status == 200
        assert canary.hits()
    finally:
        canary.stop()


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
    # A local cell runs the node's own unpack of the image: nothing of it crosses the pod's
    # interface (EC2 cells fetch through TLS, tests/ec2); the pull's password crossed nothing.
    pulled = [s for s in segments if LocalCellSettings().pull_path_port in (s["sport"], s["dport"])]
    assert pulled == [], "the cell fetched the image itself"
    everything = b"".join(bytes.fromhex(s["payload"]) for s in segments)
    for clear in (CANARY_PASSWORD.encode(), base64.b64encode(f"puller:{CANARY_PASSWORD}".encode()), b"HTTP/1."):
        assert clear not in everything, clear
    # Each direction starts (the capture began on an idle channel) with a TLS record
    # header: content type 20-23 (handshake, or data on a kept-alive connection), version 3.x.
    first_out = next(bytes.fromhex(s["payload"]) for s in agent if s["dport"] == port)
    first_back = next(bytes.fromhex(s["payload"]) for s in agent if s["sport"] == port)
    for first in (first_out, first_back):
        assert 20 <= first[0] <= 23 and first[1] == 3, first[:5].hex()


def test_host_pid_and_host_ipc_pods_see_their_cell_only(service, busybox, tmp_path, request):
    """hostPID and hostIPC mean the cell's namespaces, as in a VM: a hostPID container sees
    the cell's agent and none of the node's processes (a marker process started here, the
    node's own service); a hostIPC one sees none of the node's shared memory."""
    cri = service.runtime
    config = sandbox_config(pod_name(request.node.name), tmp_path)
    config.linux.security_context.namespace_options.pid = pb.NODE
    config.linux.security_context.namespace_options.ipc = pb.NODE
    sandbox_id = cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    marker = subprocess.Popen(["sleep", "31415.9"])
    shm = subprocess.run(["ipcmk", "-M", "4096"], check=True, capture_output=True, text=True).stdout.split()[-1]
    try:
        ctr = container_config("looker", busybox, ["sleep", "3600"])
        ctr.linux.security_context.namespace_options.pid = pb.NODE
        ctr.linux.security_context.namespace_options.ipc = pb.NODE
        cid = start(cri, (sandbox_id, config), ctr)
        wait_state(cri, cid, pb.CONTAINER_RUNNING)
        seen = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=30, cmd=[
            "sh", "-c", "for p in /proc/[0-9]*; do cat $p/cmdline; echo; done"])).stdout
        assert b"kiyot_cell.cli" in seen  # the cell's own agent: the cell's namespace, not a private one
        assert b"31415.9" not in seen and b"kiyot_py.cli" not in seen  # nothing of the node's
        assert f"/proc/{marker.pid}/".encode() not in seen
        # The cell's pid 1 (its supervisor) is in sight, but not its environment, memory or
        # root: the container lacks CAP_SYS_PTRACE and the supervisor's capabilities.
        for peek in ("cat /proc/1/environ", "head -c 1 /proc/1/mem", "ls /proc/1/root/"):
            r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=30, cmd=["sh", "-c", f"{peek} 2>&1"]))
            assert r.exit_code != 0 and b"denied" in r.stderr + r.stdout, (peek, r)
        segments = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=30,
                                                   cmd=["cat", "/proc/sysvipc/shm"])).stdout.decode()
        assert all(line.split()[1] != shm for line in segments.splitlines()[1:]), segments
        assert any(line.split()[1] == shm for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:])
        # The cell's pid 1 reaps what the cell orphans, as init does: a container's conmon
        # daemonizes, and when the container ends it is no zombie.
        wait_state(cri, run(cri, (sandbox_id, config), "brief", busybox, ["true"]), pb.CONTAINER_EXITED)
        init = cell_init(cell_dir(service.state_dir, sandbox_id))
        assert wait_for(lambda: not _zombies_under(init)), _zombies_under(init)
    finally:
        marker.kill()
        subprocess.run(["ipcrm", "-m", shm], check=False)
        remove_pod(cri, sandbox_id)


def test_privileged_pods_are_refused_on_local_cells_by_default(service, pod, busybox, tmp_path, request):
    """A local cell shares the node's kernel: privileged there is root on the node."""
    cri = service.runtime
    config = sandbox_config(pod_name(request.node.name), tmp_path)
    config.linux.security_context.privileged = True
    with pytest.raises(grpc.RpcError) as err:
        cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "privileged" in err.value.details() and "local.allow_privileged" in err.value.details()
    assert all(s.metadata.uid != config.metadata.uid for s in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items)

    sandbox_id, sandbox = pod
    ctr = container_config("root-on-the-node", busybox, ["sleep", "3600"])
    ctr.linux.security_context.privileged = True
    with pytest.raises(grpc.RpcError) as err:
        cri.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=ctr, sandbox_config=sandbox))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = cri.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id)))
    assert list(listed.containers) == []
