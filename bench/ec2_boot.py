#!/usr/bin/env python3
"""EC2 cells on the simulator: what a pod's start costs beyond the VM's own boot, and what
booting instances cost the kubelet's relists.

    python bench/ec2_boot.py                  # boot delay 20 s, 5 pods one by one, 20 at once
    python bench/ec2_boot.py --boot-delay 5 -n 3 --burst 10

Starts its own EC2 simulator (VPC 10.128.0.0/16 on the bridge kiyotbs0, the tests'
registry on its gateway) and its own `kiyot-py serve` with provider = "aws". For each
pod: RunPodSandbox, PullImage (naming the pod), CreateContainer and StartContainer of the
test busybox, from the first call to the container running. The simulator holds every
instance pending for the boot delay, so the overhead (what kiyot-py owns) is the time less
the delay. Relist latency is ListPodSandbox + ListContainers, idle and while the burst
boots. Prints tables (ms); nothing is asserted. containerd has no column here: it starts
no VM (bench/lifecycle.py compares the two on local cells).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.support.ec2 import new_ec2_service, start_sim, stop_sim
from tests.support.images import push_test_images
from tests.support.registry import REGISTRY, start_registry, stop_registry, v2_up

BRIDGE, VPC, GATEWAY_REGISTRY = "kiyotbs0", "10.128.0.0/16", "10.128.1.1:5000"


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def pod_config(name: str, log_dir: Path, annotations: dict[str, str] | None = None) -> pb.PodSandboxConfig:
    uid = str(uuid.uuid4())
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uid, attempt=0),
        hostname=name, log_directory=str(log_dir / uid), labels={"app": "bench"}, annotations=annotations or {})
    config.linux.resources.memory_limit_in_bytes = 512 * 1024 * 1024
    return config


def run_pod(svc, image: str, config: pb.PodSandboxConfig) -> tuple[str, str]:
    """RunPodSandbox, PullImage (naming the pod), Create and StartContainer of `sleep 3600`:
    (sandbox id, container id)."""
    sandbox_id = svc.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=180).pod_sandbox_id
    svc.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config), timeout=120)
    container = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image=image),
                                   command=["sleep", "3600"], log_path="c.log")
    cid = svc.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=container, sandbox_config=config), timeout=120).container_id
    svc.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return sandbox_id, cid


def start_pod(svc, image: str, log_dir: Path, name: str) -> tuple[str, float]:
    """(sandbox id, seconds from RunPodSandbox to the container running)."""
    config = pod_config(name, log_dir)
    t0 = time.monotonic()
    sandbox_id, cid = run_pod(svc, image, config)
    for _ in range(6000):  # bounded: 60 s
        state = svc.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state
        if state == pb.CONTAINER_RUNNING:
            break
        time.sleep(0.01)
    return sandbox_id, time.monotonic() - t0


def relist(svc, n: int, stop: threading.Event | None = None) -> list[float]:
    """Milliseconds of ListPodSandbox + ListContainers, n times (or until `stop`)."""
    times = []
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        svc.runtime.ListPodSandbox(pb.ListPodSandboxRequest())
        svc.runtime.ListContainers(pb.ListContainersRequest())
        times.append((time.perf_counter() - t0) * 1000)
        if stop is not None:
            time.sleep(0.02)
    return times


def cell_boots(sim_dir: Path) -> dict[str, float]:
    """Per instance, seconds from the simulator powering its machine on ("instance running")
    to its agent serving: the cell's own boot, which on EC2 runs on the VM's own CPUs (here
    every machine shares this host's)."""
    running = {}
    for line in (sim_dir / "sim.log").read_text().splitlines():
        if '"instance running"' in line:
            event = json.loads(line)
            running[event["instance"]] = _ts(event["timestamp"])
    boots = {}
    for instance_id, t0 in running.items():
        console = sim_dir / "instances" / instance_id / "console.log"
        for line in console.read_text().splitlines() if console.exists() else []:
            if line.startswith("{") and '"event": "serving"' in line:
                boots[instance_id] = _ts(json.loads(line)["timestamp"]) - t0
                break
    return boots


def _ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def instance_of(svc, sandbox_id: str) -> str:
    status = svc.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
    return str(json.loads(status.info["info"])["cell"]["id"])


def remove(svc, ids: list[str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda i: svc.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=i)), ids))
    for i in ids:
        svc.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=i))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boot-delay", type=float, default=20.0, help="seconds an instance stays pending (20)")
    ap.add_argument("-n", type=int, default=5, help="pods started one after another (5)")
    ap.add_argument("--burst", type=int, default=20, help="pods started at once (20)")
    ns = ap.parse_args()

    registry = None if v2_up() else start_registry(Path(tempfile.mkdtemp(prefix="kiyot-bench-registry-")))
    images = push_test_images(REGISTRY)
    image = images["busybox"].ref.replace(REGISTRY, GATEWAY_REGISTRY, 1)
    base = Path(tempfile.mkdtemp(prefix="kiyot-bench-ec2-"))
    (base / "sim").mkdir()
    sim = start_sim(base / "sim", BRIDGE, VPC, REGISTRY)
    svc = new_ec2_service(base / "node", sim, GATEWAY_REGISTRY, node="bench-node", log_level="warning",
                          boot_timeout=max(60.0, ns.boot_delay * 3))
    try:
        svc.start()
        start_pod(svc, image, base / "logs", "warm-up")  # the node's first pull of the image
        sim.set_boot_delay(ns.boot_delay)
        idle = relist(svc, 200)
        ids, one_by_one = [], []
        for i in range(ns.n):
            sandbox_id, seconds = start_pod(svc, image, base / "logs", f"seq-{i}")
            ids.append(sandbox_id)
            one_by_one.append(seconds)
        stop = threading.Event()
        during: list[float] = []
        watcher = threading.Thread(target=lambda: during.extend(relist(svc, 100000, stop)))
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(ns.burst) as pool:
            burst = list(pool.map(lambda i: start_pod(svc, image, base / "logs", f"burst-{i}"), range(ns.burst)))
        stop.set()
        watcher.join()
        ids += [sandbox_id for sandbox_id, _ in burst]
        at_once = [seconds for _, seconds in burst]
        instances = [instance_of(svc, i) for i in ids]
        remove(svc, ids)
        boots = cell_boots(base / "sim")
    finally:
        sim.set_boot_delay(0.0)
        if svc.proc is not None and svc.proc.poll() is None:
            svc.stop()
        stop_sim(sim)
        if registry is not None:
            stop_registry(registry)

    delay_ms = ns.boot_delay * 1000
    print(f"\nRunPodSandbox -> container running, boot delay {ns.boot_delay:.0f} s (ms); overhead = time - delay;")
    print("cell boot = machine on -> its agent serving (the VM's own work; here on this host's CPUs)")
    print(f"{'pods':<22}{'n':>4}{'median':>9}{'p90':>9}{'overhead med':>14}{'p90':>7}"
          f"{'cell boot med':>15}{'p90':>7}{'rest med':>10}")
    groups = (("one after another", one_by_one, instances[:ns.n]),
              (f"{ns.burst} at once", at_once, instances[ns.n:]))
    for label, values, their in groups:
        ms = [v * 1000 for v in values]
        cell = [boots[i] * 1000 for i in their if i in boots] or [0.0]
        rest = [t - delay_ms - boots.get(i, 0.0) * 1000 for t, i in zip(ms, their, strict=True)]
        print(f"{label:<22}{len(ms):>4}{statistics.median(ms):>9.0f}{p(ms, 0.9):>9.0f}"
              f"{statistics.median(ms) - delay_ms:>14.0f}{p(ms, 0.9) - delay_ms:>7.0f}"
              f"{statistics.median(cell):>15.0f}{p(cell, 0.9):>7.0f}{statistics.median(rest):>10.0f}")
    print("\nListPodSandbox + ListContainers (ms)")
    print(f"{'while':<30}{'n':>6}{'p50':>8}{'p99':>8}")
    for label, values in (("idle", idle), (f"{ns.burst} instances boot", during)):
        print(f"{label:<30}{len(values):>6}{p(values, 0.5):>8.2f}{p(values, 0.99):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
