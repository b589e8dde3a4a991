"""End-to-end fixtures: a real `kiyot-py serve` on a unix socket, driven like the kubelet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from tests.support.hostnet import remove_host_network

from .helpers import new_pod, pod_name, remove_pod

# A bridge and subnet of the tests' own, apart from a developer's running service.
BRIDGE = "kiyott0"
SUBNET = "10.123.0.0/24"
LOG_MAX_SIZE = 65536


@dataclass
class Service:
    """One `kiyot-py serve` process and a CRI client for it."""

    state_dir: Path
    socket: Path
    config: Path
    log_file: Path
    env: dict[str, str] | None = None  # on top of the tests' own environment
    proc: subprocess.Popen | None = None
    channel: grpc.Channel | None = None
    runtime: api_pb2_grpc.RuntimeServiceStub | None = None
    images: api_pb2_grpc.ImageServiceStub | None = None

    def start(self, crash_at: str = "") -> None:
        """Start the service; with `crash_at`, it kills itself at that crash point."""
        env = dict(os.environ, **(self.env or {}))
        if crash_at:
            env["KIYOTPY_CRASH_AT"] = crash_at
        with open(self.log_file, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kiyot_py.cli", "serve", "--config", str(self.config)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env,
            )
        # The kubelet's own message limit, so a reply that would not reach it fails here too.
        self.channel = grpc.insecure_channel(f"unix://{self.socket}", options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024)])
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        for _ in range(600):  # bounded: 60 s
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiyot-py serve exited:\n{self.log_file.read_text()[-4000:]}")
            try:
                self.runtime.Version(pb.VersionRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.1)
        raise RuntimeError(f"kiyot-py serve did not answer:\n{self.log_file.read_text()[-4000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.channel.close()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.channel.close()
        return code


def cleanup(service: Service) -> None:
    """Remove every cell the tests made, through the service itself where possible."""
    try:
        for sb in service.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            service.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
    except grpc.RpcError:
        pass


def new_service(base: Path, bridge: str = BRIDGE, subnet: str = SUBNET) -> Service:
    """A service (not started yet) with its own state, socket and cells' bridge under `base`."""
    config = base / "kiyot.toml"
    registries = base / "registries.conf"
    # registries.conf(5) style: registry.k8s.io comes from the local test registry.
    registries.write_text(
        '[[registry]]\nprefix = "registry.k8s.io"\nlocation = "127.0.0.1:5000"\ninsecure = true\n'
    )
    config.write_text(
        f'socket = "{base}/kiyot.sock"\n'
        f'state_dir = "{base}/state"\n'
        f'node_name = "test-node"\n'
        f'log_level = "debug"\n'
        f'registries_conf = "{registries}"\n'
        # Small log segments, so that every test's logs also go through the cells' cuts.
        f'[local]\nbridge = "{bridge}"\nsubnet = "{subnet}"\nlog_max_size = {LOG_MAX_SIZE}\n'
    )
    return Service(state_dir=base / "state", socket=base / "kiyot.sock", config=config,
                   log_file=base / "serve.log")


@pytest.fixture(scope="session")
def service(tmp_path_factory, registry) -> Service:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (network namespaces, runc)")
    svc = new_service(tmp_path_factory.mktemp("kiyot"))
    svc.start()
    yield svc
    cleanup(svc)
    if svc.proc.poll() is None:
        svc.stop()
    remove_host_network(BRIDGE)


@pytest.fixture
def pod(service, tmp_path, request):
    """A ready sandbox named after the test: (id, config); removed afterwards."""
    sandbox_id, config = new_pod(service.runtime, pod_name(request.node.name), tmp_path)
    yield sandbox_id, config
    remove_pod(service.runtime, sandbox_id)


@pytest.fixture
def cri(service):
    return service.runtime


@pytest.fixture
def img(service):
    return service.images
