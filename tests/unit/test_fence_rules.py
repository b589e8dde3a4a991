"""The host fence's rules, as pure functions of the settings: what is dropped, in what order."""

from __future__ import annotations

import ipaddress

import pytest

from kiyot_py.config import ConfigError, LocalCellSettings, Settings
from kiyot_py.providers.local import (
    FenceChain,
    deny_networks,
    fence_chain,
    fence_restore,
    fence_rules,
    forward_chain,
    jumps_in,
    prerouting_chain,
    pull_guard_chain,
)

BRIDGE, GATEWAY, SUBNET = "kiyot0", "10.89.0.1", "10.89.0.0/16"
PULL = ("-d", "10.89.0.1/32", "-p", "tcp", "-m", "tcp", "--dport", "5380")


def fence(deny: str = ""):
    return fence_rules(BRIDGE, GATEWAY, SUBNET, 5380, 9276, deny_networks(deny))


def chain(chains: tuple[FenceChain, ...], name: str) -> FenceChain:
    (found,) = [c for c in chains if c.name == name]
    return found


def test_chain_names_fit_iptables_and_differ():
    names = [f(b) for b in ("kiyot0", "x" * 15) for f in
             (fence_chain, forward_chain, pull_guard_chain, prerouting_chain)]
    assert all(len(n) <= 28 for n in names)
    assert len(set(names)) == len(names)
    assert forward_chain("kiyot0") == "KIYOT-kiyot0-FWD"


def test_input_accepts_replies_and_the_pull_path_then_drops_the_rest():
    c = chain(fence().v4, fence_chain(BRIDGE))
    assert (c.table, c.hook, c.jump) == ("filter", "INPUT", ("-i", BRIDGE, "-j", "KIYOT-kiyot0"))
    assert c.rules == (
        ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
        (*PULL, "-j", "ACCEPT"),
        ("-j", "DROP"),
    )


def test_the_pull_path_is_dropped_from_every_other_interface_but_the_nodes_own_store():
    c = chain(fence().v4, pull_guard_chain(BRIDGE))
    assert (c.table, c.hook, c.match) == ("filter", "INPUT", ("!", "-i", BRIDGE))
    assert c.rules == (("-i", "lo", "-s", "10.89.0.1/32", *PULL, "-j", "RETURN"), (*PULL, "-j", "DROP"))


def test_new_connections_to_the_node_drop_before_dnat():
    c = chain(fence().v4, prerouting_chain(BRIDGE))
    assert (c.table, c.hook, c.match) == ("mangle", "PREROUTING", ("-i", BRIDGE))
    assert c.rules[0] == ("-m", "addrtype", "!", "--dst-type", "LOCAL", "-j", "RETURN")
    assert c.rules[-1] == ("-j", "DROP")
    assert (*PULL, "-j", "RETURN") in c.rules


def test_forward_drops_link_local_the_node_multicast_and_the_denied_in_order():
    c = chain(fence("10.0.0.0/8, 192.168.0.0/16,fd00::/8").v4, forward_chain(BRIDGE))
    assert (c.table, c.hook, c.jump) == ("filter", "FORWARD", ("-i", BRIDGE, "-j", "KIYOT-kiyot0-FWD"))
    assert c.rules == (
        ("-o", BRIDGE, "-p", "tcp", "-m", "tcp", "--dport", "9276", "-j", "DROP"),  # no cell reaches another's agent
        ("-o", BRIDGE, "-j", "RETURN"),  # otherwise cell to cell, on the bridge
        ("!", "-s", SUBNET, "-j", "DROP"),
        ("-d", "169.254.0.0/16", "-j", "DROP"),
        ("-m", "addrtype", "--dst-type", "LOCAL", "-j", "DROP"),
        ("-m", "addrtype", "--dst-type", "BROADCAST", "-j", "DROP"),
        ("-d", "224.0.0.0/4", "-j", "DROP"),
        ("-d", "10.0.0.0/8", "-j", "DROP"),
        ("-d", "192.168.0.0/16", "-j", "DROP"),
    )
    # Nothing ACCEPTs: what passes goes back to FORWARD, under the node's own policy.
    assert not [r for r in c.rules if r[-1] == "ACCEPT"]


def test_ipv6_only_replies_come_in_and_nothing_is_forwarded():
    v6 = fence("fd00::/8").v6
    assert [(c.hook, c.name) for c in v6] == [("INPUT", "KIYOT-kiyot0"), ("FORWARD", "KIYOT-kiyot0-FWD")]
    assert chain(v6, fence_chain(BRIDGE)).rules == (
        ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"), ("-j", "DROP"))
    assert chain(v6, forward_chain(BRIDGE)).rules == (("-d", "fd00::/8", "-j", "DROP"), ("-j", "DROP"))
    assert all(c.match == ("-i", BRIDGE) for c in v6)


def test_restore_rebuilds_chains_and_puts_the_jumps_first_in_one_transaction():
    stale = [("filter", "-A INPUT -i kiyot0 -j KIYOT-kiyot0"),
             ("mangle", "-A PREROUTING -i kiyot0 -j KIYOT-kiyot0-PRE")]
    text = fence_restore(fence().v4, stale).splitlines()
    assert text[0] == "*filter" and text.count("COMMIT") == 2 and "*mangle" in text
    filt = text[:text.index("COMMIT") + 1]
    assert ":KIYOT-kiyot0 - [0:0]" in filt  # declared: created, or flushed if it was there
    # The old jump goes in the same transaction as the new one comes first.
    assert "-D INPUT -i kiyot0 -j KIYOT-kiyot0" in filt
    assert filt.index("-D INPUT -i kiyot0 -j KIYOT-kiyot0") < filt.index("-I INPUT 1 -i kiyot0 -j KIYOT-kiyot0")
    assert "-I INPUT 1 ! -i kiyot0 -j KIYOT-kiyot0-PULL" in filt
    assert "-I FORWARD 1 -i kiyot0 -j KIYOT-kiyot0-FWD" in filt
    assert filt.index("-A KIYOT-kiyot0 -j DROP") < filt.index("-I INPUT 1 -i kiyot0 -j KIYOT-kiyot0")
    mangle = text[text.index("*mangle"):]
    assert "-D PREROUTING -i kiyot0 -j KIYOT-kiyot0-PRE" in mangle
    assert mangle[-2:] == ["-I PREROUTING 1 -i kiyot0 -j KIYOT-kiyot0-PRE", "COMMIT"]


def test_jumps_are_found_by_their_target_only():
    listing = "\n".join([
        "-P INPUT ACCEPT",
        "-A INPUT -j DOCKER-USER",
        "-A INPUT -i kiyot0 -j KIYOT-kiyot0",
        "-A INPUT ! -i kiyot0 -j KIYOT-kiyot0-PULL",
        "-A INPUT -i kiyot0 -j KIYOT-kiyot0",
        "-A INPUT -i kiyot00 -j KIYOT-kiyot00",
    ])
    assert jumps_in(listing, ["KIYOT-kiyot0", "KIYOT-kiyot0-PULL"]) == [
        "-A INPUT -i kiyot0 -j KIYOT-kiyot0", "-A INPUT ! -i kiyot0 -j KIYOT-kiyot0-PULL",
        "-A INPUT -i kiyot0 -j KIYOT-kiyot0"]


def test_deny_egress_is_validated_entry_by_entry():
    ok = Settings(local=LocalCellSettings(deny_egress=" 10.0.0.0/8,, fd00::/8 ,192.0.2.7"))
    ok.validate()
    assert deny_networks(ok.local.deny_egress) == [
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"), ipaddress.ip_network("192.0.2.7/32")]
    for bad in ("10.0.0.0/33", "example.com", "10.0.0.1/8"):
        with pytest.raises(ConfigError, match=r"local\.deny_egress: .*is not a CIDR"):
            Settings(local=LocalCellSettings(deny_egress=f"172.16.0.0/12,{bad}")).validate()
