"""Model records → CRI messages."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.model import Container, Image, Sandbox
from kiyot_py.pods import events, stats

SANDBOX_STATES = {
    "SANDBOX_READY": pb.SANDBOX_READY,
    "SANDBOX_NOTREADY": pb.SANDBOX_NOTREADY,
}
CONTAINER_STATES = {
    "CONTAINER_CREATED": pb.CONTAINER_CREATED,
    "CONTAINER_RUNNING": pb.CONTAINER_RUNNING,
    "CONTAINER_EXITED": pb.CONTAINER_EXITED,
    "CONTAINER_UNKNOWN": pb.CONTAINER_UNKNOWN,
}
SANDBOX_STATE_NAMES = {v: k for k, v in SANDBOX_STATES.items()}
CONTAINER_STATE_NAMES = {v: k for k, v in CONTAINER_STATES.items()}


T = TypeVar("T")
STREAM_PAGE = 500  # records per streamed message, well under gRPC's 4 MiB default


def pages(items: list[T], size: int = STREAM_PAGE) -> Iterator[list[T]]:
    """Slices of a list for a streamed answer; an empty list still gives one (empty) page."""
    for start in range(0, max(len(items), 1), size):
        yield items[start:start + size]


R = TypeVar("R")
M = TypeVar("M")


class Remembered(Generic[R, M]):
    """The CRI message of each record, made once and again only when what `version` reads
    of the record changes. The kubelet relists every second and most records are as they
    were: copying a message made before costs a fifth of making it anew. A record that
    is not the same object as before (reloaded) is made anew too."""

    def __init__(self, convert: Callable[[R], M], version: Callable[[R], Hashable]) -> None:
        self._convert = convert
        self._version = version
        self._made: dict[int, tuple[R, Hashable, M]] = {}

    def __call__(self, records: list[R]) -> list[M]:
        made = self._made
        out = []
        for record in records:
            version = self._version(record)
            entry = made.get(id(record))
            if entry is None or entry[0] is not record or entry[1] != version:
                entry = made[id(record)] = (record, version, self._convert(record))
            out.append(entry[2])
        if len(made) > 2 * len(records) + 64:  # records gone since: keep only what was asked for now
            self._made = {id(r): made[id(r)] for r in records}
        return out


def sandbox_metadata(sb: Sandbox) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(name=sb.name, namespace=sb.namespace, uid=sb.uid, attempt=sb.attempt)


def pod_sandbox(sb: Sandbox) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=sb.id, metadata=sandbox_metadata(sb), state=SANDBOX_STATES[sb.state],
        created_at=sb.created_at, labels=sb.labels, annotations=sb.annotations,
        runtime_handler=sb.runtime_handler,
    )


# What of a record its List message shows and may change (labels, annotations, names
# and creation times are fixed at creation in the CRI).
def pod_sandbox_version(sb: Sandbox) -> Hashable:
    return sb.state


def container_version(c: Container) -> Hashable:
    return c.state, c.image, c.image_ref, c.image_id


def pod_sandbox_status(sb: Sandbox) -> pb.PodSandboxStatus:
    config = pb.PodSandboxConfig.FromString(sb.config)
    ip = sb.cell.address if sb.cell is not None and sb.state == "SANDBOX_READY" else ""
    return pb.PodSandboxStatus(
        id=sb.id, metadata=sandbox_metadata(sb), state=SANDBOX_STATES[sb.state],
        created_at=sb.created_at,
        network=pb.PodSandboxNetworkStatus(ip=ip),
        linux=pb.LinuxPodSandboxStatus(
            namespaces=pb.Namespace(options=config.linux.security_context.namespace_options)
        ),
        labels=sb.labels, annotations=sb.annotations, runtime_handler=sb.runtime_handler,
    )


def sandbox_info(sb: Sandbox) -> dict[str, str]:
    """PodSandboxStatus verbose info: where the cell is (never its secret)."""
    cell = sb.cell
    info = {
        "phase": sb.phase,
        "cell": None if cell is None else {
            "id": cell.id, "address": cell.address, "agent": cell.agent_url,
            "state": cell.state, "state_reason": cell.state_reason, "tags": cell.tags,
            "offering": cell.offering, "notices": cell.notices,
        },
        "pod_resources": sb.pod_resources,  # as the kubelet last gave them (UpdatePodSandboxResources)
    }
    return {"info": json.dumps(info)}


def container(c: Container) -> pb.Container:
    return pb.Container(
        id=c.id, pod_sandbox_id=c.sandbox_id,
        metadata=pb.ContainerMetadata(name=c.name, attempt=c.attempt),
        image=pb.ImageSpec(image=c.image), image_ref=c.image_ref, image_id=c.image_id,
        state=CONTAINER_STATES[c.state], created_at=c.created_at,
        labels=c.labels, annotations=c.annotations,
    )


def container_status(c: Container) -> pb.ContainerStatus:
    config = pb.ContainerConfig.FromString(c.config)
    return pb.ContainerStatus(
        id=c.id, metadata=pb.ContainerMetadata(name=c.name, attempt=c.attempt),
        state=CONTAINER_STATES[c.state], created_at=c.created_at,
        started_at=c.started_at, finished_at=c.finished_at, exit_code=c.exit_code,
        image=pb.ImageSpec(image=c.image), image_ref=c.image_ref, image_id=c.image_id,
        reason=c.reason, message=c.message, labels=c.labels, annotations=c.annotations,
        mounts=config.mounts, log_path=c.log_path,
        user=pb.ContainerUser(linux=pb.LinuxContainerUser(uid=c.uid, gid=c.gid, supplemental_groups=c.groups)),
        resources=container_resources(c.resources),
    )


def container_resources(resources: dict[str, Any]) -> pb.ContainerResources | None:
    """The limits in force in the cell (an OCI linux.resources' cpu, memory, pids) in CRI
    terms, as containerd reports its spec's: what the kubelet's in-place resize compares
    with what it asked for. None for a container without limits."""
    if not resources:
        return None
    cpu, memory, pids = (resources.get(k) or {} for k in ("cpu", "memory", "pids"))
    linux = pb.LinuxContainerResources(
        cpu_period=cpu.get("period", 0), cpu_quota=cpu.get("quota", 0), cpu_shares=cpu.get("shares", 0),
        cpuset_cpus=cpu.get("cpus", ""), cpuset_mems=cpu.get("mems", ""),
        memory_limit_in_bytes=memory.get("limit", 0), memory_swap_limit_in_bytes=memory.get("swap", 0))
    if pids.get("limit"):  # the node took it from unified pids.max (pods/spec/resources.py)
        linux.unified["pids.max"] = "max" if pids["limit"] == -1 else str(pids["limit"])
    return pb.ContainerResources(linux=linux)


def _u64(value: int | None) -> pb.UInt64Value | None:
    """A figure, or no field at all where the cell gave none (unknown is not 0)."""
    return None if value is None else pb.UInt64Value(value=value)


def cpu_usage(cpu: stats.Cpu | None, at: int) -> pb.CpuUsage:
    if cpu is None:
        return pb.CpuUsage(timestamp=at)
    return pb.CpuUsage(timestamp=at, usage_core_nano_seconds=_u64(cpu.usage_core_nano_seconds),
                       usage_nano_cores=_u64(cpu.usage_nano_cores))


def memory_usage(memory: stats.Memory | None, at: int) -> pb.MemoryUsage:
    if memory is None:
        return pb.MemoryUsage(timestamp=at)
    return pb.MemoryUsage(
        timestamp=at, working_set_bytes=_u64(memory.working_set_bytes),
        available_bytes=_u64(memory.available_bytes), usage_bytes=_u64(memory.usage_bytes),
        rss_bytes=_u64(memory.rss_bytes), page_faults=_u64(memory.page_faults),
        major_page_faults=_u64(memory.major_page_faults))


def container_stats(c: Container, usage: stats.ContainerUsage | None, layer_filesystem: str,
                    now: int) -> pb.ContainerStats:
    """A container's latest sample; without one (not sampled yet, or not running), its
    attributes and CPU and memory stamped `now` with no figures, as containerd answers."""
    at = usage.timestamp if usage is not None else now
    out = pb.ContainerStats(
        attributes=pb.ContainerAttributes(id=c.id, metadata=pb.ContainerMetadata(name=c.name, attempt=c.attempt),
                                          labels=c.labels, annotations=c.annotations),
        cpu=cpu_usage(usage.cpu if usage is not None else None, at),
        memory=memory_usage(usage.memory if usage is not None else None, at),
    )
    layer = usage.writable_layer if usage is not None else None
    if layer is not None:
        out.writable_layer.CopyFrom(pb.FilesystemUsage(
            timestamp=layer.timestamp, fs_id=pb.FilesystemIdentifier(mountpoint=layer_filesystem),
            used_bytes=_u64(layer.used_bytes), inodes_used=_u64(layer.inodes_used)))
    return out


DEFAULT_INTERFACE = "eth0"


def network_usage(network: stats.Network) -> pb.NetworkUsage:
    """Every interface of the pod's network; the default one is eth0, else the first."""
    interfaces = [pb.NetworkInterfaceUsage(name=i.name, rx_bytes=_u64(i.rx_bytes), rx_errors=_u64(i.rx_errors),
                                           tx_bytes=_u64(i.tx_bytes), tx_errors=_u64(i.tx_errors))
                  for i in network.interfaces]
    default = next((i for i in interfaces if i.name == DEFAULT_INTERFACE), interfaces[0] if interfaces else None)
    return pb.NetworkUsage(timestamp=network.timestamp, default_interface=default, interfaces=interfaces)


def pod_sandbox_stats(sb: Sandbox, usage: stats.PodUsage | None, containers: list[pb.ContainerStats],
                      now: int) -> pb.PodSandboxStats:
    """A sandbox's latest sample (its cell's cgroup and network) with its containers'."""
    at = usage.timestamp if usage is not None else now
    linux = pb.LinuxPodSandboxStats(
        cpu=cpu_usage(usage.cpu if usage is not None else None, at),
        memory=memory_usage(usage.memory if usage is not None else None, at),
        process=pb.ProcessUsage(timestamp=at, process_count=_u64(usage.process_count if usage is not None else None)),
        containers=containers,
    )
    if usage is not None and usage.network is not None:
        linux.network.CopyFrom(network_usage(usage.network))
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(id=sb.id, metadata=sandbox_metadata(sb), labels=sb.labels,
                                           annotations=sb.annotations),
        linux=linux)


def image(img: Image) -> pb.Image:
    out = pb.Image(
        id=img.id, repo_tags=img.repo_tags, repo_digests=img.repo_digests, size=img.size,
        spec=pb.ImageSpec(image=img.id), pinned=img.pinned,
    )
    user = img.user.split(":", 1)[0]
    if user.isdigit():
        out.uid.value = int(user)
    elif user:
        out.username = user
    return out


EVENT_TYPES = {
    events.CREATED: pb.CONTAINER_CREATED_EVENT, events.STARTED: pb.CONTAINER_STARTED_EVENT,
    events.STOPPED: pb.CONTAINER_STOPPED_EVENT, events.DELETED: pb.CONTAINER_DELETED_EVENT,
}


def container_event(event: events.LifecycleEvent) -> pb.ContainerEventResponse:
    return pb.ContainerEventResponse(
        container_id=event.id,
        container_event_type=EVENT_TYPES[event.kind],
        created_at=event.at,
        pod_sandbox_status=pod_sandbox_status(event.sandbox) if event.sandbox is not None else None,
        containers_statuses=[container_status(c) for c in event.containers],
    )
