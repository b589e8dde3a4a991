"""The node's side of a far-away cell's enrollment (cells/kiyot_cell/identity.py).

A cell that boots far away (EC2) makes its own key and serves TLS with a provisional
self-signed certificate. The node connects (with its own client certificate, so that
nobody else can make the cell take a certificate), reads the key the cell presents,
and compares its fingerprint with the one the cell printed on its console, which the
provider read from the cloud API for that instance id. Only if they match does the node
sign a certificate for that key and the cell's name, and hand it over
(`PUT /v1/identity`). From then on the channel is the usual one: the cell's name pinned,
the node's CA trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kiyot_py.agent_client import AgentFailed, AgentUnreachable
from kiyot_py.pki import NodePKI

CONSOLE_PREFIX = "kiyot-cell identity sha256:"  # cells/kiyot_cell/identity.py, the same line


def console_fingerprint(console: str) -> str | None:
    """The fingerprint the cell printed on its console (its last such line), if it has yet."""
    found = None
    for raw in console.splitlines():
        line = raw.strip()
        if line.startswith(CONSOLE_PREFIX):
            value = line[len(CONSOLE_PREFIX):]
            if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
                found = value
    return found


def spki_fingerprint(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Presented:
    """What a cell's agent presented in a TLS handshake."""

    certificate: x509.Certificate
    enrolled: bool  # the node's CA signed it, for the name the node expects


async def presented(host: str, port: int, pki: NodePKI, server_name: str, timeout: float = 2.0) -> Presented:
    """Shake hands with the agent (presenting the node's certificate) and look at its certificate."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=pki.enrollment_context(),
                                                      server_hostname=server_name)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise AgentUnreachable(f"cell agent {host}:{port}: {exc or type(exc).__name__}") from None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    cert = x509.load_der_x509_certificate(der)
    return Presented(cert, pki.issued_for(cert, server_name))


async def enroll(session: aiohttp.ClientSession, host: str, port: int, pki: NodePKI, cell_id: str,
                 console: Callable[[], Awaitable[str]]) -> None:
    """Give the cell at host:port the node's certificate for its key, if that key is the one
    its console shows (`console()` reads it); otherwise refuse, and give it nothing.

    AgentUnreachable while the agent does not listen yet. The console is read only once it
    does: the cell prints its key's fingerprint before its agent listens, so one read of
    the console (one cloud API call) is enough."""
    from kiyot_py.pki import cell_server_name

    name = cell_server_name(cell_id)
    seen = await presented(host, port, pki, name)
    if seen.enrolled:
        return  # done before (the node restarted after enrolling it)
    console_says = await console()
    if spki_fingerprint(seen.certificate) != console_says:
        raise AgentFailed(
            f"cell {cell_id} at {host}:{port} presents a key whose fingerprint "
            f"{spki_fingerprint(seen.certificate)[:16]}… is not the one its console shows ({console_says[:16]}…): "
            "not enrolled")
    cert_pem = pki.issue_for_key(cell_id, seen.certificate.public_key())
    try:
        async with session.put(f"https://{host}:{port}/v1/identity", json={"certificate": cert_pem.decode()},
                               ssl=pki.enrollment_context(), server_hostname=name,
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                raise AgentFailed(f"cell {cell_id} refused its certificate: {resp.status} {await resp.text()}",
                                  status=resp.status)
    except aiohttp.ClientError as exc:
        raise AgentUnreachable(f"cell agent {host}:{port}: enrolling: {exc}") from None
