"""The simulator keeps EC2's rules where moto does not (kiyot_py/ec2sim/gaps.py), over
HTTP as boto3 sees it, and every instance is a real machine with its own metadata service."""

from __future__ import annotations

import json
import subprocess
import uuid

import botocore.exceptions
import pytest

from tests.e2e.helpers import wait_for

from .conftest import BRIDGE, Sim


def _launch(sim: Sim, token: str = "", instance_type: str = "t3.small", subnet: str | None = None, **extra):
    lay = sim.layout
    args = dict(ImageId=lay["image"], MinCount=1, MaxCount=1, InstanceType=instance_type,
                SubnetId=subnet or lay["subnets"][0], **extra)
    if token:
        args["ClientToken"] = token
    return sim.client().run_instances(**args)


def _error(call) -> dict:
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        call()
    return raised.value.response["Error"]


def _state(sim: Sim, instance_id: str) -> str:
    found = sim.client().describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return found["State"]["Name"]


def test_a_client_token_gives_one_reservation_and_refuses_other_parameters(sim):
    token = uuid.uuid4().hex
    first = _launch(sim, token)
    again = _launch(sim, token)
    try:
        assert again["ReservationId"] == first["ReservationId"]
        assert again["Instances"][0]["InstanceId"] == first["Instances"][0]["InstanceId"]
        err = _error(lambda: _launch(sim, token, instance_type="t3.large"))
        assert err["Code"] == "IdempotentParameterMismatch"
    finally:
        sim.client().terminate_instances(InstanceIds=[first["Instances"][0]["InstanceId"]])


def test_unknown_images_and_foreign_subnets_are_refused_and_no_public_address_is_given(sim):
    err = _error(lambda: sim.client().run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1,
                                                    SubnetId=sim.layout["subnets"][0]))
    assert err["Code"] == "InvalidAMIID.NotFound"
    # moto's default VPC and its subnets are not the simulator's: nothing launches there.
    default_subnets = [s["SubnetId"] for s in sim.client().describe_subnets()["Subnets"]
                       if s["SubnetId"] not in sim.layout["subnets"]]
    assert default_subnets
    err = _error(lambda: _launch(sim, subnet=default_subnets[0]))
    assert err["Code"] == "InvalidParameterValue" and "own subnets" in err["Message"]
    err = _error(lambda: sim.client().run_instances(ImageId=sim.layout["image"], MinCount=1, MaxCount=1))
    assert err["Code"] == "InvalidParameterValue"
    launched = _launch(sim)
    instance_id = launched["Instances"][0]["InstanceId"]
    try:
        found = sim.client().describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        assert "PublicIpAddress" not in found
        assert found["PrivateIpAddress"].startswith("10.127.1.")
    finally:
        sim.client().terminate_instances(InstanceIds=[instance_id])


def test_wrong_credentials_are_refused(sim, tmp_path):
    bogus = tmp_path / "credentials"
    bogus.write_text("[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = nope\n")
    err = _error(lambda: sim.client(credentials=bogus).describe_instances())
    assert err["Code"] == "AuthFailure"


def test_an_instance_is_pending_through_its_boot_delay_then_a_machine_at_its_address(sim):
    sim.set_boot_delay(1.5)
    try:
        launched = _launch(sim, UserData='{"kind": "not ours"}')
    finally:
        sim.set_boot_delay(0.0)
    instance = launched["Instances"][0]
    instance_id, address = instance["InstanceId"], instance["PrivateIpAddress"]
    try:
        assert _state(sim, instance_id) == "pending"
        assert wait_for(lambda: _state(sim, instance_id) == "running", seconds=30)
        netns = f"/run/netns/kiyotsim-{instance_id}"
        addrs = subprocess.run(["nsenter", f"--net={netns}", "ip", "-o", "addr"], capture_output=True, text=True,
                               check=True).stdout
        assert f"inet {address}/24" in addrs and "inet 169.254.169.254/32" in addrs
        # The machine's own metadata service answers inside the machine only, IMDSv2 only.
        imds = ["nsenter", f"--net={netns}", "python3", "-c", IMDS_CLIENT]
        answer = json.loads(subprocess.run(imds, capture_output=True, text=True, check=True).stdout)
        assert answer == {"v1": 401, "instance-id": instance_id, "local-ipv4": address,
                          "user-data": '{"kind": "not ours"}'}
        # The console shows what the machine's init said: it refused the user data.
        assert wait_for(lambda: "not kiyot-cell user data" in sim.client().get_console_output(
            InstanceId=instance_id)["Output"], seconds=30)
    finally:
        sim.client().terminate_instances(InstanceIds=[instance_id])
    assert wait_for(lambda: not _netns_exists(instance_id), seconds=30)
    veths = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True,
                           check=True).stdout
    assert f"ks{instance_id[-12:]}" not in veths


def _netns_exists(instance_id: str) -> bool:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return f"kiyotsim-{instance_id}" in names


IMDS_CLIENT = """
import json, urllib.request, urllib.error
base = "http://169.254.169.254"
out = {}
try:
    urllib.request.urlopen(base + "/latest/meta-data/instance-id", timeout=2)
except urllib.error.HTTPError as e:
    out["v1"] = e.code
req = urllib.request.Request(base + "/latest/api/token", method="PUT",
                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
token = urllib.request.urlopen(req, timeout=2).read().decode()
for path in ("meta-data/instance-id", "meta-data/local-ipv4", "user-data"):
    r = urllib.request.Request(base + "/latest/" + path, headers={"X-aws-ec2-metadata-token": token})
    out[path.split("/")[-1]] = urllib.request.urlopen(r, timeout=2).read().decode()
print(json.dumps(out))
"""
