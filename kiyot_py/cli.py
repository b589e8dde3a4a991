"""Command line: `kiyot-py serve`, `kiyot-py reset`, `kiyot-py version`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from kiyot_py import __version__
from kiyot_py.config import ConfigError, load_settings


def _settings_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=os.environ.get("KIYOT_CONFIG"),
                   help="TOML settings file (env KIYOT_CONFIG)")
    p.add_argument("--socket", type=Path,
                   help="unix socket to serve on (default /run/kiyot-py/kiyot.sock)")
    p.add_argument("--state-dir", type=Path,
                   help="where state and local cells live (default /var/lib/kiyot-py)")
    p.add_argument("--node-name", help="name tagged on every cell (default: hostname)")
    p.add_argument("--registries-conf", type=Path,
                   help="registries.conf(5)-style TOML: mirrors and plain-HTTP registries")
    p.add_argument("--subnet", help="subnet for local cells (default 10.89.0.0/16)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiyot-py",
        description="A CRI runtime for the kubelet in which every pod runs in its own cell "
        "(a VM, or on one machine a network namespace with its own IP).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _settings_options(sub.add_parser(
        "serve",
        help="serve CRI v1 on a unix socket",
        description="Serve CRI v1 (RuntimeService and ImageService) on a unix socket. Settings "
        "come from the TOML file, then KIYOT_* environment variables (KIYOT_SOCKET, "
        "KIYOT_STATE_DIR, KIYOT_LOCAL_SUBNET, ...), then these flags. SIGTERM stops the "
        "service and leaves the cells running.",
    ))
    reset = sub.add_parser(
        "reset",
        help="delete every local cell and what serve set up on this host",
        description="Undo `serve` on this host, as before an uninstall: delete every local cell "
        "(their containers are killed), remove the cells' bridge and its iptables fence, and "
        "forget every sandbox, container and image in the state dir. Refused while a service "
        "runs on the same state dir. Takes the same settings as serve.",
    )
    _settings_options(reset)
    reset.add_argument("--yes", action="store_true", help="really do it (every pod here dies)")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"kiyot-py {__version__}")
        return 0
    from kiyot_py import log
    from kiyot_py.providers import ProviderError
    from kiyot_py.service import reset, serve
    from kiyot_py.store import StoreError

    if args.command == "reset" and not args.yes:
        print("kiyot-py: reset deletes every local cell and the pods in them; pass --yes", file=sys.stderr)
        return 2

    overrides = {
        "socket": args.socket, "state_dir": args.state_dir, "node_name": args.node_name,
        "registries_conf": args.registries_conf, "log_level": args.log_level,
    }
    if args.subnet:
        overrides["local"] = {"subnet": args.subnet}
    try:
        settings = load_settings(args.config, dict(os.environ), overrides)
        log.configure(settings.log_level)
        if args.command == "reset":
            cells = asyncio.run(reset(settings))
            print(f"kiyot-py: deleted {cells} cell(s); removed bridge {settings.local.bridge} and its fence")
        else:
            asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"kiyot-py: {exc}", file=sys.stderr)
        return 2
    except (ProviderError, StoreError) as exc:
        print(f"kiyot-py: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
