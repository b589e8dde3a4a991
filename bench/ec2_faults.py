#!/usr/bin/env python3
"""When the cloud takes a cell back: the time from the event to the state the kubelet sees.

    python bench/ec2_faults.py              # 5 rounds of each scenario, watch period 10 s
    python bench/ec2_faults.py -n 3 --watch 5

Starts its own EC2 simulator (VPC 10.128.0.0/16 on the bridge kiyotbs0, the tests'
registry on its gateway) and two `kiyot-py serve` with provider = "aws": one with the
given `cell_watch_interval` and no queue, one that hears EC2 through SQS only (its watch
period 600 s). Each round runs a pod with one container (busybox `sleep`) on a fresh
instance, makes the event with the simulator's faults, and polls PodSandboxStatus (every
20 ms) as the kubelet would see it:

- spot notice (agent / SQS): the notice in the instance's metadata or on EventBridge, the
  termination 3 s later; "heard" = notice -> on the sandbox; "seen" = termination -> NOTREADY;
- terminated / stopped behind the node's back (its agent's connection breaks);
- terminated silently: the instance cut off first, so that only the watch period tells;
- terminated, SQS only: cut off first, the queue's state change alone;
- cut off 10 s: the number of state changes the kubelet would have seen (0 is right).

Prints a table (ms); nothing is asserted. containerd has no column: it has no VM to lose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ec2_boot
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.support.ec2 import new_ec2_service, start_sim, stop_sim
from tests.support.images import push_test_images
from tests.support.registry import REGISTRY, start_registry, stop_registry, v2_up

BRIDGE, VPC, GATEWAY_REGISTRY = "kiyotbs0", "10.128.0.0/16", "10.128.1.1:5000"
SPOT_AFTER = 3.0  # seconds from a spot notice to the termination


def run_pod(svc, image: str, log_dir: Path, spot: str) -> tuple[str, str]:
    """A pod with one running container, on the given spot policy: (sandbox id, container id)."""
    config = ec2_boot.pod_config(f"b-{uuid.uuid4().hex[:8]}", log_dir, {"kiyot-py.io/spot": spot})
    return ec2_boot.run_pod(svc, image, config)


def info(svc, sandbox_id: str) -> dict:
    status = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
    return json.loads(status.info["info"])["cell"]


def until(predicate: Callable[[], bool], seconds: float = 120.0) -> float:
    """When predicate() first held (monotonic), polled every 20 ms (bounded)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the state never came")
        time.sleep(0.02)
    return time.monotonic()


def not_ready(svc, sandbox_id: str) -> Callable[[], bool]:
    def check() -> bool:
        status = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
        return bool(status.state == pb.SANDBOX_NOTREADY)
    return check


def finish(svc, sandbox_id: str) -> None:
    svc.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    svc.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="rounds of each scenario (5)")
    ap.add_argument("--watch", type=float, default=10.0, help="cell_watch_interval of the first node (10 s)")
    ns = ap.parse_args()

    registry = None if v2_up() else start_registry(Path(tempfile.mkdtemp(prefix="kiyot-bench-registry-")))
    image = push_test_images(REGISTRY)["busybox"].ref.replace(REGISTRY, GATEWAY_REGISTRY, 1)
    base = Path(tempfile.mkdtemp(prefix="kiyot-bench-faults-"))
    (base / "sim").mkdir()
    sim = start_sim(base / "sim", BRIDGE, VPC, REGISTRY)
    control = sim.control
    control.eventbridge("kiyot-bench-events")
    watched = new_ec2_service(base / "watched", sim, GATEWAY_REGISTRY, node="bench-watched", log_level="warning",
                              settings=f"cell_watch_interval = {ns.watch}")
    queued = new_ec2_service(base / "queued", sim, GATEWAY_REGISTRY, node="bench-queued", log_level="warning",
                             settings="cell_watch_interval = 600", aws='interruption_queue = "kiyot-bench-events"')
    results: dict[str, dict[str, list[float]]] = {}

    def record(label: str, what: str, seconds: float) -> None:
        results.setdefault(label, {}).setdefault(what, []).append(seconds * 1000)

    def instance(svc, sandbox_id: str) -> str:
        return str(info(svc, sandbox_id)["id"])

    def spot(svc, label: str, imds: bool) -> None:
        sandbox_id, _ = run_pod(svc, image, base / "logs", "always")
        iid = instance(svc, sandbox_id)
        t0 = time.monotonic()
        control.interrupt(iid, after=SPOT_AFTER, imds=imds, sqs=not imds)
        record(label, "heard", until(lambda: bool(info(svc, sandbox_id)["notices"])) - t0)
        if not imds:
            control.cut(iid, 60.0)  # nothing but the queue tells the node of the end
        record(label, "seen", until(not_ready(svc, sandbox_id)) - (t0 + SPOT_AFTER))
        finish(svc, sandbox_id)

    def ended(svc, label: str, how: str, cut_first: bool) -> None:
        sandbox_id, _ = run_pod(svc, image, base / "logs", "never")
        iid = instance(svc, sandbox_id)
        if cut_first:
            control.cut(iid, 60.0)
            time.sleep(0.5)
        ec2 = sim.client()
        t0 = time.monotonic()
        if how == "stop":
            ec2.stop_instances(InstanceIds=[iid])
        else:
            ec2.terminate_instances(InstanceIds=[iid])
        record(label, "seen", until(not_ready(svc, sandbox_id)) - t0)
        finish(svc, sandbox_id)

    def blip(svc, label: str) -> None:
        sandbox_id, cid = run_pod(svc, image, base / "logs", "never")
        control.cut(instance(svc, sandbox_id), 10.0)
        states = set()
        deadline = time.monotonic() + 13.0
        while time.monotonic() < deadline:  # bounded: the cut and 3 s after it
            sandbox = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id)).status
            container = svc.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
            states.add((sandbox.state, container.state))
            time.sleep(0.05)
        record(label, "changes", (len(states) - 1) / 1000)
        finish(svc, sandbox_id)

    try:
        watched.start()
        queued.start()
        control.spot_prices({"t3.small": 0.0065, "t3.medium": 0.0125})
        run_pod(watched, image, base / "logs", "never")  # warm-up: the first pull of the image
        for _ in range(ns.n):
            spot(watched, "spot notice via the agent", imds=True)
            spot(queued, "spot notice via SQS", imds=False)
            ended(watched, "terminated behind its back", "terminate", cut_first=False)
            ended(watched, "stopped behind its back", "stop", cut_first=False)
            ended(watched, f"terminated silently (watch {ns.watch:g} s)", "terminate", cut_first=True)
            ended(queued, "terminated silently, SQS only", "terminate", cut_first=True)
            ended(queued, "stopped silently, SQS only", "stop", cut_first=True)
        for _ in range(min(ns.n, 2)):
            blip(watched, "agent cut off 10 s")
    finally:
        for svc in (watched, queued):
            if svc.proc is not None and svc.proc.poll() is None:
                for sb in svc.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
                    finish(svc, sb.id)
                svc.stop()
        stop_sim(sim)
        if registry is not None:
            stop_registry(registry)

    print("\nFrom the event to what the kubelet sees (ms): heard = the notice on the sandbox;")
    print(f"seen = the end (termination, {SPOT_AFTER:g} s after a spot notice) -> NOTREADY, its container EXITED 137")
    print(f"{'scenario':<36}{'what':<9}{'n':>3}{'median':>9}{'max':>9}")
    for label, measures in results.items():
        for what, values in measures.items():
            if what == "changes":
                print(f"{label:<36}{'changes':<9}{len(values):>3}{max(values):>9.0f}{'':>9}")
                continue
            print(f"{label:<36}{what:<9}{len(values):>3}{statistics.median(values):>9.0f}{max(values):>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
