"""The sandbox verbs: RunPodSandbox, StopPodSandbox, RemovePodSandbox, status and list, and
UpdatePodSandboxResources (recorded only).

A sandbox is a cell. RunPodSandbox returns only once the cell's agent answers and holds
the pod (CRI requires the sandbox ready on success); a repeated call for the same pod
joins the creation under way or returns the sandbox made, never a second cell. Stop
releases the cell (billing stops); both stop and remove are idempotent.
"""

from __future__ import annotations

import asyncio
import builtins

import structlog

from kiyot_py.config import Settings
from kiyot_py.errors import FailedPrecondition, InvalidArgument, KiyotError
from kiyot_py.gen.runtime.v1 import api_pb2
from kiyot_py.hostports import HostPort, HostPortError, HostPorts
from kiyot_py.model import (
    CONTAINER_CREATED,
    CONTAINER_RUNNING,
    SANDBOX_READY,
    Sandbox,
    new_id,
)
from kiyot_py.pods.cells import Cells, launch_token
from kiyot_py.pods.index import Index
from kiyot_py.pods.spec import SpecError
from kiyot_py.pods.spec.resources import linux_resources
from kiyot_py.pods.sync import CellSync
from kiyot_py.pods.volumes import PodVolumes

log = structlog.get_logger("kiyot.pods.sandboxes")

HOST_NAME_MAX = 64  # bytes; sethostname(2) refuses more
SandboxKey = tuple[str, str, str, int]


class Sandboxes:
    def __init__(self, settings: Settings, index: Index, cells: Cells, sync: CellSync,
                 hostports: HostPorts, volumes: PodVolumes) -> None:
        self._settings = settings
        self._volumes = volumes
        self._index = index
        self._cells = cells
        self._sync = sync
        self._hostports = hostports
        self._creating: dict[SandboxKey, asyncio.Task[str]] = {}

    # -- RunPodSandbox ----------------------------------------------------------------

    async def run(self, config: api_pb2.PodSandboxConfig, runtime_handler: str) -> str:
        md = config.metadata
        if not md.name or not md.namespace or not md.uid:
            raise InvalidArgument("sandbox metadata needs name, namespace and uid")
        if len(config.hostname.encode()) > HOST_NAME_MAX:
            raise InvalidArgument(
                f"hostname {config.hostname!r} is longer than {HOST_NAME_MAX} bytes")
        self._cells.refuse_node_access(f"pod {md.namespace}/{md.name}", config.linux.security_context)
        reserved = self._cells.provider.reserved_ports
        for port in host_ports(config):
            if port.container_port in reserved:
                raise InvalidArgument(f"container port {port.container_port} is the cell agent's own")
        key = (md.name, md.namespace, md.uid, md.attempt)
        existing = self._index.sandbox_by_key(key)
        if existing is not None and existing.phase != "creating":
            return existing.id  # the kubelet repeated itself: same sandbox, no second cell
        task = self._creating.get(key)
        if task is None:
            sb = existing or self._new_record(config, runtime_handler)
            task = self._boot_in_background(sb, config)
        return await asyncio.shield(task)

    def adopt(self, sb: Sandbox) -> None:
        """Resume bringing up a sandbox whose RunPodSandbox never returned (the node
        restarted); the kubelet's retry joins it."""
        log.info("adopting a sandbox still coming up", sandbox=sb.id)
        self._boot_in_background(sb, api_pb2.PodSandboxConfig.FromString(sb.config))

    def _new_record(self, config: api_pb2.PodSandboxConfig, handler: str) -> Sandbox:
        md = config.metadata
        sb = Sandbox(
            id=new_id(), name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt,
            labels=dict(config.labels), annotations=dict(config.annotations),
            runtime_handler=handler, log_directory=config.log_directory,
            config=config.SerializeToString(),
            launch_token=launch_token(self._settings.node_name, md.uid, md.attempt),
        )
        self._index.save(sb)  # with its token, before the launch: a restart adopts it
        return sb

    def _boot_in_background(self, sb: Sandbox, config: api_pb2.PodSandboxConfig) -> asyncio.Task[str]:
        # Its own task: a kubelet that gives up waiting must not abort the creation
        # half-way; its retry joins this one instead.
        key = sb.key
        task = asyncio.create_task(self._boot(sb, config), name=f"boot-{sb.id[:12]}")
        self._creating[key] = task
        task.add_done_callback(lambda _: self._creating.pop(key, None))
        return task

    async def _boot(self, sb: Sandbox, config: api_pb2.PodSandboxConfig) -> str:
        log.info("creating sandbox", sandbox=sb.id, pod=f"{sb.namespace}/{sb.name}")
        try:
            agent = await self._cells.launch(sb, self._index.save)
            assert sb.cell is not None
            # No host name given (hostNetwork, crictl): the cell's own, as containerd
            # gives the node's. The pod's name would not do: it may exceed 64 bytes.
            sb.hostname = config.hostname or sb.cell.hostname or sb.cell.id
            self._index.save(sb)
            await self._hostports.open(sb.id, sb.cell.address, host_ports(config))
            dns = config.dns_config
            await agent.put_pod({
                "sandbox_id": sb.id,
                "hostname": sb.hostname,
                "dns": {"servers": list(dns.servers), "searches": list(dns.searches),
                        "options": list(dns.options)},
                "labels": dict(config.labels),
            })
        except BaseException as exc:
            log.warning("sandbox creation failed", sandbox=sb.id, error=str(exc))
            await self._hostports.close(sb.id)
            if sb.cell is not None:
                try:
                    await asyncio.shield(self._cells.terminate(sb.cell.id))
                except KiyotError as cleanup:  # the orphan collector terminates it later
                    log.warning("terminating the cell of a failed sandbox failed", sandbox=sb.id,
                                cell=sb.cell.id, error=str(cleanup))
            self._index.forget(sb)
            if isinstance(exc, HostPortError):
                raise FailedPrecondition(str(exc)) from None
            if isinstance(exc, KiyotError):
                raise type(exc)(f"creating the cell of sandbox {sb.id}: {exc}") from None
            raise
        sb.state = SANDBOX_READY
        sb.phase = "ready"
        self._index.save(sb)
        self._sync.watch(sb)
        log.info("sandbox ready", sandbox=sb.id, ip=sb.cell.address)
        return sb.id

    async def wait_for_creations(self) -> None:
        await asyncio.gather(*self._creating.values(), return_exceptions=True)

    # -- StopPodSandbox, RemovePodSandbox ---------------------------------------------

    async def stop(self, sandbox_id: str) -> None:
        sb = self._index.find_sandbox(sandbox_id)
        if sb is None:
            return  # StopPodSandbox is idempotent
        task = self._creating.get(sb.key)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        async with self._index.gate(sb.id).exclusive():
            await self._hostports.close(sb.id)  # also when the cell was lost meanwhile
            if sb.cell is not None and sb.cell.state == "stopped":
                # Lost to a stop behind the node's back, and not released since (a restart
                # came between): a stopped instance still holds its disk.
                await self._cells.terminate(sb.cell.id)
                sb.cell.state = "terminated"
                self._index.save(sb)
            if sb.cell is None or sb.cell.gone:
                return
            agent = self._cells.agent(sb)
            for c in self._index.containers_of(sb.id):
                if c.state in (CONTAINER_CREATED, CONTAINER_RUNNING):
                    try:
                        self._sync.apply(c, await agent.stop_container(c.id, 0, "SIGKILL"))
                    except KiyotError as exc:
                        log.warning("stopping container failed", container=c.id, error=str(exc))
            await self._sync.drain_logs(sb.id)
            await self._sync.unwatch(sb.id)
            self._volumes.forget(sb.id)
            await self._cells.terminate(sb.cell.id)
            self._sync.cell_lost(sb, reason="SandboxStopped")
            log.info("sandbox stopped", sandbox=sb.id)

    async def remove(self, sandbox_id: str) -> None:
        sb = self._index.find_sandbox(sandbox_id)
        if sb is None:
            return  # RemovePodSandbox is idempotent
        await self.stop(sb.id)
        async with self._index.gate(sb.id).exclusive():
            for c in self._index.containers_of(sb.id):
                await self._sync.stop_logs(c.id)
                self._index.forget(c)
            self._index.forget(sb)
        log.info("sandbox removed", sandbox=sb.id)

    # -- PodSandboxStatus, ListPodSandbox ---------------------------------------------

    def status(self, sandbox_id: str) -> Sandbox:
        return self._index.sandbox(sandbox_id)

    def list(self, id_prefix: str = "", state: str | None = None,
             labels: dict[str, str] | None = None) -> builtins.list[Sandbox]:  # `list` is the verb here
        return self._index.list_sandboxes(id_prefix, state, labels)

    # -- UpdatePodSandboxResources ------------------------------------------------------

    def record_resources(self, sandbox_id: str, resources: api_pb2.LinuxContainerResources,
                         overhead: api_pb2.LinuxContainerResources) -> None:
        """Keep what the kubelet now says of the whole pod, converted as a container's limits
        are (PodSandboxStatus's verbose info shows them); the cell is left as it is
        (RuntimeService.UpdatePodSandboxResources says why)."""
        sb = self._index.sandbox(sandbox_id)
        try:
            sb.pod_resources = {"resources": linux_resources(resources), "overhead": linux_resources(overhead)}
        except SpecError as exc:
            raise InvalidArgument(str(exc)) from None
        self._index.save(sb)
        log.info("pod resources recorded", sandbox=sb.id, resources=sb.pod_resources)


_PROTOCOLS = {api_pb2.TCP: "tcp", api_pb2.UDP: "udp"}


def host_ports(config: api_pb2.PodSandboxConfig) -> list[HostPort]:
    """The sandbox's port mappings that ask for a port on the node (host_port > 0).

    A hostNetwork pod has its cell's network, never the node's; what it serves on the
    node's network is what it declares: each mapping of only a container port is that
    port on the node too (the kubelet sends host_port = container_port for such a pod)."""
    nso = config.linux.security_context.namespace_options
    host_network = nso.network == api_pb2.NODE
    ports: list[HostPort] = []
    for m in config.port_mappings:
        host_port = m.host_port if m.host_port > 0 or not host_network else m.container_port
        if host_port <= 0:
            continue  # only a container port: the pod IP serves it as it is
        if host_port > 65535 or not 0 < m.container_port <= 65535:
            raise InvalidArgument(f"port mapping {host_port}->{m.container_port} is out of range")
        protocol = _PROTOCOLS.get(m.protocol)
        if protocol is None:
            raise InvalidArgument(
                f"host port {host_port}: protocol {api_pb2.Protocol.Name(m.protocol)} is not supported")
        port = HostPort(protocol, m.host_ip, host_port, m.container_port)
        if any((p.protocol, p.host_ip, p.host_port) == (protocol, m.host_ip, host_port) for p in ports):
            raise InvalidArgument(f"host port {port} is mapped twice")
        ports.append(port)
    return ports
