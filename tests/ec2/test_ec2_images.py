"""An EC2 cell pulls its images from the registry itself, with the pod's credentials sent
over the agent channel during the PullImage that brought them, and kept nowhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.helpers import container_config, log_lines, start, wait_for, wait_state
from tests.support.images import push_busybox
from tests.support.registry import start_registry, stop_registry

from .conftest import GATEWAY, cleanup, new_ec2_service
from .test_ec2_cells import GiB, run_pod, sized_pod

USER, PASSWORD = "puller", "pw-that-must-stay-in-memory-only"
PRIVATE = f"{GATEWAY}:5002"  # on the VPC's gateway, as a registry in the VPC


@pytest.fixture
def private_registry(sim, tmp_path):
    proc = start_registry(tmp_path / "private-registry", PRIVATE, user=(USER, PASSWORD))
    try:
        yield push_busybox(PRIVATE, (USER, PASSWORD), repo="team/busybox")
    finally:
        stop_registry(proc)


def test_the_pods_credentials_reach_its_cell_for_that_pull_only(sim, tmp_path, private_registry):
    svc = new_ec2_service(tmp_path / "node", sim, node="creds-node", more_registries=(PRIVATE,))
    svc.start()
    try:
        image = private_registry.ref
        config = sized_pod("private", tmp_path, GiB)
        sandbox_id = run_pod(svc.runtime, config)
        auth = pb.AuthConfig(username=USER, password=PASSWORD, server_address=PRIVATE)
        # The node resolves with the credentials, and the cell pulls with them (the registry
        # answers nobody without them): both within this call.
        svc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=auth, sandbox_config=config))
        cid = start(svc.runtime, (sandbox_id, config), container_config("c", image, ["echo", "pulled with care"]))
        assert wait_state(svc.runtime, cid, pb.CONTAINER_EXITED).exit_code == 0
        log_path = f"{config.log_directory}/c/0.log"
        assert wait_for(lambda: any(t == "pulled with care" for _, _, t in log_lines(log_path)))

        # The node resolved the image (manifest and config) and keeps none of its layers: the
        # cells pull from the registry themselves.
        assert not (svc.state_dir / "content").exists()

        # Another pod of the node, whose kubelet never sent credentials: its cell pulls
        # without any, and the registry refuses it.
        other = sized_pod("no-creds", tmp_path, GiB)
        other_id = run_pod(svc.runtime, other)
        with pytest.raises(grpc.RpcError) as refused:
            start(svc.runtime, (other_id, other), container_config("c", image, ["true"]))
        assert "unauthorized" in refused.value.details().lower() or "401" in refused.value.details()

        # Nowhere at rest, in no log, in no process's arguments: not on the node, not in the cell.
        secret = PASSWORD.encode()
        places = [svc.state_dir, svc.log_file, sim.state_dir]
        found = subprocess.run(["grep", "-rlsF", PASSWORD, *map(str, places)], capture_output=True, text=True,
                               check=False).stdout.split()
        assert found == [], f"the password is in {found}"
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert secret not in cmdline.read_bytes(), cmdline
            except OSError:
                continue
    finally:
        cleanup(svc)
        svc.stop()
