"""A far-away cell's identity, made in the cell: no secret ever travels to it.

At first boot the cell makes its own key (`cell.key`, 0600, never leaves the cell) and
serves with a provisional self-signed certificate for it (`provisional.crt`) until the
node hands it a certificate from the node's CA (`PUT /v1/identity`). The node trusts the
key only once it has read the key's fingerprint from the cell's serial console, which
only the cloud API shows, to the node's own cloud credentials, for that instance id. The
fingerprint is the SHA-256 of the key's SubjectPublicKeyInfo (DER), in hex.

A certificate is taken only if the CA in `ca.crt` signed it, it is for this cell's key,
and it holds one name under `.cells.kiyot`: nobody but the node can make one.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CELL_DOMAIN = "cells.kiyot"
KEY = "cell.key"
CERT = "cell.crt"
PROVISIONAL = "provisional.crt"
CA = "ca.crt"
# The one line of the console the node looks for (see cells/API.md, "Boot").
CONSOLE_PREFIX = "kiyot-cell identity sha256:"


class IdentityRefused(ValueError):
    """A certificate offered to the cell is not one the node made for this cell's key."""


def spki_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def ensure_key(tls_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The cell's key, made once (at first boot) and kept 0600 in `tls_dir`."""
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = tls_dir / KEY
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), mode=0o600)
    return key


def ensure_provisional(tls_dir: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A self-signed certificate for the key, to serve TLS with until the node enrolls it."""
    path = tls_dir / PROVISIONAL
    if path.exists():
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if spki_fingerprint(cert.public_key()) == spki_fingerprint(key.public_key()):  # type: ignore[arg-type]
            return
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiyot-cell (not enrolled)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    _write(path, cert.public_bytes(serialization.Encoding.PEM))


def enrolled(tls_dir: Path) -> bool:
    return (tls_dir / CERT).is_file()


def accept(tls_dir: Path, cert_pem: bytes) -> str:
    """Check a certificate from the node and keep it as the cell's; the name it holds."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise IdentityRefused("not a PEM certificate") from None
    ca = x509.load_pem_x509_certificate((tls_dir / CA).read_bytes())
    ca_key = ca.public_key()
    if cert.issuer != ca.subject or not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise IdentityRefused("not issued by the node's CA")
    try:
        hash_alg = cert.signature_hash_algorithm
        assert hash_alg is not None
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
    except (InvalidSignature, AssertionError):
        raise IdentityRefused("not signed by the node's CA") from None
    key = ensure_key(tls_dir)
    if spki_fingerprint(cert.public_key()) != spki_fingerprint(key.public_key()):  # type: ignore[arg-type]
        raise IdentityRefused("not for this cell's key")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityRefused("no name or no usage") from None
    if len(names) != 1 or not names[0].endswith("." + CELL_DOMAIN) or ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise IdentityRefused("not a cell's server certificate")
    now = datetime.datetime.now(datetime.UTC)
    if not _utc(cert, "not_valid_before") <= now <= _utc(cert, "not_valid_after"):
        raise IdentityRefused("not valid now")
    _write(tls_dir / CERT, cert_pem)
    return names[0]


def _utc(cert: x509.Certificate, name: str) -> datetime.datetime:
    """A validity bound, timezone-aware (cryptography 42 has `<name>_utc`; Debian's 38 not)."""
    aware = getattr(cert, f"{name}_utc", None)
    if isinstance(aware, datetime.datetime):
        return aware
    naive: datetime.datetime = getattr(cert, name)
    return naive.replace(tzinfo=datetime.UTC)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
