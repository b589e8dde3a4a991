#!/usr/bin/env python3
"""Pod lifecycle benchmark through a CRI socket: pull, runp, create, start, stop, rm,
recreate (the container's next attempt in the same pod, as the kubelet restarts one), stopp, rmp.

    python bench/lifecycle.py -n 20                      # starts its own kiyot-py serve
    python bench/lifecycle.py --socket unix:///run/kiyot-py/kiyot.sock
    python bench/lifecycle.py --reference unix:///run/containerd/containerd.sock
    python bench/lifecycle.py --pool 2                   # its own service keeps 2 standby cells

Prints min / median / p90 per operation in milliseconds, one column group per runtime
(kiyot-py, and the reference runtime when given). Each iteration is bounded; no timing
is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from tests.support.hostnet import remove_host_network
from tests.support.images import push_test_images
from tests.support.registry import REGISTRY, start_registry, stop_registry, v2_up

DEFAULT_IMAGE = "127.0.0.1:5000/test/busybox:latest"
OPS = ["pull", "runp", "create", "start", "stop", "rm", "recreate", "stopp", "rmp"]


@contextmanager
def own_service(pool: int = 0):
    """A kiyot-py serve of the benchmark's own, on a bridge and subnet apart; with `pool`
    standby cells in a warm pool (waited for before the first iteration)."""
    base = Path(tempfile.mkdtemp(prefix="kiyot-bench-"))
    config = base / "kiyot.toml"
    config.write_text(
        f'socket = "{base}/kiyot.sock"\nstate_dir = "{base}/state"\nlog_level = "warning"\n'
        '[local]\nbridge = "kiyotb0"\nsubnet = "10.124.0.0/24"\n'
        + (f'[[pools]]\nname = "bench"\nsize = {pool}\n' if pool else "")
    )
    with open(base / "serve.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "kiyot_py.cli", "serve", "--config", str(config)],
                                stdout=log, stderr=log)
    target = f"unix://{base}/kiyot.sock"
    try:
        if pool:
            wait_pool_full(target)
        yield target
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        # Standby cells outlive the service, as VMs would: reset takes them.
        subprocess.run([sys.executable, "-m", "kiyot_py.cli", "reset", "--yes", "--config", str(config)],
                       check=False, capture_output=True)
        remove_host_network("kiyotb0")


def wait_pool_full(target: str) -> None:
    channel = wait_ready(target)
    rt = api_pb2_grpc.RuntimeServiceStub(channel)
    for _ in range(600):  # bounded: 60 s
        fill = json.loads(rt.Status(pb.StatusRequest(verbose=True)).info.get("pools", "{}"))
        if fill and all(p["ready"] == p["size"] for p in fill.values()):
            break
        time.sleep(0.1)
    channel.close()


def ensure_test_registry():
    """For the default image: the tests' registry on 127.0.0.1:5000 with their images.

    Returns the registry process when this started one (to stop at the end)."""
    proc = None
    if not v2_up():
        proc = start_registry(Path(tempfile.mkdtemp(prefix="kiyot-bench-registry-")))
    push_test_images(REGISTRY)
    return proc


def wait_ready(target: str) -> grpc.Channel:
    channel = grpc.insecure_channel(target)
    rt = api_pb2_grpc.RuntimeServiceStub(channel)
    for _ in range(300):
        try:
            rt.Version(pb.VersionRequest(), timeout=1)
            return channel
        except grpc.RpcError:
            time.sleep(0.1)
    raise SystemExit(f"{target} does not answer")


def one_iteration(channel: grpc.Channel, image: str, log_dir: Path) -> dict[str, float]:
    rt = api_pb2_grpc.RuntimeServiceStub(channel)
    im = api_pb2_grpc.ImageServiceStub(channel)
    times: dict[str, float] = {}

    def timed(op, call, *args):
        t0 = time.perf_counter()
        result = call(*args, timeout=120)
        times[op] = (time.perf_counter() - t0) * 1000
        return result

    uid = str(uuid.uuid4())
    sandbox_config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f"bench-{uid[:8]}", namespace="bench", uid=uid),
        hostname="bench", log_directory=str(log_dir / uid),
    )
    timed("pull", im.PullImage, pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    sandbox = timed("runp", rt.RunPodSandbox, pb.RunPodSandboxRequest(config=sandbox_config)).pod_sandbox_id
    try:
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="sleeper"), image=pb.ImageSpec(image=image),
            command=["sleep", "3600"], log_path="sleeper.log",
            # As the kubelet sends them for a plain pod.
            linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD))),
        )
        cid = timed("create", rt.CreateContainer, pb.CreateContainerRequest(
            pod_sandbox_id=sandbox, config=config, sandbox_config=sandbox_config)).container_id
        timed("start", rt.StartContainer, pb.StartContainerRequest(container_id=cid))
        timed("stop", rt.StopContainer, pb.StopContainerRequest(container_id=cid, timeout=0))
        timed("rm", rt.RemoveContainer, pb.RemoveContainerRequest(container_id=cid))
        config.metadata.attempt = 1
        cid = timed("recreate", rt.CreateContainer, pb.CreateContainerRequest(
            pod_sandbox_id=sandbox, config=config, sandbox_config=sandbox_config)).container_id
    finally:
        timed("stopp", rt.StopPodSandbox, pb.StopPodSandboxRequest(pod_sandbox_id=sandbox))
        timed("rmp", rt.RemovePodSandbox, pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox))
    return times


def measure(target: str, image: str, n: int) -> dict[str, list[float]]:
    channel = wait_ready(target)
    samples: dict[str, list[float]] = {op: [] for op in OPS}
    with tempfile.TemporaryDirectory(prefix="kiyot-bench-logs-") as logs:
        for _ in range(n):
            for op, ms in one_iteration(channel, image, Path(logs)).items():
                samples[op].append(ms)
    channel.close()
    return samples


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def print_table(results: dict[str, dict[str, list[float]]], rows: list[str], title: str,
                first: str = "op") -> None:
    """min / median / p90 of each row, one column group per runtime ("n/a": no samples)."""
    names = list(results)
    width = max(len(first), *(len(r) for r in rows)) + 1
    header = f"{first:<{width}}" + "".join(f"| {name + ' min/med/p90':<30}" for name in names)
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for row in rows:
        line = f"{row:<{width}}"
        for name in names:
            v = results[name][row]
            line += f"| {min(v):8.1f} {statistics.median(v):8.1f} {p90(v):8.1f}    " if v else f"| {'n/a':<30}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--iterations", type=int, default=10)
    parser.add_argument("--image", default=DEFAULT_IMAGE,
                        help="image to run (must hold sleep); default %(default)s")
    parser.add_argument("--socket", help="a running kiyot-py's CRI endpoint; default: start one")
    parser.add_argument("--reference", help="a reference runtime's CRI endpoint, e.g. containerd's")
    parser.add_argument("--pool", type=int, default=0, metavar="N",
                        help="standby cells in the warm pool of the benchmark's own service (default 0: none)")
    args = parser.parse_args()
    if not 1 <= args.iterations <= 1000:
        parser.error("--iterations must be between 1 and 1000")

    results = run_sides(args, measure)
    print_table(results, OPS, f"{args.iterations} iterations (ms)")
    totals = {name: sum(statistics.median(results[name][op]) for op in OPS) for name in results}
    print("sum of medians: " + ", ".join(f"{name} {total:.1f} ms" for name, total in totals.items()))
    return 0


Measure = Callable[[str, str, int], dict[str, list[float]]]


def run_sides(args: argparse.Namespace, measure: Measure) -> dict[str, dict[str, list[float]]]:
    """`measure` on kiyot-py (`--socket`, or a service of the benchmark's own) and on the
    `--reference` runtime if given, in one run; the tests' registry for the default image."""
    registry = ensure_test_registry() if args.image == DEFAULT_IMAGE else None
    results: dict[str, dict[str, list[float]]] = {}
    try:
        if args.socket:
            results["kiyot-py"] = measure(args.socket, args.image, args.iterations)
        else:
            with own_service(getattr(args, "pool", 0)) as target:
                results["kiyot-py"] = measure(target, args.image, args.iterations)
        if args.reference:
            results["reference"] = measure(args.reference, args.image, args.iterations)
    finally:
        if registry is not None:
            stop_registry(registry)
    return results


if __name__ == "__main__":
    sys.exit(main())
