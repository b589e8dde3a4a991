"""A pod's volumes on EC2 cells, through the CRI socket, against the simulator: the kubelet's
files shipped to a cell that cannot see the node's disk, kept in sync by atomic swaps,
secrets on memory only, termination messages read back, other host paths refused."""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kiyot_py.ec2sim.machines import machine_processes
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import Service, cleanup
from tests.e2e.helpers import container_config, remove_pod, sandbox_config, start, wait_for, wait_state

from .conftest import new_ec2_service
from .test_ec2_cells import busybox, run_pod

SWAPS = 100


@pytest.fixture(scope="module")
def kubelet_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kubelet")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("allowed-host-path")


@pytest.fixture(scope="module")
def svc(tmp_path_factory, sim, kubelet_root, allowed) -> Iterator[Service]:
    service = new_ec2_service(tmp_path_factory.mktemp("kiyot-volumes"), sim, node="test-node-volumes",
                              settings=f'[volumes]\nkubelet_root = "{kubelet_root}"\n'
                                       f'allowed_host_paths = "{allowed}"\nsync_interval = 5\n')
    service.start()
    yield service
    cleanup(service)
    if service.proc is not None and service.proc.poll() is None:
        service.stop()


# -- the kubelet's AtomicWriter, as the test's own kubelet ----------------------------------

def _stamp() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("..%Y_%m_%d_%H_%M_%S.") + f"{time.monotonic_ns() % 10**9:09d}"


def write_atomic(volume: Path, files: dict[str, str]) -> None:
    """What the kubelet does for a configmap, secret or projected volume: a new timestamped
    directory, `..data_tmp` to it renamed over `..data`, visible names linked through it,
    then the old version and names removed."""
    volume.mkdir(parents=True, exist_ok=True)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    version = volume / _stamp()
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    os.symlink(version.name, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            os.symlink(f"..data/{name}", volume / name)
    for entry in volume.iterdir():
        if not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    if old is not None:
        for f in (volume / old).iterdir():
            f.unlink()
        (volume / old).rmdir()


def pod_dir(root: Path, config: pb.PodSandboxConfig) -> Path:
    return root / "pods" / config.metadata.uid


def mount(host: Path, container: str, readonly: bool = True) -> pb.Mount:
    return pb.Mount(host_path=str(host), container_path=container, readonly=readonly)


def machine_of(sim, sandbox_id: str) -> Path:
    (instance,) = sim.live(**{"kiyot-sandbox": sandbox_id})
    return sim.state_dir / "instances" / instance["InstanceId"]


def in_cell(machine: Path, *argv: str) -> subprocess.CompletedProcess:
    """A command in the cell's own view of the world: its mount namespace (the agent's)."""
    (pid, *_) = machine_processes(machine)
    return subprocess.run(["nsenter", f"--target={pid}", "--mount", "--", *argv],
                          capture_output=True, text=True, check=False)


def exec_out(cri, cid: str, *cmd: str) -> str:
    answer = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=20))
    assert answer.exit_code == 0, (cmd, answer.stderr)
    return answer.stdout.decode()


def new_pod(svc, tmp_path, name: str) -> tuple[str, pb.PodSandboxConfig]:
    config = sandbox_config(name, tmp_path)
    return run_pod(svc.runtime, config), config


def pull(svc, config, test_images) -> str:
    image = busybox(test_images)
    svc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config))
    return image


# -- the tests ---------------------------------------------------------------------------------

def test_a_projected_volume_reaches_a_cell_that_cannot_see_the_node(svc, sim, tmp_path, test_images, kubelet_root):
    cri = svc.runtime
    sandbox_id, config = new_pod(svc, tmp_path, "projected")
    token = secrets.token_hex(24)
    volume = pod_dir(kubelet_root, config) / "volumes" / "kubernetes.io~projected" / "kube-api-access-x1"
    write_atomic(volume, {"token": token, "ca.crt": "-----BEGIN CERTIFICATE-----\n", "namespace": "default"})
    image = pull(svc, config, test_images)
    cid = start(cri, (sandbox_id, config), container_config(
        "app", image, ["sleep", "3600"],
        mounts=[mount(volume, "/var/run/secrets/kubernetes.io/serviceaccount")]))
    wait_state(cri, cid, pb.CONTAINER_RUNNING)

    where = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert exec_out(cri, cid, "cat", f"{where}/token") == token
    assert exec_out(cri, cid, "cat", f"{where}/namespace") == "default"
    assert "token -> ..data/token" in exec_out(cri, cid, "ls", "-l", where)  # the kubelet's layout
    mounts = exec_out(cri, cid, "cat", "/proc/mounts")
    assert any(line.split()[1] == where and line.split()[2] == "tmpfs" for line in mounts.splitlines()), mounts

    machine = machine_of(sim, sandbox_id)
    assert in_cell(machine, "test", "-d", str(machine / "disk")).returncode == 0  # the cell sees its own disk
    for node_path in (volume, kubelet_root, tmp_path):  # and nothing of the node's
        seen = in_cell(machine, "test", "-e", str(node_path))
        assert seen.returncode == 1, (node_path, seen.stderr)
    remove_pod(cri, sandbox_id)


def test_a_hundred_swaps_reach_the_container_whole(svc, sim, tmp_path, test_images, kubelet_root):
    cri = svc.runtime
    sandbox_id, config = new_pod(svc, tmp_path, "swaps")
    volume = pod_dir(kubelet_root, config) / "volumes" / "kubernetes.io~configmap" / "settings"

    def contents(n: int) -> dict[str, str]:
        return {"a": f"v{n}", "b": f"v{n}", "big": " ".join([f"v{n}"] * 20000)}  # big: ~100 KiB

    write_atomic(volume, contents(0))
    image = pull(svc, config, test_images)
    # Reads each version through one resolution of ..data (as a consistent reader does);
    # says MIX when a read saw two versions, SEEN when it first sees a version.
    reader = (
        'last=; while true; do '
        'if cd /etc/settings/..data 2>/dev/null; then '
        ' a=$(cat a 2>/dev/null) && b=$(cat b 2>/dev/null) && u=$(tr " " "\\n" < big 2>/dev/null | sort -u) '
        ' && if [ -n "$a" ] && [ -n "$b" ] && [ -n "$u" ]; then '
        '  if [ "$a" != "$b" ] || [ "$u" != "$a" ]; then echo "MIX $a $b $u"; fi; '
        '  if [ "$a" != "$last" ]; then echo "SEEN $a"; last=$a; fi; '
        ' fi; cd /; fi; done')
    cid = start(cri, (sandbox_id, config), container_config(
        "reader", image, ["sh", "-c", reader], mounts=[mount(volume, "/etc/settings")]))
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    log_path = Path(config.log_directory) / "reader" / "0.log"
    assert wait_for(lambda: "SEEN v0" in _texts(log_path))

    swapped_at: dict[str, float] = {}
    for n in range(1, SWAPS + 1):
        write_atomic(volume, contents(n))
        swapped_at[f"v{n}"] = time.time()
        time.sleep(0.1)
    assert wait_for(lambda: f"SEEN v{SWAPS}" in _texts(log_path), seconds=60)

    lines = _timed(log_path)
    assert not [text for _, text in lines if text.startswith("MIX")], "a read saw two versions at once"
    seen = {text.split()[1]: at for at, text in lines if text.startswith("SEEN ")}
    delays = [seen[v] - swapped_at[v] for v in swapped_at if v in seen]
    assert len(seen) > SWAPS // 2, f"only {len(seen)} of {SWAPS} versions were seen"
    print(f"\nswap to container: {len(delays)} of {SWAPS} versions seen; delay median "
          f"{statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms; last "
          f"{(seen[f'v{SWAPS}'] - swapped_at[f'v{SWAPS}']) * 1000:.0f} ms")
    remove_pod(cri, sandbox_id)


def test_a_change_while_the_node_was_down_reaches_the_cell(svc, sim, tmp_path, test_images, kubelet_root):
    """kill -9 of the node; the kubelet rotates a token meanwhile; the restarted node
    watches the volume again and brings the cell up to date."""
    cri = svc.runtime
    sandbox_id, config = new_pod(svc, tmp_path, "rotated")
    volume = pod_dir(kubelet_root, config) / "volumes" / "kubernetes.io~projected" / "kube-api-access-r1"
    write_atomic(volume, {"token": "first"})
    image = pull(svc, config, test_images)
    cid = start(cri, (sandbox_id, config), container_config(
        "app", image, ["sleep", "3600"], mounts=[mount(volume, "/var/run/secrets/sa")]))
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    assert exec_out(cri, cid, "cat", "/var/run/secrets/sa/token") == "first"
    svc.kill9()
    write_atomic(volume, {"token": "second"})
    svc.start()
    cri = svc.runtime
    assert wait_for(lambda: exec_out(cri, cid, "cat", "/var/run/secrets/sa/token") == "second", seconds=30)
    write_atomic(volume, {"token": "third"})  # and it is watched again
    assert wait_for(lambda: exec_out(cri, cid, "cat", "/var/run/secrets/sa/token") == "third", seconds=30)
    remove_pod(cri, sandbox_id)


def test_a_secret_stays_in_the_cells_memory(svc, sim, tmp_path, test_images, kubelet_root):
    cri = svc.runtime
    sandbox_id, config = new_pod(svc, tmp_path, "secret")
    password = secrets.token_hex(32)
    volume = pod_dir(kubelet_root, config) / "volumes" / "kubernetes.io~secret" / "db"
    write_atomic(volume, {"password": password})
    image = pull(svc, config, test_images)
    cid = start(cri, (sandbox_id, config), container_config(
        "db", image, ["sleep", "3600"], mounts=[mount(volume, "/etc/db")]))
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    assert exec_out(cri, cid, "cat", "/etc/db/password") == password
    mounts = exec_out(cri, cid, "cat", "/proc/mounts")
    assert any(line.split()[1] == "/etc/db" and line.split()[2] == "tmpfs" for line in mounts.splitlines()), mounts

    machine = machine_of(sim, sandbox_id)
    assert not _files_holding(machine, password.encode()), "the secret is on the cell's disk"
    cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    cri.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    assert not _files_holding(machine, password.encode())
    remove_pod(cri, sandbox_id)
    assert not _files_holding(machine, password.encode())


def test_the_termination_message_comes_back_from_the_cell(svc, sim, tmp_path, test_images, kubelet_root):
    cri = svc.runtime
    sandbox_id, config = new_pod(svc, tmp_path, "ending")
    log_file = pod_dir(kubelet_root, config) / "containers" / "ender" / "4f1c2a9e"
    log_file.parent.mkdir(parents=True)
    log_file.touch()  # the kubelet makes it empty before CreateContainer
    image = pull(svc, config, test_images)
    ender = container_config("ender", image, ["sh", "-c", "printf 'bye from the cell' > /dev/termination-log; exit 3"],
                             mounts=[mount(log_file, "/dev/termination-log", readonly=False)])
    ender.annotations["io.kubernetes.container.terminationMessagePath"] = "/dev/termination-log"
    cid = start(cri, (sandbox_id, config), ender)
    status = wait_state(cri, cid, pb.CONTAINER_EXITED)
    assert status.exit_code == 3
    # What the kubelet does: the status's mount at the termination message path, its file.
    (m,) = [m for m in status.mounts if m.container_path == "/dev/termination-log"]
    assert Path(m.host_path).read_text() == "bye from the cell"
    remove_pod(cri, sandbox_id)


def test_host_paths_outside_the_pod_are_refused_unless_allowed(svc, sim, tmp_path, test_images, allowed):
    cri = svc.runtime
    sandbox_id, config = new_pod(svc, tmp_path, "hostpath")
    image = pull(svc, config, test_images)
    with pytest.raises(grpc.RpcError) as refused:
        start(cri, (sandbox_id, config),
              container_config("etc", image, ["true"], mounts=[mount(Path("/etc"), "/host")]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot see the node's disk" in refused.value.details()
    assert "volumes.allowed_host_paths" in refused.value.details()

    (allowed / "motd").write_text("shipped from the node\n")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(allowed / "control.sock"))
    try:
        with pytest.raises(grpc.RpcError) as refused:
            start(cri, (sandbox_id, config), container_config(
                "sock", image, ["true"], mounts=[mount(allowed / "control.sock", "/run/control.sock")]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "socket" in refused.value.details()
    finally:
        sock.close()
        (allowed / "control.sock").unlink()
    cid = start(cri, (sandbox_id, config), container_config(
        "motd", image, ["sleep", "3600"], mounts=[mount(allowed, "/host")]))
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    assert exec_out(cri, cid, "cat", "/host/motd") == "shipped from the node\n"
    assert not [c for c in cri.ListContainers(pb.ListContainersRequest()).containers if c.metadata.name == "etc"]
    remove_pod(cri, sandbox_id)


# -- reading what happened -----------------------------------------------------------------------

def _timed(log_path: Path) -> list[tuple[float, str]]:
    out = []
    for line in log_path.read_text().splitlines():
        ts, _stream, _tag, text = [*line.split(" ", 3), ""][:4]
        # RFC 3339 with nanoseconds, which fromisoformat cuts to microseconds: enough here.
        stamp = re.match(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", ts)
        assert stamp is not None, line
        zone = "+00:00" if stamp.group(3) == "Z" else stamp.group(3)
        at = dt.datetime.fromisoformat(stamp.group(1) + zone).timestamp() + float(f"0.{stamp.group(2) or 0}")
        out.append((at, text))
    return out


def _texts(log_path: Path) -> str:
    try:
        return log_path.read_text()
    except FileNotFoundError:
        return ""


def _files_holding(machine: Path, needle: bytes) -> list[str]:
    """Files under the machine's directory (its disk, its runtime state) holding `needle`."""
    found = []
    for top, _dirs, files in os.walk(machine):
        for name in files:
            path = os.path.join(top, name)
            try:
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as fh:
                    if needle in fh.read():
                        found.append(path)
            except OSError:
                continue
    return found
