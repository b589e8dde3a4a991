"""The container verbs: Create, Start, Stop, Remove, status, list, ReopenContainerLog, ExecSync,
UpdateContainerResources.

The node builds each container's OCI spec from the cell's facts and the image's config
for the cell's platform; the agent pulls the image from the node's pull path into the
cell and runs the container. Every verb the kubelet may repeat is idempotent.
"""

from __future__ import annotations

import builtins
import os

import structlog

from kiyot_py.agent_client import AgentConflict, AgentError, AgentTimeout, ExecResult
from kiyot_py.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.model import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    SANDBOX_READY,
    Container,
    new_id,
)
from kiyot_py.pods.cell_images import CellImages
from kiyot_py.pods.cells import Cells
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.index import Index
from kiyot_py.pods.spec import SpecError, build_container_spec
from kiyot_py.pods.spec.resources import linux_resources
from kiyot_py.pods.sync import CellSync
from kiyot_py.pods.volumes import PodVolumes

log = structlog.get_logger("kiyot.pods.containers")


class Containers:
    def __init__(self, index: Index, cells: Cells, images: ImageManager, cell_images: CellImages,
                 sync: CellSync, volumes: PodVolumes) -> None:
        self._index = index
        self._cell_images = cell_images
        self._volumes = volumes
        self._cells = cells
        self._images = images
        self._sync = sync
        self._reserved_names: set[tuple[str, str, int]] = set()

    # -- CreateContainer --------------------------------------------------------------

    async def create(
        self,
        sandbox_id: str,
        config: api_pb2.ContainerConfig,
        sandbox_config: api_pb2.PodSandboxConfig,
    ) -> str:
        sb = self._index.sandbox(sandbox_id)
        async with self._index.gate(sb.id).shared():
            if sb.state != SANDBOX_READY or sb.cell is None or sb.id not in self._index.sandboxes:
                raise FailedPrecondition(f"pod sandbox {sb.id} is not ready")
            md = config.metadata
            if not md.name:
                raise InvalidArgument("container metadata needs a name")
            name_key = (sb.id, md.name, md.attempt)
            for c in self._index.containers_of(sb.id):
                if (c.sandbox_id, c.name, c.attempt) == name_key:
                    raise AlreadyExists(
                        f"container name {md.name!r} (attempt {md.attempt}) is in use by {c.id}")
            if name_key in self._reserved_names:
                raise AlreadyExists(f"container name {md.name!r} (attempt {md.attempt}) is being created")
            if not config.image.image:
                raise InvalidArgument("container config names no image")
            self._cells.refuse_node_access(f"container {md.name!r}", config.linux.security_context)
            image = self._images.get(config.image.image)
            if not sandbox_config.HasField("metadata"):
                sandbox_config = api_pb2.PodSandboxConfig.FromString(sb.config)
            agent = self._cells.agent(sb)
            facts = await self._cells.learn_facts(sb, agent)
            chosen = await self._images.for_cell(image, facts)  # the cell's platform's manifest
            try:
                spec = build_container_spec(config, sandbox_config, chosen.config.get("config") or {}, facts,
                                            hostname=sb.hostname or None)
            except SpecError as exc:
                raise InvalidArgument(str(exc)) from None
            try:  # to a cell that cannot see the kubelet's files on this node
                in_cell = await self._volumes.ship(sb, agent, config)
            except AgentError as exc:
                raise exc.within(f"shipping the volumes of container {md.name!r}") from None
            for mount in spec.spec["mounts"]:
                if mount.get("type") == "bind" and mount.get("source") in in_cell:
                    mount["source"] = in_cell[mount["source"]]

            container = Container(
                id=new_id(), sandbox_id=sb.id, name=md.name, attempt=md.attempt,
                image=config.image.image, image_id=image.id,
                image_ref=image.repo_digests[0] if image.repo_digests else image.id,
                labels=dict(config.labels), annotations=dict(config.annotations),
                log_path=os.path.join(sb.log_directory, config.log_path)
                if sb.log_directory and config.log_path else "",
                stop_signal=spec.stop_signal, config=config.SerializeToString(),
            )
            self._reserved_names.add(name_key)
            self._sync.in_flight.add(container.id)
            try:
                await self._cell_images.provide(sb, agent, image, chosen.platform_digest)
                record = await agent.create_container({
                    "id": container.id, "name": md.name, "image_digest": chosen.platform_digest,
                    "spec": spec.spec, "user": spec.user, "groups_policy": spec.groups_policy,
                    "stop_signal": spec.stop_signal,
                    "pod_namespaces": list(spec.pod_namespaces), "pid_target": spec.pid_target,
                    "devices": spec.devices,
                    "stdin": config.stdin, "stdin_once": config.stdin_once, "tty": config.tty,
                })
                self._sync.apply(container, record, save=False)
                self._index.save(container)
            except AgentError as exc:
                raise exc.within(f"creating container {md.name!r}") from None
            finally:
                self._reserved_names.discard(name_key)
                self._sync.in_flight.discard(container.id)
        log.info("container created", container=container.id, sandbox=sb.id, name=md.name)
        return container.id

    # -- StartContainer, StopContainer, RemoveContainer -------------------------------

    async def start(self, container_id: str) -> None:
        c = self._index.container(container_id)
        sb = self._index.sandbox(c.sandbox_id)
        async with self._index.gate(sb.id).shared():
            if c.state == CONTAINER_RUNNING:
                return
            if c.state != CONTAINER_CREATED:
                raise FailedPrecondition(f"container {c.id} is {_state_word(c.state)}, not created")
            try:
                self._sync.apply(c, await self._cells.agent(sb).start_container(c.id))
            except AgentError as exc:
                raise exc.within(f"starting container {c.id}") from None
            self._sync.ship_logs(c, sb)
        log.info("container started", container=c.id)

    async def stop(self, container_id: str, timeout: int) -> None:
        c = self._index.find_container(container_id)
        if c is None or c.state in (CONTAINER_EXITED, CONTAINER_UNKNOWN):
            return  # StopContainer is idempotent
        sb = self._index.sandbox(c.sandbox_id)
        async with self._index.gate(sb.id).shared():
            if c.state in (CONTAINER_EXITED, CONTAINER_UNKNOWN):
                return  # the sandbox was stopped while we waited
            try:
                record = await self._cells.agent(sb).stop_container(c.id, max(timeout, 0), c.stop_signal)
            except AgentError as exc:
                raise exc.within(f"stopping container {c.id}") from None
            await self._sync.apply_exit(c, record)
        log.info("container stopped", container=c.id, exit_code=c.exit_code)

    async def remove(self, container_id: str) -> None:
        c = self._index.find_container(container_id)
        if c is None:
            return  # RemoveContainer is idempotent
        sb = self._index.find_sandbox(c.sandbox_id)
        if sb is not None and sb.cell is not None and not sb.cell.gone:
            async with self._index.gate(sb.id).shared():
                try:
                    await self._cells.agent(sb).delete_container(c.id)
                except AgentError as exc:
                    raise exc.within(f"removing container {c.id}") from None
        await self._sync.stop_logs(c.id)
        self._sync.stats.forget_container(c.id)
        self._index.forget(c)
        log.info("container removed", container=c.id)

    # -- UpdateContainerResources -------------------------------------------------------

    async def update_resources(self, container_id: str, r: api_pb2.LinuxContainerResources) -> None:
        """Apply new limits in the cell; ContainerStatus then reports the cell's answer.

        Converted as at create, so both agree; a field left at zero keeps its value. As
        containerd answers, a container that runs no more (or ends while the cell is asked)
        is a success that changes nothing: no CRI container starts again, so no limit could
        ever apply to it (containerd writes them into a spec no one runs)."""
        c = self._index.container(container_id)
        try:
            change = linux_resources(r)
        except SpecError as exc:
            raise InvalidArgument(str(exc)) from None
        if not change or c.state not in (CONTAINER_CREATED, CONTAINER_RUNNING):
            return
        sb = self._index.sandbox(c.sandbox_id)
        async with self._index.gate(sb.id).shared():
            if c.state not in (CONTAINER_CREATED, CONTAINER_RUNNING):
                return  # it ended (or its cell went) while we waited
            try:
                self._sync.apply(c, await self._cells.agent(sb).update_resources(c.id, change))
            except AgentConflict:
                log.info("container ended before its resources were updated", container=c.id)
                return
            except AgentError as exc:
                raise exc.within(f"updating the resources of container {c.id}") from None
        log.info("container resources updated", container=c.id, resources=change)

    # -- ContainerStatus, ListContainers ----------------------------------------------

    def status(self, container_id: str) -> Container:
        return self._index.container(container_id)

    def list(
        self,
        id_prefix: str = "",
        sandbox_prefix: str = "",
        state: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> builtins.list[Container]:  # `list` is the verb here
        return self._index.list_containers(id_prefix, sandbox_prefix, state, labels)

    # -- ReopenContainerLog, ExecSync -------------------------------------------------

    async def reopen_log(self, container_id: str) -> None:
        c = self._index.container(container_id)
        if c.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running")
        await self._sync.reopen_log(c.id)

    async def exec_sync(self, container_id: str, cmd: builtins.list[str], timeout: int) -> ExecResult:
        c = self._index.container(container_id)
        if c.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running")
        if not cmd:
            raise InvalidArgument("exec needs a command")
        try:
            return await self._cells.agent(self._index.sandbox(c.sandbox_id)).exec_sync(c.id, cmd, timeout)
        except AgentTimeout:
            raise DeadlineExceeded(f"command {cmd!r} timed out after {timeout}s; it was killed") from None
        except AgentError as exc:
            raise exc.within(f"exec in container {c.id}") from None


def _state_word(state: str) -> str:
    return state.removeprefix("CONTAINER_").lower()
