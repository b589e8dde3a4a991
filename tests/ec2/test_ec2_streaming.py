"""exec, port-forward and stats of a pod on an EC2 cell, with the kit's crictl through the
socket: the pod's network is its own inside the instance, apart from the agent's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import urllib.request

import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.helpers import container_config, sandbox_config, start, wait_for, wait_state
from tests.e2e.test_streaming import KIT, crictl_argv, free_port, page

from .test_ec2_cells import busybox, pod_address, run_pod

pytestmark = pytest.mark.skipif(KIT is None, reason="the conformance kit's crictl is needed")


def test_exec_port_forward_and_stats_of_a_pod_on_an_instance(ec2_service, sim, tmp_path, test_images):
    cri, img = ec2_service.runtime, ec2_service.images
    config = sandbox_config("streams", tmp_path)
    sandbox_id = run_pod(cri, config)
    try:
        image = busybox(test_images)
        img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config))
        web = container_config("web", image, ["httpd", "-f", "-p", "8080", "-h", "/www"])
        cid = start(cri, (sandbox_id, config), web)
        wait_state(cri, cid, pb.CONTAINER_RUNNING)

        data = os.urandom(256 * 1024)
        done = subprocess.run(crictl_argv(ec2_service, "exec", "-i", cid, "cat"), input=data, capture_output=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(data).digest()
        failed = subprocess.run(crictl_argv(ec2_service, "exec", cid, "sh", "-c", "exit 7"), capture_output=True,
                                timeout=120, check=False)
        assert failed.returncode != 0

        # The forward reaches the pod's own localhost, in the pod's network namespace.
        local = free_port()
        forward = subprocess.Popen(crictl_argv(ec2_service, "port-forward", sandbox_id, f"{local}:8080"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert b"hello from kiyot" in wait_for(lambda: page(f"http://127.0.0.1:{local}/index.html"), 30)
        finally:
            forward.terminate()
            forward.wait(10)

        # Stats come from the instance: the container's memory, and the pod's own interface.
        (instance,) = sim.live(**{"kiyot-sandbox": sandbox_id})
        with urllib.request.urlopen(f"http://{pod_address(instance)}:8080/index.html", timeout=10) as resp:
            assert resp.status == 200

        def sampled():
            stats = cri.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
                filter=pb.PodSandboxStatsFilter(id=sandbox_id))).stats
            if not stats or not stats[0].linux.network.interfaces:
                return None
            eth = stats[0].linux.network.default_interface
            if eth.rx_bytes.value == 0 or not stats[0].linux.containers:
                return None
            return stats[0]
        pod_stats = wait_for(sampled, 30)
        (container,) = pod_stats.linux.containers
        assert container.attributes.id == cid and container.memory.working_set_bytes.value > 0
    finally:
        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
