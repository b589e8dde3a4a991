"""Small helpers that build CRI requests the way the kubelet does."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

from kiyot_py.gen.runtime.v1 import api_pb2 as pb


def pod_name(test_name: str) -> str:
    """A valid DNS label from a test's name (parametrized names carry brackets)."""
    return re.sub(r"[^a-z0-9-]+", "-", test_name.lower())[:50].strip("-")


def sandbox_config(name: str, log_dir: Path, **labels: str) -> pb.PodSandboxConfig:
    uid = str(uuid.uuid4())
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=uid, attempt=0),
        hostname=name,
        log_directory=str(log_dir / f"default_{name}_{uid}"),
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["default.svc.cluster.local"],
                                options=["ndots:5"]),
        labels={"app": name, **labels},
        annotations={"kiyot.test/owner": "e2e"},
    )


# What the kubelet sends for a plain pod: the pod's network and IPC, a PID namespace of
# the container's own (shareProcessNamespace makes it POD).
KUBELET_NAMESPACES = pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)


def container_config(name: str, image: str, command: list[str] | None = None,
                     args: list[str] | None = None, **kw) -> pb.ContainerConfig:
    kw.setdefault("linux", pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(namespace_options=KUBELET_NAMESPACES)))
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=image),
        command=command or [], args=args or [],
        log_path=f"{name}/0.log",
        labels={"container": name},
        **kw,
    )


def new_pod(cri, name: str, log_dir: Path) -> tuple[str, pb.PodSandboxConfig]:
    config = sandbox_config(name, log_dir)
    return cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id, config


def remove_pod(cri, sandbox_id: str) -> None:
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


def create(cri, pod, config: pb.ContainerConfig) -> str:
    sandbox_id, sandbox = pod
    return cri.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox)).container_id


def start(cri, pod, config: pb.ContainerConfig) -> str:
    cid = create(cri, pod, config)
    cri.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def run(cri, pod, name: str, image: str, command: list[str], **kw) -> str:
    """Create and start a container named `name` running `command`."""
    return start(cri, pod, container_config(name, image, command, **kw))


def wait_state(cri, container_id: str, state: int, seconds: float = 30.0) -> pb.ContainerStatus:
    """Poll ContainerStatus until `state` (bounded), as the kubelet's relist does."""
    deadline = time.monotonic() + seconds
    while True:
        status = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=container_id)).status
        if status.state == state or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def wait_for(predicate, seconds: float = 30.0, every: float = 0.05):
    """Poll until predicate() is truthy (bounded); returns its last value."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def log_lines(path: str) -> list[tuple[str, str, str]]:
    """(stream, tag, text) for each CRI log line; checks the timestamp's shape."""
    out = []
    for line in Path(path).read_text().splitlines():
        ts, stream, tag, text = [*line.split(" ", 3), ""][:4]
        assert ts.endswith("Z") or "+" in ts or ts.count("-") > 2, line
        assert "T" in ts, line
        out.append((stream, tag, text))
    return out


def cell_init(its_dir: Path) -> int:
    """The node's pid of a cell's pid 1 (its supervisor, which the spawner forked), or 0."""
    try:
        pid = json.loads((its_dir / "cell.json").read_text())["supervisor_pid"]
    except (OSError, ValueError, KeyError):
        return 0
    return pid if pid and Path(f"/proc/{pid}").exists() else 0


def cell_runc(its_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`runc` inside a cell (its PID and mount namespaces, its own runtime state), as its
    agent runs it: runc on the node knows nothing of a cell's containers."""
    init = cell_init(its_dir)
    assert init, f"the cell in {its_dir} is not running"
    return subprocess.run(["nsenter", "-t", str(init), "-p", "-m", "runc", "--root", str(its_dir / "runc"), *args],
                          check=check, capture_output=True, text=True)


def runc_status(its_dir: Path, container_id: str) -> str:
    """What runc in the cell says of a container: running, stopped, ... or gone (the
    cell is gone, or it knows no such container)."""
    if not cell_init(its_dir):
        return "gone"
    out = cell_runc(its_dir, "state", container_id, check=False)
    return json.loads(out.stdout)["status"] if out.returncode == 0 else "gone"


def parent_of(pid: int) -> int:
    """The parent pid of `pid` on the node, or 0 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def processes_naming(text: str) -> list[int]:
    """Every process on the node whose command line holds `text` (a container id: its
    conmon; a cell directory: its agent)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def cell_dir(state_dir: Path, sandbox_id: str) -> Path:
    """A sandbox's local cell directory (cells are named after their launch token)."""
    for path in (state_dir / "cells").glob("*/cell.json"):
        if json.loads(path.read_text())["sandbox_id"] == sandbox_id:
            return path.parent
    raise AssertionError(f"no cell holds sandbox {sandbox_id}")
