"""`kiyot-py serve`: wire the rooms together, serve until SIGTERM, leave cells running."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import IO

import aiohttp
import structlog

from kiyot_cell.tls import small_read_buffers
from kiyot_py import enrollment
from kiyot_py.agent_client import AgentClient
from kiyot_py.config import ConfigError, Settings
from kiyot_py.cri.server import start_server
from kiyot_py.model import Cell
from kiyot_py.pki import NodePKI
from kiyot_py.platforms import Platform
from kiyot_py.pods import shared_images
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.runtime import PodRuntime
from kiyot_py.pods.shared_images import SharedImages
from kiyot_py.providers import make_provider
from kiyot_py.registry.client import RegistryClient
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.content import ContentStore
from kiyot_py.registry.pullpath import PullGrants, PullPath
from kiyot_py.store import Store
from kiyot_py.streaming.server import StreamingServer

log = structlog.get_logger("kiyot.service")


def _reap_with_pidfds() -> None:
    """Python 3.11 reaps each child with a thread blocked in waitpid: one per live cell.

    A pidfd watcher needs no threads (3.12 does this by itself)."""
    if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)


STORE_FILE = "state.db"
NODE_ID_FILE = "node-id"  # the node's id: the cells' tags and launch tokens name it
PKI_DIR = "pki"  # the node's CA and client certificate (keys 0600)
CONTENT_DIR = "content"  # every image's blobs, served to the cells by the pull path


def _lock_state_dir(settings: Settings) -> IO[str]:
    """One service per state directory: a second one would fight over the same cells."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(settings.state_dir / "serve.lock", "w")  # noqa: SIM115 - held (and locked) for the service's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(f"a kiyot-py service is running on {settings.state_dir}; stop it first") from None
    return lock


def persisted_node_id(settings: Settings) -> str:
    """The node's id, kept in the state directory from the first start on: the cells' tags
    and launch tokens carry it, so that a node renamed later still knows its own cells (and
    collects their orphans) and never launches a second cell for a pod it launched before."""
    path = settings.state_dir / NODE_ID_FILE
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if not kept:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(settings.node_name + "\n")
        os.replace(tmp, path)
        return settings.node_name
    if kept != settings.node_name:
        log.warning("node_name differs from the node id this state directory was made with; keeping the id",
                    node_name=settings.node_name, node_id=kept, file=str(path))
    return kept


async def serve(settings: Settings) -> None:
    _reap_with_pidfds()
    small_read_buffers()  # two TLS streams to every cell's agent
    lock = _lock_state_dir(settings)
    settings.node_name = persisted_node_id(settings)
    store = Store(settings.state_dir / STORE_FILE)
    pki = NodePKI(settings.state_dir / PKI_DIR, settings.node_name)
    provider = make_provider(settings, pki, shared_images.unpacked_dir(settings.state_dir))
    await provider.start()
    registries = RegistriesConfig.load(settings.registries_conf)
    registry = RegistryClient()
    # The layers, for the cells' pull path; cells that pull from the registries (EC2) need
    # none of them on the node.
    content = ContentStore(settings.state_dir / CONTENT_DIR) if provider.pull_path is not None else None
    grants = PullGrants()
    pull_path: PullPath | None = None
    if provider.pull_path is not None:
        where = provider.pull_path
        assert content is not None
        pull_path = PullPath(content, grants, pki.pull_path_context([where.host]))
        await pull_path.start(where.host, where.port)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    images = ImageManager(store, registry, registries, content,
                          default_platform=Platform("linux", provider.default_architecture))
    def enroll(cell: Cell, console: Callable[[], Awaitable[str]]) -> Awaitable[None]:
        url = urllib.parse.urlsplit(cell.agent_url)
        return enrollment.enroll(http, url.hostname or cell.address, url.port or 443, pki, cell.id, console)

    shared: SharedImages | None = None  # one unpack per image on the node, for cells on its disk
    if pull_path is not None and provider.pull_path is not None and provider.features.shares_node_disk:
        assert content is not None
        shared = SharedImages(settings.state_dir, pki, provider.pull_path, grants, content)
    runtime = PodRuntime(settings, store, provider, images, grants=grants, enroll=enroll, shared_images=shared,
                         agents=lambda cell: AgentClient(http, cell.agent_url, pki.client_context(), cell.server_name))
    await runtime.start()
    streaming = StreamingServer(runtime.streams, settings.streaming.address, settings.streaming.port)
    await streaming.start()
    server = await start_server(settings.socket, runtime, settings.state_dir, streaming)
    log.info("serving", socket=str(settings.socket), state_dir=str(settings.state_dir),
             provider=provider.name, pull_path=str(provider.pull_path))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down; cells keep running")
    await server.stop(grace=5)
    await streaming.close()
    await runtime.close()
    if pull_path is not None:
        await pull_path.stop()
    await registry.close()
    await http.close()
    await provider.close()
    store.close()
    lock.close()


async def reset(settings: Settings) -> int:
    """Take this node's cells down for good (their containers die), undo what the provider
    set up on the host, and forget every sandbox, container and image; the number of cells."""
    lock = _lock_state_dir(settings)
    try:
        if (settings.state_dir / NODE_ID_FILE).exists():
            settings.node_name = persisted_node_id(settings)
        cells = await make_provider(settings, NodePKI(settings.state_dir / PKI_DIR, settings.node_name)).reset()
        for suffix in ("", "-wal", "-shm"):
            (settings.state_dir / f"{STORE_FILE}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(settings.state_dir / CONTENT_DIR, ignore_errors=True)  # the images go with their records
        log.info("reset", state_dir=str(settings.state_dir), cells_deleted=cells)
        return cells
    finally:
        lock.close()
