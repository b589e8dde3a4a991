"""The host's network for end-to-end tests: undo what `kiyot-py serve` sets up for local
cells (the bridge and its fence), and the pieces the fence's tests probe it with.

The service leaves the bridge and its fence in place on purpose (cells outlive it); tests
and benchmarks that ran a service on a bridge of their own remove them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiyot_py.providers import local


def remove_host_network(bridge: str) -> None:
    asyncio.run(local.remove_host_network(bridge))


def sh(*argv: str, check: bool = True) -> str:
    out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def in_netns(netns: str | None) -> list[str]:
    """The argv prefix that runs a command in network namespace `netns` (None: the host's)."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []


# A TCP server that notes every connection it accepts (one line per client in `hits`)
# and answers an HTTP request with "canary". Its port goes to `ready` once it listens.
_CANARY = r"""
import os, socket, sys, threading
host, family, hits, ready = sys.argv[1:5]
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == "6":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] takes IPv4 too, as by default
s.bind((host, 0))
s.listen(64)
with open(ready + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
os.replace(ready + ".tmp", ready)
lock = threading.Lock()
def serve(conn, addr):
    with lock, open(hits, "a") as f:
        f.write(addr[0] + "\n")
    conn.settimeout(3)
    try:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\ncanary")
    except OSError:
        pass
    finally:
        conn.close()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""


@dataclass
class Canary:
    """A canary server on `host` (in `netns`, or on the host): who connected to it, ever."""

    name: str
    host: str
    workdir: Path
    netns: str | None = None
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def hits_file(self) -> Path:
        return self.workdir / f"{self.name}.hits"

    def start(self) -> Canary:
        ready = self.workdir / f"{self.name}.port"
        family = "6" if ":" in self.host else "4"
        self.proc = subprocess.Popen(
            [*in_netns(self.netns), sys.executable, "-c", _CANARY, self.host, family, str(self.hits_file), str(ready)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):  # bounded: 10 s
            if ready.exists():
                self.port = int(ready.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"canary {self.name} on {self.host} exited at start")
            time.sleep(0.05)
        raise RuntimeError(f"canary {self.name} on {self.host} did not listen")

    def hits(self) -> list[str]:
        return self.hits_file.read_text().splitlines() if self.hits_file.exists() else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


# Connects to each (host, port) at once, sends an HTTP request; for each: "canary" (a
# canary answered), "connected" (something else did) or "failed: <why>".
_PROBE = r"""
import json, socket, sys, threading
targets, out = json.loads(sys.argv[1]), {}
def probe(key, host, port):
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.settimeout(3)
            s.connect(address)
            out[key] = "connected"
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if b"canary" in data:
                out[key] = "canary"
    except OSError as exc:
        out.setdefault(key, f"failed: {exc}")
threads = [threading.Thread(target=probe, args=(k, h, p)) for k, (h, p) in targets.items()]
for t in threads:
    t.start()
for t in threads:
    t.join(20)
print(json.dumps(out))
"""


def probe(netns: str | None, targets: dict[str, tuple[str, int]]) -> dict[str, str]:
    """Connect from `netns` (None: the host) to every target, all at once (bounded: ~3 s)."""
    out = subprocess.run([*in_netns(netns), sys.executable, "-c", _PROBE, json.dumps(targets)],
                         check=True, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


@dataclass
class BehindNode:
    """A network namespace behind the node, as the cloud's metadata service is: reached
    through a veth pair whose host end holds `host_cidrs`, its own end `ns_cidrs`."""

    netns: str
    veth: str
    host_cidrs: tuple[str, ...]
    ns_cidrs: tuple[str, ...]
    routes: tuple[tuple[str, str], ...] = ()  # (destination, via) inside the namespace

    def create(self) -> BehindNode:
        self.remove()  # what a run cut short left behind
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        for cidr in self.host_cidrs:
            sh("ip", "addr", "add", cidr, "dev", self.veth)
        for cidr in self.ns_cidrs:
            sh("ip", "-n", self.netns, "addr", "add", cidr, "dev", "eth0")
        sh("ip", "link", "set", self.veth, "up")
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        for destination, via in self.routes:
            sh("ip", "-n", self.netns, "route", "add", destination, "via", via)
        return self

    def remove(self) -> None:
        if Path(f"/run/netns/{self.netns}").exists():
            sh("ip", "netns", "del", self.netns, check=False)  # takes eth0, and with it the pair
        if Path(f"/sys/class/net/{self.veth}").exists():
            sh("ip", "link", "del", self.veth, check=False)


@contextlib.contextmanager
def sysctls(values: dict[str, str]):
    """Set `/proc/sys` values (e.g. "net/ipv4/conf/kiyott0/forwarding") for a while."""
    saved: dict[str, str] = {}
    try:
        for key, value in values.items():
            path = Path("/proc/sys") / key
            saved[key] = path.read_text().strip()
            path.write_text(value)
        yield
    finally:
        for key, value in saved.items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / key).write_text(value)


def host_addresses(family: str, exclude_dev: str) -> list[str]:
    """The host's own global addresses ("4" or "6"), but for those on `exclude_dev`."""
    found = []
    for line in sh("ip", "-j", f"-{family}", "addr", "show", "scope", "global").splitlines() or ["[]"]:
        for link in json.loads(line):
            if link["ifname"] != exclude_dev:
                found += [a["local"] for a in link.get("addr_info", []) if "local" in a]  # ip lists {} too
    return found


def link_local(dev: str, netns: str | None = None) -> str | None:
    """The fe80:: address of `dev`, if it has one (and it is past DAD)."""
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "-6", "addr", "show", "dev", dev, "scope", "link"]
    for link in json.loads(sh(*argv, check=False) or "[]"):
        for a in link.get("addr_info", []):
            if "local" in a and not a.get("tentative"):
                return str(a["local"])
    return None


def mac(dev: str) -> str:
    return Path(f"/sys/class/net/{dev}/address").read_text().strip()
