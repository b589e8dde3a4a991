"""EC2 end-to-end fixtures: the EC2 simulator (moto over HTTP, a real cell behind every
instance) and a `kiyot-py serve` with provider = "aws" pointed at it, driven like the kubelet.

The simulator's VPC (10.127.0.0/16, on the bridge kiyotst0) is apart from a developer's
simulator (10.126.0.0/16) and from the other tests' bridges; the test registry is served
on its gateways (10.127.1.1:5000), as a VPC would reach a registry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Service, cleanup
from tests.support import ec2
from tests.support.ec2 import Sim, start_sim, stop_sim

BRIDGE = "kiyotst0"
VPC = "10.127.0.0/16"
GATEWAY = "10.127.1.1"
REGISTRY = f"{GATEWAY}:5000"
NODE = "test-node"


@pytest.fixture(scope="session")
def sim(tmp_path_factory, registry) -> Iterator[Sim]:
    if os.geteuid() != 0:
        pytest.skip("EC2 end-to-end tests need root (the simulator makes network namespaces)")
    try:
        simulator = start_sim(tmp_path_factory.mktemp("ec2sim"), BRIDGE, VPC, registry)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield simulator
    stop_sim(simulator)


def new_ec2_service(base: Path, sim: Sim, *, node: str = NODE, **options) -> Service:
    """A service (not started) on EC2 cells of the simulator; see tests.support.ec2."""
    return ec2.new_ec2_service(base, sim, REGISTRY, node=node, **options)


@pytest.fixture(scope="session")
def ec2_service(tmp_path_factory, sim) -> Iterator[Service]:
    svc = new_ec2_service(tmp_path_factory.mktemp("kiyot-ec2"), sim)
    svc.start()
    yield svc
    cleanup(svc)
    if svc.proc is not None and svc.proc.poll() is None:
        svc.stop()
