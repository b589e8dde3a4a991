"""A pod's host name and host ports, as the conformance suite and the kubelet use them."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .conftest import BRIDGE
from .helpers import remove_pod, run, sandbox_config, wait_for, wait_state


def exec_out(cri, cid, *cmd) -> str:
    r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=10))
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode()


def pull(img, ref):
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pod(cri, config: pb.PodSandboxConfig) -> str:
    return cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id


def test_a_pod_without_hostname_and_a_long_name_gets_the_cells_name(cri, img, test_images, tmp_path):
    # critest's pods: no hostname, names far past 64 bytes (sethostname's limit).
    name = "a-pod-name-of-seventy-characters-" + "x" * 37
    assert len(name) == 70
    config = sandbox_config(name, tmp_path)
    config.hostname = ""
    sandbox_id = run_pod(cri, config)
    try:
        ref = test_images["busybox"].ref
        pull(img, ref)
        cid = run(cri, (sandbox_id, config), "host", ref, ["sleep", "3600"])
        assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
        hostname = exec_out(cri, cid, "hostname").strip()
        assert 0 < len(hostname.encode()) <= 64
        assert f"HOSTNAME={hostname}" in exec_out(cri, cid, "env")
        assert exec_out(cri, cid, "cat", "/etc/hostname").strip() == hostname
    finally:
        remove_pod(cri, sandbox_id)


def test_a_hostname_longer_than_64_bytes_is_refused(cri, tmp_path):
    config = sandbox_config("long-hostname", tmp_path)
    config.hostname = "h" * 65
    with pytest.raises(grpc.RpcError) as err:
        run_pod(cri, config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 bytes" in err.value.details()
    assert not [sb for sb in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items
                if sb.metadata.name == "long-hostname"]


def serve_web(cri, img, test_images, pod, port: int = 8080) -> None:
    """busybox's httpd on the pod's `port`, serving the test image's /www."""
    ref = test_images["busybox"].ref
    pull(img, ref)
    run(cri, pod, "web", ref, ["httpd", "-f", "-p", str(port), "-h", "/www"])


def wait_for_page(url: str) -> bytes | None:
    """The page's body once the web server answers (bounded), else None."""
    def page():
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            return None
    return wait_for(page, 30)


def test_host_port_forwards_to_the_container_port(cri, img, test_images, tmp_path):
    host_port = free_port()
    config = sandbox_config("host-port", tmp_path)
    config.port_mappings.append(pb.PortMapping(protocol=pb.TCP, container_port=8080, host_port=host_port))
    sandbox_id = run_pod(cri, config)
    try:
        serve_web(cri, img, test_images, (sandbox_id, config))

        assert b"hello from kiyot" in wait_for_page(f"http://127.0.0.1:{host_port}/index.html")

        # The port is this pod's: another pod asking for it gets a clear error, no cell.
        other = sandbox_config("host-port-taken", tmp_path)
        other.port_mappings.append(pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=host_port))
        with pytest.raises(grpc.RpcError) as err:
            run_pod(cri, other)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(host_port) in err.value.details()
        assert not [sb for sb in cri.ListPodSandbox(pb.ListPodSandboxRequest()).items
                    if sb.metadata.name == "host-port-taken"]
    finally:
        remove_pod(cri, sandbox_id)
    # Stopped: the node no longer listens there (SO_REUSEADDR: our own client's closed
    # connections linger in TIME_WAIT, but a listener would still make bind fail).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", host_port))


def test_host_ports_are_validated(cri, tmp_path):
    for mapping in (pb.PortMapping(protocol=pb.SCTP, container_port=80, host_port=free_port()),
                    pb.PortMapping(protocol=pb.TCP, container_port=0, host_port=free_port()),
                    pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=70000)):
        config = sandbox_config("bad-port", tmp_path)
        config.port_mappings.append(mapping)
        with pytest.raises(grpc.RpcError) as err:
            run_pod(cri, config)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, mapping


def test_host_ports_come_back_after_a_restart(service, cri, img, test_images, tmp_path):
    host_port = free_port()
    config = sandbox_config("host-port-restart", tmp_path)
    config.port_mappings.append(pb.PortMapping(protocol=pb.TCP, container_port=8080, host_port=host_port))
    sandbox_id = run_pod(cri, config)
    try:
        serve_web(cri, img, test_images, (sandbox_id, config))
        service.kill9()
        service.start()

        assert b"hello from kiyot" in wait_for_page(f"http://127.0.0.1:{host_port}/index.html")
    finally:
        remove_pod(service.runtime, sandbox_id)


def test_a_host_network_pod_serves_its_declared_ports_on_the_node(cri, img, test_images, tmp_path):
    # hostNetwork is the cell's network; a port it declares (critest's "portforward in host
    # network" declares only a container port) is that port on the node as well.
    port = free_port()
    config = sandbox_config("host-network-port", tmp_path)
    config.linux.security_context.namespace_options.network = pb.NODE
    config.port_mappings.append(pb.PortMapping(protocol=pb.TCP, container_port=port))
    sandbox_id = run_pod(cri, config)
    try:
        serve_web(cri, img, test_images, (sandbox_id, config), port)
        ip = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status.network.ip

        assert b"hello from kiyot" in wait_for_page(f"http://127.0.0.1:{port}/index.html")
        assert ip != "127.0.0.1" and b"hello from kiyot" in wait_for_page(f"http://{ip}:{port}/index.html")
    finally:
        remove_pod(cri, sandbox_id)
    with socket.socket() as s:  # removed: the node no longer listens there
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_container_port_alone_is_served_at_the_pod_ip(cri, img, test_images, tmp_path):
    # Only a container port (critest's "port mapping with only container port"): the pod IP.
    config = sandbox_config("container-port", tmp_path)
    config.port_mappings.append(pb.PortMapping(protocol=pb.TCP, container_port=8080))
    sandbox_id = run_pod(cri, config)
    try:
        serve_web(cri, img, test_images, (sandbox_id, config))
        ip = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status.network.ip

        assert b"hello from kiyot" in wait_for_page(f"http://{ip}:8080/index.html")
    finally:
        remove_pod(cri, sandbox_id)


def test_the_bridge_keeps_its_address_as_cells_come_and_go(cri, tmp_path):
    """A bridge takes the lowest MAC of its ports unless its own was set: a cell's veth
    coming or going would change the gateway's MAC under every other cell (their ARP
    entries stale for up to 45 s). The service sets it once (addr_assign_type 3)."""
    sysfs = Path(f"/sys/class/net/{BRIDGE}")
    assert (sysfs / "addr_assign_type").read_text().strip() == "3"
    before = (sysfs / "address").read_text()
    sandboxes = [run_pod(cri, sandbox_config(f"bridge-mac-{i}", tmp_path)) for i in range(3)]
    for sandbox_id in sandboxes:
        remove_pod(cri, sandbox_id)
    assert (sysfs / "address").read_text() == before

