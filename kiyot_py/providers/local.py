"""Local cells: a network namespace per pod, with its own IP on a bridge.

Each cell is a directory `<state>/cells/<cell-id>/` holding `cell.json` (this
provider's "cloud API": address, tags, the agent supervisor's pid), the agent's token
and its state. The agent runs inside the namespace under `kiyot-cell supervise`, which
restarts it if it dies, as systemd would inside a VM. Containers are held by conmon, so
they outlive both the agent and `kiyot-py serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from kiyot_py.config import LocalCellSettings
from kiyot_py.model import Cell
from kiyot_py.platforms import normalize_arch
from kiyot_py.providers.base import (
    TAG_SANDBOX,
    CapacityError,
    CellFeatures,
    CellNotFound,
    CellShape,
    ProviderConfigError,
    ProviderUnavailable,
    PullEndpoint,
)

log = structlog.get_logger("kiyot.providers.local")

NETNS_DIR = Path("/run/netns")


@dataclass
class _CellFile:
    id: str
    sandbox_id: str
    address: str
    netns: str
    veth: str
    tags: dict[str, str]
    supervisor_pid: int = 0
    token: str = ""  # the launch's idempotency token
    # "pending" from the moment the address is claimed until the agent's supervisor runs:
    # a cell still pending when no launch is under way was cut short (kill -9).
    state: str = "running"


async def _run(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise ProviderUnavailable(f"{' '.join(argv)}: {err.decode().strip() or proc.returncode}")
    return out.decode()


def fence_chain(bridge: str) -> str:
    """The iptables chain that fences the cells on `bridge` off the host."""
    return f"KIYOT-{bridge}"[:28]  # iptables allows 28 characters


async def remove_host_network(bridge: str) -> None:
    """Undo what start() sets up on the host: the fence and the bridge (and its address)."""
    chain = fence_chain(bridge)
    for argv in (
        ["iptables", "-D", "INPUT", "-i", bridge, "-j", chain],
        ["iptables", "-F", chain],
        ["iptables", "-X", chain],
        ["ip", "link", "del", bridge],
    ):
        await _run(*argv, check=False)


async def _succeeds(*argv: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait() == 0


class LocalProvider:
    name = "local"

    def __init__(self, state_dir: Path, settings: LocalCellSettings) -> None:
        self._dir = state_dir / "cells"
        self._settings = settings
        self._net = ipaddress.ip_network(settings.subnet)
        self._gateway = str(next(self._net.hosts()))
        self._lock = asyncio.Lock()
        self._features = CellFeatures()

    @property
    def features(self) -> CellFeatures:
        return self._features

    @property
    def default_architecture(self) -> str:
        return normalize_arch(os.uname().machine)[0]  # a local cell runs on this host

    @property
    def pull_path(self) -> PullEndpoint:
        return PullEndpoint(self._gateway, self._settings.pull_path_port)

    @property
    def reserved_ports(self) -> frozenset[int]:
        return frozenset({self._settings.agent_port})

    # -- shared infrastructure ------------------------------------------------

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        bridge = self._settings.bridge
        if not Path(f"/sys/class/net/{bridge}").exists():  # noqa: ASYNC240 - a sysfs stat, never blocks
            await _run("ip", "link", "add", bridge, "type", "bridge")
        addrs = await _run("ip", "-o", "addr", "show", "dev", bridge)
        if f" {self._gateway}/" not in addrs:
            await _run("ip", "addr", "add", f"{self._gateway}/{self._net.prefixlen}", "dev", bridge)
        await _run("ip", "link", "set", bridge, "up")
        await self._fence_host()
        self._features = await self._probe_features()
        # A VM's agent comes back when the VM does: revive supervisors that are gone
        # (after a reboot of this host, say) for cells whose namespace still exists.
        for cell in self._read_all():
            if Path(NETNS_DIR / cell.netns).exists() and not self._supervisor_alive(cell):  # noqa: ASYNC240 - stat
                log.info("reviving cell agent", cell=cell.id)
                await self._start_agent(cell)

    async def close(self) -> None:
        pass

    async def reset(self) -> int:
        """Delete every cell here and undo start() (fence, bridge); the number of cells deleted."""
        async with self._lock:
            cell_ids = [d.name for d in self._dir.iterdir() if d.is_dir()] if self._dir.exists() else []
            for cell_id in cell_ids:
                await self._teardown(cell_id)
        await remove_host_network(self._settings.bridge)
        return len(cell_ids)

    async def _probe_features(self) -> CellFeatures:
        """A local cell runs this host's OCI runtime on this host's kernel: ask the runtime."""
        try:
            features = json.loads(await _run(self._settings.runtime, "features"))
        except (ProviderUnavailable, ValueError, OSError) as exc:
            log.warning("the OCI runtime cannot list its features", runtime=self._settings.runtime, error=str(exc))
            return CellFeatures()
        # mount_setattr(2) (Linux 5.12) is what makes `rro` recursive.
        kernel = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
        return CellFeatures(
            recursive_read_only_mounts="rro" in (features.get("mountOptions") or []) and kernel >= (5, 12),
        )

    async def _fence_host(self) -> None:
        """Cells reach this host only at the pull path, as a VM in a VPC would reach the node.

        Without this, every host service bound to 0.0.0.0 would be open to every pod.
        Replies to the node's own connections (to the agents) stay allowed.
        """
        chain = fence_chain(self._settings.bridge)
        if not await _succeeds("iptables", "-n", "-L", chain):
            await _run("iptables", "-N", chain)
        await _run("iptables", "-F", chain)
        for rule in (
            ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-p", "tcp", "-d", self._gateway, "--dport", str(self._settings.pull_path_port), "-j", "ACCEPT"],
            ["-j", "DROP"],
        ):
            await _run("iptables", "-A", chain, *rule)
        jump = ["INPUT", "-i", self._settings.bridge, "-j", chain]
        if not await _succeeds("iptables", "-C", *jump):
            await _run("iptables", "-I", *jump)

    # -- cells ------------------------------------------------------------------

    async def launch(self, shape: CellShape, token: str) -> Cell:
        if shape.runtime_handler not in ("", self._settings.runtime):
            raise ProviderConfigError(
                f"runtime handler {shape.runtime_handler!r} is not configured (local cells run "
                f"{self._settings.runtime!r})")
        if shape.architecture and shape.architecture != self.default_architecture:
            raise ProviderConfigError(
                f"local cells are {self.default_architecture}; {shape.architecture} was asked for")
        cell_id = "c" + token[:12]
        async with self._lock:
            existing = self._read(cell_id)
            if existing is not None:
                if existing.token != token:
                    raise ProviderConfigError(f"cell {cell_id} was launched for another token")
                if existing.state == "running":
                    return self._cell(existing)
                # Pending while no launch runs (the lock is ours): a launch cut short by a
                # crash. Nothing in it is worth keeping: build it again.
                log.info("rebuilding a cell whose launch was cut short", cell=cell_id)
                await self._teardown(cell_id)
            cell_dir = self._dir / cell_id
            cell_dir.mkdir(mode=0o700)
            try:
                cell = _CellFile(
                    id=cell_id, sandbox_id=shape.tags.get(TAG_SANDBOX, ""), address=self._allocate_address(),
                    netns=f"kiyot-{token[:12]}", veth=f"kv{token[:12]}", tags=dict(shape.tags),
                    token=token, state="pending",
                )
                self._write(cell)  # claims the address before anything is built
                await self._build_network(cell)
                token_file = cell_dir / "token"
                fd = os.open(token_file, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(32))
                await self._start_agent(cell)
                cell.state = "running"
                self._write(cell)
            except BaseException:
                await self._teardown(cell_id)
                raise
            log.info("cell launched", cell=cell_id, address=cell.address)
            return self._cell(cell)

    async def wait_running(self, cell_id: str, timeout: float) -> Cell:
        # A launch here returns only once the cell runs; what is not running now never will.
        cell = self._read(cell_id)
        if cell is None or cell.state != "running":
            raise CellNotFound(f"cell {cell_id} does not exist (or its launch was cut short)")
        return self._cell(cell)

    async def terminate(self, cell_id: str) -> None:
        async with self._lock:
            await self._teardown(cell_id)

    async def describe(self, cell_ids: list[str]) -> dict[str, Cell]:
        cells = (self._read(cell_id) for cell_id in cell_ids)
        return {c.id: self._cell(c) for c in cells if c is not None}

    async def list_cells(self, tags: dict[str, str]) -> list[Cell]:
        return [
            self._cell(c) for c in self._read_all()
            if all(c.tags.get(k) == v for k, v in tags.items())
        ]

    # -- pieces -------------------------------------------------------------------

    def _cell(self, cell: _CellFile) -> Cell:
        token = (self._dir / cell.id / "token")
        # A local cell without its namespace (the host rebooted) is gone for good.
        alive = Path(NETNS_DIR / cell.netns).exists() and token.exists()
        state = cell.state if alive or cell.state == "pending" else "terminated"
        return Cell(
            id=cell.id, sandbox_id=cell.sandbox_id, address=cell.address,
            agent_url=f"http://{cell.address}:{self._settings.agent_port}",
            token=token.read_text() if token.exists() else "",
            state=state, tags=dict(cell.tags),
            pull_path=f"{self._gateway}:{self._settings.pull_path_port}", hostname=cell.id,
        )

    def _allocate_address(self) -> str:
        used = {c.address for c in self._read_all()} | {self._gateway}
        # The file lock keeps two kiyot-py processes on one host from taking one address.
        with open(self._dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for host in self._net.hosts():
                if str(host) not in used:
                    return str(host)
        raise CapacityError(f"no free address left in {self._net} for another cell")

    async def _build_network(self, cell: _CellFile) -> None:
        ns = cell.netns
        await _run("ip", "netns", "add", ns)
        await _run("ip", "link", "add", cell.veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        await _run("ip", "link", "set", cell.veth, "master", self._settings.bridge, "up")
        await _run("ip", "-n", ns, "addr", "add", f"{cell.address}/{self._net.prefixlen}", "dev", "eth0")
        await _run("ip", "-n", ns, "link", "set", "eth0", "up")
        await _run("ip", "-n", ns, "link", "set", "lo", "up")
        await _run("ip", "-n", ns, "route", "add", "default", "via", self._gateway)
        await self._forget_neighbour(cell.address)
        # The agent's port answers the node only, not the pod's own containers.
        await _run("nsenter", f"--net={NETNS_DIR / ns}", "iptables", "-A", "INPUT", "-p", "tcp",
                   "--dport", str(self._settings.agent_port), "!", "-s", self._gateway, "-j", "DROP")

    async def _forget_neighbour(self, address: str) -> None:
        """Drop the host's ARP entry for a cell address.

        A reused address would otherwise go to the old cell's MAC for as long as the
        kernel deems that entry reachable (15-45 s): the new agent looks dead that long.
        """
        await _run("ip", "neigh", "flush", "to", address, "dev", self._settings.bridge, check=False)

    async def _start_agent(self, cell: _CellFile) -> None:
        cell_dir = self._dir / cell.id
        argv = [
            "nsenter", f"--net={NETNS_DIR / cell.netns}", "--",
            sys.executable, "-m", "kiyot_cell.cli", "supervise",
            "--listen", f"{cell.address}:{self._settings.agent_port}",
            "--token-file", str(cell_dir / "token"),
            "--state-dir", str(cell_dir / "agent"),
            "--netns", str(NETNS_DIR / cell.netns),
            "--cgroup-parent", f"kiyot/{cell.id}",
            "--runtime", self._settings.runtime,
            "--log-max-size", str(self._settings.log_max_size),
        ]
        with open(cell_dir / "agent.log", "ab") as out:  # noqa: ASYNC230 - only opened (for the child), never read
            # A session of its own: the cell outlives `kiyot-py serve`.
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )
        cell.supervisor_pid = proc.pid
        self._write(cell)

    def _supervisor_alive(self, cell: _CellFile) -> bool:
        if not cell.supervisor_pid:
            return False
        try:
            cmdline = Path(f"/proc/{cell.supervisor_pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self._dir / cell.id).encode() in cmdline

    async def _teardown(self, cell_id: str) -> None:
        cell = self._read(cell_id)
        cell_dir = self._dir / cell_id
        if cell is None and not cell_dir.exists():
            return
        if cell is not None:
            if self._supervisor_alive(cell):
                # Like terminating a VM: no grace. The containers go next, by runc.
                os.killpg(cell.supervisor_pid, signal.SIGKILL)
                for _ in range(200):  # bounded: 10 s
                    if not self._supervisor_alive(cell):
                        break
                    await asyncio.sleep(0.01)
            await self._delete_containers(cell_dir)
            for mount in mounts_under(cell_dir):  # e.g. the pod's IPC namespace, bound on a file
                await _run("umount", "--lazy", mount, check=False)
            if Path(NETNS_DIR / cell.netns).exists():  # noqa: ASYNC240 - a stat of /run/netns, never blocks
                await _run("ip", "netns", "del", cell.netns, check=False)
            if Path(f"/sys/class/net/{cell.veth}").exists():  # noqa: ASYNC240 - a sysfs stat, never blocks
                await _run("ip", "link", "del", cell.veth, check=False)
            await self._forget_neighbour(cell.address)
            _remove_cgroups(f"kiyot/{cell.id}")
        shutil.rmtree(cell_dir, ignore_errors=True)
        log.info("cell deleted", cell=cell_id)

    async def _delete_containers(self, cell_dir: Path) -> None:
        """Containers whose bundle lives in this cell: conmon holds them, so kill them here."""
        out = await _run("runc", "list", "--format", "json", check=False)
        for ctr in json.loads(out or "null") or []:
            if str(ctr.get("bundle", "")).startswith(str(cell_dir) + "/"):
                await _run("runc", "delete", "--force", ctr["id"], check=False)

    def _read(self, cell_id: str) -> _CellFile | None:
        try:
            return _CellFile(**json.loads((self._dir / cell_id / "cell.json").read_text()))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _read_all(self) -> list[_CellFile]:
        if not self._dir.exists():
            return []
        cells = (self._read(p.name) for p in self._dir.iterdir() if p.is_dir())
        return [c for c in cells if c is not None]

    def _write(self, cell: _CellFile) -> None:
        path = self._dir / cell.id / "cell.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell.__dict__))
        os.replace(tmp, path)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (the order to unmount them in)."""
    prefix = str(directory).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # Field 5 is the mount point; space, tab, newline and backslash come octal-escaped.
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4]).decode()
            if (point + "/").startswith(prefix):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def _remove_cgroups(relative: str) -> None:
    root = Path("/sys/fs/cgroup")
    for hierarchy in root.iterdir() if root.exists() else []:
        path = hierarchy / relative
        if path.is_dir():
            # Children first; a cgroup directory is removed with rmdir, never rm -r.
            for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                path.rmdir()
