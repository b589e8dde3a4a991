"""kiyot-cell: the cell agent's command line (`serve`, `supervise`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

from . import __version__, log, tls
from .boot import DEFAULT_IMDS, DEFAULT_ROOT, BootError, boot
from .config import DEFAULT_SECCOMP_PROFILE, AgentConfig
from .runtime import die_with_parent

DESCRIPTION = """\
The kiyot cell agent: a small REST agent (cells/API.md) that runs inside one cell,
pulls images with skopeo into one OCI layout, unpacks each once with umoci and runs
containers with an OCI runtime (runc) under conmon. It serves TLS with the cell's own
certificate and answers only a client whose certificate the node's CA signed for a node
(--tls-dir holds cell.key, cell.crt and ca.crt; see cells/API.md).

  kiyot-cell serve     --listen 10.89.0.2:7070 --tls-dir /etc/kiyot/tls --state-dir /var/lib/kiyot-cell
  kiyot-cell supervise <same arguments>   # runs `serve` and restarts it when it dies
  kiyot-cell boot [--root /var/lib/kiyot-cell]   # a VM's cell: settings from its user data
  kiyot-cell spawner   # the node's, for local cells: requests on stdin, a unix socket

Containers are held by conmon and outlive the agent: a restarted agent re-attaches to
them from the records in --state-dir.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve HTTPS on")
    p.add_argument("--tls-dir", required=True, type=Path, metavar="DIR",
                   help="the cell's key and certificate (cell.key mode 0600, cell.crt) and the node's CA (ca.crt)")
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
    p.add_argument("--log-max-size", type=int, default=10 * 1024 * 1024, metavar="BYTES",
                   help="cut a container's log in the cell past this size, keeping the current and the "
                        "previous segment (default 10 MiB; the node keeps the whole log)")
    p.add_argument("--seccomp-profile", type=Path, default=DEFAULT_SECCOMP_PROFILE, metavar="FILE",
                   help="the cell's RuntimeDefault seccomp profile (JSON), reported in GET /v1/facts; "
                        f"absent: none (default {DEFAULT_SECCOMP_PROFILE}, from containers-common)")
    p.add_argument("--direct-pulls", action="store_true",
                   help="pull from registries (the node names them and sends the pod's credentials) instead "
                        "of the node's pull path only: for a cell that is a VM of its own")
    p.add_argument("--shared-images", type=Path, default=None, metavar="DIR",
                   help="the node's read-only unpacked images (a cell on the node's own disk): "
                        "POST /v1/images/shared uses one from under DIR instead of pulling it")
    p.add_argument("--instance-metadata", default="", metavar="URL",
                   help="the instance metadata service of a cell that is a VM (e.g. http://169.254.169.254): "
                        "polled for EC2's spot interruption and rebalance notices, reported on /v1/events")
    p.add_argument("--stats-interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between two samples of what the containers and the pod use "
                        "(GET /v1/stats and `stats` events; default 1)")
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
    b = sub.add_parser(
        "boot", help="boot a cell that is a VM of its own: read the user data, make the key, supervise",
        description="Read the instance's user data from the metadata service (IMDSv2), make the cell's "
                    "own key at first boot and print its fingerprint on the console for the node, then "
                    "run the agent under `supervise` on the instance's private address (cells/API.md, Boot).")
    b.add_argument("--root", type=Path, default=DEFAULT_ROOT, metavar="DIR",
                   help=f"the cell's disk: its key, its agent's state (default {DEFAULT_ROOT})")
    b.add_argument("--imds", default=DEFAULT_IMDS, metavar="URL",
                   help=f"the instance metadata service (default {DEFAULT_IMDS})")
    b.add_argument("--runtime-root", type=Path, default=None, metavar="DIR",
                   help="the runtime's --root (default: the runtime's own, /run/runc)")
    b.add_argument("--cgroup-parent", default="kiyot-cell", metavar="PATH",
                   help="cgroup under which each container gets <PATH>/<id> (default: kiyot-cell)")
    b.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sp = sub.add_parser(
        "spawner", help="fork local cells' agents from one interpreter (run by the node, not by hand)",
        description="Import the agent once, then on each request on stdin (a unix socket the node "
                    "holds the other end of) fork a local cell's pid 1 into the cell's network namespace "
                    "and new IPC, PID and mount namespaces, running `supervise` with the request's "
                    "arguments (kiyot_cell/spawner.py). Exits with its parent.")
    sp.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return ap.parse_args(argv)


def _config(ns: argparse.Namespace) -> AgentConfig:
    host, sep, port = ns.listen.rpartition(":")
    if not sep or not port.isdigit():
        sys.exit(f"kiyot-cell: --listen must be HOST:PORT, got {ns.listen!r}")
    missing = [name for name in tls.FILES if not (ns.tls_dir / name).is_file()]
    if not (ns.tls_dir / "cell.crt").is_file() and not (ns.tls_dir / "provisional.crt").is_file():
        missing.append("cell.crt")
    if missing:
        sys.exit(f"kiyot-cell: --tls-dir {ns.tls_dir} lacks {', '.join(missing)}")
    key_mode = (ns.tls_dir / "cell.key").stat().st_mode
    if ns.log_max_size < 4096:
        sys.exit(f"kiyot-cell: --log-max-size must be at least 4096 bytes, got {ns.log_max_size}")
    if not ns.stats_interval > 0:
        sys.exit(f"kiyot-cell: --stats-interval must be a positive number of seconds, got {ns.stats_interval}")
    runtime_path = ns.runtime_path or shutil.which(ns.runtime) or f"/usr/sbin/{ns.runtime}"
    cfg = AgentConfig(
        host=host.strip("[]"), port=int(port), tls_dir=ns.tls_dir.resolve(), state_dir=ns.state_dir.resolve(),
        netns=ns.netns, cgroup_parent=ns.cgroup_parent, runtime=ns.runtime, runtime_path=runtime_path,
        conmon_path=shutil.which("conmon") or "/usr/bin/conmon",
        catatonit_path=shutil.which("catatonit") or "/usr/bin/catatonit",
        skopeo_path=shutil.which("skopeo") or "skopeo", umoci_path=shutil.which("umoci") or "umoci",
        runtime_root=ns.runtime_root.resolve() if ns.runtime_root else None,
        log_max_size=ns.log_max_size, seccomp_profile=ns.seccomp_profile, direct_pulls=ns.direct_pulls,
        instance_metadata=ns.instance_metadata, stats_interval=ns.stats_interval,
        shared_images_dir=ns.shared_images.resolve() if ns.shared_images else None,
    )
    if key_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.get("cli").warning("key_file_mode", path=str(ns.tls_dir / "cell.key"), mode=oct(key_mode & 0o777),
                               hint="chmod 0600")
    return cfg


async def _serve(cfg: AgentConfig) -> None:
    from aiohttp import web

    from .server import build_app

    tls.small_read_buffers()
    context = tls.server_context(cfg.tls_dir)
    app = build_app(cfg, context)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True, ssl_context=context)
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


def _supervise(cfg: AgentConfig) -> int:
    """Run `serve` in a forked child; restart it on death with a short backoff.

    The child is forked from this interpreter, whose imports (aiohttp, the server) are
    already done: a cell's agent answers one interpreter start-up sooner, and a restart
    after a crash is a fork, not a new Python. In a cell with a PID namespace of its own
    this is its pid 1, as init is in a VM: every orphan of the cell (a conmon that
    daemonized, a container whose conmon died) is reaped here.
    """
    from . import server  # noqa: F401  (imported once here, shared by every child)

    lg = log.get("supervise")
    stopping = False
    child = 0

    def signal_child(sig: int) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    def on_term(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        signal_child(signal.SIGTERM)
        signal.alarm(10)  # an agent that does not stop within 10 s is killed

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGALRM, lambda *_: signal_child(signal.SIGKILL))
    backoff = 0.2
    supervisor = os.getpid()
    while not stopping:
        started = time.monotonic()
        child = os.fork()
        if child == 0:
            os._exit(_serve_child(cfg, supervisor))
        if stopping:  # the signal came before `child` was set
            signal_child(signal.SIGTERM)
        lg.info("agent_started", pid=child)
        while True:
            pid, status = os.waitpid(-1, 0)  # the agent, or an orphan reparented here
            if pid == child:
                break
        child = 0
        if stopping:
            break
        if time.monotonic() - started > 10:
            backoff = 0.2  # it ran for a while: a fresh failure, restart quickly
        lg.warning("agent_died", rc=os.waitstatus_to_exitcode(status), restart_in=backoff)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        backoff = min(backoff * 2, 5.0)
    lg.info("supervisor_exit")
    return 0


def _serve_child(cfg: AgentConfig, supervisor: int) -> int:
    """The forked agent: default signal handling, and it dies with its supervisor so that
    a revived supervisor never meets an old agent on its port."""
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        die_with_parent()
        if os.getppid() != supervisor:
            return 1  # the supervisor died before the line above took hold
        asyncio.run(_serve(cfg))
        return 0
    except BaseException:
        log.get("supervise").exception("agent_failed")
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse_args(argv)
    log.setup(ns.log_level)
    if ns.command == "spawner":
        from .spawner import serve
        return serve()
    if ns.command == "boot":
        try:
            ns = parse_args([*boot(ns.root, ns.imds, ns.runtime_root, ns.cgroup_parent), "--log-level", ns.log_level,
                             "--instance-metadata", ns.imds])
        except BootError as e:
            sys.exit(f"kiyot-cell boot: {e}")
    cfg = _config(ns)  # under supervise too: bad arguments fail once, not on every restart
    if ns.command == "supervise":
        return _supervise(cfg)
    asyncio.run(_serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
