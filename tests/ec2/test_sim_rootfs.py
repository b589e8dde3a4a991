"""A simulated instance sees nothing of the node's disk, as an instance booted from an
image with the same OS would not: its own root (kiyot_py/ec2sim/rootfs.py), in its mount
namespace only, with its own disk at the same path, and containers still run in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiyot_py.ec2sim import rootfs
from kiyot_py.ec2sim.machines import machine_processes
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.e2e.helpers import container_config, start, wait_for, wait_state

from .test_ec2_cells import GiB, busybox, run_pod, sized_pod

KUBELET = Path("/var/lib/kubelet")


def _host_mounts_under(directory: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(directory) or p.startswith(f"{directory}/")]


def _python_intact() -> None:
    """What the machines saw read-only is all there on the node (no teardown went through it)."""
    assert Path(sys.prefix, "pyvenv.cfg").exists() or sys.prefix == sys.base_prefix
    assert Path(sys.executable).exists() and Path(os.path.realpath(sys.executable)).exists()
    import kiyot_cell
    assert Path(kiyot_cell.__file__).with_name("cli.py").exists()
    assert Path("/usr/sbin/runc").exists() and Path("/etc/passwd").exists()


def test_the_exposed_paths_skip_what_the_os_holds_and_refuse_system_places():
    got = rootfs.exposures("/tmp/sim/instances/i-1", ["/usr/lib/python3", "/opt/venv", "/opt/venv/lib/x", "/opt/py"])
    assert got == [("/opt/py", True), ("/opt/venv", True), ("/tmp/sim/instances/i-1", False)]
    for machine in ("/usr/local/sim/i-1", "/etc/sim", "/dev/shm/i-1", "/"):
        with pytest.raises(rootfs.RootfsError):
            rootfs.exposures(machine, [])
    with pytest.raises(rootfs.RootfsError):
        rootfs.exposures("/tmp/i-1", ["/sys/kernel"])


def test_a_machine_root_alone_hides_the_node_and_leaves_nothing_mounted(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (mount namespaces)")
    machine = tmp_path / "instances" / "i-0123456789abcdef0"
    (machine / "disk").mkdir(parents=True)
    node_only = tmp_path / "node-only"
    node_only.write_text("the node's")
    script = "\n".join([
        f"test ! -e {node_only} || {{ echo node file seen; exit 1; }}",
        f"test \"$(ls {tmp_path})\" = instances || {{ echo node dir seen; exit 2; }}",  # its own path only
        f"test -d {machine}/disk || {{ echo own disk not seen; exit 3; }}",
        f"test ! -e {KUBELET} || {{ echo kubelet seen; exit 4; }}",
        "test \"$$\" = 1 || { echo not pid 1; exit 5; }",
        "touch /usr/x 2>/dev/null && { echo /usr writable; exit 6; }",
        f"touch {sys.prefix}/x 2>/dev/null && {{ echo python writable; exit 7; }}",
        f"{sys.executable} -c 'import kiyot_cell.cli' || exit 8",
        "echo own > /tmp/own-tmp && runc --version >/dev/null || exit 9",
        "echo ok",
    ])
    ro = [f"--ro={p}" for p in rootfs.python_paths()]
    done = subprocess.run(["unshare", "--ipc", "--pid", "--kill-child", "--mount-proc", "--propagation", "slave", "--",
                           sys.executable, "-I", "-S", rootfs.__file__, "--machine", str(machine), *ro, "--",
                           "/bin/sh", "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
    assert _host_mounts_under(tmp_path) == []
    assert (machine / "os" / "tmp" / "own-tmp").read_text() == "own\n"  # its /tmp is on its own disk
    assert list((machine / "root").iterdir()) == []  # its root was a tmpfs in its namespace only
    _python_intact()


def test_a_cell_sees_its_disk_and_nothing_of_the_node_and_runs_its_pod(ec2_service, sim, tmp_path, test_images):
    cri, img = ec2_service.runtime, ec2_service.images
    node_file = tmp_path / "on-the-node"
    node_file.write_text("only the node has this")
    config = sized_pod("private", tmp_path, GiB)
    sandbox_id = run_pod(cri, config)
    (instance,) = sim.live(**{"kiyot-sandbox": sandbox_id})
    machine = sim.state_dir / "instances" / instance["InstanceId"]
    try:
        pids = machine_processes(machine)
        assert pids
        host = os.readlink("/proc/self/ns/mnt")
        assert host not in {os.readlink(f"/proc/{pid}/ns/mnt") for pid in pids}

        def seen(path: Path | str) -> bool:
            done = subprocess.run(["nsenter", f"--target={pids[0]}", "--mount", "--", "test", "-e", str(path)],
                                  capture_output=True, text=True, check=False)
            assert done.returncode in (0, 1), done.stderr
            return done.returncode == 0

        hidden = [node_file, tmp_path, sim.state_dir / "credentials", sim.state_dir / "sim.log",
                  ec2_service.state_dir, ec2_service.config]
        if KUBELET.exists():
            hidden.append(KUBELET)
        assert [p for p in hidden if seen(p)] == []
        assert seen(machine / "disk" / "tls") and seen(machine / "runc")  # its own disk, at its path
        assert seen("/usr/sbin/runc") and seen(sys.executable)  # the OS, the agent's Python
        assert _host_mounts_under(machine) == []  # the machine's mounts are its own

        image = busybox(test_images)
        img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image), sandbox_config=config))
        cid = start(cri, (sandbox_id, config), container_config("app", image, ["sleep", "3600"]))
        assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
        answer = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/proc/1/cmdline"], timeout=20))
        assert answer.exit_code == 0 and answer.stdout.startswith(b"sleep"), answer.stderr
    finally:
        cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    # Powered off: its disk and its root's directories are gone, what it saw of the node is not.
    assert wait_for(lambda: not any((machine / part).exists() for part in ("disk", "runc", "os", "root")), seconds=30)
    assert machine_processes(machine) == []
    assert _host_mounts_under(machine) == []
    _python_intact()
