"""`kiyot-py reset`: what `serve` left on the host goes, only on request, never under a service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.providers.local import fence_chain

from .conftest import new_service
from .helpers import cell_dir, new_pod, processes_naming, run, runc_status, wait_state

BRIDGE = "kiyott1"  # apart from the session's service
SUBNET = "10.125.0.0/24"


def test_reset_takes_cells_bridge_fence_and_state_away(tmp_path, registry, test_images, service):
    svc = new_service(tmp_path, BRIDGE, SUBNET)
    reset = [sys.executable, "-m", "kiyot_py.cli", "reset", "--config", str(svc.config)]
    svc.start()
    try:
        ref = test_images["busybox"].ref
        svc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
        pod = new_pod(svc.runtime, "doomed", tmp_path)
        cid = run(svc.runtime, pod, "sleeper", ref, ["sleep", "3600"])
        wait_state(svc.runtime, cid, pb.CONTAINER_RUNNING)
        its_dir = cell_dir(svc.state_dir, pod[0])
        cell = json.loads((its_dir / "cell.json").read_text())

        asked = subprocess.run(reset, check=False, capture_output=True, text=True)
        assert asked.returncode == 2 and "--yes" in asked.stderr
        under_service = subprocess.run([*reset, "--yes"], check=False, capture_output=True, text=True)
        assert under_service.returncode == 2 and "running" in under_service.stderr
        assert runc_status(its_dir, cid) == "running"

        assert svc.stop() == 0  # the cells outlive the service...
        assert runc_status(its_dir, cid) == "running"
        done = subprocess.run([*reset, "--yes"], check=False, capture_output=True, text=True)
        assert done.returncode == 0 and "deleted 1 cell" in done.stdout, done.stderr
        # ...but not a reset.
        assert runc_status(its_dir, cid) == "gone" and processes_naming(cid) == []
        assert not Path(f"/run/netns/{cell['netns']}").exists()
        assert not Path(f"/sys/class/net/{BRIDGE}").exists()
        chain = subprocess.run(["iptables", "-n", "-L", fence_chain(BRIDGE)], check=False, capture_output=True)
        assert chain.returncode != 0
        assert not (svc.state_dir / "state.db").exists()
        assert not [d for d in (svc.state_dir / "cells").iterdir() if d.is_dir()]
        agents = subprocess.run(["pgrep", "-f", str(svc.state_dir)], check=False, capture_output=True, text=True).stdout
        assert agents == ""

        svc.start()  # a fresh start over the reset state knows nothing
        assert list(svc.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
        assert list(svc.images.ListImages(pb.ListImagesRequest()).images) == []
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.stop()
        subprocess.run([*reset, "--yes"], check=False, capture_output=True)
