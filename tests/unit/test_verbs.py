"""Every CRI verb through the socket, as the kubelet calls it, over a fake provider and
fake agents: the decisions of kiyot_py.pods without root, cells or registries."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import grpc
import pytest

from kiyot_py.config import Settings
from kiyot_py.cri.server import start_server
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from kiyot_py.model import CellFacts, Image, Sandbox
from kiyot_py.pods.cells import launch_token
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.runtime import PodRuntime
from kiyot_py.providers.base import (
    CapacityError,
    CellShape,
    ProviderConfigError,
    ProviderPermissionDenied,
    QuotaError,
    Readiness,
)
from kiyot_py.registry.client import RegistryClient
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.content import ContentStore
from kiyot_py.store import Store
from kiyot_py.streaming.server import StreamingServer
from tests.registry.fake import PASSWORD, USER, FakeRegistry
from tests.support.fakes import FakeAgents, FakeProvider


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# The image the node holds: a config, one layer and their manifest, in its content store.
CONFIG = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/app"], "Env": ["PATH=/bin"]}}
CONFIG_BYTES = json.dumps(CONFIG).encode()
LAYER_BYTES = b"not a real layer: the fake agent never unpacks it"
MANIFEST_BYTES = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _sha(CONFIG_BYTES),
               "size": len(CONFIG_BYTES)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _sha(LAYER_BYTES),
                "size": len(LAYER_BYTES)}],
}).encode()
IMAGE_ID = _sha(CONFIG_BYTES)
IMAGE_DIGEST = "sha256:" + "d" * 64  # the index's (never fetched here)
PLATFORM_DIGEST = _sha(MANIFEST_BYTES)
IMAGE = "registry.example/app:1"


class Node:
    """A kiyot-py service on a unix socket in tmp, with fakes beneath it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.settings = Settings(state_dir=tmp / "state", socket=tmp / "kiyot.sock", node_name="node-a")
        self.provider = FakeProvider()
        self.agents = FakeAgents()

    async def start(self, seed=None) -> Node:
        self.store = Store(self.settings.state_dir / "state.db")
        if seed is not None:
            await seed(self)
        self.store.put(Image(id=IMAGE_ID, repo_tags=[IMAGE], repo_digests=[f"registry.example/app@{IMAGE_DIGEST}"],
                             size=1234, platform_digest=PLATFORM_DIGEST, config=CONFIG))
        self.content = ContentStore(self.settings.state_dir / "content")
        for data in (CONFIG_BYTES, LAYER_BYTES, MANIFEST_BYTES):
            self.content.put(_sha(data), data)
        self.registry = RegistryClient()
        images = ImageManager(self.store, self.registry, RegistriesConfig.load(None), self.content)
        self.runtime = PodRuntime(self.settings, self.store, self.provider, images, agents=self.agents)
        await self.runtime.start()
        self.streaming = StreamingServer(self.runtime.streams)
        await self.streaming.start()
        self.server = await start_server(self.settings.socket, self.runtime, self.settings.state_dir,
                                         self.streaming)
        self.channel = grpc.aio.insecure_channel(f"unix://{self.settings.socket}")
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.img = api_pb2_grpc.ImageServiceStub(self.channel)
        return self

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(grace=None)
        await self.streaming.close()
        await self.runtime.close()
        await self.registry.close()
        self.store.close()

    def agent_of(self, sandbox_id: str):
        cell = self.runtime.index.sandboxes[sandbox_id].cell
        return self.agents(cell)


@pytest.fixture
async def node(tmp_path):
    n = await Node(tmp_path).start()
    yield n
    await n.stop()


def pod_config(name: str = "web", uid: str = "uid-1", attempt: int = 0, log_dir: str = "") -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=uid, attempt=attempt),
        labels={"app": name}, log_directory=log_dir,
        dns_config=pb.DNSConfig(servers=["10.96.0.10"]),
        linux=pb.LinuxPodSandboxConfig(
            resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=125000, memory_limit_in_bytes=448 << 20),
            overhead=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=25000, memory_limit_in_bytes=64 << 20)),
    )


def container_config(name: str = "app", log_path: str = "") -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=IMAGE),
                              labels={"c": name}, log_path=log_path)


async def run_pod(node: Node, **kw) -> str:
    return (await node.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config(**kw)))).pod_sandbox_id


async def create(node: Node, sandbox_id: str, name: str = "app", log_path: str = "") -> str:
    resp = await node.rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=container_config(name, log_path), sandbox_config=pod_config()))
    return resp.container_id


# -- sandboxes -----------------------------------------------------------------------------


async def test_run_pod_sandbox_launches_one_tagged_cell_and_hands_it_the_pod(node):
    sid = await run_pod(node)
    again = await run_pod(node)  # the kubelet repeats itself
    assert again == sid
    assert list(node.provider.launches.values()) == [1] and len(node.provider.cells) == 1
    (shape,) = node.provider.shapes
    assert (shape.cpu_millis, shape.memory_bytes) == (1500, 512 << 20)  # limits plus overhead
    assert shape.tags["kiyot-node"] == "node-a" and shape.tags["kiyot-sandbox"] == sid
    assert shape.tags["pod-label:app"] == "web" and shape.tags["kiyot-role"] == "pod"
    agent = node.agent_of(sid)
    assert agent.pod["sandbox_id"] == sid and agent.pod["dns"]["servers"] == ["10.96.0.10"]
    cell = node.runtime.index.sandboxes[sid].cell
    assert cell.facts.architecture == "amd64"  # learned from the agent, kept with the cell


async def test_pod_sandbox_status_and_list(node):
    sid = await run_pod(node)
    other = await run_pod(node, name="db", uid="uid-2")
    status = (await node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))).status
    assert status.state == pb.SANDBOX_READY and status.network.ip.startswith("10.0.0.")
    listed = (await node.rt.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(label_selector={"app": "db"})))).items
    assert [s.id for s in listed] == [other]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="f" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stop_terminates_the_cell_and_remove_forgets_the_sandbox(node):
    sid = await run_pod(node)
    cid = await create(node, sid)
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    for _ in range(2):  # idempotent
        await node.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    assert len(node.provider.terminated) == 1 and node.provider.cells == {}
    status = (await node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))).status
    assert status.state == pb.SANDBOX_NOTREADY
    c = (await node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid))).status
    assert c.state == pb.CONTAINER_EXITED and c.exit_code == 137
    for _ in range(2):
        await node.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert (await node.rt.ListPodSandbox(pb.ListPodSandboxRequest())).items == []
    assert (await node.rt.ListContainers(pb.ListContainersRequest())).containers == []


@pytest.mark.parametrize("error, code", [
    (CapacityError("InsufficientInstanceCapacity: no m5.large in us-east-1a"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaError("VcpuLimitExceeded: you have requested more vCPU capacity"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ProviderPermissionDenied("UnauthorizedOperation: not allowed ec2:RunInstances"),
     grpc.StatusCode.PERMISSION_DENIED),
    (ProviderConfigError("InvalidAMIID.NotFound: ami-123 does not exist"), grpc.StatusCode.FAILED_PRECONDITION),
])
async def test_provider_errors_reach_the_kubelet_with_their_code_and_message(node, error, code):
    node.provider.fail_launch = error
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run_pod(node)
    assert err.value.code() == code
    assert str(error) in err.value.details()
    assert (await node.rt.ListPodSandbox(pb.ListPodSandboxRequest())).items == []  # nothing half-made
    assert await run_pod(node)  # and the kubelet's retry succeeds


async def test_an_unreachable_agent_fails_the_sandbox_and_releases_its_cell(node):
    node.settings.cell_boot_timeout = 0.2
    node.agents.new_ones_unreachable = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run_pod(node)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer" in err.value.details()
    assert len(node.provider.terminated) == 1 and node.provider.cells == {}
    assert (await node.rt.ListPodSandbox(pb.ListPodSandboxRequest())).items == []


async def test_a_sandbox_cut_short_by_a_restart_is_adopted_with_its_cell(tmp_path):
    """The node died after launching a cell, before RunPodSandbox returned."""
    token = launch_token("node-a", "uid-1", 0)
    half_made = Sandbox(id="a" * 64, name="web", namespace="default", uid="uid-1", attempt=0,
                        config=pod_config().SerializeToString(), launch_token=token)

    async def seed(node: Node) -> None:
        tags = {"kiyot-node": "node-a", "kiyot-sandbox": half_made.id, "kiyot-role": "pod"}
        half_made.cell = await node.provider.launch(CellShape(tags=tags), token)
        node.store.put(half_made)

    node = await Node(tmp_path).start(seed)
    try:
        sid = await run_pod(node)  # the kubelet's retry: same uid and attempt
        assert sid == half_made.id
        assert len(node.provider.cells) == 1 and node.provider.launches[token] == 2
        status = (await node.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))).status
        assert status.state == pb.SANDBOX_READY
    finally:
        await node.stop()


# -- containers ----------------------------------------------------------------------------


async def test_container_lifecycle_through_the_agent(node, tmp_path):
    sid = (await node.rt.RunPodSandbox(pb.RunPodSandboxRequest(
        config=pod_config(log_dir=str(tmp_path / "logs"))))).pod_sandbox_id
    (tmp_path / "logs").mkdir()
    cid = await create(node, sid, log_path="app.log")
    agent = node.agent_of(sid)
    body = agent.containers[cid].body
    assert body["image_digest"] == PLATFORM_DIGEST
    assert body["spec"]["process"]["args"] == ["/app"]  # the image default, from the node
    assert (body["stdin"], body["stdin_once"], body["tty"]) == (False, False, False)
    interactive = container_config("shell")
    interactive.stdin = interactive.stdin_once = interactive.tty = True  # for attach, in the cell
    shell = (await node.rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sid, config=interactive, sandbox_config=pod_config()))).container_id
    assert {k: agent.containers[shell].body[k] for k in ("stdin", "stdin_once", "tty")} == dict.fromkeys(
        ("stdin", "stdin_once", "tty"), True)
    await node.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=shell))
    assert agent.pulls[0]["digest"] == PLATFORM_DIGEST
    # The cell may fetch that manifest, its config and its layer from the node, and nothing else.
    cell_id = node.runtime.index.sandboxes[sid].cell.id
    assert node.runtime.cells.grants.of(cell_id) == {
        PLATFORM_DIGEST, IMAGE_ID, _sha(LAYER_BYTES)}
    with pytest.raises(grpc.aio.AioRpcError) as err:  # one name per attempt
        await create(node, sid)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    status = (await node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid))).status
    assert status.state == pb.CONTAINER_RUNNING and status.image_ref == f"registry.example/app@{IMAGE_DIGEST}"
    running = (await node.rt.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))))).containers
    assert [c.id for c in running] == [cid]

    result = await node.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=1))
    assert result.exit_code == 0
    agent.exec_times_out = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sleep", "9"], timeout=1))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    await node.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    for _ in range(2):
        await node.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    status = (await node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid))).status
    assert status.state == pb.CONTAINER_EXITED and status.exit_code == 143
    assert "hello from the fake" in (tmp_path / "logs" / "app.log").read_text()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    for _ in range(2):
        await node.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    assert cid not in agent.containers
    assert (await node.rt.ListContainers(pb.ListContainersRequest())).containers == []


async def test_container_events_follow_the_lifecycle_in_order(node):
    stream = node.rt.GetContainerEvents(pb.GetEventsRequest())
    seen: list[tuple[str, int]] = []

    async def read() -> None:
        async for event in stream:
            seen.append((event.container_id, event.container_event_type))

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.2)  # the stream is open before the lifecycle begins
    sid = await run_pod(node)
    cid = await create(node, sid)
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    await node.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    await node.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    await node.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    await node.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
    for _ in range(100):  # bounded: 10 s
        if len(seen) >= 8:
            break
        await asyncio.sleep(0.1)
    stream.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert [e for e in seen if e[0] == cid] == [
        (cid, pb.CONTAINER_CREATED_EVENT), (cid, pb.CONTAINER_STARTED_EVENT),
        (cid, pb.CONTAINER_STOPPED_EVENT), (cid, pb.CONTAINER_DELETED_EVENT)]
    # The sandbox's own events carry its id, as containerd's do.
    assert [e for e in seen if e[0] == sid] == [
        (sid, pb.CONTAINER_CREATED_EVENT), (sid, pb.CONTAINER_STARTED_EVENT),
        (sid, pb.CONTAINER_STOPPED_EVENT), (sid, pb.CONTAINER_DELETED_EVENT)]


async def test_create_container_refuses_what_it_cannot_run(node):
    sid = await run_pod(node)
    bad = container_config()
    bad.image.image = "registry.example/never-pulled:1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=bad))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id="0" * 64, config=container_config()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await node.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(node, sid)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_agent_failure_keeps_its_kind(node):
    sid = await run_pod(node)
    cid = await create(node, sid)
    node.agent_of(sid).containers.pop(cid)  # the cell lost it
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    node.agent_of(sid).unreachable = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "connection refused" in err.value.details()


async def test_a_container_the_cell_lost_is_reported_so(node):
    """The agent's state went (a cell rebuilt under it): its next snapshot lacks the
    container, the agent confirms it is gone, and the node stops calling it running."""
    sid = await run_pod(node)
    cid = await create(node, sid)
    await node.rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    kept = await create(node, sid, name="kept")
    agent = node.agent_of(sid)
    del agent.containers[cid]
    agent.break_stream()
    for _ in range(200):  # bounded: 2 s
        status = (await node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid))).status
        if status.state == pb.CONTAINER_UNKNOWN:
            break
        await asyncio.sleep(0.01)
    assert status.state == pb.CONTAINER_UNKNOWN and status.reason == "NotInCell"
    other = (await node.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=kept))).status
    assert other.state == pb.CONTAINER_CREATED  # the one the cell still holds is untouched


async def test_privileged_asks_the_provider(node):
    config = pod_config(name="root", uid="uid-9")
    config.linux.security_context.privileged = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "privileged" in err.value.details()
    assert node.provider.cells == {}  # refused before any cell is asked for
    host_pid = pod_config(name="hostpid", uid="uid-8")  # the cell's PID namespace: nothing to refuse
    host_pid.linux.security_context.namespace_options.pid = pb.NODE
    await node.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=host_pid))
    sid = await run_pod(node)
    ctr = container_config()
    ctr.linux.security_context.privileged = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=ctr))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node.provider.allow_privileged = True  # a VM of its own: privileged in it only
    assert await node.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=ctr))


# -- images in cells -------------------------------------------------------------------------


async def test_image_fs_info_sums_the_cells_and_remove_image_frees_unused_ones(node):
    busy = await run_pod(node)
    await create(node, busy)
    idle = await run_pod(node, name="idle", uid="uid-2")
    info = await node.img.ImageFsInfo(pb.ImageFsInfoRequest())
    assert info.image_filesystems[0].used_bytes.value == 2000
    assert info.container_filesystems[0].used_bytes.value == 100
    await node.img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=IMAGE)))
    assert node.agent_of(idle).removed_images == [PLATFORM_DIGEST]
    assert node.agent_of(busy).removed_images == []  # a container there still has it
    assert (await node.img.ListImages(pb.ListImagesRequest())).images == []
    await node.img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=IMAGE)))  # idempotent


async def test_an_arm64_cell_behind_this_node_gets_arm64(tmp_path):
    """PullImage resolves for the node's default (amd64); CreateContainer in an arm64
    cell gets the index's arm64 manifest and an arm64 seccomp profile."""
    registry = FakeRegistry()
    await registry.start()
    node = Node(tmp_path)
    node.agents = FakeAgents(CellFacts(
        architecture="arm64", variant="v8", kernel="6.8.0", capabilities=["CAP_CHOWN", "CAP_KILL"],
        seccomp_profile={"defaultAction": "SCMP_ACT_ERRNO", "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}))
    await node.start()
    try:
        ref = f"{registry.host}/multi/app:latest"
        pulled = await node.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
        amd64_manifest, amd64_config = registry.platforms["linux/amd64"]
        arm64_manifest, _ = registry.platforms["linux/arm64/v8"]
        assert pulled.image_ref == amd64_config  # the node's default platform names the image

        sid = await run_pod(node)
        config = container_config()
        config.image.image = ref
        config.linux.security_context.seccomp.profile_type = pb.SecurityProfile.RuntimeDefault
        cid = (await node.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sid, config=config, sandbox_config=pod_config()))).container_id
        agent = node.agent_of(sid)
        body = agent.containers[cid].body
        assert body["image_digest"] == arm64_manifest != amd64_manifest
        assert agent.pulls[-1]["digest"] == arm64_manifest
        assert body["spec"]["process"]["args"] == ["/bin/arm64"]  # the arm64 image's own config
        assert body["spec"]["linux"]["seccomp"]["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
        assert body["spec"]["process"]["capabilities"]["bounding"] == ["CAP_CHOWN", "CAP_KILL"]
    finally:
        await node.stop()
        await registry.stop()


async def test_pull_credentials_serve_that_pull_only(tmp_path):
    """Namespace A pulls with credentials; a pod in namespace B runs the image the node
    holds, as under containerd. No cell gets a credential, the pull path grants B the
    image by digest, and the password is nowhere in the node's state."""
    registry = FakeRegistry()
    await registry.start()
    node = Node(tmp_path)
    await node.start()
    try:
        a = pod_config("puller", uid="uid-a")
        a.metadata.namespace = "team-a"
        sid_a = (await node.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=a))).pod_sandbox_id
        ref = f"{registry.host}/basic/app:latest"
        pulled = await node.img.PullImage(pb.PullImageRequest(
            image=pb.ImageSpec(image=ref), sandbox_config=a,
            auth=pb.AuthConfig(username=USER, password=PASSWORD, server_address=registry.host)))
        assert pulled.image_ref == _sha(registry.config)
        record = node.runtime.images.get(ref)
        registry.requests.clear()  # from here on, nothing more is asked of the registry

        b = pod_config("borrower", uid="uid-b")
        b.metadata.namespace = "team-b"
        sid_b = (await node.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=b))).pod_sandbox_id
        for sid, config in ((sid_a, a), (sid_b, b)):
            ctr = container_config()
            ctr.image.image = ref
            await node.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sid, config=ctr,
                                                                    sandbox_config=config))
            pull = node.agent_of(sid).pulls[-1]
            assert set(pull) == {"ref", "digest"} and pull["ref"].startswith("10.0.0.1:5380/")
            cell = node.runtime.index.sandboxes[sid].cell.id
            assert pull["digest"] in node.runtime.cells.grants.of(cell)
        assert registry.requests == [] and record.platforms == {}
    finally:
        await node.stop()
        await registry.stop()
    raw = b"".join(p.read_bytes() for p in node.settings.state_dir.glob("state.db*"))
    assert PASSWORD.encode() not in raw and USER.encode() not in raw


async def test_pull_image_for_a_named_pod_fetches_its_cells_platform_at_once(tmp_path):
    """The kubelet names the pod it pulls for: its arm64 cell's manifest is fetched in the
    same PullImage, while the credentials are at hand; an image without that platform
    fails the pull, as on an arm64 node."""
    registry = FakeRegistry()
    await registry.start()
    node = Node(tmp_path)
    node.agents = FakeAgents(CellFacts(architecture="arm64", variant="v8"))
    await node.start()
    try:
        config = pod_config()
        await node.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config))
        ref = f"{registry.host}/multi/app:latest"
        await node.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref), sandbox_config=config))
        record = node.runtime.images.get(ref)
        arm64_manifest, _ = registry.platforms["linux/arm64/v8"]
        assert record.platforms["linux/arm64/v8"].platform_digest == arm64_manifest
        blobs = node.content.manifest_blobs(arm64_manifest)
        assert len(blobs) == 3 and all(node.content.has(d) for d in blobs)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=f"{registry.host}/open/app:latest"),
                                                         sandbox_config=config))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no linux/arm64/v8 manifest" in err.value.details()
    finally:
        await node.stop()
        await registry.stop()


# -- the runtime, streamed lists, image status ------------------------------------------


async def test_version_status_and_runtime_config(node):
    version = await node.rt.Version(pb.VersionRequest())
    assert (version.runtime_name, version.runtime_api_version) == ("kiyot-py", "v1")
    status = await node.rt.Status(pb.StatusRequest())
    assert {c.type: c.status for c in status.status.conditions} == {"RuntimeReady": True, "NetworkReady": True}
    (handler,) = status.runtime_handlers
    assert handler.features.recursive_read_only_mounts  # what the provider says its cells do
    assert status.features.supplemental_groups_policy
    config = await node.rt.RuntimeConfig(pb.RuntimeConfigRequest())
    assert config.linux.cgroup_driver == pb.CGROUPFS
    await node.rt.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(
        runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr="10.1.0.0/24"))))


async def test_status_tells_what_the_provider_cannot_do(node):
    node.provider.ready = Readiness(runtime_reason="ProviderNotReady",
                                    runtime_message="EC2 cells cannot be launched yet: AuthFailure")
    conditions = {c.type: c for c in (await node.rt.Status(pb.StatusRequest())).status.conditions}
    assert not conditions["RuntimeReady"].status
    assert (conditions["RuntimeReady"].reason, conditions["RuntimeReady"].message) == (
        "ProviderNotReady", "EC2 cells cannot be launched yet: AuthFailure")
    assert conditions["NetworkReady"].status and not conditions["NetworkReady"].reason
    node.provider.ready = Readiness(network_reason="BridgeDown", network_message="the bridge is gone")
    conditions = {c.type: c for c in (await node.rt.Status(pb.StatusRequest())).status.conditions}
    assert conditions["RuntimeReady"].status
    assert (conditions["NetworkReady"].status, conditions["NetworkReady"].reason) == (False, "BridgeDown")


async def test_streamed_lists_page_what_the_lists_give(node):
    sid = await run_pod(node)
    cid = await create(node, sid)
    pods = [p.id async for page in node.rt.StreamPodSandboxes(pb.StreamPodSandboxesRequest())
            for p in page.pod_sandboxes]
    assert pods == [sid]
    containers = [c.id async for page in node.rt.StreamContainers(pb.StreamContainersRequest())
                  for c in page.containers]
    assert containers == [cid]
    images = [i.id async for page in node.img.StreamImages(pb.StreamImagesRequest()) for i in page.images]
    assert images == [IMAGE_ID]


async def test_image_status_by_tag_id_and_unknown(node):
    by_tag = await node.img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=IMAGE)))
    assert by_tag.image.id == IMAGE_ID and by_tag.image.size == 1234
    by_id = await node.img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=IMAGE_ID[7:19])))
    assert by_id.image.id == IMAGE_ID
    unknown = await node.img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image="nope:1")))
    assert not unknown.HasField("image")  # CRI: no image, no error
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image="bad//ref:1")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
