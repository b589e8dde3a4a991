"""Undo what `kiyot-py serve` sets up on the host for local cells: the bridge and its fence.

The service leaves both in place on purpose (cells outlive it); tests and benchmarks that
ran a service on a bridge of their own remove them afterwards.
"""

from __future__ import annotations

import asyncio

from kiyot_py.providers import local


def remove_host_network(bridge: str) -> None:
    asyncio.run(local.remove_host_network(bridge))
