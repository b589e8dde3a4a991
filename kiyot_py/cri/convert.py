"""Model records → CRI messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TypeVar

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.model import Container, Image, Sandbox

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


def sandbox_metadata(sb: Sandbox) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(name=sb.name, namespace=sb.namespace, uid=sb.uid, attempt=sb.attempt)


def pod_sandbox(sb: Sandbox) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=sb.id, metadata=sandbox_metadata(sb), state=SANDBOX_STATES[sb.state],
        created_at=sb.created_at, labels=sb.labels, annotations=sb.annotations,
        runtime_handler=sb.runtime_handler,
    )


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
    )


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
