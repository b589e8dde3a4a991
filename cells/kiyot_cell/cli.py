"""kiyot-cell: the cell agent's command line (`serve`, `supervise`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from . import __version__, log
from .config import AgentConfig
from .runtime import die_with_parent

DESCRIPTION = """\
The kiyot cell agent: a small REST agent (cells/API.md) that runs inside one cell,
pulls images with skopeo into one OCI layout, unpacks them with umoci and runs
containers with an OCI runtime (runc) under conmon. Every request needs the bearer
token from --token-file.

  kiyot-cell serve     --listen 10.89.0.2:7070 --token-file /etc/kiyot/token --state-dir /var/lib/kiyot-cell
  kiyot-cell supervise <same arguments>   # runs `serve` and restarts it when it dies

Containers are held by conmon and outlive the agent: a restarted agent re-attaches to
them from the records in --state-dir.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve HTTP on")
    p.add_argument("--token-file", required=True, type=Path, metavar="FILE",
                   help="file holding the bearer token (mode 0600; never passed in argv)")
    p.add_argument("--state-dir", required=True, type=Path, metavar="DIR",
                   help="where images, bundles, logs and records live")
    p.add_argument("--netns", default=None, metavar="PATH",
                   help="network namespace the containers join (e.g. /run/netns/cell-1); "
                        "absent: containers share the agent's network")
    p.add_argument("--cgroup-parent", default="kiyot-cell", metavar="PATH",
                   help="cgroup under which each container gets <PATH>/<id> (default: kiyot-cell)")
    p.add_argument("--runtime", choices=("runc", "crun"), default="runc",
                   help="OCI runtime (default runc; crun refuses cgroup v1 hybrid hosts)")
    p.add_argument("--runtime-path", default=None, metavar="P", help="path of the runtime binary")
    p.add_argument("--runtime-root", default=None, type=Path, metavar="DIR",
                   help="the runtime's --root for its state (default: the runtime's own, /run/runc)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kiyot-cell", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"kiyot-cell {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_common(sub.add_parser("serve", help="run the agent in the foreground",
                               description="Run the agent's HTTP server in the foreground."))
    _add_common(sub.add_parser(
        "supervise", help="run `serve` as a child and restart it when it dies",
        description="Run `serve` as a child and restart it (short backoff) whenever it dies, as "
                    "systemd's Restart=always would in a VM. SIGTERM stops the agent and exits; "
                    "the containers, held by conmon, keep running."))
    return ap.parse_args(argv)


def _config(ns: argparse.Namespace) -> AgentConfig:
    host, sep, port = ns.listen.rpartition(":")
    if not sep or not port.isdigit():
        sys.exit(f"kiyot-cell: --listen must be HOST:PORT, got {ns.listen!r}")
    st = ns.token_file.stat()
    token = ns.token_file.read_bytes().strip()
    if not token:
        sys.exit(f"kiyot-cell: token file {ns.token_file} is empty")
    runtime_path = ns.runtime_path or shutil.which(ns.runtime) or f"/usr/sbin/{ns.runtime}"
    cfg = AgentConfig(
        host=host.strip("[]"), port=int(port), token=token, state_dir=ns.state_dir.resolve(),
        netns=ns.netns, cgroup_parent=ns.cgroup_parent, runtime=ns.runtime, runtime_path=runtime_path,
        conmon_path=shutil.which("conmon") or "/usr/bin/conmon",
        skopeo_path=shutil.which("skopeo") or "skopeo", umoci_path=shutil.which("umoci") or "umoci",
        runtime_root=ns.runtime_root.resolve() if ns.runtime_root else None,
    )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.get("cli").warning("token_file_mode", path=str(ns.token_file), mode=oct(st.st_mode & 0o777),
                               hint="chmod 0600")
    return cfg


async def _serve(cfg: AgentConfig) -> None:
    from aiohttp import web

    from .server import build_app

    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    await site.start()
    log.get("cli").info("serving", listen=f"{cfg.host}:{cfg.port}", state_dir=str(cfg.state_dir),
                        runtime=cfg.runtime, netns=cfg.netns, pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    log.get("cli").info("stopping")
    await runner.cleanup()


def _supervise(argv: list[str]) -> int:
    """Run `serve` with the same arguments; restart on death with a short backoff."""
    lg = log.get("supervise")
    child_argv = [sys.executable, "-m", "kiyot_cell.cli", "serve", *argv]
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = 0.2
    while not stopping:
        started = time.monotonic()
        # The agent dies with its supervisor: a revived supervisor never meets an old agent on its port.
        child = subprocess.Popen(child_argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        lg.info("agent_started", pid=child.pid)
        rc = child.wait()
        if stopping:
            break
        if time.monotonic() - started > 10:
            backoff = 0.2  # it ran for a while: a fresh failure, restart quickly
        lg.warning("agent_died", rc=rc, restart_in=backoff)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        backoff = min(backoff * 2, 5.0)
    if child is not None and child.poll() is None:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    lg.info("supervisor_exit")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    log.setup(ns.log_level)
    if ns.command == "supervise":
        _config(ns)  # fail fast on bad arguments instead of restarting forever
        return _supervise(argv[argv.index("supervise") + 1:])
    cfg = _config(ns)
    asyncio.run(_serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
