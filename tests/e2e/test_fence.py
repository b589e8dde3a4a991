"""The trust boundary: a pod reaches nothing of the node, by any route, over v4 or v6.

Canaries listen on the host (127.0.0.1, [::], 0.0.0.0) and on a link-local address behind
the node (169.254.77.1, as cloud metadata is at 169.254.169.254); from inside a pod's cell
none of them is ever connected to, while the same probes from the host reach them all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiyot_py.config import LocalCellSettings
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from tests.support.hostnet import BehindNode, Canary, host_addresses, link_local, mac, probe, sh, sysctls

from .conftest import BRIDGE, SUBNET
from .helpers import cell_dir, container_config, remove_pod, sandbox_config, start, wait_for, wait_state

GATEWAY = "10.123.0.1"
assert SUBNET == "10.123.0.0/24"
PULL_PORT = LocalCellSettings().pull_path_port
# Behind the node: a link-local network (the metadata service's kind) and a routed one
# (the wider network the node forwards a pod's packets to, the control).
BEHIND = BehindNode(
    netns="kiyot-fence-behind", veth="kfence0",
    host_cidrs=("169.254.77.2/24", "198.18.77.2/24"), ns_cidrs=("169.254.77.1/24", "198.18.77.1/24"),
    routes=((SUBNET, "198.18.77.2"),),  # replies to the cells go back through the node
)
LINK_LOCAL_CANARY, ROUTED_CANARY = "169.254.77.1", "198.18.77.1"
# Addresses only the node's DNAT gives a meaning to (inside 198.18.77.0/24, which is ours).
DNAT_TO_ROUTED, DNAT_TO_NODE = "198.18.77.9", "198.18.77.10"


def cell_netns(service, sandbox_id: str) -> str:
    return json.loads((cell_dir(service.state_dir, sandbox_id) / "cell.json").read_text())["netns"]


def nat(op: str, rule: list[str]) -> None:
    sh("iptables", "-t", "nat", op, "PREROUTING", *(["1"] if op == "-I" else []), *rule)


def test_a_cell_reaches_nothing_of_the_node(service, pod, tmp_path):
    netns = cell_netns(service, pod[0])
    cell = ["ip", "-n", netns]
    # The cell has no IPv6 on its link (both ends), only ::1 on loopback.
    assert "inet6" not in sh(*cell, "addr", "show", "dev", "eth0")
    assert "::1/128" in sh(*cell, "addr", "show", "dev", "lo")
    veth = json.loads((cell_dir(service.state_dir, pod[0]) / "cell.json").read_text())["veth"]
    assert Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").read_text().strip() == "1"

    canaries: list[Canary] = []
    dnat = [
        ["-i", BRIDGE, "-d", DNAT_TO_ROUTED, "-p", "tcp", "--dport", "7001", "-j", "DNAT"],
        ["-i", BRIDGE, "-d", GATEWAY, "-p", "tcp", "--dport", "7002", "-j", "DNAT"],
        ["-i", BRIDGE, "-d", DNAT_TO_NODE, "-p", "tcp", "--dport", "7003", "-j", "DNAT"],
    ]
    added: list[list[str]] = []
    try:
        BEHIND.create()
        lo4 = Canary("lo4", "127.0.0.1", tmp_path).start()
        any6 = Canary("any6", "::", tmp_path).start()
        any4 = Canary("any4", "0.0.0.0", tmp_path).start()  # noqa: S104 - the point: every interface
        meta = Canary("linklocal", LINK_LOCAL_CANARY, tmp_path, netns=BEHIND.netns).start()
        routed = Canary("routed", ROUTED_CANARY, tmp_path, netns=BEHIND.netns).start()
        canaries += [lo4, any6, any4, meta, routed]
        host_side = [lo4, any6, any4, meta]  # what no cell may ever reach

        # DNAT on the node: one to the wider network (allowed), one from the node's own
        # address to it (a NodePort's kind: the node is reached), one to the node.
        targets = [f"{ROUTED_CANARY}:{routed.port}", f"{ROUTED_CANARY}:{routed.port}", f"{GATEWAY}:{any4.port}"]
        for rule, to in zip(dnat, targets, strict=True):
            nat("-I", [*rule, "--to-destination", to])
            added.append([*rule, "--to-destination", to])

        # A pod with CAP_NET_ADMIN could turn IPv6 back on and point a route at the node.
        bridge_ll = wait_for(lambda: link_local(BRIDGE), 10)  # past DAD, once the bridge has a port
        assert bridge_ll, "the bridge has no IPv6 link-local address to probe"
        in_cell = ["nsenter", f"--net=/run/netns/{netns}", "--", "sysctl", "-q", "-w"]
        sh(*in_cell, "net.ipv6.conf.eth0.accept_dad=0")
        sh(*in_cell, "net.ipv6.conf.eth0.disable_ipv6=0")
        assert wait_for(lambda: link_local("eth0", netns), 10)
        sh(*cell, "-6", "neigh", "replace", bridge_ll, "lladdr", mac(BRIDGE), "dev", "eth0", "nud", "permanent")
        sh(*cell, "-6", "route", "replace", "default", "via", bridge_ll, "dev", "eth0")

        others4 = host_addresses("4", BRIDGE)
        others6 = host_addresses("6", BRIDGE)
        assert "169.254.77.2" in others4
        with sysctls({f"net/ipv4/conf/{BRIDGE}/forwarding": "1", f"net/ipv4/conf/{BEHIND.veth}/forwarding": "1"}):
            forbidden = {
                "gateway, 0.0.0.0": (GATEWAY, any4.port),
                "gateway, [::]": (GATEWAY, any6.port),
                "gateway, 127.0.0.1": (GATEWAY, lo4.port),
                "bridge fe80, [::]": (f"{bridge_ll}%eth0", any6.port),
                "link-local behind the node (forwarded)": (LINK_LOCAL_CANARY, meta.port),
                "DNAT from the node's address": (GATEWAY, 7002),
                "DNAT to the node": (DNAT_TO_NODE, 7003),
                "the cell's own 127.0.0.1": ("127.0.0.1", lo4.port),
            }
            for address in others4:
                forbidden[f"host {address}, 0.0.0.0"] = (address, any4.port)
                forbidden[f"host {address}, [::]"] = (address, any6.port)
            for address in others6:
                forbidden[f"host {address}, [::]"] = (address, any6.port)
            allowed = {
                "the pull path": (GATEWAY, PULL_PORT),
                "the wider network (forwarded)": (ROUTED_CANARY, routed.port),
                "DNAT to the wider network": (DNAT_TO_ROUTED, 7001),
            }
            from_cell = probe(netns, {**forbidden, **allowed})

            assert {k: v for k, v in from_cell.items() if k in forbidden and not v.startswith("failed")} == {}
            assert from_cell["the pull path"] == "connected", from_cell
            assert from_cell["the wider network (forwarded)"] == "canary", from_cell
            assert from_cell["DNAT to the wider network"] == "canary", from_cell
            assert {c.name: c.hits() for c in host_side} == {c.name: [] for c in host_side}
            assert len(routed.hits()) == 2  # the two allowed probes, not the DNAT from the node's address

            # The pull path from the node's other interfaces: the LAN (here: behind it).
            from_lan = probe(BEHIND.netns, {"pull path": (GATEWAY, PULL_PORT), "0.0.0.0 on the gateway": (
                GATEWAY, any4.port)})
            assert from_lan["pull path"].startswith("failed"), from_lan
            assert from_lan["0.0.0.0 on the gateway"] == "canary", from_lan  # the route there works

        # The control: from the host, the very same canaries answer.
        from_host = probe(None, {
            "127.0.0.1": ("127.0.0.1", lo4.port),
            "[::] over bridge fe80": (f"{bridge_ll}%{BRIDGE}", any6.port),
            "[::] over the gateway": (GATEWAY, any6.port),
            "0.0.0.0 over the gateway": (GATEWAY, any4.port),
            **{f"0.0.0.0 over {a}": (a, any4.port) for a in others4},
            **{f"[::] over {a}": (a, any6.port) for a in others6},
            "link-local behind the node": (LINK_LOCAL_CANARY, meta.port),
        })
        assert set(from_host.values()) == {"canary"}, from_host
        assert all(c.hits() for c in host_side)
    finally:
        for rule in added:
            nat("-D", rule)
        for canary in canaries:
            canary.stop()
        BEHIND.remove()


def readable(pid: int | str) -> bool:
    try:
        os.readlink(f"/proc/{pid}/ns/ipc")
    except PermissionError:  # pid 1 of a sandbox we run inside
        return False
    return True


def test_a_host_ipc_container_gets_the_cells_ipc_namespace_not_the_nodes(service, cri, img, test_images, tmp_path):
    config = sandbox_config("host-ipc", tmp_path)
    host_ipc = pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.NODE)
    config.linux.security_context.namespace_options.CopyFrom(host_ipc)  # hostIPC: true, as the kubelet sends it
    sandbox_id = cri.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    try:
        ref = test_images["busybox"].ref
        img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
        cid = start(cri, (sandbox_id, config), container_config(
            "host-ipc", ref, ["sleep", "3600"],
            linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                namespace_options=host_ipc))))
        assert wait_state(cri, cid, pb.CONTAINER_RUNNING).state == pb.CONTAINER_RUNNING
        readlink = ["busybox", "readlink", "/proc/self/ns/ipc"]  # the image has no readlink link
        r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=readlink, timeout=10))
        assert r.exit_code == 0, r.stderr
        seen = r.stdout.decode().strip()
        assert seen.startswith("ipc:[")
        # The node's: init's (when this sandbox lets us see it), kiyot-py serve's, ours.
        node = {os.readlink(f"/proc/{pid}/ns/ipc") for pid in (1, service.proc.pid, "self") if readable(pid)}
        assert len(node) == 1 and seen not in node, (seen, node)
        # It is the cell's: its agent supervisor's, which still passes for the supervisor.
        cell = json.loads((cell_dir(service.state_dir, sandbox_id) / "cell.json").read_text())
        assert os.readlink(f"/proc/{cell['supervisor_pid']}/ns/ipc") == seen
        cmdline = Path(f"/proc/{cell['supervisor_pid']}/cmdline").read_bytes().split(b"\0")
        assert b"kiyot_cell.cli" in cmdline and b"supervise" in cmdline
    finally:
        remove_pod(cri, sandbox_id)
