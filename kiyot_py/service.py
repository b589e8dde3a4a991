"""`kiyot-py serve`: wire the rooms together, serve until SIGTERM, leave cells running."""

from __future__ import annotations

import asyncio
import fcntl
import signal
import sys

import aiohttp
import structlog

from kiyot_py.config import ConfigError, Settings
from kiyot_py.cri.server import start_server
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.runtime import PodRuntime
from kiyot_py.providers.local import LocalProvider
from kiyot_py.registry.client import RegistryClient
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.pullpath import PullPath
from kiyot_py.store import Store

log = structlog.get_logger("kiyot.service")


def _reap_with_pidfds() -> None:
    """Python 3.11 reaps each child with a thread blocked in waitpid: one per live cell.

    A pidfd watcher needs no threads (3.12 does this by itself)."""
    if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)


async def serve(settings: Settings) -> None:
    _reap_with_pidfds()
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # One service per state directory: a second one would fight over the same cells.
    lock = open(settings.state_dir / "serve.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"another kiyot-py already serves {settings.state_dir}") from None

    store = Store(settings.state_dir / "state.db")
    provider = LocalProvider(settings.state_dir, settings.local)
    await provider.start()
    registries = RegistriesConfig.load(settings.registries_conf)
    registry = RegistryClient()
    pull_path = PullPath(registries)
    await pull_path.start(provider.gateway, settings.local.pull_path_port)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    runtime = PodRuntime(settings, store, provider, ImageManager(store, registry, registries), http)
    await runtime.recover()
    server = await start_server(settings.socket, runtime, settings.state_dir)
    log.info("serving", socket=str(settings.socket), state_dir=str(settings.state_dir),
             provider=provider.name, pull_path=provider.pull_path)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down; cells keep running")
    await server.stop(grace=5)
    await runtime.close()
    await pull_path.stop()
    await registry.close()
    await http.close()
    await provider.close()
    store.close()
    lock.close()
