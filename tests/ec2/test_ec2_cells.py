"""EC2 cells end to end, through the CRI socket, against the simulator: every pod its own
instance (the cheapest allowed type that fits, tagged, at the pod IP), exactly once."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import urllib.request

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.helpers import container_config, log_lines, sandbox_config, start, wait_for, wait_state

from .conftest import NODE, REGISTRY
from .test_simulator import IMDS_CLIENT

GiB = 1024 ** 3


def sized_pod(name: str, log_dir, memory: int, cpu_millis: int = 0, **labels: str) -> pb.PodSandboxConfig:
    config = sandbox_config(name, log_dir, **labels)
    config.linux.resources.memory_limit_in_bytes = memory
    if cpu_millis:
        config.linux.resources.cpu_shares = cpu_millis * 1024 // 1000
    return config


def busybox(test_images) -> str:
    """The test busybox as a cell pulls it: from the registry on the VPC's gateway."""
    return test_images["busybox"].ref.replace("127.0.0.1:5000", REGISTRY, 1)


def pod_address(instance: dict) -> str:
    """The pod IP of an instance: its primary interface's second private address."""
    (nic,) = [n for n in instance["NetworkInterfaces"] if n["Attachment"]["DeviceIndex"] == 0]
    (address,) = [a["PrivateIpAddress"] for a in nic["PrivateIpAddresses"] if not a["Primary"]]
    return address


def run_pod(cri, config: pb.PodSandboxConfig) -> str:
    return cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=120).pod_sandbox_id


def test_a_pod_gets_its_own_cheapest_instance_at_its_ip(ec2_service, sim, tmp_path, test_images):
    cri, img = ec2_service.runtime, ec2_service.images
    config = sized_pod("web", tmp_path, 3 * GiB, 1000, tier="front", **{"example.com/very-" + "long" * 40: "v"})
    sandbox_id = run_pod(cri, config)

    instances = sim.live(**{"kiyot-sandbox": sandbox_id})
    assert len(instances) == 1
    instance = instances[0]
    assert instance["InstanceType"] == "t3.medium"  # 3 GiB + headroom, 1 vCPU: t3.medium is the cheapest fit
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["kiyot-node"] == NODE and tags["kiyot-pod-uid"] == config.metadata.uid
    assert tags["kiyot-pod"] == "default/web" and tags["kiyot-pod-attempt"] == "0"
    assert tags["pod-label:tier"] == "front" and tags["pod-label:app"] == "web"
    long_keys = [k for k in tags if k.startswith("pod-label:example.com/very-")]
    assert len(long_keys) == 1 and len(long_keys[0]) == 128  # shortened, with a digest of the whole
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert "PublicIpAddress" not in instance
    volumes = sim.client().describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}])["Volumes"]
    assert volumes
    assert all(m["Ebs"]["DeleteOnTermination"] for m in instance["BlockDeviceMappings"])
    assert all({"Key": "kiyot-sandbox", "Value": sandbox_id} in v["Tags"] for v in volumes)

    status = cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
    pod_ip = pod_address(instance)
    assert status.status.network.ip == pod_ip != instance["PrivateIpAddress"]
    info = json.loads(status.info["info"])
    assert info["cell"]["offering"]["instance_type"] == "t3.medium"
    offering = info["cell"]["offering"]
    assert (offering["market"], offering["zone"], offering["price_per_hour"]) == ("on-demand", "us-east-1a", "0.04160")
    assert {"Key": "kiyot-price-per-hour", "Value": "0.04160"} in instance["Tags"]

    image = busybox(test_images)
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config))
    cid = start(cri, (sandbox_id, config), container_config(
        "web", image, ["sh", "-c", "echo serving on $(hostname); exec httpd -f -p 8080 -h /www"]))
    assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
    log_path = f"{config.log_directory}/web/0.log"
    assert wait_for(lambda: any("serving on" in text for _, _, text in log_lines(log_path)))
    page = wait_for(lambda: _get(f"http://{pod_ip}:8080/"), seconds=20)
    assert page == b"<html><body>hello from kiyot</body></html>\n"

    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    after = sim.instances(**{"kiyot-sandbox": sandbox_id})
    assert [i["State"]["Name"] for i in after] == ["terminated"]
    assert cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state == pb.CONTAINER_EXITED
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


def test_six_gib_gets_the_large_one(ec2_service, sim, tmp_path):
    cri = ec2_service.runtime
    sandbox_id = run_pod(cri, sized_pod("big", tmp_path, 6 * GiB))
    try:
        assert [i["InstanceType"] for i in sim.live(**{"kiyot-sandbox": sandbox_id})] == ["t3.large"]
    finally:
        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


def test_run_repeated_while_the_instance_boots_makes_one(ec2_service, sim, tmp_path):
    cri = ec2_service.runtime
    config = sized_pod("twice", tmp_path, 1 * GiB)
    sim.set_boot_delay(2.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            ids = list(pool.map(lambda _: run_pod(cri, config), range(3)))
    finally:
        sim.set_boot_delay(0.0)
    assert len(set(ids)) == 1
    assert len(sim.instances(**{"kiyot-pod-uid": config.metadata.uid})) == 1
    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=ids[0]))
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=ids[0]))


def test_twenty_pods_at_once_get_twenty_instances(ec2_service, sim, tmp_path):
    cri = ec2_service.runtime
    configs = [sized_pod(f"many-{i}", tmp_path, 512 * 1024 ** 2) for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda c: run_pod(cri, c), configs))
    try:
        assert len(set(ids)) == 20
        for config, sandbox_id in zip(configs, ids, strict=True):
            live = sim.live(**{"kiyot-pod-uid": config.metadata.uid})
            assert [i["Tags"] for i in live] and len(live) == 1
            assert {"Key": "kiyot-sandbox", "Value": sandbox_id} in live[0]["Tags"]
        addresses = {s.status.network.ip for s in (
            cri.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=i)) for i in ids)}
        assert len(addresses) == 20
    finally:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda i: cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=i)), ids))
        for i in ids:
            cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=i))
    assert not sim.live(**{"kiyot-node": NODE})


PROBE = """
for target in "$@"; do
  if echo | nc -w 2 "${target%:*}" "${target#*:}" >/dev/null 2>&1
  then echo "$target open"
  else echo "$target closed"
  fi
done
echo probed
exec sleep 3600
"""


def test_a_pod_reaches_neither_the_metadata_service_nor_the_agent(ec2_service, sim, tmp_path, test_images):
    cri, img = ec2_service.runtime, ec2_service.images
    config = sized_pod("nosy", tmp_path, GiB)
    sandbox_id = run_pod(cri, config)
    (instance,) = sim.live(**{"kiyot-sandbox": sandbox_id})
    agent = f"{instance['PrivateIpAddress']}:9276"
    try:
        image = busybox(test_images)
        img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config))
        targets = ["169.254.169.254:80", agent, f"{pod_address(instance)}:9276", "127.0.0.1:9276", REGISTRY]
        cid = start(cri, (sandbox_id, config), container_config("nosy", image, ["sh", "-c", PROBE, "probe", *targets]))
        log_path = f"{config.log_directory}/nosy/0.log"
        assert wait_for(lambda: any(text == "probed" for _, _, text in log_lines(log_path)), seconds=60)
        seen = dict(text.rsplit(" ", 1) for _, _, text in log_lines(log_path) if text != "probed")
        assert seen == {"169.254.169.254:80": "closed", agent: "closed", f"{pod_address(instance)}:9276": "closed",
                        "127.0.0.1:9276": "closed", REGISTRY: "open"}  # the last: the probe can see what is open
        # The cell itself (where its agent runs) reaches its metadata service, IMDSv2 only.
        netns = f"/run/netns/kiyotsim-{instance['InstanceId']}"
        answer = json.loads(subprocess.run(["nsenter", f"--net={netns}", "python3", "-c", IMDS_CLIENT],
                                           capture_output=True, text=True, check=True).stdout)
        assert answer["v1"] == 401 and answer["instance-id"] == instance["InstanceId"]
        assert cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state == pb.CONTAINER_RUNNING
    finally:
        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read()
    except OSError:
        return None


