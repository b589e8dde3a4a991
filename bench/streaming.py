#!/usr/bin/env python3
"""exec, port-forward and stats through a CRI socket, as an operator's crictl
(the conformance kit's) and the kubelet use them, one pod per runtime:

    python bench/streaming.py -n 20                        # starts its own kiyot-py serve
    python bench/streaming.py --reference unix:///run/kiyot-bench-containerd/containerd.sock

Rows: `crictl exec CID true` over SPDY and over WebSocket, `crictl exec -s` (ExecSync),
8 MiB through `crictl exec -i cat` (MiB/s), one GET through a running `crictl
port-forward`, 20 GETs at once through it, and ListContainerStats over gRPC. Each crictl
run is bounded; no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lifecycle import DEFAULT_IMAGE, print_table, run_sides, wait_ready
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
KIT = Path(os.environ.get("KIYOTPY_CONFORMANCE_KIT", REPO.parent / "shared" / "conformance"))
ROWS = ["exec spdy (ms)", "exec websocket (ms)", "exec -s (ms)", "cat 8 MiB (MiB/s)",
        "forward GET (ms)", "forward 20 GETs (ms)", "stats list (ms)"]


class CrictlFailed(Exception):
    pass


def crictl(endpoint: str, *args: str, data: bytes | None = None) -> bytes:
    argv = [str(KIT / "bin" / "crictl"), "--config", str(KIT / "crictl-noconfig.yaml"),
            "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", "60s", *args]
    done = subprocess.run(argv, input=data, capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        raise CrictlFailed(f"crictl {' '.join(args[:3])}: {done.stderr.decode().strip()}")
    return done.stdout


def timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - the forward's own http://127.0.0.1 URL
        return r.read()


def measure(endpoint: str, image: str, n: int) -> dict[str, list[float]]:
    channel = wait_ready(endpoint)
    rt = api_pb2_grpc.RuntimeServiceStub(channel)
    im = api_pb2_grpc.ImageServiceStub(channel)
    uid = str(uuid.uuid4())
    logs = tempfile.mkdtemp(prefix="kiyot-bench-logs-")
    sandbox_config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f"stream-{uid[:8]}", namespace="bench", uid=uid),
        hostname="stream", log_directory=f"{logs}/{uid}")
    im.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
    sandbox = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox_config), timeout=120).pod_sandbox_id
    samples: dict[str, list[float]] = {row: [] for row in ROWS}
    forward = None
    try:
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="web"), image=pb.ImageSpec(image=image),
            command=["httpd", "-f", "-p", "8080", "-h", "/www"], log_path="web.log")
        cid = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sandbox, config=config,
                                                           sandbox_config=sandbox_config), timeout=120).container_id
        rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        data = os.urandom(8 << 20)
        for _ in range(n):
            samples["exec spdy (ms)"].append(timed_ms(lambda: crictl(endpoint, "exec", cid, "true")))
            with contextlib.suppress(CrictlFailed):  # containerd 1.6 has no v5.channel.k8s.io, crictl's only one
                samples["exec websocket (ms)"].append(
                    timed_ms(lambda: crictl(endpoint, "exec", "--transport", "websocket", cid, "true")))
            samples["exec -s (ms)"].append(timed_ms(lambda: crictl(endpoint, "exec", "-s", cid, "true")))
            samples["stats list (ms)"].append(timed_ms(lambda: rt.ListContainerStats(
                pb.ListContainerStatsRequest(), timeout=30)))
        for _ in range(3):
            ms = timed_ms(lambda: crictl(endpoint, "exec", "-i", cid, "cat", data=data))
            samples["cat 8 MiB (MiB/s)"].append(8 / (ms / 1000))
        local = free_port()
        forward = subprocess.Popen(
            [str(KIT / "bin" / "crictl"), "--config", str(KIT / "crictl-noconfig.yaml"), "--runtime-endpoint",
             endpoint, "port-forward", sandbox, f"{local}:8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{local}/index.html"
        for _ in range(100):  # bounded: the forward listens within ~10 s
            try:
                get(url)
                break
            except OSError:
                time.sleep(0.1)
        for _ in range(n):
            samples["forward GET (ms)"].append(timed_ms(lambda: get(url)))
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                samples["forward 20 GETs (ms)"].append(timed_ms(lambda: list(pool.map(get, [url] * 20))))
    finally:
        if forward is not None:
            forward.terminate()
            forward.wait(10)
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=120)
        channel.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--iterations", type=int, default=10)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="an image with busybox's httpd; default %(default)s")
    parser.add_argument("--socket", help="a running kiyot-py's CRI endpoint; default: start one")
    parser.add_argument("--reference", help="a reference runtime's CRI endpoint, e.g. containerd's")
    args = parser.parse_args()
    if not 1 <= args.iterations <= 1000:
        parser.error("--iterations must be between 1 and 1000")
    if not (KIT / "bin" / "crictl").exists():
        parser.error(f"no crictl in {KIT}/bin: set KIYOTPY_CONFORMANCE_KIT")
    print_table(run_sides(args, measure), ROWS, f"{args.iterations} iterations (throughput: 3)", first="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
