"""A warm pool on EC2 cells (the simulator, a boot delay of its own): a pod claims the
standby instance, which is retagged as the pod's and runs its container, and the pool
launches the next one; RunPodSandbox takes no boot."""

from __future__ import annotations

import time

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.conftest import cleanup
from tests.e2e.helpers import container_config, start, wait_for, wait_state

from .conftest import new_ec2_service
from .test_ec2_cells import GiB, busybox, run_pod, sized_pod

BOOT_DELAY = 5.0  # seconds the simulator holds each instance in pending


def tags_of(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance["Tags"]}


def test_a_pod_claims_a_standby_instance_and_the_pool_refills(tmp_path, sim, test_images):
    svc = new_ec2_service(tmp_path / "pooled", sim, node="pool-node",
                          settings='[[pools]]\nname = "ec2"\nsize = 1\n')
    sim.set_boot_delay(BOOT_DELAY)
    try:
        svc.start()
        assert wait_for(lambda: [i for i in sim.live(**{"kiyot-node": "pool-node", "kiyot-role": "standby"})
                                 if i["State"]["Name"] == "running"], 60)
        (standby,) = sim.live(**{"kiyot-node": "pool-node", "kiyot-role": "standby"})
        assert tags_of(standby)["kiyot-pool"] == "ec2"
        assert wait_for(lambda: '"ready": 1' in svc.runtime.Status(pb.StatusRequest(verbose=True)).info["pools"], 60)

        config = sized_pod("pooled", tmp_path, GiB)
        t0 = time.monotonic()
        sandbox_id = run_pod(svc.runtime, config)
        claimed = time.monotonic() - t0
        image = busybox(test_images)
        svc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
        ctr = container_config("hello", image, ["sh", "-c", "echo from the pool"])
        cid = start(svc.runtime, (sandbox_id, config), ctr)
        assert wait_state(svc.runtime, cid, pb.CONTAINER_EXITED, 60).exit_code == 0
        print(f"RunPodSandbox on a standby instance: {claimed * 1000:.0f} ms "
              f"(to container exited: {(time.monotonic() - t0) * 1000:.0f} ms; boot delay {BOOT_DELAY:.0f} s)")

        (mine,) = sim.live(**{"kiyot-sandbox": sandbox_id})
        assert mine["InstanceId"] == standby["InstanceId"]
        tags = tags_of(mine)
        assert tags["kiyot-role"] == "pod" and tags["kiyot-pool"] == "ec2"
        assert tags["kiyot-pod-uid"] == config.metadata.uid and tags["pod-label:app"] == "pooled"
        # The pool launched its next standby instance.
        assert wait_for(lambda: sim.live(**{"kiyot-node": "pool-node", "kiyot-role": "standby"}), 30)
    finally:
        sim.set_boot_delay(0.0)
        cleanup(svc)
        if svc.proc is not None and svc.proc.poll() is None:
            svc.stop()
        for instance in sim.live(**{"kiyot-node": "pool-node"}):  # standby ones outlive the service
            sim.client().terminate_instances(InstanceIds=[instance["InstanceId"]])
