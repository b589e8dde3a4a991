"""The boot contract of a cell that is a VM of its own (EC2): one source for both sides.

The node launches the instance with `UserData` (below, JSON) as its user data. In the
instance, `kiyot-cell boot` (the cell image's unit; the EC2 simulator runs the same
command in each simulated instance, as cloud-init would) reads it from the instance
metadata service (IMDSv2: a session token first, then the user data, the instance id and
the private address), and then:

1. keeps the node's CA certificate (public) as the only CA whose node may call;
2. makes the cell's own key at first boot (identity.py) and prints its fingerprint on the
   console, one line: `kiyot-cell identity sha256:<hex>`; the node reads it with
   GetConsoleOutput and enrolls that key, and no other, over the agent's TLS port;
3. gives the pod a network namespace of its own at the instance's second private address
   (the pod IP), from which nothing of the instance is reached (the agent's API, the
   metadata service and the instance role's credentials), and serves the agent on the
   primary address under `supervise`.

Nothing in the user data is secret: it holds no key, no token, nothing that lets anyone
act as the node or as the cell.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from . import identity, log

USER_DATA_VERSION = 1
USER_DATA_MAX = 16 * 1024  # EC2's limit on user data
DEFAULT_ROOT = Path("/var/lib/kiyot-cell")
DEFAULT_IMDS = "http://169.254.169.254"
IMDS_TOKEN_TTL = 300


class BootError(RuntimeError):
    pass


@dataclass(frozen=True)
class UserData:
    """What the node tells a cell at launch (its user data, JSON)."""

    node: str  # the node's name, as its client certificate names it
    ca: str  # the node's CA certificate, PEM
    agent_port: int = 9276
    log_max_size: int = 10 * 1024 * 1024
    runtime: str = "runc"

    def encode(self) -> bytes:
        data = json.dumps({"kiyot-cell": USER_DATA_VERSION, **asdict(self)}, sort_keys=True).encode()
        if len(data) > USER_DATA_MAX:
            raise ValueError(f"user data is {len(data)} bytes, over EC2's {USER_DATA_MAX}")
        return data

    @classmethod
    def decode(cls, raw: bytes) -> UserData:
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise BootError(f"the user data is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("kiyot-cell") != USER_DATA_VERSION:
            raise BootError(f"the user data is not kiyot-cell user data of version {USER_DATA_VERSION}")
        try:
            return cls(node=str(doc["node"]), ca=str(doc["ca"]), agent_port=int(doc.get("agent_port", 9276)),
                       log_max_size=int(doc.get("log_max_size", 10 * 1024 * 1024)),
                       runtime=str(doc.get("runtime", "runc")))
        except (KeyError, TypeError, ValueError) as e:
            raise BootError(f"the user data lacks or mangles {e}") from None


@dataclass(frozen=True)
class InstanceFacts:
    instance_id: str
    private_address: str  # the primary one: the agent's
    user_data: UserData
    pod_address: str = ""  # the second private address of the primary interface: the pod's


class Metadata:
    """An IMDSv2 client: every read carries a session token got by PUT."""

    def __init__(self, base: str, timeout: float = 2.0) -> None:
        if not base.startswith("http://"):
            raise BootError(f"the metadata service is plain HTTP, got {base!r}")
        self._base = base.rstrip("/")
        self._timeout = timeout
        self._token = ""

    def _call(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        req = urllib.request.Request(self._base + path, method=method, headers=headers)  # noqa: S310 - http only, above
        with urllib.request.urlopen(req, timeout=self._timeout) as resp:  # noqa: S310
            return bytes(resp.read())

    def get(self, path: str) -> bytes:
        if not self._token:
            self._token = self._call("PUT", "/latest/api/token",
                                     {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)}).decode()
        return self._call("GET", path, {"X-aws-ec2-metadata-token": self._token})

    def instance(self, attempts: int = 60) -> InstanceFacts:
        """The instance's facts; the service may need a moment at boot (bounded retries)."""
        error: Exception | None = None
        for _ in range(attempts):
            try:
                primary = self.get("/latest/meta-data/local-ipv4").decode()
                mac = self.get("/latest/meta-data/mac").decode().strip()
                addresses = self.get(f"/latest/meta-data/network/interfaces/macs/{mac}/local-ipv4s").decode().split()
                return InstanceFacts(
                    instance_id=self.get("/latest/meta-data/instance-id").decode(),
                    private_address=primary,
                    user_data=UserData.decode(self.get("/latest/user-data")),
                    pod_address=next((a for a in addresses if a != primary), ""),
                )
            except (urllib.error.URLError, OSError) as e:
                error = e
                self._token = ""
                time.sleep(0.5)
        raise BootError(f"the metadata service did not answer: {error}")


def fence_agent_port(port: int) -> None:
    """The pod shares the instance's network: its containers reach the instance's own
    addresses over loopback. That way, never to the agent's port (the node comes in from
    the outside, on the instance's interface)."""
    rule = ["INPUT", "-i", "lo", "-p", "tcp", "-m", "tcp", "--dport", str(port), "-j", "DROP"]
    if subprocess.run(["iptables", "-C", *rule], check=False, capture_output=True).returncode != 0:
        subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)


POD_NETNS = "netns/pod"  # under the cell's root: the pod's network namespace, bound on a file
POD_VETH = "kpod0"  # the instance's end of the pod's link


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _iptables_once(*rule: str) -> None:
    if _sh("iptables", "-C", *rule, check=False).returncode != 0:
        _sh("iptables", "-A", *rule)


def pod_network(root: Path, pod_address: str, uplink: str) -> Path:
    """The pod's own network namespace, at the instance's second private address.

    The agent stays in the instance's namespace with the primary address; the pod's
    containers (hostNetwork ones too: the cell is their host) get a namespace of their own,
    whose eth0 holds the pod address (/32, every destination on-link), linked to the
    instance by a veth. The instance routes the pod address to it and answers ARP for it on
    its uplink. From the pod's link the instance takes nothing but replies: no packet of the
    pod reaches the instance's own addresses (the agent's API, the metadata service where it
    is local) nor is forwarded to link-local ones (the metadata service, the instance
    role's credentials).
    """
    netns = root / POD_NETNS
    if _sh("nsenter", f"--net={netns}", "true", check=False).returncode == 0:
        return netns  # the pod's namespace is there already (the agent is booting again)
    netns.parent.mkdir(parents=True, exist_ok=True)
    netns.touch()
    _sh("unshare", f"--net={netns}", "true")  # a namespace kept by a bind mount on the file
    in_pod = ["nsenter", f"--net={netns}"]
    _sh("ip", "link", "del", POD_VETH, check=False)
    _sh(*in_pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", POD_VETH, "netns", "1")
    _sh(*in_pod, "ip", "addr", "add", f"{pod_address}/32", "dev", "eth0")
    _sh(*in_pod, "ip", "link", "set", "lo", "up")
    _sh(*in_pod, "ip", "link", "set", "eth0", "up")
    _sh(*in_pod, "ip", "route", "add", "default", "dev", "eth0")
    _sh("ip", "link", "set", POD_VETH, "up")
    _sh("sysctl", "-q", "-w", f"net.ipv4.conf.{POD_VETH}.proxy_arp=1", "net.ipv4.ip_forward=1")
    _sh("ip", "route", "replace", f"{pod_address}/32", "dev", POD_VETH)
    _sh("ip", "neigh", "replace", "proxy", pod_address, "dev", uplink)
    _iptables_once("INPUT", "-i", POD_VETH, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
    _iptables_once("INPUT", "-i", POD_VETH, "-j", "DROP")
    _iptables_once("FORWARD", "-i", POD_VETH, "-d", "169.254.0.0/16", "-j", "DROP")
    return netns


def uplink_of(address: str) -> str:
    """The interface that holds `address` (the instance's primary one)."""
    for line in _sh("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3].split("/")[0] == address:
            return fields[1]
    raise BootError(f"no interface holds {address}")


def prepare(root: Path, facts: InstanceFacts) -> str:
    """The cell's TLS directory made ready from the user data; the key's fingerprint."""
    tls_dir = root / "tls"
    key = identity.ensure_key(tls_dir)
    (tls_dir / identity.CA).write_text(facts.user_data.ca)
    identity.ensure_provisional(tls_dir, key)
    return identity.spki_fingerprint(key.public_key())


def agent_argv(root: Path, facts: InstanceFacts, runtime_root: Path | None, cgroup_parent: str,
               pod_netns: Path | None) -> list[str]:
    """The `supervise` arguments the boot hands over to."""
    ud = facts.user_data
    argv = [
        "supervise", "--listen", f"{facts.private_address}:{ud.agent_port}",
        "--tls-dir", str(root / "tls"), "--state-dir", str(root / "agent"),
        "--cgroup-parent", cgroup_parent, "--runtime", ud.runtime, "--log-max-size", str(ud.log_max_size),
        "--direct-pulls",  # a VM of its own fetches its images from the registries
    ]
    if runtime_root is not None:
        argv += ["--runtime-root", str(runtime_root)]
    if pod_netns is not None:
        argv += ["--netns", str(pod_netns)]
    return argv


def boot(root: Path, imds: str, runtime_root: Path | None, cgroup_parent: str) -> list[str]:
    """Everything up to serving: the `supervise` arguments to run next."""
    lg = log.get("boot")
    facts = Metadata(imds).instance()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fingerprint = prepare(root, facts)
    # The console is where the node looks (GetConsoleOutput): stdout is the console here.
    print(f"{identity.CONSOLE_PREFIX}{fingerprint}", flush=True)
    if not shutil.which("iptables"):
        raise BootError("no iptables: the pod could reach the agent's port and the metadata service")
    fence_agent_port(facts.user_data.agent_port)
    pod_netns = None
    if facts.pod_address:
        pod_netns = pod_network(root, facts.pod_address, uplink_of(facts.private_address))
    else:
        # One address only: the pod shares the instance's network, and the metadata
        # service (the instance role's credentials) is within its reach.
        print("kiyot-cell boot: the instance has no second private address: the pod shares its network",
              file=sys.stderr)
    lg.info("booted", instance=facts.instance_id, address=facts.private_address, pod_address=facts.pod_address,
            node=facts.user_data.node, enrolled=identity.enrolled(root / "tls"))
    return agent_argv(root, facts, runtime_root, cgroup_parent, pod_netns)
