"""EC2 end-to-end fixtures: the EC2 simulator (moto over HTTP, a real cell behind every
instance) and a `kiyot-py serve` with provider = "aws" pointed at it, driven like the kubelet.

The simulator's VPC (10.127.0.0/16, on the bridge kiyotst0) is apart from a developer's
simulator (10.126.0.0/16) and from the other tests' bridges; the test registry is served
on its gateways (10.127.1.1:5000), as a VPC would reach a registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import Service

BRIDGE = "kiyotst0"
VPC = "10.127.0.0/16"
GATEWAY = "10.127.1.1"
REGISTRY = f"{GATEWAY}:5000"
NODE = "test-node"
ALLOWED = "t3.small,t3.medium,t3.large,m5.large,c5.xlarge"


@dataclass
class Sim:
    state_dir: Path
    proc: subprocess.Popen
    layout: dict

    def client(self, service: str = "ec2", credentials: Path | None = None):
        """A boto3 client of the simulator, as the node's credentials (or others) see it."""
        keys = _read_credentials(credentials or self.state_dir / "credentials")
        return boto3.client(service, region_name=self.layout["region"], endpoint_url=self.layout["endpoint_url"],
                            aws_access_key_id=keys["aws_access_key_id"],
                            aws_secret_access_key=keys["aws_secret_access_key"])

    def set_boot_delay(self, seconds: float) -> None:
        (self.state_dir / "boot-delay").write_text(str(seconds))

    def instances(self, **tags: str) -> list[dict]:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        return [i for r in self.client().describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]

    def live(self, **tags: str) -> list[dict]:
        return [i for i in self.instances(**tags) if i["State"]["Name"] in ("pending", "running")]


def _read_credentials(path: Path) -> dict[str, str]:
    keys = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            keys[key.strip()] = value.strip()
    return keys


@pytest.fixture(scope="session")
def sim(tmp_path_factory, registry) -> Iterator[Sim]:
    if os.geteuid() != 0:
        pytest.skip("EC2 end-to-end tests need root (the simulator makes network namespaces)")
    state = tmp_path_factory.mktemp("ec2sim")
    out = open(state / "sim.log", "wb")  # noqa: SIM115 - the simulator's for the session
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiyot_py.ec2sim.cli", "--state-dir", str(state), "--listen", "127.0.0.1:0",
         "--bridge", BRIDGE, "--vpc-cidr", VPC, "--forward", f"5000={registry}"],
        stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    for _ in range(300):  # bounded: 30 s
        if proc.poll() is not None:
            pytest.fail(f"the EC2 simulator exited:\n{(state / 'sim.log').read_text()[-3000:]}")
        if (state / "layout.json").exists() and b"ready " in (state / "sim.log").read_bytes():
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the EC2 simulator did not start")
    yield Sim(state, proc, json.loads((state / "layout.json").read_text()))
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    out.close()


def new_ec2_service(base: Path, sim: Sim, *, node: str = NODE, credentials: Path | None = None, image: str = "",
                    gc_interval: float = 60.0) -> Service:
    """A service (not started) on EC2 cells of the simulator, state and socket under `base`.
    Each service of a test has a node name of its own: the orphan collector of one never
    sees another's cells as its own."""
    base.mkdir(parents=True, exist_ok=True)
    registries = base / "registries.conf"
    registries.write_text(f'[[registry]]\nprefix = "{REGISTRY}"\nlocation = "{REGISTRY}"\ninsecure = true\n')
    lay = sim.layout
    config = base / "kiyot.toml"
    config.write_text(
        f'socket = "{base}/kiyot.sock"\nstate_dir = "{base}/state"\nnode_name = "{node}"\n'
        f'log_level = "debug"\nregistries_conf = "{registries}"\nprovider = "aws"\ncell_boot_timeout = 60\n'
        f'gc_interval = {gc_interval}\n'
        f'[aws]\nregion = "{lay["region"]}"\nendpoint_url = "{lay["endpoint_url"]}"\n'
        f'subnets = "{",".join(lay["subnets"])}"\nsecurity_groups = "{lay["security_group"]}"\n'
        f'image = "{image or lay["image_parameter"]}"\ninstance_profile = "{lay["instance_profile"]}"\n'
        f'instance_types = "{ALLOWED}"\n')
    return Service(state_dir=base / "state", socket=base / "kiyot.sock", config=config, log_file=base / "serve.log",
                   env={"AWS_SHARED_CREDENTIALS_FILE": str(credentials or sim.state_dir / "credentials"),
                        "AWS_CONFIG_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"})


def cleanup(service: Service) -> None:
    try:
        for sb in service.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            service.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
    except grpc.RpcError:
        pass


@pytest.fixture(scope="session")
def ec2_service(tmp_path_factory, sim) -> Iterator[Service]:
    svc = new_ec2_service(tmp_path_factory.mktemp("kiyot-ec2"), sim)
    svc.start()
    yield svc
    cleanup(svc)
    if svc.proc is not None and svc.proc.poll() is None:
        svc.stop()
