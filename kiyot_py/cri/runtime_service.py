"""CRI RuntimeService: one small method per RPC."""

from __future__ import annotations

import json

from kiyot_py import __version__
from kiyot_py.cri import convert, metrics
from kiyot_py.cri.errors import answer_unimplemented, rpc
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from kiyot_py.model import Container, Sandbox, now_ns, to_json
from kiyot_py.pods.runtime import PodRuntime
from kiyot_py.pods.stats import ContainerUsage, PodUsage
from kiyot_py.streaming import requests as streams
from kiyot_py.streaming.server import StreamingServer


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, runtime: PodRuntime, streaming: StreamingServer) -> None:
        self._rt = runtime
        self._streaming = streaming
        self._listed_sandboxes = convert.Remembered(convert.pod_sandbox, convert.pod_sandbox_version)
        self._listed_containers = convert.Remembered(convert.container, convert.container_version)

    @rpc
    async def Version(self, request, context):
        return pb.VersionResponse(
            version="0.1.0", runtime_name="kiyot-py", runtime_version=__version__,
            runtime_api_version="v1",
        )

    @rpc
    async def Status(self, request, context):
        ready = await self._rt.readiness()
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=not ready.runtime_reason,
                                reason=ready.runtime_reason, message=ready.runtime_message),
            pb.RuntimeCondition(type="NetworkReady", status=not ready.network_reason,
                                reason=ready.network_reason, message=ready.network_message),
        ]
        features = self._rt.cell_features
        handler = pb.RuntimeHandler(name="", features=pb.RuntimeHandlerFeatures(
            recursive_read_only_mounts=features.recursive_read_only_mounts,
            user_namespaces=features.user_namespaces,
        ))
        info = {}
        if request.verbose and self._rt.pools is not None:  # `crictl info`: the warm pools' fill
            info["pools"] = json.dumps({name: {"ready": ready_n, "size": size}
                                        for name, (ready_n, size) in self._rt.pools.sizes().items()})
        return pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=conditions),
            runtime_handlers=[handler],
            # The agent resolves users in the rootfs with either policy (Merge, Strict).
            features=pb.RuntimeFeatures(supplemental_groups_policy=True),
            info=info,
        )

    @rpc
    async def RuntimeConfig(self, request, context):
        return pb.RuntimeConfigResponse(
            linux=pb.LinuxRuntimeConfiguration(cgroup_driver=pb.CGROUPFS)
        )

    @rpc
    async def UpdateRuntimeConfig(self, request, context):
        # Each cell has its own network; the node's pod CIDR does not apply to it.
        return pb.UpdateRuntimeConfigResponse()

    # -- sandboxes --------------------------------------------------------------------

    @rpc
    async def RunPodSandbox(self, request, context):
        sandbox_id = await self._rt.sandboxes.run(request.config, request.runtime_handler)
        return pb.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)

    @rpc
    async def StopPodSandbox(self, request, context):
        await self._rt.sandboxes.stop(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    @rpc
    async def RemovePodSandbox(self, request, context):
        await self._rt.sandboxes.remove(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    @rpc
    async def PodSandboxStatus(self, request, context):
        sb = self._rt.sandboxes.status(request.pod_sandbox_id)
        return pb.PodSandboxStatusResponse(
            status=convert.pod_sandbox_status(sb),
            info=convert.sandbox_info(sb) if request.verbose else {},
            containers_statuses=[
                convert.container_status(c) for c in self._rt.containers.list(sandbox_prefix=sb.id)
            ],
            timestamp=now_ns(),
        )

    def _sandboxes(self, f: pb.PodSandboxFilter) -> list[pb.PodSandbox]:
        state = convert.SANDBOX_STATE_NAMES[f.state.state] if f.HasField("state") else None
        found = self._rt.sandboxes.list(f.id, state, dict(f.label_selector))
        return self._listed_sandboxes(found)

    @rpc
    async def ListPodSandbox(self, request, context):
        return pb.ListPodSandboxResponse(items=self._sandboxes(request.filter))

    @rpc
    async def StreamPodSandboxes(self, request, context):
        for page in convert.pages(self._sandboxes(request.filter)):
            yield pb.StreamPodSandboxesResponse(pod_sandboxes=page)

    @rpc
    async def UpdatePodSandboxResources(self, request, context):
        """Recorded, not applied: the pod's limits are its containers', which the kubelet's
        resize sets one by one (UpdateContainerResources, applied in the cell), so the pod's
        total is bound by their sum. containerd 2.x does no more (it records them and tells
        NRI plugins); a VM cell's size cannot change in place (EC2 changes an instance's
        type only while it is stopped), and a limit on a local cell's cgroup parent would
        be a second, redundant one that could refuse a resize the containers' limits allow.
        So a kubelet's resize never fails here: only an unknown sandbox does (NOT_FOUND), or a
        pids.max that is no number (INVALID_ARGUMENT, as at create), which no kubelet sends."""
        self._rt.sandboxes.record_resources(request.pod_sandbox_id, request.resources, request.overhead)
        return pb.UpdatePodSandboxResourcesResponse()

    # -- containers -------------------------------------------------------------------

    @rpc
    async def CreateContainer(self, request, context):
        container_id = await self._rt.containers.create(
            request.pod_sandbox_id, request.config, request.sandbox_config
        )
        return pb.CreateContainerResponse(container_id=container_id)

    @rpc
    async def StartContainer(self, request, context):
        await self._rt.containers.start(request.container_id)
        return pb.StartContainerResponse()

    @rpc
    async def StopContainer(self, request, context):
        await self._rt.containers.stop(request.container_id, request.timeout)
        return pb.StopContainerResponse()

    @rpc
    async def RemoveContainer(self, request, context):
        await self._rt.containers.remove(request.container_id)
        return pb.RemoveContainerResponse()

    def _containers(self, f: pb.ContainerFilter) -> list[pb.Container]:
        state = convert.CONTAINER_STATE_NAMES[f.state.state] if f.HasField("state") else None
        found = self._rt.containers.list(f.id, f.pod_sandbox_id, state, dict(f.label_selector))
        return self._listed_containers(found)

    @rpc
    async def ListContainers(self, request, context):
        return pb.ListContainersResponse(containers=self._containers(request.filter))

    @rpc
    async def StreamContainers(self, request, context):
        for page in convert.pages(self._containers(request.filter)):
            yield pb.StreamContainersResponse(containers=page)

    @rpc
    async def ContainerStatus(self, request, context):
        c = self._rt.containers.status(request.container_id)
        info = {}
        if request.verbose:
            record = to_json(c)
            record.pop("config", None)
            info = {"info": json.dumps(record)}
        return pb.ContainerStatusResponse(status=convert.container_status(c), info=info)

    @rpc
    async def ReopenContainerLog(self, request, context):
        await self._rt.containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    @rpc
    async def ExecSync(self, request, context):
        result = await self._rt.containers.exec_sync(request.container_id, list(request.cmd), request.timeout)
        return pb.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    @rpc
    async def UpdateContainerResources(self, request, context):
        # Windows resources and the annotations have nothing to act on in a Linux cell.
        await self._rt.containers.update_resources(request.container_id, request.linux)
        return pb.UpdateContainerResourcesResponse()

    # -- stats: the latest the cells pushed, never a round trip ---------------------------

    def _container_stats(self, f: pb.ContainerStatsFilter) -> list[pb.ContainerStats]:
        now, fs = now_ns(), self._rt.stats.layer_filesystem
        found = self._rt.stats.containers(f.id, f.pod_sandbox_id, dict(f.label_selector))
        return [convert.container_stats(c, usage, fs, now) for c, usage in found]

    @rpc
    async def ContainerStats(self, request, context):
        c, usage = self._rt.stats.container(request.container_id)
        return pb.ContainerStatsResponse(
            stats=convert.container_stats(c, usage, self._rt.stats.layer_filesystem, now_ns()))

    @rpc
    async def ListContainerStats(self, request, context):
        return pb.ListContainerStatsResponse(stats=self._container_stats(request.filter))

    @rpc
    async def StreamContainerStats(self, request, context):
        for page in convert.pages(self._container_stats(request.filter)):
            yield pb.StreamContainerStatsResponse(container_stats=page)

    def _pod_stats(self, sb: Sandbox, usage: PodUsage | None,
                   containers: list[tuple[Container, ContainerUsage | None]]) -> pb.PodSandboxStats:
        now, fs = now_ns(), self._rt.stats.layer_filesystem
        return convert.pod_sandbox_stats(sb, usage, [convert.container_stats(c, u, fs, now) for c, u in containers],
                                         now)

    @rpc
    async def PodSandboxStats(self, request, context):
        sb, usage = self._rt.stats.sandbox(request.pod_sandbox_id)
        return pb.PodSandboxStatsResponse(stats=self._pod_stats(sb, usage, self._rt.stats.containers(
            sandbox_prefix=sb.id)))

    def _pods_stats(self, f: pb.PodSandboxStatsFilter) -> list[pb.PodSandboxStats]:
        return [self._pod_stats(*found) for found in self._rt.stats.sandboxes(f.id, dict(f.label_selector))]

    @rpc
    async def ListPodSandboxStats(self, request, context):
        return pb.ListPodSandboxStatsResponse(stats=self._pods_stats(request.filter))

    @rpc
    async def StreamPodSandboxStats(self, request, context):
        for page in convert.pages(self._pods_stats(request.filter)):
            yield pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=page)

    @rpc
    async def ListMetricDescriptors(self, request, context):
        return pb.ListMetricDescriptorsResponse(descriptors=metrics.descriptors())

    def _pod_metrics(self) -> list[pb.PodSandboxMetrics]:
        stats = self._rt.stats
        return [metrics.pod_sandbox_metrics(sb, usage, containers, stats.layer_filesystem)
                for sb, usage, containers in stats.sandboxes()]

    @rpc
    async def ListPodSandboxMetrics(self, request, context):
        return pb.ListPodSandboxMetricsResponse(pod_metrics=self._pod_metrics())

    @rpc
    async def StreamPodSandboxMetrics(self, request, context):
        for page in convert.pages(self._pod_metrics()):
            yield pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=page)

    @rpc
    async def GetContainerEvents(self, request, context):
        async for event in self._rt.events.stream():
            yield convert.container_event(event)

    # -- streaming: a URL on the streaming server, for one connection -------------------

    @rpc
    async def Exec(self, request, context):
        checked = self._rt.streams.check_exec(streams.ExecRequest(
            request.container_id, tuple(request.cmd), tty=request.tty, stdin=request.stdin,
            stdout=request.stdout, stderr=request.stderr))
        return pb.ExecResponse(url=self._streaming.url_for(checked))

    @rpc
    async def Attach(self, request, context):
        checked = self._rt.streams.check_attach(streams.AttachRequest(
            request.container_id, tty=request.tty, stdin=request.stdin, stdout=request.stdout,
            stderr=request.stderr))
        return pb.AttachResponse(url=self._streaming.url_for(checked))

    @rpc
    async def PortForward(self, request, context):
        checked = self._rt.streams.check_port_forward(
            streams.PortForwardRequest(request.pod_sandbox_id, tuple(request.port)))
        return pb.PortForwardResponse(url=self._streaming.url_for(checked))


answer_unimplemented(RuntimeService, pb.DESCRIPTOR.services_by_name["RuntimeService"], why={
    "CheckpointContainer": (
        "(by design): a checkpoint needs CRIU, which cells do not have, and would be taken inside "
        "the cell, a VM of its own, while the kubelet's `location` is on the node's disk"),
})
