"""The EC2 simulator: moto's EC2 over HTTP, where every instance is a real cell.

One process: moto's server in a thread (`ThreadedMotoServer`), its EC2 backend with the
gaps of `gaps.py` filled, and an asyncio loop that powers each instance's machine on and
off (`machines.py`). At start it lays out what an operator would have made in a real
account, and writes it down for the node (`<state>/node.toml`, `<state>/credentials`):

- a VPC and one subnet per zone, whose addresses live only on a bridge the simulator
  makes (the node sits on that bridge, as a thin node sits in the VPC); nothing from the
  bridge is forwarded anywhere else, and moto's public range goes to a blackhole route;
- a security group, the cell image as an AMI and an SSM parameter naming it, an
  instance profile;
- an IAM user with a policy for the node, and its access key (authentication is on:
  wrong credentials get AWS's `AuthFailure`);
- TCP forwards of host services (a registry on 127.0.0.1) onto the bridge's gateway, as a
  VPC would reach a registry: a cell's own 127.0.0.1 is its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from kiyot_py.ec2sim.faults import Faults
from kiyot_py.ec2sim.machines import Machines, MachineSpec
from kiyot_py.providers.hostcell import run

log = structlog.get_logger("kiyot.ec2sim")

ACCOUNT = "123456789012"
MOTO_PUBLIC_RANGE = "54.214.0.0/16"  # real AWS addresses moto hands out: never reached from here
NODE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["ec2:*", "ssm:GetParameter", "ssm:GetParameters",
                                                 "iam:PassRole", "pricing:GetProducts", "sqs:GetQueueUrl",
                                                 "sqs:ReceiveMessage", "sqs:DeleteMessage",
                                                 # AWS authorizes a batch delete as sqs:DeleteMessage;
                                                 # moto asks for an action of the batch's own name.
                                                 "sqs:DeleteMessageBatch"], "Resource": "*"}],
}


@dataclass
class SimSettings:
    state_dir: Path = Path("/var/lib/kiyot-ec2sim")
    listen: str = "127.0.0.1:4566"
    region: str = "us-east-1"
    vpc_cidr: str = "10.126.0.0/16"
    zones: tuple[str, ...] = ("us-east-1a", "us-east-1b")
    bridge: str = "kiyotsim0"
    boot_delay: float = 0.0
    image_parameter: str = "/kiyot/cell-image/latest"
    forwards: list[tuple[int, str, int]] = field(default_factory=list)  # (port on the gateway, host, port)


class Simulator:
    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.machines = Machines(settings.state_dir / "instances", settings.bridge, settings.boot_delay)
        self.subnet_ids: frozenset[str] = frozenset()
        self.layout: dict[str, Any] = {}
        self._server: Any = None
        self._forwards: list[asyncio.subprocess.Process] = []
        self._networks: list[ipaddress.IPv4Network] = []
        self._backend: Any = None
        self.faults = Faults(self, settings.zones)
        self._control: Any = None

    # -- what gaps.py calls, from moto's threads ----------------------------------------

    def launched(self, instances: list[Any]) -> None:
        specs = []
        for instance in instances:
            subnet = self._backend.get_subnet(instance.subnet_id)
            user_data = instance.user_data.decode().encode() if instance.user_data is not None else b""
            nic = instance.nics[0]
            secondary = tuple(a["PrivateIpAddress"] for a in nic.private_ip_addresses if not a.get("Primary"))
            specs.append(MachineSpec(instance.id, instance.private_ip, subnet.cidr_block, instance.instance_type,
                                     instance.placement.zone or "", user_data, nic.mac_address, secondary))
        self.machines.launched(specs, self)

    def ended(self, instance_ids: list[str]) -> None:
        self.machines.ended(instance_ids)

    def console(self, instance_id: str) -> bytes:
        return self.machines.console(instance_id)

    def attempt(self, instance_type: str, zone: str, market: str) -> tuple[str, str] | None:
        return self.faults.attempt(instance_type, zone, market)

    def spot_price(self, instance_type: str, zone: str) -> float | None:
        return self.faults.spot_price(instance_type, zone)

    def state_changed(self, instance_ids: list[str], states: tuple[str, ...]) -> None:
        for instance_id in instance_ids:
            for state in states:
                self.faults.announce("EC2 Instance State-change Notification", instance_id, {"state": state})

    def tokens_expired(self) -> bool:
        # EC2 keeps a client token for a while after its instance ends, not forever: with
        # this file present, every token seen so far counts as expired.
        return (self.settings.state_dir / "client-tokens-expired").exists()

    # -- what machines.py calls, on the loop ---------------------------------------------

    def running(self, instance_id: str) -> None:
        from moto.ec2.models.instances import InstanceState

        instance = self._backend.get_instance(instance_id)
        if instance.state == "pending":
            instance._state = InstanceState("running", 16)

    def failed(self, instance_id: str, reason: str) -> None:
        from moto.ec2.models.instances import InstanceState, StateReason

        instance = self._backend.get_instance(instance_id)
        instance._state = InstanceState("terminated", 48)
        instance.state_reason = StateReason(reason, "Server.InternalError")

    # -- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.machines.attach(asyncio.get_running_loop())
        await self.machines.sweep()
        vpc = ipaddress.IPv4Network(s.vpc_cidr)
        self._networks = list(vpc.subnets(new_prefix=24))[1:len(s.zones) + 1]
        await self._network_up()
        from moto.ec2.models import ec2_backends
        from moto.server import ThreadedMotoServer

        from kiyot_py.ec2sim import gaps

        self._backend = ec2_backends[ACCOUNT][s.region]
        self.layout = self._lay_out(vpc)
        gaps.install(self)
        host, _, port = s.listen.rpartition(":")
        self._server = ThreadedMotoServer(host, int(port), verbose=False)
        self._server.start()
        bound_host, bound_port = self._server.get_host_and_port()
        self.layout["endpoint_url"] = f"http://{bound_host}:{bound_port}"
        for gateway_port, target_host, target_port in s.forwards:
            for net in self._networks:
                self._forwards.append(await asyncio.create_subprocess_exec(
                    "socat", f"TCP-LISTEN:{gateway_port},bind={next(net.hosts())},fork,reuseaddr",
                    f"TCP:{target_host}:{target_port}", stdin=asyncio.subprocess.DEVNULL))
        self._control = await self.faults.serve(s.state_dir / "control.sock")
        self._write_node_files()
        log.info("ec2 simulator serving", endpoint=self.layout["endpoint_url"], subnets=self.layout["subnets"],
                 image=self.layout["image"], state_dir=str(s.state_dir))

    async def stop(self) -> None:
        if self._control is not None:
            await self._control.cleanup()
        await self.faults.close()
        await self.machines.power_off_all()
        for proc in self._forwards:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if self._server is not None:
            self._server.stop()
        await self._network_down()

    # -- pieces -------------------------------------------------------------------------

    async def _network_up(self) -> None:
        s = self.settings
        if not Path(f"/sys/class/net/{s.bridge}").exists():  # noqa: ASYNC240 - a sysfs stat
            await run("ip", "link", "add", s.bridge, "type", "bridge")
        addrs = await run("ip", "-o", "addr", "show", "dev", s.bridge)
        for net in self._networks:
            gateway = f"{next(net.hosts())}/{net.prefixlen}"
            if f" {gateway} " not in addrs:
                await run("ip", "addr", "add", gateway, "dev", s.bridge)
        await run("ip", "link", "set", s.bridge, "up")
        # What a simulated instance sends stays on this machine: only to the bridge (the
        # VPC) and the node on it, never forwarded beyond.
        rule = ["FORWARD", "-i", s.bridge, "!", "-o", s.bridge, "-j", "DROP"]
        if not await _ok("iptables", "-C", *rule):
            await run("iptables", "-I", *rule)
        if not await _ok("ip", "route", "show", "type", "blackhole", MOTO_PUBLIC_RANGE, expect_output=True):
            await run("ip", "route", "add", "blackhole", MOTO_PUBLIC_RANGE, check=False)

    async def _network_down(self) -> None:
        s = self.settings
        await run("iptables", "-D", "FORWARD", "-i", s.bridge, "!", "-o", s.bridge, "-j", "DROP", check=False)
        await run("ip", "route", "del", "blackhole", MOTO_PUBLIC_RANGE, check=False)
        await run("ip", "link", "del", s.bridge, check=False)

    def _lay_out(self, vpc: ipaddress.IPv4Network) -> dict[str, Any]:
        from moto.iam.models import iam_backends
        from moto.ssm.models import ssm_backends

        s = self.settings
        ec2 = self._backend
        vpc_id = ec2.create_vpc(str(vpc)).id
        subnets = [ec2.create_subnet(vpc_id=vpc_id, cidr_block=str(net), availability_zone=zone).id
                   for net, zone in zip(self._networks, s.zones, strict=True)]
        self.subnet_ids = frozenset(subnets)
        group = ec2.create_security_group("kiyot-cells", "cells of kiyot-py nodes", vpc_id=vpc_id).id
        image = ec2.register_image(name="kiyot-cell", description="the kiyot-py cell image (simulated)").id
        ssm_backends[ACCOUNT][s.region].put_parameter(
            name=s.image_parameter, description="the kiyot-py cell image", value=image, parameter_type="String",
            allowed_pattern="", keyid="", overwrite=True, tags=[], data_type="aws:ec2:image", tier=None,
            policies=None)
        iam = iam_backends[ACCOUNT]["global"]
        iam.create_instance_profile(name="kiyot-cell", path="/", role_names=[])
        iam.create_user(s.region, "kiyot-node", "/", [])
        policy = iam.create_policy(description="what a kiyot-py node needs", path="/",
                                   policy_document=json.dumps(NODE_POLICY), policy_name="kiyot-node", tags=[])
        iam.attach_user_policy(policy.arn, "kiyot-node")
        key = iam.create_access_key("kiyot-node")
        return {"region": s.region, "vpc": vpc_id, "subnets": subnets, "security_group": group, "image": image,
                "image_parameter": s.image_parameter, "instance_profile": "kiyot-cell",
                "gateways": [str(next(n.hosts())) for n in self._networks],
                "access_key_id": key.access_key_id, "secret_access_key": key.secret_access_key}

    def _write_node_files(self) -> None:
        d = self.settings.state_dir
        lay = self.layout
        fd = os.open(d / "credentials.tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"[default]\naws_access_key_id = {lay['access_key_id']}\n"
                     f"aws_secret_access_key = {lay['secret_access_key']}\n")
        os.replace(d / "credentials.tmp", d / "credentials")
        # The registries forwarded onto the VPC's gateways are plain HTTP (a test registry).
        forwarded = [f"{g}:{port}" for port, _, _ in self.settings.forwards for g in lay["gateways"]]
        (d / "registries.conf").write_text("".join(
            f'[[registry]]\nprefix = "{r}"\nlocation = "{r}"\ninsecure = true\n\n' for r in forwarded))
        (d / "node.toml").write_text(
            f'provider = "aws"\nregistries_conf = "{d / "registries.conf"}"\n\n[aws]\n'
            f'region = "{lay["region"]}"\nendpoint_url = "{lay["endpoint_url"]}"\n'
            f'subnets = "{",".join(lay["subnets"])}"\nsecurity_groups = "{lay["security_group"]}"\n'
            f'image = "{lay["image_parameter"]}"\ninstance_profile = "{lay["instance_profile"]}"\n')
        public = {k: v for k, v in lay.items() if k not in ("access_key_id", "secret_access_key")}
        (d / "layout.json").write_text(json.dumps(public, indent=2) + "\n")


async def _ok(*argv: str, expect_output: bool = False) -> bool:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return proc.returncode == 0 and (bool(out.strip()) if expect_output else True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
