"""Local cells: namespaces of its own per pod (network, with its own IP on a bridge;
IPC; PID; mounts), the nearest a shared kernel comes to a VM.

Each cell is a directory `<state>/cells/<cell-id>/` holding `cell.json` (this
provider's "cloud API": address, tags, the pid of the process that leads the cell), the
agent's TLS identity (`tls/`: its key and certificate from the node's CA), its runtime
state (`runc/`) and the agent's state. The agent runs in those namespaces under
`kiyot-cell supervise`, the cell's pid 1, which restarts it if it dies, as systemd would
inside a VM. Containers are held by conmon, so they outlive both the agent and
`kiyot-py serve`; a cell ends when its pid 1 does, with everything in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from kiyot_py.config import LocalCellSettings
from kiyot_py.crashpoints import crash_point
from kiyot_py.model import Cell
from kiyot_py.pki import NodePKI, cell_server_name
from kiyot_py.platforms import normalize_arch
from kiyot_py.providers.base import (
    TAG_SANDBOX,
    CapacityError,
    CellEvents,
    CellFeatures,
    CellNotFound,
    CellShape,
    ProviderConfigError,
    ProviderUnavailable,
    PullEndpoint,
    Readiness,
)
from kiyot_py.providers.hostcell import (
    cell_agent_processes,
    cgroup_busy,
    mounts_under,
    process_group,
    remove_cgroups,
    run,
    write_netns_sysctls,
)
from kiyot_py.providers.local_spawner import Spawner

log = structlog.get_logger("kiyot.providers.local")

NETNS_DIR = Path("/run/netns")
NET_ADDR_SET = "3"  # /sys/class/net/<dev>/addr_assign_type of an address set by hand


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


def fence_chain(bridge: str) -> str:
    """The iptables chain that fences the cells on `bridge` off the host (INPUT, v4 and v6)."""
    return f"KIYOT-{bridge}"[:28]  # iptables allows 28 characters


def forward_chain(bridge: str) -> str:
    """The chain of what the node never forwards for the cells on `bridge` (FORWARD, v4 and v6)."""
    return f"KIYOT-{bridge}-FWD"[:28]


def pull_guard_chain(bridge: str) -> str:
    """The chain that keeps every interface but `bridge` off the pull path (INPUT, v4)."""
    return f"KIYOT-{bridge}-PULL"[:28]


def prerouting_chain(bridge: str) -> str:
    """The chain that drops a cell's new connections to the node before any DNAT (mangle, v4)."""
    return f"KIYOT-{bridge}-PRE"[:28]


LINK_LOCAL_V4 = "169.254.0.0/16"  # cloud metadata (169.254.169.254) lives here
MULTICAST_V4 = "224.0.0.0/4"


@dataclass(frozen=True)
class FenceChain:
    """One chain of the host fence: its rules, in order, and where it is jumped to from."""

    table: str  # "filter" or "mangle"
    name: str
    hook: str  # the built-in chain that jumps here: INPUT, FORWARD, PREROUTING
    match: tuple[str, ...]  # the packets of `hook` that jump here, e.g. ("-i", bridge)
    rules: tuple[tuple[str, ...], ...]

    @property
    def jump(self) -> tuple[str, ...]:
        return (*self.match, "-j", self.name)


@dataclass(frozen=True)
class Fence:
    """The host fence for one bridge: the iptables chains and the ip6tables chains."""

    v4: tuple[FenceChain, ...]
    v6: tuple[FenceChain, ...]


def deny_networks(deny_egress: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The CIDRs of `LocalCellSettings.deny_egress` (validated by Settings.validate())."""
    return [ipaddress.ip_network(e.strip()) for e in deny_egress.split(",") if e.strip()]


def fence_rules(
    bridge: str, gateway: str, subnet: str, pull_path_port: int, agent_port: int,
    deny_egress: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network | str] = (),
) -> Fence:
    """Every rule of the host fence for the cells on `bridge`: a pure function of the settings.

    A cell is a pod on a node of its own: the node (this host) is out of its reach but for
    the pull path, as a VPC's node is out of a VM's; the wider network through the node is
    not, as a pod's is not. Rules are appended in order; the jumps go first in their hooks.
    """
    pull = ("-d", f"{gateway}/32", "-p", "tcp", "-m", "tcp", "--dport", str(pull_path_port))
    denied = [ipaddress.ip_network(n) for n in deny_egress]
    established = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
    v4 = (
        # What comes in from a cell to the node: replies to the node's own connections
        # (to the agents) and the pull path, nothing else.
        FenceChain("filter", fence_chain(bridge), "INPUT", ("-i", bridge), (
            (*established, "-j", "ACCEPT"),
            (*pull, "-j", "ACCEPT"),
            ("-j", "DROP"),
        )),
        # The pull path listens on the gateway address, which the node's other interfaces
        # (its LAN, its loopback) would reach too: it serves the cells, and the node's own
        # image store (pods/shared_images.py, from the gateway address over loopback) only.
        FenceChain("filter", pull_guard_chain(bridge), "INPUT", ("!", "-i", bridge), (
            ("-i", "lo", "-s", f"{gateway}/32", *pull, "-j", "RETURN"),
            (*pull, "-j", "DROP"),
        )),
        # New connections from a cell to any of the node's addresses, before DNAT could
        # send them elsewhere (a NodePort, a node-published port, a metadata proxy): the
        # INPUT fence above would never see those.
        FenceChain("mangle", prerouting_chain(bridge), "PREROUTING", ("-i", bridge), (
            ("-m", "addrtype", "!", "--dst-type", "LOCAL", "-j", "RETURN"),
            (*established, "-j", "RETURN"),
            (*pull, "-j", "RETURN"),
            ("-j", "DROP"),
        )),
        # What the node forwards for a cell: what a pod's node would (the wider network),
        # never link-local (cloud metadata answers there with the node's credentials),
        # the node itself, broadcast, multicast, or what the config denies.
        FenceChain("filter", forward_chain(bridge), "FORWARD", ("-i", bridge), (
            # Cell to cell stays on the bridge (br_netfilter shows it to FORWARD): as on a
            # node's CNI bridge, but no cell reaches another cell's agent.
            ("-o", bridge, "-p", "tcp", "-m", "tcp", "--dport", str(agent_port), "-j", "DROP"),
            ("-o", bridge, "-j", "RETURN"),
            ("!", "-s", subnet, "-j", "DROP"),  # a forged source never leaves the node
            ("-d", LINK_LOCAL_V4, "-j", "DROP"),
            ("-m", "addrtype", "--dst-type", "LOCAL", "-j", "DROP"),
            ("-m", "addrtype", "--dst-type", "BROADCAST", "-j", "DROP"),
            ("-d", MULTICAST_V4, "-j", "DROP"),
            *(("-d", str(n), "-j", "DROP") for n in denied if n.version == 4),
        )),
    )
    # Cells have no IPv6 but loopback (an IPv4 cluster's pods have none either): should a
    # pod turn it on (CAP_NET_ADMIN), the node's [::] services and link-local neighbours
    # stay out of its reach.
    v6 = (
        FenceChain("filter", fence_chain(bridge), "INPUT", ("-i", bridge), (
            (*established, "-j", "ACCEPT"),
            ("-j", "DROP"),
        )),
        FenceChain("filter", forward_chain(bridge), "FORWARD", ("-i", bridge), (
            *(("-d", str(n), "-j", "DROP") for n in denied if n.version == 6),
            ("-j", "DROP"),  # fe80::/10, ff00::/8, the node's addresses and the rest alike
        )),
    )
    return Fence(v4=v4, v6=v6)


def fence_restore(chains: Sequence[FenceChain], stale: Sequence[tuple[str, str]] = ()) -> str:
    """The `iptables-restore --noflush` input that installs `chains` in one transaction.

    `stale` are (table, rule) pairs in `iptables -S` form ("-A INPUT -i b -j KIYOT-b"): the
    jumps to these chains found in place, deleted as the new ones go first. Declaring a
    chain creates or flushes it; in one transaction, no packet ever sees a half-built fence.
    """
    lines: list[str] = []
    for table in dict.fromkeys(c.table for c in chains):
        ours = [c for c in chains if c.table == table]
        lines.append(f"*{table}")
        lines += [f":{c.name} - [0:0]" for c in ours]
        lines += ["-D" + rule[2:] for t, rule in stale if t == table and rule.startswith("-A ")]
        for c in ours:
            lines += [" ".join(("-A", c.name, *rule)) for rule in c.rules]
        lines += [" ".join(("-I", c.hook, "1", *c.jump)) for c in ours]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def jumps_in(listing: str, chain_names: Sequence[str]) -> list[str]:
    """The rules of an `iptables -S <hook>` listing that jump to one of `chain_names`."""
    return [line for line in listing.splitlines()
            if line.startswith("-A ") and line.split()[-2:] in (["-j", n] for n in chain_names)]


def _fence_tools() -> list[tuple[str, str]]:
    """(iptables tool, family) for each IP version this host has."""
    tools = [("iptables", "v4")]
    if Path("/proc/sys/net/ipv6").exists():  # a kernel booted with ipv6.disable=1 has none
        tools.append(("ip6tables", "v6"))
    return tools


async def remove_host_network(bridge: str) -> None:
    """Undo what start() sets up on the host: the fence (v4 and v6) and the bridge (and its address)."""
    fence = fence_rules(bridge, "10.0.0.1", "10.0.0.0/24", 1, 1)  # only the chains' names and hooks matter
    for tool, family in _fence_tools():
        chains = fence.v4 if family == "v4" else fence.v6
        for chain in chains:
            listing = await run(tool, "-t", chain.table, "-S", chain.hook, check=False)
            for rule in jumps_in(listing, [chain.name]):
                await run(tool, "-t", chain.table, "-D", *rule.split()[1:], check=False)
        for chain in chains:
            await run(tool, "-t", chain.table, "-F", chain.name, check=False)
            await run(tool, "-t", chain.table, "-X", chain.name, check=False)
    await run("ip", "link", "del", bridge, check=False)


async def _run_input(argv: Sequence[str], data: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate(data.encode())
    return proc.returncode or 0, out.decode()


async def ip_batch(commands: Sequence[str], netns: str = "") -> None:
    """`ip -batch`: several ip commands in one process (in the named namespace if given);
    stops at the first that fails."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    code, out = await _run_input(argv, "".join(c + "\n" for c in commands))
    if code != 0:
        raise ProviderUnavailable(f"{' '.join(argv)}: {out.strip() or code}")


async def _succeeds(*argv: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait() == 0


IFF_UP = 0x1


class LocalProvider:
    name = "local"

    def __init__(self, state_dir: Path, settings: LocalCellSettings, pki: NodePKI,
                 shared_images: Path | None = None) -> None:
        self._dir = state_dir / "cells"
        self._shared_images = shared_images  # the node's unpacked images, for the agents
        self._pki = pki
        self._settings = settings
        self._net = ipaddress.ip_network(settings.subnet)
        self._gateway = str(next(self._net.hosts()))
        # One lock per cell, not one for all: cells are built side by side (N pods made at
        # once scale with the cores); a repeated launch or a terminate waits for its own.
        self._locks: dict[str, asyncio.Lock] = {}
        self._features = CellFeatures(shares_node_disk=True)
        self._spawner = Spawner(self._dir / "spawner.log")

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

    async def readiness(self) -> Readiness:
        """A local cell needs its runtime and conmon on this host, and the cells' bridge up."""
        missing = [tool for tool in (self._settings.runtime, "conmon") if shutil.which(tool) is None]
        bridge = self._settings.bridge
        try:
            up = int(Path(f"/sys/class/net/{bridge}/flags").read_text(), 16) & IFF_UP  # noqa: ASYNC240 - sysfs
        except (OSError, ValueError):
            up = 0
        return Readiness(
            runtime_reason="RuntimeMissing" if missing else "",
            runtime_message=f"{' and '.join(missing)} not found on this node's PATH" if missing else "",
            network_reason="" if up else "BridgeDown",
            network_message="" if up else f"the cells' bridge {bridge} is gone or down (restart kiyot-py to make it)",
        )

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        bridge = self._settings.bridge
        if not Path(f"/sys/class/net/{bridge}").exists():  # noqa: ASYNC240 - a sysfs stat, never blocks
            await run("ip", "link", "add", bridge, "type", "bridge")
        addrs = await run("ip", "-o", "addr", "show", "dev", bridge)
        if f" {self._gateway}/" not in addrs:
            await run("ip", "addr", "add", f"{self._gateway}/{self._net.prefixlen}", "dev", bridge)
        await self._pin_bridge_address()
        await run("ip", "link", "set", bridge, "up")
        await self._fence_host()
        self._features = await self._probe_features()
        await self._spawner.start()
        # A launch cut short right after making the cell's directory left no record: the
        # cell was never handed to anyone. Take down whatever of it was built.
        for unrecorded in self._unrecorded_dirs():
            log.info("removing a cell whose launch left no record", cell=unrecorded)
            await self._teardown(unrecorded)
        # A VM's agent comes back when the VM does: revive supervisors that are gone
        # (after a reboot of this host, say) for cells whose namespace still exists.
        running = running_agents()
        for cell in self._read_all():
            if not Path(NETNS_DIR / cell.netns).exists():  # noqa: ASYNC240 - a stat of /run/netns
                continue
            self._ipv6_off(cell, check=False)  # cells made before cells had no IPv6
            if str(self._dir / cell.id / "agent") not in running:
                log.info("reviving cell agent", cell=cell.id)
                await self._start_agent(cell)

    async def _pin_bridge_address(self) -> None:
        """Give the bridge its MAC address for good (its present one).

        A bridge whose address nobody set takes the lowest of its ports' addresses, so a
        cell's veth joining or leaving can change the gateway's MAC under every other cell:
        their packets to the node then go to the old MAC until their ARP entry expires
        (15-45 s of silence; a pull or an agent reply stalls that long). An address set
        explicitly stays (addr_assign_type 3)."""
        sysfs = Path(f"/sys/class/net/{self._settings.bridge}")
        if (sysfs / "addr_assign_type").read_text().strip() != NET_ADDR_SET:
            address = (sysfs / "address").read_text().strip()
            await run("ip", "link", "set", "dev", self._settings.bridge, "address", address)

    async def close(self) -> None:
        await self._spawner.close()  # the cells it forked stay, as VMs would

    def watch_events(self, sink: CellEvents) -> None:
        pass  # a local cell goes only when this node says so: no feed to watch

    def interrupted(self, cell: Cell) -> None:
        pass

    async def reset(self) -> int:
        """Delete every cell here and undo start() (fence, bridge); the number of cells deleted."""
        cell_ids = [d.name for d in self._dir.iterdir() if d.is_dir()] if self._dir.exists() else []
        for cell_id in cell_ids:
            await self.terminate(cell_id)
        await remove_host_network(self._settings.bridge)
        return len(cell_ids)

    async def _probe_features(self) -> CellFeatures:
        """A local cell runs this host's OCI runtime on this host's kernel: ask the runtime."""
        try:
            features = json.loads(await run(self._settings.runtime, "features"))
        except (ProviderUnavailable, ValueError, OSError) as exc:
            log.warning("the OCI runtime cannot list its features", runtime=self._settings.runtime, error=str(exc))
            return CellFeatures(privileged=self._settings.allow_privileged, shares_node_disk=True)
        # mount_setattr(2) (Linux 5.12) is what makes `rro` recursive.
        kernel = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
        return CellFeatures(
            recursive_read_only_mounts="rro" in (features.get("mountOptions") or []) and kernel >= (5, 12),
            privileged=self._settings.allow_privileged,
            shares_node_disk=True,
        )

    def fence(self) -> Fence:
        """This host's fence for the cells (the rules; _fence_host installs them)."""
        s = self._settings
        return fence_rules(s.bridge, self._gateway, str(self._net), s.pull_path_port, s.agent_port,
                           deny_networks(s.deny_egress))

    async def _fence_host(self) -> None:
        """Cells reach this host only at the pull path, as a VM in a VPC would reach the node.

        Without this, every host service bound to 0.0.0.0 or [::] would be open to every
        pod, and the node would forward a pod's packets to cloud metadata. Replies to the
        node's own connections (to the agents) stay allowed. Run at every start: the chains
        are rebuilt and their jumps put first again, each IP version in one transaction.
        """
        fence = self.fence()
        for tool, family in _fence_tools():
            chains = fence.v4 if family == "v4" else fence.v6
            error = ""
            for _ in range(3):  # bounded: a rule deleted meanwhile fails the transaction; list again
                stale = []
                for table, hook in dict.fromkeys((c.table, c.hook) for c in chains):
                    listing = await run(tool, "-t", table, "-S", hook)
                    stale += [(table, r) for r in jumps_in(listing, [c.name for c in chains])]
                code, error = await _run_input([f"{tool}-restore", "--noflush"], fence_restore(chains, stale))
                if code == 0:
                    break
            else:
                raise ProviderUnavailable(f"{tool}-restore could not install the host fence: {error.strip()}")

    def _ipv6_off(self, cell: _CellFile, *, check: bool = True) -> None:
        """No IPv6 on a cell's link, either end, as for a pod of an IPv4 cluster: set on
        both ends before they come up, so eth0 never sends a router solicitation or DAD.
        Loopback keeps ::1 (pods have it; what binds [::1] still works)."""
        if not Path("/proc/sys/net/ipv6").exists():
            return
        try:
            write_netns_sysctls(NETNS_DIR / cell.netns,
                                {f"net/ipv6/conf/{dev}/disable_ipv6": "1" for dev in ("default", "eth0")})
            host_end = Path(f"/proc/sys/net/ipv6/conf/{cell.veth}/disable_ipv6")
            if host_end.exists():
                host_end.write_text("1")
        except OSError as e:
            if check:
                raise ProviderUnavailable(f"cell {cell.id}: IPv6 could not be turned off: {e}") from None

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
        async with self._locks.setdefault(cell_id, asyncio.Lock()):
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
            elif (self._dir / cell_id).exists():  # made, then the node died before its record
                await self._teardown(cell_id)
            cell_dir = self._dir / cell_id
            cell_dir.mkdir(mode=0o700)
            crash_point("cell-dir-made")
            try:
                cell = _CellFile(
                    id=cell_id, sandbox_id=shape.tags.get(TAG_SANDBOX, ""), address="",
                    netns=f"kiyot-{token[:12]}", veth=f"kv{token[:12]}", tags=dict(shape.tags),
                    token=token, state="pending",
                )
                self._record_with_address(cell)  # claims the address before anything is built
                crash_point("cell-recorded")
                await self._build_network(cell)
                crash_point("cell-network-built")
                self._pki.issue_cell(cell_id).write(cell_dir / "tls")
                await self._start_agent(cell)
                cell.state = "running"
                self._write(cell)
            except BaseException:
                await self._teardown(cell_id)
                raise
            log.info("cell launched", cell=cell_id, address=cell.address)
            return self._cell(cell)

    def fits(self, cell: Cell, shape: CellShape) -> bool:
        # Every local cell is the same: the node's kernel, cores and memory, one runtime.
        return shape.runtime_handler in ("", self._settings.runtime) and \
            shape.architecture in ("", self.default_architecture)

    async def retag(self, cell_id: str, tags: dict[str, str]) -> None:
        # Not under the launch lock: a claim must not wait behind another cell's launch,
        # and only the one claiming a ready cell ever writes its record.
        cell = self._read(cell_id)
        if cell is None:
            raise CellNotFound(f"cell {cell_id} does not exist")
        cell.tags.update(tags)
        cell.sandbox_id = cell.tags.get(TAG_SANDBOX, "")
        self._write(cell)

    async def wait_running(self, cell_id: str, timeout: float) -> Cell:
        # A launch here returns only once the cell runs; what is not running now never will.
        cell = self._read(cell_id)
        if cell is None or cell.state != "running":
            raise CellNotFound(f"cell {cell_id} does not exist (or its launch was cut short)")
        return self._cell(cell)

    async def identity_fingerprint(self, cell_id: str, timeout: float) -> str:
        raise ProviderConfigError("a local cell's identity comes from the node: there is nothing to enroll")

    async def terminate(self, cell_id: str) -> None:
        async with self._locks.setdefault(cell_id, asyncio.Lock()):
            await self._teardown(cell_id)
        self._locks.pop(cell_id, None)

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
        identity = self._dir / cell.id / "tls" / "cell.crt"
        # A local cell without its namespace (the host rebooted) is gone for good.
        alive = Path(NETNS_DIR / cell.netns).exists() and identity.exists()
        state = cell.state if alive or cell.state == "pending" else "terminated"
        return Cell(
            id=cell.id, sandbox_id=cell.sandbox_id, address=cell.address,
            agent_url=f"https://{cell.address}:{self._settings.agent_port}",
            server_name=cell_server_name(cell.id),
            state=state, tags=dict(cell.tags),
            pull_path=f"{self._gateway}:{self._settings.pull_path_port}", hostname=cell.id,
        )

    def _record_with_address(self, cell: _CellFile) -> None:
        """Give `cell` a free address and write its record, which claims the address.
        Under the file lock, read and written in one step: neither another launch nor
        another kiyot-py process on this host takes the same address."""
        with open(self._dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = {c.address for c in self._read_all()} | {self._gateway}
            for host in self._net.hosts():
                if str(host) not in used:
                    cell.address = str(host)
                    self._write(cell)
                    return
        raise CapacityError(f"no free address left in {self._net} for another cell")

    async def _build_network(self, cell: _CellFile) -> None:
        # Few processes per cell: one `ip -batch` for each step that must come before the
        # next (the namespace and the link; the host's end up; the cell's end up).
        ns = cell.netns
        await ip_batch([f"netns add {ns}", f"link add {cell.veth} type veth peer name eth0 netns {ns}"])
        self._ipv6_off(cell)  # both ends still down
        await ip_batch([f"link set {cell.veth} master {self._settings.bridge} up",
                        # A reused address would otherwise go to the old cell's MAC for as
                        # long as the kernel deems that entry reachable (15-45 s).
                        f"neigh flush to {cell.address} dev {self._settings.bridge}"])
        await ip_batch([f"addr add {cell.address}/{self._net.prefixlen} dev eth0", "link set eth0 up",
                        "link set lo up", f"route add default via {self._gateway}"], netns=ns)
        # The agent's port answers the node only, not the pod's own containers.
        await run("nsenter", f"--net={NETNS_DIR / ns}", "iptables", "-w", "-A", "INPUT", "-p", "tcp",
                   "--dport", str(self._settings.agent_port), "!", "-s", self._gateway, "-j", "DROP")

    async def _forget_neighbour(self, address: str) -> None:
        """Drop the host's ARP entry for a cell address.

        A reused address would otherwise go to the old cell's MAC for as long as the
        kernel deems that entry reachable (15-45 s): the new agent looks dead that long.
        """
        await run("ip", "neigh", "flush", "to", address, "dev", self._settings.bridge, check=False)

    async def _start_agent(self, cell: _CellFile) -> None:
        cell_dir = self._dir / cell.id
        # The cell is the pod's host, as in a VM: namespaces of its own for IPC, PIDs and
        # mounts (with its own /proc), so that hostIPC and hostPID containers (no such
        # namespace in their spec: runc leaves them in the agent's) share the cell's,
        # never the node's. Mounts made in the cell stay there (the node's new mounts,
        # such as the kubelet's volumes, still reach it) and go with it. The spawner forks
        # the supervisor as the namespace's pid 1, in a session of its own and no child of
        # this service (a VM outlives the node's service); the whole namespace dies with
        # pid 1. Its command line reads as below: how the node finds a cell's processes.
        argv = [
            "supervise",
            "--listen", f"{cell.address}:{self._settings.agent_port}",
            "--tls-dir", str(cell_dir / "tls"),
            "--state-dir", str(cell_dir / "agent"),
            "--netns", str(NETNS_DIR / cell.netns),
            "--cgroup-parent", f"kiyot/{cell.id}",
            "--runtime", self._settings.runtime,
            # The runtime's state lives with the cell (its pids are the cell's), never in
            # the node's /run/runc: nothing on the node mistakes a cell's pid for its own.
            "--runtime-root", str(cell_dir / "runc"),
            "--log-max-size", str(self._settings.log_max_size),
        ]
        if self._shared_images is not None:  # a cell on this disk: the node unpacks each image once
            argv += ["--shared-images", str(self._shared_images)]
        pid = await self._spawner.spawn(argv, NETNS_DIR / cell.netns, cell_dir / "agent.log")
        crash_point("cell-supervisor-spawned")  # its pid not saved yet
        cell.supervisor_pid = pid
        self._write(cell)

    def _unrecorded_dirs(self) -> list[str]:
        if not self._dir.exists():
            return []
        return [d.name for d in self._dir.iterdir() if d.is_dir() and not (d / "cell.json").exists()]

    async def _teardown(self, cell_id: str) -> None:
        cell = self._read(cell_id)
        cell_dir = self._dir / cell_id
        if cell is None and not cell_dir.exists():
            return
        # Found by their command line, not by the pid on record: the node may have died
        # between spawning a supervisor and saving its pid. Like terminating a VM: no
        # grace; the containers go next, by the runtime.
        for pgid in {process_group(pid) for pid in agent_processes(cell_dir)} - {0}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        # The supervisor was the cell's pid 1: with it every process of the cell dies,
        # containers included, as with a VM's power cut.
        for _ in range(1000):  # bounded: 10 s
            if not agent_processes(cell_dir) and not cgroup_busy(f"kiyot/{cell_id}"):
                break
            await asyncio.sleep(0.01)
        await self._delete_containers(cell_dir)  # a cell made before cells had a PID namespace
        crash_point("cell-containers-killed")
        # A cell's own mounts go with its mount namespace; a cell made before cells had one
        # left its mounts (the pod's IPC namespace, bound on a file) on the node.
        for mount in mounts_under(cell_dir):
            await run("umount", "--lazy", mount, check=False)
        # Named after the cell (its token): a cell without its record is found too.
        netns, veth = (cell.netns, cell.veth) if cell is not None else (f"kiyot-{cell_id[1:]}", f"kv{cell_id[1:]}")
        if Path(NETNS_DIR / netns).exists():  # noqa: ASYNC240 - a stat of /run/netns, never blocks
            await run("ip", "netns", "del", netns, check=False)
        crash_point("cell-netns-gone")
        if Path(f"/sys/class/net/{veth}").exists():  # noqa: ASYNC240 - a sysfs stat, never blocks
            await run("ip", "link", "del", veth, check=False)
        if cell is not None:
            await self._forget_neighbour(cell.address)
        remove_cgroups(f"kiyot/{cell_id}")
        shutil.rmtree(cell_dir, ignore_errors=True)
        crash_point("cell-record-gone")  # the sandbox still names it
        log.info("cell deleted", cell=cell_id)

    async def _delete_containers(self, cell_dir: Path) -> None:
        """Containers of this cell in the node's own runtime state: those of a cell made
        before cells had PID namespaces of their own (and runtime state of their own), whose
        containers outlive their agent. A cell made since keeps none there."""
        runtime = self._settings.runtime  # the cells' own runtime (runc or crun), not always runc
        out = await run(runtime, "list", "--format", "json", check=False)
        for ctr in json.loads(out or "null") or []:
            if str(ctr.get("bundle", "")).startswith(str(cell_dir) + "/"):
                await run(runtime, "delete", "--force", ctr["id"], check=False)

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


def agent_processes(cell_dir: Path) -> list[int]:
    """Pids of the agent processes of a cell (its supervisor and the `serve` it forked),
    by their command line: `--state-dir <cell_dir>/agent`."""
    return running_agents().get(str(cell_dir / "agent"), [])


def running_agents() -> dict[str, list[int]]:
    """Every cell agent process on this host, by its --state-dir: one pass over /proc."""
    found: dict[str, list[int]] = {}
    for pid, args in cell_agent_processes():
        if b"--state-dir" in args[:-1]:
            state_dir = args[args.index(b"--state-dir") + 1].decode(errors="replace")
            found.setdefault(state_dir, []).append(pid)
    return found

