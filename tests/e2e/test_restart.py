"""Crashes: `kill -9` of the service, and of a cell's agent. Nothing is lost."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from kiyot_py.config import LocalCellSettings
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.providers.local import agent_processes

from .conftest import LOG_MAX_SIZE
from .helpers import (
    cell_dir,
    cell_init,
    cell_runc,
    log_lines,
    parent_of,
    pod_name,
    processes_naming,
    remove_pod,
    run,
    runc_status,
    sandbox_config,
    wait_for,
    wait_state,
)


@pytest.fixture
def busybox(service, test_images) -> str:
    ref = test_images["busybox"].ref
    service.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return ref


def _ticks(path: str) -> list[int]:
    return [int(text.split()[1]) for stream, _, text in log_lines(path) if text.startswith("tick ")]


def test_kill9_of_the_service_loses_nothing(service, pod, busybox):
    cri, ref, sandbox_id = service.runtime, busybox, pod[0]
    cid = run(cri, pod, "ticker", ref,
              ["sh", "-c", "i=0; while [ $i -lt 100000 ]; do echo tick $i; i=$((i+1)); sleep 0.02; done"])
    log_path = wait_state(cri, cid, pb.CONTAINER_RUNNING).log_path
    wait_for(lambda: len(_ticks(log_path)) >= 10)

    def snapshot(cri):
        sandboxes = {(s.id, s.state) for s in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items}
        containers = {(c.id, c.state) for c in cri.ListContainers(pb.ListContainersRequest()).containers}
        images = {i.id for i in service.images.ListImages(pb.ListImagesRequest()).images}
        return sandboxes, containers, images

    before = snapshot(cri)
    service.kill9()
    ticks_while_down = len(_ticks(log_path))
    time.sleep(1.0)  # the container goes on while no service runs
    service.start()
    cri = service.runtime
    assert snapshot(cri) == before
    assert (sandbox_id, pb.SANDBOX_READY) in before[0]
    assert cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state == pb.CONTAINER_RUNNING
    # The log resumes where it stopped: more lines come, none missing, none twice.
    wait_for(lambda: len(_ticks(log_path)) > ticks_while_down + 60)
    cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    time.sleep(0.5)
    ticks = _ticks(log_path)
    assert ticks == list(range(len(ticks))), "gap or duplicate in the log after the restart"
    remove_pod(cri, sandbox_id)


def test_kill9_of_the_agent_loses_nothing(service, pod, busybox):
    cri, ref, sandbox_id = service.runtime, busybox, pod[0]
    long_runner = run(cri, pod, "long", ref, ["sleep", "3600"])
    exits_later = run(cri, pod, "short", ref, ["sleep", "1000"])  # killed below, while the agent is down
    for cid in (long_runner, exits_later):
        wait_state(cri, cid, pb.CONTAINER_RUNNING)

    its_dir = cell_dir(service.state_dir, sandbox_id)
    supervisor = cell_init(its_dir)  # the cell's pid 1: its agent, and conmons it adopted
    agents = set(agent_processes(its_dir))
    children = [int(p) for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    assert len([p for p in children if p in agents]) == 1
    agent = next(p for p in children if p in agents)
    # Hold the supervisor so that the agent stays down while a container exits.
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(agent, signal.SIGKILL)
        cell_runc(its_dir, "kill", exits_later, "KILL")
        assert wait_for(lambda: runc_status(its_dir, exits_later) == "stopped")
    finally:
        os.kill(supervisor, signal.SIGCONT)
    # The supervisor brings the agent back; it reports what happened while it was down.
    status = wait_state(cri, exits_later, pb.CONTAINER_EXITED)
    assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, 137)
    assert runc_status(its_dir, long_runner) == "running"
    assert cri.ContainerStatus(pb.ContainerStatusRequest(container_id=long_runner)).status.state \
        == pb.CONTAINER_RUNNING
    revived = wait_for(lambda: [p for p in agent_processes(its_dir) if p not in (supervisor, agent)
                                and parent_of(p) == supervisor])
    assert revived and agent not in revived
    r = cri.ExecSync(pb.ExecSyncRequest(container_id=long_runner, cmd=["echo", "still here"], timeout=10))
    assert r.stdout == b"still here\n"
    remove_pod(cri, sandbox_id)


def test_sigterm_shuts_down_cleanly_and_leaves_cells_running(service, pod, busybox):
    import stat

    assert stat.S_IMODE(service.socket.stat().st_mode) == 0o660
    cri, ref, sandbox_id = service.runtime, busybox, pod[0]
    cid = run(cri, pod, "keeps", ref, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    its_dir = cell_dir(service.state_dir, sandbox_id)
    assert service.stop() == 0
    assert runc_status(its_dir, cid) == "running"
    service.start()
    cri = service.runtime
    assert cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state == pb.CONTAINER_RUNNING
    remove_pod(cri, sandbox_id)
    assert runc_status(its_dir, cid) == "gone" and processes_naming(cid) == []


def test_a_cell_lost_while_the_service_was_down_is_reported(service, pod, busybox):
    """As after a host reboot: the cell's namespace and containers are gone when the service comes back."""
    cri, ref, sandbox_id = service.runtime, busybox, pod[0]
    cid = run(cri, pod, "doomed", ref, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    service.kill9()
    its_dir = cell_dir(service.state_dir, sandbox_id)
    cell = json.loads((its_dir / "cell.json").read_text())
    os.killpg(cell["supervisor_pid"], signal.SIGKILL)  # the cell's pid 1 and all in it with it
    assert wait_for(lambda: processes_naming(cid) == [])
    subprocess.run(["ip", "netns", "del", cell["netns"]], check=True)
    service.start()
    cri = service.runtime
    sandbox = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
    assert sandbox.state == pb.SANDBOX_NOTREADY
    status = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 137, "InstanceTerminated")
    assert "was terminated" in status.message
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    assert not its_dir.exists()


def _agent_call(service, sandbox_id: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Talk to a cell's agent directly, with the node's certificate, as only the node should."""
    its_dir = cell_dir(service.state_dir, sandbox_id)
    cell = json.loads((its_dir / "cell.json").read_text())
    pki = service.state_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "node.crt"), str(pki / "node.key"))
    with socket.create_connection((cell["address"], LocalCellSettings().agent_port), timeout=60) as raw, \
            ctx.wrap_socket(raw, server_hostname=f"{cell['id']}.cells.kiyot") as tls:
        conn = http.client.HTTPConnection(cell["address"], timeout=60)
        conn.sock = tls
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")


def test_a_container_the_node_never_recorded_is_removed(service, pod, busybox):
    """As after a crash between the agent's create and the node's record of it."""
    cri, sandbox_id = service.runtime, pod[0]
    known = run(cri, pod, "known", busybox, ["sleep", "3600"])
    wait_state(cri, known, pb.CONTAINER_RUNNING)
    _, record = _agent_call(service, sandbox_id, "GET", f"/v1/containers/{known}")
    stray = "ab" * 32
    status, _ = _agent_call(service, sandbox_id, "POST", "/v1/containers", {
        "id": stray, "name": "stray", "image_digest": record["image_digest"],
        "spec": {"process": {"args": ["sleep", "3600"], "env": ["PATH=/bin:/usr/bin"]}}})
    assert status == 201
    assert _agent_call(service, sandbox_id, "POST", f"/v1/containers/{stray}/start")[0] == 200
    its_dir = cell_dir(service.state_dir, sandbox_id)
    assert runc_status(its_dir, stray) == "running"

    service.kill9()
    service.start()
    cri = service.runtime
    assert wait_for(lambda: _agent_call(service, sandbox_id, "GET", f"/v1/containers/{stray}")[0] == 404)
    assert runc_status(its_dir, stray) == "gone"
    listed = cri.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id)))
    assert [c.id for c in listed.containers] == [known]
    assert runc_status(its_dir, known) == "running"


def test_a_log_cut_in_the_cell_while_the_service_was_down_leaves_one_gap(service, pod, busybox):
    """Cells keep two log segments: what rotated away while nobody read it is lost once,
    openly (a warning), and the copy goes on from the oldest byte the cell still has."""
    cri, sandbox_id = service.runtime, pod[0]
    cid = run(cri, pod, "chatty", busybox, ["sh", "-c", (
        "i=0; while true; do j=0; while [ $j -lt 100 ]; do echo tick $i; i=$((i+1)); j=$((j+1)); done; "
        "sleep 0.05; done")])
    log_path = wait_state(cri, cid, pb.CONTAINER_RUNNING).log_path
    wait_for(lambda: len(_ticks(log_path)) >= 100)
    service.kill9()
    copied = Path(log_path).stat().st_size

    def in_cell() -> int:
        return _agent_call(service, sandbox_id, "GET", f"/v1/containers/{cid}")[1]["log_size"]

    assert wait_for(lambda: in_cell() > copied + 3 * LOG_MAX_SIZE, seconds=60)
    service.start()
    cri = service.runtime
    assert wait_for(lambda: Path(log_path).stat().st_size > copied + LOG_MAX_SIZE)
    cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    ticks = _ticks(log_path)
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    assert all(step >= 1 for step in steps), "no line twice, none out of order"
    assert sum(step > 1 for step in steps) == 1, "exactly one gap: the bytes cut while no one read"
    assert "log bytes lost in the cell" in service.log_file.read_text()


def test_kill9_while_a_cell_comes_up_then_the_retry_adopts_it(service, tmp_path, request):
    """The node dies after the cell was launched, before its agent answered: the
    kubelet's retry (same pod uid and attempt) gets that cell, and no second one."""
    config = sandbox_config(pod_name(request.node.name), tmp_path)
    cells = service.state_dir / "cells"

    def booting_cell() -> dict | None:
        for path in cells.glob("*/cell.json"):
            try:
                cell = json.loads(path.read_text())
            except (ValueError, FileNotFoundError):
                continue  # being written
            if cell["tags"].get("kiyot-pod", "").endswith(config.metadata.name) and cell["state"] == "running":
                return cell
        return None

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(service.runtime.RunPodSandbox, pb.RunPodSandboxRequest(config=config), timeout=60)
        launched = wait_for(booting_cell, every=0.002)
        assert launched, "no cell came up"
        service.kill9()
        with pytest.raises(grpc.RpcError):
            first.result()  # it never returned: the kubelet retries

    service.start()
    sandbox_id = service.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    mine = [json.loads(p.read_text()) for p in cells.glob("*/cell.json")]
    mine = [c for c in mine if c["tags"].get("kiyot-pod", "").endswith(config.metadata.name)]
    assert [c["id"] for c in mine] == [launched["id"]]  # one cell, the one launched before
    assert mine[0]["sandbox_id"] == sandbox_id == launched["sandbox_id"]
    status = service.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
    assert status.state == pb.SANDBOX_READY and status.network.ip == launched["address"]
    again = service.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    assert again == sandbox_id
    remove_pod(service.runtime, sandbox_id)


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout


def _agent_groups(its_dir) -> set[int]:
    """Process groups of a cell's agent (supervisor and its serve), by command line."""
    groups = set()
    for pid in agent_processes(its_dir):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    return groups


def test_kill9_before_the_supervisors_pid_was_saved_makes_no_second_one(service, pod, busybox):
    """The node died between spawning a cell's supervisor and saving its pid: at restart
    the supervisor is found by its command line, not started twice; teardown finds it too."""
    cri, sandbox_id = service.runtime, pod[0]
    its_dir = cell_dir(service.state_dir, sandbox_id)
    assert len(_agent_groups(its_dir)) == 1
    service.kill9()
    record = json.loads((its_dir / "cell.json").read_text())
    record["supervisor_pid"] = 0  # as if the write after the spawn never happened
    (its_dir / "cell.json").write_text(json.dumps(record))
    service.start()
    cri = service.runtime
    assert len(_agent_groups(its_dir)) == 1, "a second supervisor was started"
    cid = run(cri, pod, "alive", busybox, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    remove_pod(cri, sandbox_id)
    assert _agent_groups(its_dir) == set() and not its_dir.exists()
    assert record["netns"] not in _netns_list()


def test_kill9_after_the_cell_directory_was_made_leaves_nothing_behind(service, tmp_path, request):
    """The node died after making a cell's directory and namespace, before its record: a
    restart takes them down, and the kubelet's retry of that pod gets a cell of its own."""
    from kiyot_py.pods.cells import launch_token

    config = sandbox_config(pod_name(request.node.name), tmp_path)
    token = launch_token("test-node", config.metadata.uid, config.metadata.attempt)
    half_made = service.state_dir / "cells" / f"c{token[:12]}"
    half_made.mkdir(mode=0o700)
    subprocess.run(["ip", "netns", "add", f"kiyot-{token[:12]}"], check=True)
    service.kill9()
    service.start()
    assert not half_made.exists()
    assert f"kiyot-{token[:12]}" not in _netns_list()
    # And a launch that meets such a directory (made again here) builds the cell afresh.
    half_made.mkdir(mode=0o700)
    sandbox_id = service.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    assert cell_dir(service.state_dir, sandbox_id) == half_made and (half_made / "cell.json").exists()
    remove_pod(service.runtime, sandbox_id)
    assert not half_made.exists()
