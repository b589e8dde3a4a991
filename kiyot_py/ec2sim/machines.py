"""Every simulated instance is a real cell: the VM the node would get from EC2.

An instance's machine is a network namespace with the instance's private address on a
veth on the simulator's bridge (the VPC), namespaces of its own for IPC, PIDs and mounts,
a directory for its disk, and its own metadata service (IMDSv2) at 169.254.169.254 on an
interface inside that namespace, and only there. After the boot delay the machine starts
what the cell image's unit starts, `kiyot-cell boot`, as cloud-init would: the cell reads
its user data from its metadata service and brings its agent up by itself. Its stdout is
the instance's console (GetConsoleOutput). Terminating the instance powers the machine off:
its pid 1 dies, and with it every process in it.

A machine sees nothing of the node's disk, as an instance booted from an image with the
same OS would not: its init pivots into a root of its own first (rootfs.py: the OS
read-only, its own /tmp, /var, /root and /home on its disk, the agent's Python read-only,
and the machine's directory at its same path), in its mount namespace only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
from aiohttp import web

from kiyot_py.ec2sim import rootfs
from kiyot_py.providers.hostcell import cell_agent_processes, cgroup_busy, process_group, remove_cgroups, run

log = structlog.get_logger("kiyot.ec2sim.machines")

NETNS_DIR = Path("/run/netns")
IMDS_ADDRESS = "169.254.169.254"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class MachineSpec:
    """What the simulator knows of an instance when it is launched (read off moto's model)."""

    instance_id: str
    address: str
    network: str  # the subnet's CIDR
    instance_type: str
    zone: str
    user_data: bytes
    mac: str = ""
    secondary: tuple[str, ...] = ()  # secondary private addresses of the primary interface

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.network).hosts()))

    @property
    def netns(self) -> str:
        return f"kiyotsim-{self.instance_id}"

    @property
    def veth(self) -> str:
        return "ks" + self.instance_id[-12:]  # 14 characters: within IFNAMSIZ


@dataclass
class Machine:
    spec: MachineSpec
    directory: Path
    boot: asyncio.Task[None] | None = None
    imds: web.AppRunner | None = None
    # What EC2 posts to the instance's metadata later (a spot notice): path -> body.
    posted: dict[str, bytes] = field(default_factory=dict)

    @property
    def console_path(self) -> Path:
        return self.directory / "console.log"

    @property
    def disk(self) -> Path:
        return self.directory / "disk"


def _socket_in_netns(netns: Path, host: str, port: int) -> socket.socket:
    """A listening TCP socket made inside `netns` (a socket keeps the namespace it was made in)."""
    made: dict[str, socket.socket | BaseException] = {}

    def work() -> None:  # setns moves this thread only; it ends right after
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(netns) as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # IMDS answers with a TTL of 1, so that its answers die one hop away: what the
            # hop limit of 1 on a real instance means for a container behind a bridge.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            made["sock"] = sock
        except BaseException as exc:
            made["error"] = exc

    thread = threading.Thread(target=work, name="setns")
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]  # type: ignore[misc]
    return made["sock"]  # type: ignore[return-value]


def metadata_app(machine: Machine) -> web.Application:
    """IMDSv2 for one instance: a session token by PUT first, then reads with it."""
    tokens: dict[str, float] = {}
    spec = machine.spec

    def values() -> dict[str, bytes]:
        macs = f"/latest/meta-data/network/interfaces/macs/{spec.mac}"
        found = {
            "/latest/meta-data/instance-id": spec.instance_id,
            "/latest/meta-data/local-ipv4": spec.address,
            "/latest/meta-data/instance-type": spec.instance_type,
            "/latest/meta-data/placement/availability-zone": spec.zone,
            "/latest/meta-data/mac": spec.mac,
            f"{macs}/local-ipv4s": "\n".join((spec.address, *spec.secondary)),
            f"{macs}/subnet-ipv4-cidr-block": spec.network,
        }
        out = {k: v.encode() for k, v in found.items()}
        if spec.user_data:
            out["/latest/user-data"] = spec.user_data
        out.update(machine.posted)
        return out

    async def token(request: web.Request) -> web.Response:
        if "X-Forwarded-For" in request.headers:  # IMDSv2 refuses what came through a proxy
            return web.Response(status=403)
        try:
            ttl = int(request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            return web.Response(status=400)
        if not 1 <= ttl <= 21600:
            return web.Response(status=400)
        value = secrets.token_urlsafe(32)
        tokens[value] = time.monotonic() + ttl
        return web.Response(text=value)

    async def read(request: web.Request) -> web.Response:
        given = request.headers.get("X-aws-ec2-metadata-token", "")
        if tokens.get(given, 0.0) < time.monotonic():
            return web.Response(status=401)  # http_tokens = required: no IMDSv1
        data = values().get(request.path)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="text/plain")

    app = web.Application()
    app.router.add_put("/latest/api/token", token)
    app.router.add_get("/{tail:.*}", read)
    return app


class MachineHooks(Protocol):
    """How a machine's power tells the EC2 model what became of its instance."""

    def running(self, instance_id: str) -> None: ...

    def failed(self, instance_id: str, reason: str) -> None: ...


class Machines:
    def __init__(self, directory: Path, bridge: str, boot_delay: float) -> None:
        self._dir = directory
        self._bridge = bridge
        self.boot_delay = boot_delay
        self.machines: dict[str, Machine] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def current_boot_delay(self) -> float:
        """The boot delay: `<state>/boot-delay` (seconds) if it is there, read at each
        launch (a test's knob), else the one given at start."""
        try:
            return float((self._dir.parent / "boot-delay").read_text().strip())
        except (FileNotFoundError, ValueError):
            return self.boot_delay

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- called from moto's request threads --------------------------------------------

    def launched(self, specs: list[MachineSpec], hooks: MachineHooks) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._launch, specs, hooks)

    def ended(self, instance_ids: list[str]) -> None:
        assert self._loop is not None
        for instance_id in instance_ids:
            asyncio.run_coroutine_threadsafe(self.power_off(instance_id), self._loop)

    def console(self, instance_id: str) -> bytes:
        machine = self.machines.get(instance_id)
        if machine is None:
            return b""
        try:
            return machine.console_path.read_bytes()
        except FileNotFoundError:
            return b""

    # -- the machines ---------------------------------------------------------------------

    def _launch(self, specs: list[MachineSpec], hooks: MachineHooks) -> None:
        for spec in specs:
            machine = Machine(spec, self._dir / spec.instance_id)
            self.machines[spec.instance_id] = machine
            machine.boot = asyncio.create_task(self._power_on(machine, hooks), name=f"boot-{spec.instance_id}")

    async def _power_on(self, machine: Machine, hooks: MachineHooks) -> None:
        spec = machine.spec
        try:
            await asyncio.sleep(self.current_boot_delay())
            machine.disk.mkdir(parents=True, exist_ok=True)
            await self._build_network(spec)
            sock = _socket_in_netns(NETNS_DIR / spec.netns, IMDS_ADDRESS, 80)
            machine.imds = web.AppRunner(metadata_app(machine), access_log=None)
            await machine.imds.setup()
            await web.SockSite(machine.imds, sock).start()
            await self._start_init(machine)
            hooks.running(spec.instance_id)
            log.info("instance running", instance=spec.instance_id, address=spec.address)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # As EC2 does with an instance it could not start: terminated, with a reason.
            log.exception("instance failed to boot", instance=spec.instance_id)
            hooks.failed(spec.instance_id, f"Server.InternalError: {exc}")
            await self._teardown(spec, machine.directory)

    async def _build_network(self, spec: MachineSpec) -> None:
        ns = spec.netns
        prefix = ipaddress.ip_network(spec.network).prefixlen
        await run("ip", "netns", "add", ns)
        await run("ip", "link", "add", spec.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                   *(("address", spec.mac) if spec.mac else ()))
        await run("ip", "link", "set", spec.veth, "master", self._bridge, "up")
        await run("ip", "-n", ns, "addr", "add", f"{spec.address}/{prefix}", "dev", "eth0")
        await run("ip", "-n", ns, "link", "set", "eth0", "up")
        await run("ip", "-n", ns, "link", "set", "lo", "up")
        await run("ip", "-n", ns, "route", "add", "default", "via", spec.gateway)
        # The instance's own metadata service, on its loopback: 169.254.169.254 is never
        # an address of this host, nor of anything but this instance.
        await run("ip", "-n", ns, "addr", "add", f"{IMDS_ADDRESS}/32", "dev", "lo")
        for address in (spec.address, *spec.secondary):
            await run("ip", "neigh", "flush", "to", address, "dev", self._bridge, check=False)

    async def _start_init(self, machine: Machine) -> None:
        spec = machine.spec
        # Its PID 1 builds the machine's root and pivots into it (rootfs.py, on the standard
        # library only: -I -S), then becomes the cell's init, `kiyot-cell boot`.
        loader = [sys.executable, "-I", "-S", rootfs.__file__, "--machine", str(machine.directory),
                  *(f"--ro={path}" for path in rootfs.python_paths()), "--"]
        argv = [
            "setsid", "--fork", "nsenter", f"--net={NETNS_DIR / spec.netns}", "--",
            "unshare", "--ipc", "--pid", "--kill-child", "--mount-proc", "--propagation", "slave", "--",
            *loader, sys.executable, "-m", "kiyot_cell.cli", "boot", "--root", str(machine.disk),
            "--runtime-root", str(machine.directory / "runc"),
            "--cgroup-parent", f"kiyotsim/{spec.instance_id}",
        ]
        with open(machine.console_path, "ab") as console:  # noqa: ASYNC230 - only opened for the child
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=console, stderr=console)
        await proc.wait()

    def post_metadata(self, instance_id: str, path: str, body: bytes) -> None:
        """EC2 puts something in the instance's metadata (a spot notice)."""
        machine = self.machines.get(instance_id)
        if machine is None:
            raise KeyError(instance_id)
        machine.posted[path] = body

    async def cut(self, instance_id: str, seconds: float) -> None:
        """The instance's network goes away for a while (its link down), then comes back."""
        machine = self.machines.get(instance_id)
        if machine is None:
            raise KeyError(instance_id)
        veth = machine.spec.veth
        await run("ip", "link", "set", veth, "down")
        log.info("instance network cut", instance=instance_id, seconds=seconds)
        try:
            await asyncio.sleep(seconds)
        finally:
            if Path(f"/sys/class/net/{veth}").exists():  # noqa: ASYNC240 - a sysfs stat; gone if powered off
                await run("ip", "link", "set", veth, "master", self._bridge, "up", check=False)
            log.info("instance network back", instance=instance_id)

    async def power_off(self, instance_id: str) -> None:
        machine = self.machines.get(instance_id)
        if machine is None:
            return
        if machine.boot is not None and not machine.boot.done():
            machine.boot.cancel()
            await asyncio.gather(machine.boot, return_exceptions=True)
        await self._teardown(machine.spec, machine.directory)
        if machine.imds is not None:
            await machine.imds.cleanup()
            machine.imds = None
        log.info("instance powered off", instance=instance_id)

    async def _teardown(self, spec: MachineSpec, directory: Path) -> None:
        for pgid in {process_group(pid) for pid in machine_processes(directory)} - {0}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        cgroup = f"kiyotsim/{spec.instance_id}"
        for _ in range(1000):  # bounded: 10 s
            if not machine_processes(directory) and not cgroup_busy(cgroup):
                break
            await asyncio.sleep(0.01)
        if (NETNS_DIR / spec.netns).exists():
            await run("ip", "netns", "del", spec.netns, check=False)
        if Path(f"/sys/class/net/{spec.veth}").exists():  # noqa: ASYNC240 - a sysfs stat, never blocks
            await run("ip", "link", "del", spec.veth, check=False)
        remove_cgroups(cgroup)
        # The disk goes with the instance (DeleteOnTermination); the console stays readable.
        # Its root's binds were in its mount namespace only: here these are plain directories.
        for part in ("disk", "runc", "os", "root"):
            shutil.rmtree(directory / part, ignore_errors=True)

    async def power_off_all(self) -> None:
        await asyncio.gather(*(self.power_off(i) for i in list(self.machines)), return_exceptions=True)

    async def sweep(self) -> None:
        """Machines a previous run of the simulator left behind (it was killed): gone."""
        for netns in NETNS_DIR.glob("kiyotsim-i-*") if NETNS_DIR.exists() else []:  # noqa: ASYNC240 - /run
            instance_id = netns.name[len("kiyotsim-"):]
            spec = MachineSpec(instance_id, "", "0.0.0.0/0", "", "", b"")
            await self._teardown(spec, self._dir / instance_id)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir.mkdir(parents=True, exist_ok=True)


def machine_processes(directory: Path) -> list[int]:
    """Pids of a machine's init (`kiyot-cell boot --root <dir>/disk`) and what it forked."""
    marker = str(directory / "disk").encode()
    return [pid for pid, args in cell_agent_processes() if marker in args]
