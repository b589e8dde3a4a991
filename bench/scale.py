#!/usr/bin/env python3
"""Many idle pods on one node: how long they take to make, how fast the kubelet's relist
stays, and what memory the runtime spends on them.

    python bench/scale.py --pods 100                     # starts its own kiyot-py serve
    python bench/scale.py --pods 100 --reference unix:///run/kiyot-bench-containerd/containerd.sock

Each pod has one container (`sleep 3600`), made as the kubelet makes pods: RunPodSandbox,
CreateContainer, StartContainer, with `--parallel` pods in flight at once. Then `--relists`
relists as the kubelet's PLEG does every second (ListPodSandbox and ListContainers, no
filter), then memory: the runtime's own process (RSS), and per pod what the runtime keeps
beside the containers (kiyot-py: the cell's agent processes; containerd: the pod's shim),
as RSS and as PSS (shared pages split among their users). The pods are removed at the end.
Every loop is bounded; no figure is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lifecycle import DEFAULT_IMAGE, p90, run_sides, wait_ready
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc

ROWS = ["make all (s)", "per pod (ms)", "relist p50 (ms)", "relist p99 (ms)", "runtime RSS (MiB)",
        "per pod RSS (MiB)", "per pod PSS (MiB)"]


def make_pod(rt: api_pb2_grpc.RuntimeServiceStub, image: str, log_dir: Path) -> tuple[str, float]:
    uid = str(uuid.uuid4())
    sandbox_config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f"scale-{uid[:8]}", namespace="bench", uid=uid),
        hostname="scale", log_directory=str(log_dir / uid),
    )
    t0 = time.perf_counter()
    sandbox = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=sandbox_config), timeout=120).pod_sandbox_id
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="idle"), image=pb.ImageSpec(image=image),
        command=["sleep", "3600"], log_path="idle.log",
        linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD))),
    )
    cid = rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=sandbox, config=config,
                                                       sandbox_config=sandbox_config), timeout=120).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=120)
    return sandbox, (time.perf_counter() - t0) * 1000


def remove_pod(rt: api_pb2_grpc.RuntimeServiceStub, sandbox: str) -> None:
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=120)


def relist(rt: api_pb2_grpc.RuntimeServiceStub, pods: int) -> float:
    t0 = time.perf_counter()
    sandboxes = rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
    containers = rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers
    ms = (time.perf_counter() - t0) * 1000
    if len(sandboxes) < pods or len(containers) < pods:
        raise SystemExit(f"relist saw {len(sandboxes)} pods and {len(containers)} containers, not {pods}")
    return ms


# -- memory, read from /proc ---------------------------------------------------------

def _processes() -> dict[int, tuple[str, int]]:
    """pid → (command line, parent pid) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        found[int(entry.name)] = (cmdline, ppid)
    return found


def _memory_kib(pid: int, field: str) -> int:
    """`Rss` or `Pss` of a process, in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def runtime_pid(target: str, processes: dict[int, tuple[str, int]]) -> int | None:
    """The process serving the CRI socket: kiyot-py serve (its config lies beside the
    socket), or the reference containerd (the socket's own directory is its state)."""
    home = Path(target.removeprefix("unix://")).parent.as_posix()
    for pid, (cmdline, _) in processes.items():
        words = cmdline.split()
        if "kiyot_py.cli serve" in cmdline and home in cmdline:
            return pid
        if words and Path(words[0]).name == "containerd":
            return pid  # bench/reference-containerd.sh's; the only one the bench meets
    return None


def per_pod_pids(target: str, processes: dict[int, tuple[str, int]]) -> list[int]:
    """What the runtime keeps per pod beside its containers: a cell's agent processes
    (found by their command line, as the node finds them), or containerd's shims (whose
    command line names the socket)."""
    home = Path(target.removeprefix("unix://")).parent.as_posix()
    return [pid for pid, (cmdline, _) in processes.items()
            if ("kiyot_cell.cli" in cmdline or "containerd-shim" in cmdline) and home in cmdline]


def measure(target: str, image: str, pods: int, parallel: int, relists: int) -> dict[str, list[float]]:
    channel = wait_ready(target)
    rt = api_pb2_grpc.RuntimeServiceStub(channel)
    made: list[str] = []
    result: dict[str, list[float]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory(prefix="kiyot-bench-logs-") as logs:
        api_pb2_grpc.ImageServiceStub(channel).PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)),
                                                         timeout=300)
        try:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(parallel) as workers:
                for sandbox, ms in workers.map(lambda _: make_pod(rt, image, Path(logs)), range(pods)):
                    made.append(sandbox)
                    result["per pod (ms)"].append(ms)
            result["make all (s)"].append(time.perf_counter() - t0)
            time.sleep(2)  # let the last starts settle, as the kubelet's relist would meet them
            samples = []
            for _ in range(relists):
                samples.append(relist(rt, pods))
                time.sleep(0.01)
            ordered = sorted(samples)
            result["relist p50 (ms)"].append(statistics.median(ordered))
            result["relist p99 (ms)"].append(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))])
            processes = _processes()
            pid = runtime_pid(target, processes)
            if pid is not None:
                result["runtime RSS (MiB)"].append(_memory_kib(pid, "Rss") / 1024)
            extra = per_pod_pids(target, processes)
            if extra:
                result["per pod RSS (MiB)"].append(sum(_memory_kib(p, "Rss") for p in extra) / 1024 / pods)
                result["per pod PSS (MiB)"].append(sum(_memory_kib(p, "Pss") for p in extra) / 1024 / pods)
        finally:
            with ThreadPoolExecutor(parallel) as workers:
                list(workers.map(lambda s: remove_pod(rt, s), made))
    channel.close()
    return result


def print_figures(results: dict[str, dict[str, list[float]]]) -> None:
    names = list(results)
    width = max(len(r) for r in ROWS) + 1
    header = f"{'':<{width}}" + "".join(f"| {name:<14}" for name in names)
    print(f"\n{header}\n{'-' * len(header)}")
    for row in ROWS:
        line = f"{row:<{width}}"
        for name in names:
            v = results[name][row]
            if row == "per pod (ms)" and v:
                line += f"| {statistics.median(v):6.0f} (p90 {p90(v):.0f}) "
            else:
                line += f"| {v[0]:<14.1f}" if v else f"| {'n/a':<14}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=100, help="idle pods to make (default %(default)s)")
    parser.add_argument("--parallel", type=int, default=8, help="pods in flight at once (default %(default)s)")
    parser.add_argument("--relists", type=int, default=200, help="relists to time (default %(default)s)")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="image to run (must hold sleep); default %(default)s")
    parser.add_argument("--socket", help="a running kiyot-py's CRI endpoint; default: start one")
    parser.add_argument("--reference", help="a reference runtime's CRI endpoint, e.g. containerd's")
    parser.add_argument("--pool", type=int, default=0, metavar="N",
                        help="standby cells in the warm pool of the benchmark's own service (default 0: none)")
    args = parser.parse_args()
    for name, low, high in (("pods", 1, 250), ("parallel", 1, 64), ("relists", 1, 100_000)):
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name} must be between {low} and {high}")
    args.iterations = args.pods
    results = run_sides(args, lambda target, image, pods: measure(target, image, pods, args.parallel, args.relists))
    print(f"\n{args.pods} idle pods, {args.parallel} made at once, {args.relists} relists")
    print_figures(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
