"""What Status says when a provider cannot make cells: each provider's own reasons."""

from __future__ import annotations

import asyncio
import socket

import boto3

from kiyot_py.config import AwsSettings, LocalCellSettings
from kiyot_py.pki import NodePKI
from kiyot_py.providers.base import Readiness
from kiyot_py.providers.ec2 import Ec2Provider
from kiyot_py.providers.local import LocalProvider


async def test_local_cells_need_their_tools_and_their_bridge(tmp_path):
    pki = NodePKI(tmp_path / "pki", "node-a")
    lo = LocalProvider(tmp_path, LocalCellSettings(bridge="lo", runtime="sh"), pki)
    assert await lo.readiness() == Readiness()  # sh and conmon are found, lo is up
    missing = LocalProvider(tmp_path, LocalCellSettings(bridge="kiyotnone0", runtime="no-such-runtime"), pki)
    ready = await missing.readiness()
    assert ready.runtime_reason == "RuntimeMissing" and "no-such-runtime" in ready.runtime_message
    assert ready.network_reason == "BridgeDown" and "kiyotnone0" in ready.network_message


def refusing_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_ec2_is_not_ready_while_aws_refuses_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = AwsSettings(region="us-east-1", endpoint_url=f"http://127.0.0.1:{refusing_port()}",
                           subnets="subnet-1", image="ami-12345678")
    provider = Ec2Provider(settings, NodePKI(tmp_path / "pki", "node-a"), "node-a",
                           session_factory=lambda: boto3.session.Session(region_name="us-east-1"))
    await provider.start()  # logs, does not raise: launches (and Status) try again
    ready = await provider.readiness()
    assert ready.runtime_reason == "ProviderNotReady"
    assert "EC2 cells cannot be launched yet" in ready.runtime_message and "127.0.0.1" in ready.runtime_message
    assert not ready.network_reason
    await asyncio.wait_for(asyncio.shield(provider._retrying), 120)  # the try again, in the background
    assert (await provider.readiness()).runtime_reason == "ProviderNotReady"
    await provider.close()
