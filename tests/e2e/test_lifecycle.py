"""A pod's whole life through the CRI socket, as the kubelet drives it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import ssl
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import (
    cell_dir,
    container_config,
    log_lines,
    new_pod,
    processes_naming,
    run,
    sandbox_config,
    wait_for,
    wait_state,
)


@pytest.fixture
def pulled(img, test_images):
    ref = test_images["busybox"].ref
    return img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref))).image_ref


def pod_ip(cri, sandbox_id) -> str:
    return cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status.network.ip


def test_version_and_status(cri):
    version = cri.Version(pb.VersionRequest())
    assert version.runtime_name == "kiyot-py"
    assert version.runtime_api_version == "v1"
    conditions = {c.type: c.status for c in cri.Status(pb.StatusRequest()).status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}
    assert cri.RuntimeConfig(pb.RuntimeConfigRequest()).linux.cgroup_driver == pb.CGROUPFS


def test_sandbox_is_ready_with_its_own_ip(cri, pod):
    sandbox_id, config = pod
    assert len(sandbox_id) == 64 and int(sandbox_id, 16) >= 0
    status = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
    assert status.status.state == pb.SANDBOX_READY
    assert status.status.metadata.uid == config.metadata.uid
    assert status.status.network.ip.startswith("10.123.0.")
    assert status.status.created_at > 1_600_000_000 * 10**9  # nanoseconds
    assert "PRIVATE KEY" not in status.info["info"]
    # The pod IP answers from the host: the cell's agent is there, speaks TLS only, and
    # answers only the node's certificate.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{status.status.network.ip}:9276/v1/health", timeout=5)
    anyone = ssl.create_default_context()
    anyone.check_hostname, anyone.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"https://{status.status.network.ip}:9276/v1/health", timeout=5, context=anyone)


def test_container_exits_with_code_and_logs(cri, pod, pulled, test_images):
    cid = run(cri, pod, "exit3", test_images["busybox"].ref,
              ["sh", "-c", "echo hello from the cell; echo oops >&2; exit 3"])
    status = wait_state(cri, cid, pb.CONTAINER_EXITED)
    assert status.state == pb.CONTAINER_EXITED
    assert status.exit_code == 3
    assert status.reason == "Error"
    assert status.started_at > 0 and status.finished_at >= status.started_at
    assert status.image_ref.startswith("127.0.0.1:5000/test/busybox@sha256:")
    lines = wait_for(lambda: log_lines(status.log_path) if len(log_lines(status.log_path)) >= 2 else None)
    assert ("stdout", "F", "hello from the cell") in lines
    assert ("stderr", "F", "oops") in lines


def test_the_log_file_exists_once_start_returns(cri, pod, pulled, test_images):
    # critest reads it at once, before any line can have been copied from the cell.
    cid = run(cri, pod, "quiet", test_images["busybox"].ref, ["sleep", "3600"])
    path = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.log_path
    with open(path, "rb") as f:
        assert f.read() == b""


def test_an_exit_is_seen_only_with_its_log_on_the_node(cri, pod, pulled, test_images):
    # The kubelet (and critest) read the log as soon as they see the exit.
    for i in range(5):
        cid = run(cri, pod, f"last-words-{i}", test_images["busybox"].ref, ["echo", f"bye {i}"])
        status = wait_state(cri, cid, pb.CONTAINER_EXITED)
        assert ("stdout", "F", f"bye {i}") in log_lines(status.log_path)


def test_completed_reason_for_exit_zero(cri, pod, pulled, test_images):
    cid = run(cri, pod, "ok", test_images["busybox"].ref, ["true"])
    status = wait_state(cri, cid, pb.CONTAINER_EXITED)
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 0, "Completed")


def test_web_server_answers_on_pod_ip(cri, pod, pulled, test_images):
    cid = run(cri, pod, "web", test_images["busybox"].ref, ["httpd", "-f", "-p", "8080", "-h", "/www"])
    assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    url = f"http://{pod_ip(cri, pod[0])}:8080/index.html"

    def fetch():
        try:
            return urllib.request.urlopen(url, timeout=2).read()
        except OSError:
            return None

    assert b"hello from kiyot" in wait_for(fetch, every=0.1)


def test_containers_of_a_pod_share_localhost(cri, pod, pulled, test_images):
    ref = test_images["busybox"].ref
    web = run(cri, pod, "web", ref, ["httpd", "-f", "-p", "8081", "-h", "/www"])
    client = run(cri, pod, "client", ref, ["sleep", "3600"])
    assert wait_state(cri, web, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING

    def fetch():
        r = cri.ExecSync(pb.ExecSyncRequest(container_id=client, timeout=10,
                                            cmd=["wget", "-qO-", "http://127.0.0.1:8081/index.html"]))
        return r if r.exit_code == 0 else None

    result = wait_for(fetch, every=0.2)
    assert result and b"hello from kiyot" in result.stdout


def test_containers_of_a_pod_share_ipc_unless_asked_otherwise(cri, pod, pulled, test_images):
    ref = test_images["busybox"].ref
    own_ipc = pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.CONTAINER)))
    ids = {name: run(cri, pod, name, ref, ["sleep", "3600"], **kw)
           for name, kw in (("a", {}), ("b", {}), ("loner", {"linux": own_ipc}))}

    def ipc(cid):
        wait_state(cri, cid, pb.CONTAINER_RUNNING)
        # busybox's sh runs applets that have no link of their own, such as readlink.
        r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "readlink /proc/self/ns/ipc"],
                                            timeout=10))
        assert r.exit_code == 0 and r.stdout.startswith(b"ipc:["), r
        return r.stdout

    assert ipc(ids["a"]) == ipc(ids["b"])  # the kubelet's default: IPC is the pod's
    assert ipc(ids["loner"]) != ipc(ids["a"])


def _linux(**modes) -> pb.LinuxContainerConfig:
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        namespace_options=pb.NamespaceOption(network=pb.POD, ipc=pb.POD, **modes)))


def _ps(cri, cid) -> list[str]:
    r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["ps", "-o", "pid,args"], timeout=10))
    assert r.exit_code == 0, r
    return r.stdout.decode().splitlines()[1:]


def test_share_process_namespace_and_a_target_pid_namespace(cri, pod, pulled, test_images):
    ref = test_images["busybox"].ref
    one = run(cri, pod, "one", ref, ["sleep", "1111"], linux=_linux(pid=pb.POD))
    two = run(cri, pod, "two", ref, ["sleep", "2222"], linux=_linux(pid=pb.POD))
    alone = run(cri, pod, "alone", ref, ["sleep", "3333"], linux=_linux(pid=pb.CONTAINER))
    for cid in (one, two, alone):
        wait_state(cri, cid, pb.CONTAINER_RUNNING)
    # shareProcessNamespace: each sees the other; PID 1 is the pod's own init, not theirs.
    seen = _ps(cri, one)
    assert any("sleep 2222" in ln for ln in seen) and any("sleep 1111" in ln for ln in seen)
    assert not any(ln.split(None, 1)[0] == "1" and "sleep" in ln for ln in seen)
    assert not any("sleep 1111" in ln for ln in _ps(cri, alone))
    # Stopping a container of a shared namespace ends it only (and SIGTERM works: not PID 1).
    cri.StopContainer(pb.StopContainerRequest(container_id=two, timeout=10))
    assert wait_state(cri, two, pb.CONTAINER_EXITED).exit_code == 143
    assert not any("sleep 2222" in ln for ln in _ps(cri, one))
    # TARGET (an ephemeral debug container): it joins its target's PID namespace.
    debug = run(cri, pod, "debug", ref, ["sleep", "4444"], linux=_linux(pid=pb.TARGET, target_id=alone))
    wait_state(cri, debug, pb.CONTAINER_RUNNING)
    debug_sees = _ps(cri, debug)
    assert any("sleep 3333" in ln for ln in debug_sees) and any("sleep 4444" in ln for ln in debug_sees)
    assert not any("sleep 1111" in ln for ln in debug_sees)


def test_exec_sync_output_exit_code_and_timeout(cri, pod, pulled, test_images):
    cid = run(cri, pod, "sleeper", test_images["busybox"].ref, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo out; echo err >&2; exit 7"],
                                        timeout=10))
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)
    with pytest.raises(grpc.RpcError) as err:
        cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sleep", "60"], timeout=1))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The timed-out process was killed: no `sleep 60` is left in the container.
    ps = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["ps", "-o", "args"], timeout=10))
    assert b"sleep 60" not in ps.stdout
    assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING


def test_exec_sync_output_is_capped_to_what_the_kubelet_accepts(cri, pod, pulled, test_images):
    cid = run(cri, pod, "chatty", test_images["busybox"].ref, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    nine_mib = str(9 * 1024 * 1024)
    r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=60, cmd=[
        "sh", "-c", f"head -c {nine_mib} /dev/zero; head -c {nine_mib} /dev/zero >&2; exit 4"]))
    # Each stream keeps its first 8 MiB less 4 KiB; the command still ran to its end.
    kept = 8 * 1024 * 1024 - 4096
    assert (len(r.stdout), len(r.stderr), r.exit_code) == (kept, kept, 4)
    assert r.stdout.count(0) == len(r.stdout)


def test_stop_sends_sigkill_after_timeout(cri, pod, pulled, test_images):
    # `sleep` as PID 1 ignores SIGTERM: only the SIGKILL after the timeout ends it.
    cid = run(cri, pod, "stubborn", test_images["busybox"].ref, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    status = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
    assert status.state == pb.CONTAINER_EXITED
    assert status.exit_code == 137
    # Stop and remove are idempotent.
    cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
    cri.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    cri.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    with pytest.raises(grpc.RpcError) as err:
        cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_with_sigterm_handler_exits_cleanly(cri, pod, pulled, test_images):
    cid = run(cri, pod, "polite", test_images["busybox"].ref,
              ["sh", "-c", "trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=30))
    status = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 0, "Completed")


def test_list_filters(cri, pod, pulled, test_images):
    sandbox_id, _ = pod
    ref = test_images["busybox"].ref
    a = run(cri, pod, "a", ref, ["sleep", "3600"])
    b = cri.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=container_config("b", ref, ["true"]))).container_id
    wait_state(cri, a, pb.CONTAINER_RUNNING)

    def ids(**kw):
        f = pb.ContainerFilter(**kw)
        return {c.id for c in cri.ListContainers(pb.ListContainersRequest(filter=f)).containers}

    assert {a, b} <= ids()
    assert ids(id=a[:10]) == {a}
    assert ids(pod_sandbox_id=sandbox_id) == {a, b}
    assert ids(pod_sandbox_id=sandbox_id, state=pb.ContainerStateValue(state=pb.CONTAINER_CREATED)) == {b}
    assert ids(pod_sandbox_id=sandbox_id, label_selector={"container": "a"}) == {a}
    assert ids(pod_sandbox_id=sandbox_id, label_selector={"container": "zzz"}) == set()
    streamed = {c.id for r in cri.StreamContainers(pb.StreamContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id))) for c in r.containers}
    assert streamed == {a, b}

    def sandboxes(**kw):
        f = pb.PodSandboxFilter(**kw)
        return {s.id for s in cri.ListPodSandbox(pb.ListPodSandboxRequest(filter=f)).items}

    assert sandboxes(id=sandbox_id[:12]) == {sandbox_id}
    assert sandbox_id in sandboxes(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY))
    assert sandbox_id not in sandboxes(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY))
    assert sandboxes(label_selector={"app": "nope"}) == set()
    streamed = {s.id for r in cri.StreamPodSandboxes(pb.StreamPodSandboxesRequest(
        filter=pb.PodSandboxFilter(id=sandbox_id))) for s in r.pod_sandboxes}
    assert streamed == {sandbox_id}


def test_repeated_run_pod_sandbox_makes_one_cell(cri, service, tmp_path):
    config = sandbox_config("twice", tmp_path)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id,
                            range(4)))
    try:
        assert len(set(ids)) == 1
        again = cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
        assert again == ids[0]
        cells = [p for p in (service.state_dir / "cells").iterdir()
                 if p.is_dir() and (p / "cell.json").read_text().find(ids[0]) >= 0]
        assert len(cells) == 1
    finally:
        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=ids[0]))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=ids[0]))


def test_stop_and_remove_sandbox_tear_down_the_cell(cri, service, tmp_path, pulled, test_images):
    sandbox_id, config = new_pod(cri, "teardown", tmp_path)
    cid = run(cri, (sandbox_id, config), "sleeper", test_images["busybox"].ref, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    its_dir = cell_dir(service.state_dir, sandbox_id)
    netns = json.loads((its_dir / "cell.json").read_text())["netns"]
    assert netns in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    status = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
    assert status.state == pb.SANDBOX_NOTREADY
    assert cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state == pb.CONTAINER_EXITED
    assert netns not in subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert processes_naming(cid) == [] and not its_dir.exists()  # its conmon, its cell: gone
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))  # idempotent
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    with pytest.raises(grpc.RpcError) as err:
        cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not its_dir.exists()


def test_reopen_container_log_after_rotation(cri, pod, pulled, test_images):
    cid = run(cri, pod, "ticker", test_images["busybox"].ref,
              ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"])
    status = wait_state(cri, cid, pb.CONTAINER_RUNNING)
    path = status.log_path
    wait_for(lambda: len(log_lines(path)) >= 3)
    import os
    os.rename(path, path + ".1")
    cri.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    wait_for(lambda: os.path.exists(path) and len(log_lines(path)) >= 3)
    cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    old = [int(t.split()[1]) for _, _, t in log_lines(path + ".1")]
    new = [int(t.split()[1]) for _, _, t in log_lines(path)]
    assert old and new
    # Nothing lost, nothing twice, across the rotation.
    assert old + new == list(range(old[0], old[0] + len(old) + len(new)))
    with pytest.raises(grpc.RpcError) as err:
        cri.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_ids(cri):
    missing = "f" * 64
    for call, req in [
        (cri.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id=missing)),
        (cri.ContainerStatus, pb.ContainerStatusRequest(container_id=missing)),
        (cri.StartContainer, pb.StartContainerRequest(container_id=missing)),
        (cri.ExecSync, pb.ExecSyncRequest(container_id=missing, cmd=["true"])),
        (cri.ReopenContainerLog, pb.ReopenContainerLogRequest(container_id=missing)),
        (cri.CreateContainer, pb.CreateContainerRequest(
            pod_sandbox_id=missing, config=container_config("x", "busybox", ["true"]))),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, call
        assert missing in err.value.details()
    # Stop and remove of what does not exist is fine: the kubelet repeats them.
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=missing))
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=missing))
    cri.StopContainer(pb.StopContainerRequest(container_id=missing))
    cri.RemoveContainer(pb.RemoveContainerRequest(container_id=missing))


def test_create_container_with_missing_image_is_a_clear_error(cri, pod):
    sandbox_id, config = pod
    with pytest.raises(grpc.RpcError) as err:
        cri.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, sandbox_config=config,
            config=container_config("x", "127.0.0.1:5000/test/never-pulled:1", ["true"])))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never-pulled" in err.value.details() and "pull" in err.value.details()


IMPLEMENTED = {
    "RuntimeService": {
        "Version", "Status", "RuntimeConfig", "UpdateRuntimeConfig", "RunPodSandbox",
        "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus", "ListPodSandbox",
        "StreamPodSandboxes", "CreateContainer", "StartContainer", "StopContainer",
        "RemoveContainer", "ListContainers", "StreamContainers", "ContainerStatus",
        "ReopenContainerLog", "ExecSync",
        # Stats (tests/e2e/test_stats.py).
        "ContainerStats", "ListContainerStats", "StreamContainerStats", "PodSandboxStats",
        "ListPodSandboxStats", "StreamPodSandboxStats", "ListMetricDescriptors", "ListPodSandboxMetrics",
        "StreamPodSandboxMetrics",
        # Streaming (tests/e2e/test_streaming.py) and events (test_events.py).
        "Exec", "Attach", "PortForward", "GetContainerEvents",
        # Resources (tests/e2e/test_resources.py); CheckpointContainer stays UNIMPLEMENTED.
        "UpdateContainerResources", "UpdatePodSandboxResources",
    },
    "ImageService": {
        "PullImage", "ListImages", "StreamImages", "ImageStatus", "RemoveImage", "ImageFsInfo",
    },
}


def test_all_41_rpcs_are_routed(service):
    """Every RPC answers: the implemented ones are tested above, the rest say UNIMPLEMENTED by name."""
    from google.protobuf import symbol_database

    services = [pb.DESCRIPTOR.services_by_name[n] for n in IMPLEMENTED]
    assert sum(len(s.methods) for s in services) == 41
    for svc in services:
        for method in svc.methods:
            if method.name in IMPLEMENTED[svc.name]:
                continue
            request_cls = symbol_database.Default().GetSymbol(method.input_type.full_name)
            path = f"/{svc.full_name}/{method.name}"
            kind = service.channel.unary_stream if method.server_streaming else service.channel.unary_unary
            call = kind(path, request_serializer=request_cls.SerializeToString,
                        response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                result = call(request_cls(), timeout=10)
                if method.server_streaming:
                    list(result)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, path
            assert method.name in err.value.details(), path


def test_cell_reaches_only_the_pull_path_on_the_host(cri, pod, pulled, test_images, service):
    """Like a VM in a VPC: a host service on 0.0.0.0 and the cell's own agent are out of reach."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # noqa: S104 - the point: a host service on every interface
    listener.listen()
    port = listener.getsockname()[1]
    threading.Thread(target=listener.accept, daemon=True).start()
    try:
        cid = run(cri, pod, "prober", test_images["busybox"].ref, ["sleep", "3600"])
        wait_state(cri, cid, pb.CONTAINER_RUNNING)
        ip = pod_ip(cri, pod[0])

        def connects(host, p) -> bool:
            # nc exits 1 at once when it cannot connect (or after -w 2 when dropped);
            # a connection that opens stays open until `timeout` ends it.
            r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, timeout=20, cmd=[
                "sh", "-c", f"timeout 3 nc -w 2 {host} {p} </dev/null >/dev/null 2>&1; echo $?"]))
            return r.stdout.strip() != b"1"

        assert connects("10.123.0.1", 5380)  # the pull path
        assert not connects("10.123.0.1", port)  # any other host service
        assert not connects(ip, 9276)  # the cell's own agent
    finally:
        listener.close()


def test_bad_hostname_is_invalid_argument_and_leaves_no_cell(cri, service, tmp_path):
    config = sandbox_config("bad-host", tmp_path)
    config.hostname = "not a valid [hostname]"
    with pytest.raises(grpc.RpcError) as err:
        cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hostname" in err.value.details()
    listed = cri.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert all(s.metadata.uid != config.metadata.uid for s in listed)
    leftovers = [p for p in (service.state_dir / "cells").iterdir() if p.is_dir()]
    owned = {cell_dir(service.state_dir, s.id).name for s in listed}
    assert {p.name for p in leftovers} <= owned


def test_partial_lines_are_tagged_p(cri, pod, pulled, test_images):
    cid = run(cri, pod, "partial", test_images["busybox"].ref,
              ["sh", "-c", "printf 'no newline yet'; sleep 1; echo ' then done'"])
    status = wait_state(cri, cid, pb.CONTAINER_EXITED)
    lines = wait_for(lambda: log_lines(status.log_path) if len(log_lines(status.log_path)) >= 2 else None)
    assert lines[0] == ("stdout", "P", "no newline yet")
    assert lines[1] == ("stdout", "F", " then done")


def test_oversized_request_is_refused(cri, pod):
    sandbox_id, _ = pod
    huge = container_config("huge", "busybox", ["true"])
    huge.annotations["blob"] = "x" * (17 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as err:
        cri.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=huge))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listed = cri.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id)))
    assert list(listed.containers) == []


def test_no_secret_in_argv_or_logs(cri, pod, pulled, test_images, service):
    cid = run(cri, pod, "quiet", test_images["busybox"].ref, ["sleep", "3600"])
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    its_dir = cell_dir(service.state_dir, pod[0])
    # The secrets: the cell's key, the node's key and its CA's (the base64 body of each).
    secrets = [b"".join(p.read_bytes().splitlines()[1:-1])[:64]
               for p in (its_dir / "tls" / "cell.key", service.state_dir / "pki" / "node.key",
                         service.state_dir / "pki" / "ca.key")]
    from pathlib import Path

    for secret in secrets:
        assert len(secret) == 64
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                assert secret not in cmdline.read_bytes(), cmdline
        assert secret not in service.log_file.read_bytes()
        assert secret not in (its_dir / "agent.log").read_bytes()
    for key in (its_dir / "tls" / "cell.key", service.state_dir / "pki" / "node.key",
                service.state_dir / "pki" / "ca.key"):
        assert key.stat().st_mode & 0o077 == 0, key
