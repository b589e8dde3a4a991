"""`kiyot-ec2sim`: run the EC2 simulator until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

DESCRIPTION = """\
An EC2 API on this machine (moto, over HTTP) in which every instance is a real local
cell: its own network namespace at the instance's private address, on a bridge that
holds the simulated VPC, booted from its user data with its own metadata service.

It writes, in --state-dir, what a kiyot-py node needs to use it:
  node.toml     the [aws] settings (endpoint, region, subnets, security group, image)
  credentials   an access key for the node (AWS_SHARED_CREDENTIALS_FILE; mode 0600)
  layout.json   the ids it made
  control.sock  faults on command: capacity, spot notices, network cuts, EventBridge
                targets (python -m kiyot_py.ec2sim.faults --help)

  kiyot-ec2sim --state-dir /tmp/sim --forward 5000=127.0.0.1:5000
  AWS_SHARED_CREDENTIALS_FILE=/tmp/sim/credentials kiyot-py serve --config /tmp/sim/node.toml
"""


def parse_forward(text: str) -> tuple[int, str, int]:
    port, sep, target = text.partition("=")
    host, sep2, target_port = target.rpartition(":")
    if not sep or not sep2 or not port.isdigit() or not target_port.isdigit():
        raise argparse.ArgumentTypeError(f"--forward wants PORT=HOST:PORT, got {text!r}")
    return int(port), host, int(target_port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kiyot-ec2sim", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path, default=Path("/var/lib/kiyot-ec2sim"), metavar="DIR",
                    help="where the machines' disks and consoles and the node's files go")
    ap.add_argument("--listen", default="127.0.0.1:4566", metavar="HOST:PORT",
                    help="the EC2 (and SSM, IAM) endpoint (default 127.0.0.1:4566; port 0: any free one)")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--vpc-cidr", default="10.126.0.0/16", metavar="CIDR",
                    help="the VPC; one /24 per zone, on the bridge (default 10.126.0.0/16)")
    ap.add_argument("--bridge", default="kiyotsim0", metavar="NAME", help="the bridge that holds the VPC")
    ap.add_argument("--boot-delay", type=float, default=0.0, metavar="SECONDS",
                    help="how long an instance stays pending before its machine powers on (default 0)")
    ap.add_argument("--forward", type=parse_forward, action="append", default=[], metavar="PORT=HOST:PORT",
                    help="serve a host service on each gateway of the VPC (e.g. a registry: 5000=127.0.0.1:5000)")
    ap.add_argument("--spot-prices", type=Path, default=None, metavar="FILE",
                    help='spot prices, JSON: {"t3.small": 0.0065} or {"t3.small": {"us-east-1a": 0.0071}}; '
                         "others: 30%% of the on-demand price (+2%% per zone after the first)")
    ap.add_argument("--no-auth", action="store_true", help="accept any credentials (authentication is on by default)")
    ns = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("kiyot-ec2sim: run as root (it makes a bridge and network namespaces)")
    # moto reads these when it is imported: before anything imports it.
    os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
    if not ns.no_auth:
        os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    from kiyot_py.ec2sim.simulator import SimSettings, Simulator
    from kiyot_py.log import configure

    configure("info")
    zones = (f"{ns.region}a", f"{ns.region}b")
    sim = Simulator(SimSettings(state_dir=ns.state_dir, listen=ns.listen, region=ns.region, vpc_cidr=ns.vpc_cidr,
                                zones=zones, bridge=ns.bridge, boot_delay=ns.boot_delay, forwards=ns.forward))

    if ns.spot_prices is not None:
        try:
            sim.faults.set_spot_prices(json.loads(ns.spot_prices.read_text()))
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            sys.exit(f"kiyot-ec2sim: --spot-prices {ns.spot_prices}: {exc}")

    async def run() -> None:
        await sim.start()
        print(f"ready {sim.layout['endpoint_url']}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await sim.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
