"""The node's certificate authority: one mutually authenticated TLS channel to every cell.

The node keeps a CA in its state directory (`pki/ca.key`, mode 0600) and a client
certificate of its own. Each cell gets a key and a server certificate of its own, for
one name (`<cell-id>.cells.kiyot`); the node connects with that name as the TLS server
name, so a key taken from one cell cannot pass for another, and the agent accepts only
a client certificate from this CA that names the node (a URI SAN `kiyot:node:<name>`),
so a cell's certificate cannot act as the node towards another cell. A pod that sees
the traffic on its interface sees TLS records only.

The same cell certificate is the cell's client identity towards the node's pull path,
which serves with a certificate of its own for the addresses cells reach it at
(`pull_path_context`) and takes the cell's name from the certificate it presents.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CELL_DOMAIN = "cells.kiyot"
NODE_URI_PREFIX = "kiyot:node:"
CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=398)  # a cell lives as long as its pod; rotation is for later


def cell_of(peercert: dict | None) -> str | None:
    """The cell a verified client certificate names (`<cell-id>.cells.kiyot`), or None."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "DNS" and value.endswith("." + CELL_DOMAIN):
            cell_id = value[: -len(CELL_DOMAIN) - 1]
            if cell_id and "." not in cell_id:
                return cell_id
    return None


def cell_server_name(cell_id: str) -> str:
    """The one name a cell's certificate holds, and the server name the node asks for."""
    return f"{cell_id}.{CELL_DOMAIN}"


@dataclass(frozen=True)
class CellIdentity:
    """What a cell needs to serve its agent: its key, its certificate, and the CA that
    signs the node's (to check the client). PEM bytes; the key is secret."""

    server_name: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    def write(self, directory: Path) -> None:
        """Into `directory` as cell.key (0600), cell.crt and ca.crt, as the agent reads them."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(directory / "cell.key", self.key_pem)
        (directory / "cell.crt").write_bytes(self.cert_pem)
        (directory / "ca.crt").write_bytes(self.ca_pem)


class NodePKI:
    def __init__(self, directory: Path, node_name: str) -> None:
        self._dir = directory
        self._node = node_name
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._ca_key, self._ca_cert = self._load_or_make_ca()
        self.ca_pem = self._ca_cert.public_bytes(serialization.Encoding.PEM)
        self._ensure_node_cert()
        self._client_context: ssl.SSLContext | None = None
        self._enrollment_context: ssl.SSLContext | None = None

    @property
    def node_cert_path(self) -> Path:
        return self._dir / "node.crt"

    @property
    def node_key_path(self) -> Path:
        return self._dir / "node.key"

    @property
    def ca_path(self) -> Path:
        return self._dir / "ca.crt"

    def issue_cell(self, cell_id: str) -> CellIdentity:
        """A fresh key and a server certificate for one cell."""
        name = cell_server_name(cell_id)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(
            key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
            x509.SubjectAlternativeName([x509.DNSName(name)]),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        return CellIdentity(
            server_name=name,
            key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=self.ca_pem,
        )

    def issue_for_key(self, cell_id: str, public_key: object) -> bytes:
        """A certificate (PEM) for a key a cell made itself (enrollment.py), for that cell's name."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("a cell's key must be an EC key")
        name = cell_server_name(cell_id)
        cert = self._sign(
            public_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
            x509.SubjectAlternativeName([x509.DNSName(name)]),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        return cert.public_bytes(serialization.Encoding.PEM)

    def issued_for(self, cert: x509.Certificate, server_name: str) -> bool:
        """Whether this CA signed `cert` for the one name `server_name`."""
        if cert.issuer != self._ca_cert.subject:
            return False
        try:
            hash_alg = cert.signature_hash_algorithm
            assert hash_alg is not None
            self._ca_key.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (InvalidSignature, AssertionError, x509.ExtensionNotFound):
            return False
        return names.get_values_for_type(x509.DNSName) == [server_name]

    def enrollment_context(self) -> ssl.SSLContext:
        """The node's certificate, and no check of the cell's: for looking at the key a cell
        that is not enrolled yet presents (enrollment.py compares it with its console)."""
        if self._enrollment_context is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.load_cert_chain(str(self.node_cert_path), str(self.node_key_path))
            self._enrollment_context = ctx
        return self._enrollment_context

    def client_context(self) -> ssl.SSLContext:
        """The node's side: present the node's certificate, trust only this CA, check the
        cell's name (given per request as the server name)."""
        if self._client_context is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_path))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(self.node_cert_path), str(self.node_key_path))
            self._client_context = ctx
        return self._client_context

    def pull_path_context(self, addresses: list[str]) -> ssl.SSLContext:
        """The pull path's side: serve with a certificate for `addresses` (IPs or names;
        made afresh at every start, beside the CA's key and like it 0600), and require a
        client certificate from this CA (a cell's; `cell_of` reads its name)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for address in addresses:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                names.append(x509.DNSName(address))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kiyot-pull-path {self._node}"[:64])])
        cert = self._sign(key.public_key(), subject, x509.SubjectAlternativeName(names),
                          [ExtendedKeyUsageOID.SERVER_AUTH])
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        cert_file, key_file = self._dir / "pull-path.crt", self._dir / "pull-path.key"
        _write_private(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        _write_atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        ctx.load_cert_chain(str(cert_file), str(key_file))  # ssl loads a chain from files only
        return ctx

    # -- pieces -------------------------------------------------------------------------

    def _load_or_make_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key_path, cert_path = self._dir / "ca.key", self._dir / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key")
            return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kiyot-py cell CA of {self._node}"[:64])])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        # The key first: a CA certificate without its key on disk would be made again.
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    def _ensure_node_cert(self) -> None:
        if self.node_cert_path.exists() and self.node_key_path.exists():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(
            key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kiyot-node {self._node}"[:64])]),
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(NODE_URI_PREFIX + self._node)]),
            [ExtendedKeyUsageOID.CLIENT_AUTH])
        _write_private(self.node_key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        _write_atomic(self.node_cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def _sign(self, public_key: ec.EllipticCurvePublicKey, subject: x509.Name, san: x509.SubjectAlternativeName,
              usage: list[x509.ObjectIdentifier]) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self._ca_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                           critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )


def _write_private(path: Path, data: bytes) -> None:
    """A secret file: created 0600 (never readable by others, even for a moment), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
