"""The EC2 provider's pure parts, with explicit cases: tags, error kinds, the boot
contract's user data, the console line, and the enrollment checks on both sides."""

from __future__ import annotations

import datetime

import botocore.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kiyot_cell import identity
from kiyot_cell.boot import BootError, UserData
from kiyot_py.enrollment import console_fingerprint, spki_fingerprint
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.pki import NodePKI
from kiyot_py.pods.cells import pod_resources
from kiyot_py.providers import base
from kiyot_py.providers.ec2 import MAX_TAGS, aws_error, ec2_tags


def client_error(code: str, message: str = "m") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}}, "RunInstances")


@pytest.mark.parametrize(("code", "kind"), [
    ("InsufficientInstanceCapacity", base.CapacityError),
    ("VcpuLimitExceeded", base.QuotaError),
    ("AuthFailure", base.ProviderPermissionDenied),
    ("UnauthorizedOperation", base.ProviderPermissionDenied),
    ("InvalidAMIID.NotFound", base.ProviderConfigError),
    ("InvalidSubnetID.NotFound", base.ProviderConfigError),
    ("RequestLimitExceeded", base.ProviderUnavailable),
    ("InternalError", base.ProviderUnavailable),
    ("InvalidInstanceID.NotFound", base.CellNotFound),
])
def test_aws_errors_keep_their_code_and_message_and_get_a_kind(code, kind):
    err = aws_error(client_error(code, "AWS said so"), "launching the cell")
    assert type(err) is kind
    assert str(err) == f"launching the cell: {code}: AWS said so"


def test_tags_ours_first_long_ones_shortened_aws_skipped_fifty_at_most():
    long_a, long_b = "pod-label:" + "a" * 200, "pod-label:" + "a" * 199 + "b"
    tags = {"kiyot-node": "n", "kiyot-sandbox": "s", "aws:cloudformation:stack": "x",
            long_a: "v" * 300, long_b: "w",
            **{f"pod-label:l{i:02d}": str(i) for i in range(60)}}
    out = ec2_tags(tags)
    assert len(out) == MAX_TAGS
    assert out[0] == {"Key": "kiyot-node", "Value": "n"} and out[1] == {"Key": "kiyot-sandbox", "Value": "s"}
    keys = [t["Key"] for t in out]
    assert not any(k.startswith("aws:") for k in keys)
    assert all(len(t["Key"]) <= 128 and len(t["Value"]) <= 256 for t in out)
    shortened = [k for k in keys if k.startswith("pod-label:aaa")]
    assert len(shortened) == 2 and len(set(shortened)) == 2  # the digest keeps them apart
    assert ec2_tags(tags) == out  # deterministic


def test_pod_cpu_is_the_larger_of_request_and_limit():
    config = pb.PodSandboxConfig()
    r = config.linux.resources
    r.cpu_shares, r.cpu_quota, r.cpu_period, r.memory_limit_in_bytes = 512, 150000, 100000, 3 << 30
    assert pod_resources(config) == (1500, 3 << 30)  # the limit (1.5 CPU) over the request (0.5)
    r.cpu_quota = 0
    assert pod_resources(config) == (500, 3 << 30)
    r.cpu_shares = 2  # the kubelet's "no request"
    assert pod_resources(config) == (0, 3 << 30)


def test_user_data_is_small_public_and_versioned(tmp_path):
    pki = NodePKI(tmp_path / "pki", "node-a")
    ud = UserData(node="node-a", ca=pki.ca_pem.decode())
    raw = ud.encode()
    assert UserData.decode(raw) == ud
    assert b"PRIVATE" not in raw and len(raw) < 2048
    with pytest.raises(BootError, match="not kiyot-cell user data"):
        UserData.decode(b'{"kiyot-cell": 2, "node": "n", "ca": "c"}')
    with pytest.raises(BootError, match="not JSON"):
        UserData.decode(b"#!/bin/sh\necho hi")


def test_console_line_is_found_and_a_garbled_one_is_not():
    fp = "ab" * 32
    console = f"booting\nkiyot-cell identity sha256:{'0' * 64}\r\n[ ok ] agent\nkiyot-cell identity sha256:{fp}\n"
    assert console_fingerprint(console) == fp  # the last one the cell printed
    assert console_fingerprint("kiyot-cell identity sha256:xyz\n") is None
    assert console_fingerprint("") is None


def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_cell_takes_only_the_nodes_certificate_for_its_own_key(tmp_path):
    pki = NodePKI(tmp_path / "pki", "node-a")
    other_ca = NodePKI(tmp_path / "other", "node-b")
    tls = tmp_path / "cell-tls"
    key = identity.ensure_key(tls)
    (tls / "ca.crt").write_bytes(pki.ca_pem)
    identity.ensure_provisional(tls, key)
    assert (tls / "cell.key").stat().st_mode & 0o077 == 0
    assert not identity.enrolled(tls)

    someone_else = ec.generate_private_key(ec.SECP256R1())
    for refused, why in [
        (other_ca.issue_for_key("i-1", key.public_key()), "not issued by the node's CA"),
        (pki.issue_for_key("i-1", someone_else.public_key()), "not for this cell's key"),
        (_self_signed(key, "i-1.cells.kiyot"), "not issued by the node's CA"),
        (b"not a certificate", "not a PEM certificate"),
    ]:
        with pytest.raises(identity.IdentityRefused, match=why):
            identity.accept(tls, refused)
        assert not identity.enrolled(tls)

    good = pki.issue_for_key("i-1", key.public_key())
    assert identity.accept(tls, good) == "i-1.cells.kiyot"
    assert identity.enrolled(tls)
    cert = x509.load_pem_x509_certificate(good)
    assert pki.issued_for(cert, "i-1.cells.kiyot") and not pki.issued_for(cert, "i-2.cells.kiyot")
    assert not other_ca.issued_for(cert, "i-1.cells.kiyot")
    assert spki_fingerprint(cert) == identity.spki_fingerprint(key.public_key())
