"""The agent's side of the node ⇄ agent channel: TLS with a client certificate required.

The agent serves with the cell's own key and certificate (`--tls-dir`: cell.key,
cell.crt) and accepts only clients whose certificate the node's CA (ca.crt) signed and
that name a node (a URI SAN `kiyot:node:<name>`): another cell's certificate, signed by
the same CA for a server name only, is refused.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

NODE_URI_PREFIX = "kiyot:node:"
FILES = ("cell.key", "cell.crt", "ca.crt")


def server_context(tls_dir: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls_dir / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(tls_dir / "cell.crt"), str(tls_dir / "cell.key"))
    return ctx


def node_of(peercert: dict[str, Any] | None) -> str | None:
    """The node a verified client certificate names, or None when it names none."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI" and value.startswith(NODE_URI_PREFIX):
            return str(value[len(NODE_URI_PREFIX):])
    return None
