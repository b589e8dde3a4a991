"""Undo what `kiyot-py serve` sets up on the host for local cells: the bridge and its fence.

The service leaves both in place on purpose (cells outlive it); tests and benchmarks that
ran a service on a bridge of their own remove them afterwards.
"""

from __future__ import annotations

import subprocess

from kiyot_py.providers.local import fence_chain


def remove_host_network(bridge: str) -> None:
    chain = fence_chain(bridge)
    for argv in (
        ["iptables", "-D", "INPUT", "-i", bridge, "-j", chain],
        ["iptables", "-F", chain],
        ["iptables", "-X", chain],
        ["ip", "link", "del", bridge],
    ):
        subprocess.run(argv, capture_output=True)
