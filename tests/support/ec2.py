"""The EC2 simulator for tests and benchmarks: start it, look into it, and a `kiyot-py
serve` with provider = "aws" pointed at it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3

from kiyot_py.ec2sim.faults import Control
from tests.e2e.conftest import Service

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

    @property
    def control(self) -> Control:
        """Faults on command: capacity, spot notices, network cuts, EventBridge targets."""
        return Control(self.state_dir)

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


def start_sim(state: Path, bridge: str, vpc: str, registry: str) -> Sim:
    """`kiyot-ec2sim` on a free port, its VPC on `bridge`, `registry` served on its gateways."""
    out = open(state / "sim.log", "wb")  # noqa: SIM115 - the child keeps its own copy
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiyot_py.ec2sim.cli", "--state-dir", str(state), "--listen", "127.0.0.1:0",
         "--bridge", bridge, "--vpc-cidr", vpc, "--forward", f"5000={registry}"],
        stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    out.close()
    for _ in range(300):  # bounded: 30 s
        if proc.poll() is not None:
            raise RuntimeError(f"the EC2 simulator exited:\n{(state / 'sim.log').read_text()[-3000:]}")
        if (state / "layout.json").exists() and b"ready " in (state / "sim.log").read_bytes():
            return Sim(state, proc, json.loads((state / "layout.json").read_text()))
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the EC2 simulator did not start")


def stop_sim(sim: Sim) -> None:
    sim.proc.terminate()
    try:
        sim.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        sim.proc.kill()


def new_ec2_service(base: Path, sim: Sim, registry: str, *, node: str, credentials: Path | None = None,
                    image: str = "", gc_interval: float = 60.0, gc_grace: float = 120.0,
                    boot_timeout: float = 60.0, log_level: str = "debug",
                    more_registries: tuple[str, ...] = (), settings: str = "", aws: str = "") -> Service:
    """A service (not started) on EC2 cells of the simulator, state and socket under `base`
    (`settings` and `aws`: more TOML lines, top-level and for [aws]).
    Each service of a test has a node name of its own: the orphan collector of one never
    sees another's cells as its own."""
    base.mkdir(parents=True, exist_ok=True)
    registries = base / "registries.conf"
    registries.write_text("".join(f'[[registry]]\nprefix = "{r}"\nlocation = "{r}"\ninsecure = true\n\n'
                                  for r in (registry, *more_registries)))
    lay = sim.layout
    config = base / "kiyot.toml"
    config.write_text(
        f'socket = "{base}/kiyot.sock"\nstate_dir = "{base}/state"\nnode_name = "{node}"\n'
        f'log_level = "{log_level}"\nregistries_conf = "{registries}"\nprovider = "aws"\n'
        f'cell_boot_timeout = {boot_timeout}\n'
        f'gc_interval = {gc_interval}\ngc_grace = {gc_grace}\n{settings}\n'
        f'[aws]\nregion = "{lay["region"]}"\nendpoint_url = "{lay["endpoint_url"]}"\n'
        f'subnets = "{",".join(lay["subnets"])}"\nsecurity_groups = "{lay["security_group"]}"\n'
        f'image = "{image or lay["image_parameter"]}"\ninstance_profile = "{lay["instance_profile"]}"\n'
        f'instance_types = "{ALLOWED}"\n{aws}\n')
    return Service(state_dir=base / "state", socket=base / "kiyot.sock", config=config, log_file=base / "serve.log",
                   env={"AWS_SHARED_CREDENTIALS_FILE": str(credentials or sim.state_dir / "credentials"),
                        "AWS_CONFIG_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"})


