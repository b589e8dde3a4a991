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
FILES = ("cell.key", "ca.crt")  # and cell.crt, or (a cell not enrolled yet) provisional.crt


# asyncio's TLS gives every connection a read buffer of SSLProtocol.max_size (256 KiB),
# zeroed and so resident: with the two streams a node holds open to each agent (events,
# logs), half a MiB per cell on each side, most of the node's memory at 100 pods. Reads
# of 32 KiB keep a log stream at disk speed.
TLS_READ_BUFFER = 32 * 1024


def small_read_buffers() -> None:
    """Make asyncio's TLS read buffers TLS_READ_BUFFER bytes (for connections made after)."""
    import asyncio.sslproto

    if hasattr(asyncio.sslproto.SSLProtocol, "max_size"):  # CPython 3.11 to 3.13; elsewhere as it is
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def server_context(tls_dir: Path) -> ssl.SSLContext:
    """Serve with the cell's certificate, or its provisional one until the node enrolls it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls_dir / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    cert = tls_dir / "cell.crt"
    if not cert.is_file():
        cert = tls_dir / "provisional.crt"
    ctx.load_cert_chain(str(cert), str(tls_dir / "cell.key"))
    return ctx


def node_of(peercert: dict[str, Any] | None) -> str | None:
    """The node a verified client certificate names, or None when it names none."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI" and value.startswith(NODE_URI_PREFIX):
            return str(value[len(NODE_URI_PREFIX):])
    return None
