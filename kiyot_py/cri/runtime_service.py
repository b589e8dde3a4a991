"""CRI RuntimeService: one small method per RPC."""

from __future__ import annotations

import json

from kiyot_py import __version__
from kiyot_py.cri import convert
from kiyot_py.cri.errors import answer_unimplemented, rpc
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from kiyot_py.model import now_ns, to_json
from kiyot_py.pods.runtime import PodRuntime


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, runtime: PodRuntime) -> None:
        self._rt = runtime

    @rpc
    async def Version(self, request, context):
        return pb.VersionResponse(
            version="0.1.0", runtime_name="kiyot-py", runtime_version=__version__,
            runtime_api_version="v1",
        )

    @rpc
    async def Status(self, request, context):
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(type="NetworkReady", status=True),
        ]
        features = self._rt.cell_features
        handler = pb.RuntimeHandler(name="", features=pb.RuntimeHandlerFeatures(
            recursive_read_only_mounts=features.recursive_read_only_mounts,
            user_namespaces=features.user_namespaces,
        ))
        return pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=conditions),
            runtime_handlers=[handler],
            # The agent resolves users in the rootfs with either policy (Merge, Strict).
            features=pb.RuntimeFeatures(supplemental_groups_policy=True),
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
        return [convert.pod_sandbox(sb) for sb in found]

    @rpc
    async def ListPodSandbox(self, request, context):
        return pb.ListPodSandboxResponse(items=self._sandboxes(request.filter))

    @rpc
    async def StreamPodSandboxes(self, request, context):
        for page in convert.pages(self._sandboxes(request.filter)):
            yield pb.StreamPodSandboxesResponse(pod_sandboxes=page)

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
        return [convert.container(c) for c in found]

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


answer_unimplemented(RuntimeService, pb.DESCRIPTOR.services_by_name["RuntimeService"])
