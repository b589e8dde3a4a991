"""Auth, body limits, routes and the pod's /etc files."""

from __future__ import annotations

import os
import secrets
import ssl

import pytest

from tests import contract
from tests.cells.conftest import needs_root, spec_of

pytestmark = needs_root


def _client_cert(agent, where, *, names_node: bool, usage) -> str:
    """A key and certificate from the agent's own CA: for a client that names no node, or
    signed for a server (as every cell's is)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.UniformResourceIdentifier("kiyot:node:test-node")] if names_node else [x509.DNSName("pod.evil")]
    cert = agent.pki._sign(key.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]),
                           x509.SubjectAlternativeName(san), [usage])
    where.mkdir()
    (where / "cell.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (where / "cell.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(where)


def test_only_the_node_is_answered_and_nothing_changes(agent, cell_images, tmp_path):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    img = cell_images["busybox"]
    body = agent.pull_body(img)
    requests = (("GET", "/v1/health", None), ("POST", "/v1/images/pull", body), ("GET", "/v1/nope", None),
                ("PUT", "/v1/pod", {"sandbox_id": "s", "hostname": "h"}),
                ("POST", "/v1/containers", {"id": secrets.token_hex(32), "name": "x",
                                            "image_digest": img.manifest_digest, "spec": {}}))
    # No certificate, one signed for servers only that names the node, one from another
    # CA: the handshake fails.
    other_cell = agent.pki.issue_cell("c-other")
    other_cell.write(tmp_path / "other-cell")
    from kiyot_py.pki import NodePKI
    stranger = NodePKI(tmp_path / "stranger-pki", "test-node")  # the same node name, another CA
    refused = ["none",
               _client_cert(agent, tmp_path / "server-cert", names_node=True, usage=ExtendedKeyUsageOID.SERVER_AUTH)]
    for identity in refused:
        for method, path, b in requests:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                agent.call(method, path, b, identity=identity)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        c = agent.conn(10)
        c._context = stranger.client_context()  # its node certificate, our cell's name
        c.request("GET", "/v1/health")
        c.getresponse()
    # A client certificate from the CA that names no node gets through TLS, and so does
    # another cell's (a cell's identity is also its client certificate to the pull path): 401.
    nameless = _client_cert(agent, tmp_path / "nameless", names_node=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    for identity in (nameless, str(tmp_path / "other-cell")):
        for method, path, b in requests:
            r = agent.call(method, path, b, identity=identity)
            assert r.status == 401, (method, path, r.status)
            assert r.json()["error"] == "unauthorized"
    layout = agent.state_dir / "images" / "layout"
    assert not layout.exists(), "a refused pull wrote to the layout"
    assert not (agent.state_dir / "pod" / "etc").exists()
    assert agent.ok("GET", "/v1/containers") == []


def test_health(agent):
    h = agent.ok("GET", "/v1/health")
    assert h == {"version": "0.1.0", "api": "v1", "ready": True, "runtime": "runc", "enrolled": True}


def test_every_route_in_api_md_exists(agent):
    cid = "0" * 64
    for method, path in contract.routes():
        p = path.replace("{id}", cid).replace("{digest}", "sha256:" + cid).replace("{name}", "0" * 32)
        r = agent.call(method, p, {} if method in ("POST", "PUT") else None, timeout=10) \
            if p != "/v1/events" else None
        if r is None:
            c = agent.conn(10)
            c.request("GET", p)
            resp = c.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type").startswith("application/x-ndjson")
            c.close()
            continue
        assert r.status != 405, (method, path)
        if r.status == 404:
            assert not r.json()["message"].startswith("no route"), (method, path)
        assert r.status < 500, (method, path, r.body)


def test_oversized_body_is_413(agent):
    big = b'{"x": "' + b"a" * (4 * 1024 * 1024 + 10) + b'"}'
    r = agent.call("POST", "/v1/containers", raw=big)
    assert r.status == 413
    assert r.json()["error"] == "too_large"
    # Without the node's identity the body is never read: the handshake fails first.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        agent.call("POST", "/v1/containers", raw=big, identity="none")
    assert agent.ok("GET", "/v1/containers") == []


def test_bad_json_and_missing_fields_are_400(agent):
    assert agent.call("POST", "/v1/containers", raw=b"{nope").status == 400
    assert agent.call("POST", "/v1/containers", raw=b"[1]").status == 400
    r = agent.call("POST", "/v1/containers", {"name": "x"})
    assert r.status == 400 and r.json()["error"] == "invalid"
    assert agent.call("POST", "/v1/images/pull", {"ref": "x"}).status == 400
    assert agent.call("GET", "/v1/containers/" + "f" * 64).status == 404
    assert agent.call("GET", "/v1/containers/not-an-id").status == 400
    assert agent.call("DELETE", "/v1/containers/" + "f" * 64).status == 200


def test_pod_etc_files_are_written_and_mounted(agent, busybox):
    pod = {"sandbox_id": "a" * 64, "hostname": "web-0",
           "dns": {"servers": ["10.96.0.10"], "searches": ["default.svc.cluster.local"], "options": ["ndots:5"]},
           "labels": {"app": "web"}}
    out = agent.ok("PUT", "/v1/pod", pod)
    etc = agent.state_dir / "pod" / "etc"
    assert out == {"etc_dir": str(etc)}
    assert (etc / "hostname").read_text() == "web-0\n"
    assert "127.0.0.1\tlocalhost" in (etc / "hosts").read_text()
    assert "web-0" in (etc / "hosts").read_text()
    resolv = (etc / "resolv.conf").read_text()
    assert "nameserver 10.96.0.10" in resolv and "search default.svc.cluster.local" in resolv
    assert "options ndots:5" in resolv
    assert agent.ok("PUT", "/v1/pod", pod) == out  # repeat: no-op
    rec = agent.run(busybox, ["sh", "-c", "cat /etc/hostname /etc/resolv.conf; hostname"])
    agent.wait_state(rec["id"], "exited")
    log = agent.call("GET", f"/v1/containers/{rec['id']}/logs").body.decode()
    assert "stdout F web-0" in log and "nameserver 10.96.0.10" in log
    # The host name is the pod's, set by the agent alone: a `hostname` in the node's spec is ignored.
    cid = secrets.token_hex(32)
    agent.ok("POST", "/v1/containers", {"id": cid, "name": "h", "image_digest": busybox.manifest_digest,
                                        "spec": {**spec_of(["hostname"]), "hostname": "what-the-node-says"}})
    agent.ok("POST", f"/v1/containers/{cid}/start")
    agent.wait_state(cid, "exited")
    log = agent.call("GET", f"/v1/containers/{cid}/logs").body.decode()
    assert "stdout F web-0" in log and "what-the-node-says" not in log, log
    assert agent.call("PUT", "/v1/pod", {"hostname": "x"}).status == 400


def _ipc_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/ipc")


def test_containers_share_the_pods_ipc_namespace_when_asked(agent, busybox):
    # Before PUT /v1/pod there is no pod namespace to join.
    r = agent.call("POST", "/v1/containers", {"id": "1" * 64, "name": "early", "image_digest": busybox.manifest_digest,
                                              "spec": spec_of(["true"]), "pod_namespaces": ["ipc"]})
    assert r.status == 409
    agent.ok("PUT", "/v1/pod", {"sandbox_id": "a" * 64, "hostname": "ipc-pod"})
    assert agent.call("POST", "/v1/containers", {"id": "2" * 64, "name": "bad", "image_digest": busybox.manifest_digest,
                                                 "spec": spec_of(["true"]),
                                                 "pod_namespaces": ["uts"]}).status == 400
    one = agent.run(busybox, ["sleep", "1000"], name="one", pod_namespaces=["ipc"])
    two = agent.run(busybox, ["sleep", "1000"], name="two", pod_namespaces=["ipc"])
    own = agent.run(busybox, ["sleep", "1000"], name="own")
    pod_ns = f"ipc:[{(agent.state_dir / 'pod' / 'ns' / 'ipc').stat().st_ino}]"
    assert _ipc_ns(one["pid"]) == _ipc_ns(two["pid"]) == pod_ns
    assert _ipc_ns(own["pid"]) not in (pod_ns, _ipc_ns(os.getpid()))


def _pid_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def test_the_pods_pid_namespace_outlives_an_agent_restart(agent, busybox):
    agent.ok("PUT", "/v1/pod", {"sandbox_id": "a" * 64, "hostname": "pid-pod"})
    one = agent.run(busybox, ["sleep", "1000"], name="one", pod_namespaces=["pid"])
    own = agent.run(busybox, ["sleep", "1000"], name="own")
    assert _pid_ns(one["pid"]) != _pid_ns(own["pid"])
    agent.stop()
    agent.start()  # a new agent over the same state: the pod's init lived on
    two = agent.run(busybox, ["sleep", "1000"], name="two", pod_namespaces=["pid"])
    assert _pid_ns(two["pid"]) == _pid_ns(one["pid"])
    # A target's namespace, and the mistakes around it.
    three = agent.run(busybox, ["sleep", "1000"], name="three", pid_target=own["id"])
    assert _pid_ns(three["pid"]) == _pid_ns(own["pid"])
    body = {"id": "4" * 64, "name": "bad", "image_digest": busybox.manifest_digest,
            "spec": spec_of(["true"])}
    assert agent.call("POST", "/v1/containers", {**body, "pid_target": own["id"],
                                                 "pod_namespaces": ["pid"]}).status == 400
    assert agent.call("POST", "/v1/containers", {**body, "pid_target": "5" * 64}).status == 404
    agent.ok("POST", f"/v1/containers/{own['id']}/stop", {"timeout": 0})
    assert agent.call("POST", "/v1/containers", {**body, "pid_target": own["id"]}).status == 409
    # A repeated create is answered from its record, though its target has stopped since.
    again = {"id": three["id"], "name": "three", "image_digest": busybox.manifest_digest,
             "spec": spec_of(["sleep", "1000"]), "pid_target": own["id"]}
    assert agent.ok("POST", "/v1/containers", again)["id"] == three["id"]


def test_an_image_is_freed_only_when_no_container_has_it(agent, busybox, cell_images):
    # busybox-oci shares no blob with busybox: removing it must leave busybox whole.
    other = cell_images["busybox-oci"]
    agent.pull(other)
    rec = agent.run(other, ["true"])
    agent.wait_state(rec["id"], "exited")
    used = agent.ok("GET", "/v1/usage")
    assert used["images"]["bytes"] >= busybox.size + other.size
    assert agent.call("DELETE", f"/v1/images/{other.manifest_digest}").status == 409  # its lower layer
    agent.ok("DELETE", f"/v1/containers/{rec['id']}")
    agent.ok("DELETE", f"/v1/images/{other.manifest_digest}")
    agent.ok("DELETE", f"/v1/images/{other.manifest_digest}")  # repeat: already gone
    freed = agent.ok("GET", "/v1/usage")
    assert used["images"]["bytes"] - freed["images"]["bytes"] >= other.size
    assert agent.call("DELETE", "/v1/images/sha256:nope").status == 400
    # The image that stayed still runs; the removed one must be pulled again first.
    rec = agent.run(busybox, ["true"])
    assert agent.wait_state(rec["id"], "exited")["exit_code"] == 0
    body = {"id": "b" * 64, "name": "gone", "image_digest": other.manifest_digest, "spec": spec_of(["true"])}
    assert agent.call("POST", "/v1/containers", body).status == 409
