"""What a container's host paths become for a cell that cannot see the node's disk."""

from __future__ import annotations

import os
import socket

import pytest

from kiyot_py.config import VolumeSettings
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.pods.volumes import VolumeError, plan, read_version

UID = "0b6c8e1e-1111-4222-8333-944445555666"


def _config(*mounts: pb.Mount, **annotations: str) -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name="c"), mounts=list(mounts), annotations=annotations)


@pytest.fixture
def kubelet(tmp_path):
    pod = tmp_path / "kubelet" / "pods" / UID
    secret = pod / "volumes" / "kubernetes.io~secret" / "db"
    (secret / "..2026_12_02_10_00_00.1").mkdir(parents=True)
    (secret / "..2026_12_02_10_00_00.1" / "password").write_text("p")
    os.symlink("..2026_12_02_10_00_00.1", secret / "..data")
    os.symlink("..data/password", secret / "password")
    (pod / "volumes" / "kubernetes.io~empty-dir" / "scratch").mkdir(parents=True)
    (pod / "containers" / "c").mkdir(parents=True)
    (pod / "containers" / "c" / "1a2b").touch()
    (pod / "etc-hosts").write_text("127.0.0.1 localhost\n")
    return pod, VolumeSettings(kubelet_root=str(tmp_path / "kubelet"))


def test_each_kind_of_kubelet_path(kubelet):
    pod, settings = kubelet
    planned = plan(_config(
        pb.Mount(host_path=str(pod / "volumes/kubernetes.io~secret/db"), container_path="/etc/db"),
        pb.Mount(host_path=str(pod / "volumes/kubernetes.io~empty-dir/scratch"), container_path="/scratch"),
        pb.Mount(host_path=str(pod / "containers/c/1a2b"), container_path="/dev/termination-log"),
        pb.Mount(host_path=str(pod / "etc-hosts"), container_path="/etc/hosts"),
    ), UID, settings)
    assert [(v.kind, v.medium, v.termination_log) for v in planned] == [
        ("atomic", "memory", False), ("empty", "disk", False), ("file", "disk", True), ("file", "memory", False)]
    assert len({v.name for v in planned}) == 4
    assert read_version(str(pod / "volumes/kubernetes.io~secret/db")).version == "..2026_12_02_10_00_00.1"


def test_a_custom_termination_message_path(kubelet):
    pod, settings = kubelet
    (v,) = plan(_config(pb.Mount(host_path=str(pod / "containers/c/1a2b"), container_path="/tmp/last-words"),
                        **{"io.kubernetes.container.terminationMessagePath": "/tmp/last-words"}), UID, settings)
    assert v.termination_log


def test_refused_paths(kubelet, tmp_path):
    pod, settings = kubelet
    other_pod = tmp_path / "kubelet" / "pods" / "another-pod"
    other_pod.mkdir(parents=True)
    escape = pod / "escape"
    os.symlink("/etc", escape)
    for host, words in ((str(tmp_path), "cannot see the node's disk"),
                        (str(other_pod), "cannot see the node's disk"),  # another pod's directory
                        (str(escape), "cannot see the node's disk"),  # a link out of the pod's
                        (str(pod / "volumes" / ".." / ".." / "another-pod"), "cannot see the node's disk"),
                        (str(pod / "missing"), "does not exist")):
        with pytest.raises(VolumeError, match=words):
            plan(_config(pb.Mount(host_path=host, container_path="/x")), UID, settings)
    with pytest.raises(VolumeError, match="propagation"):
        plan(_config(pb.Mount(host_path=str(pod / "etc-hosts"), container_path="/x",
                              propagation=pb.PROPAGATION_HOST_TO_CONTAINER)), UID, settings)


def test_allowed_host_paths_but_never_a_socket_or_device(kubelet, tmp_path):
    _pod, settings = kubelet
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "motd").write_text("hi")
    allowing = VolumeSettings(kubelet_root=settings.kubelet_root, allowed_host_paths=f" /nowhere , {shared}")
    (v,) = plan(_config(pb.Mount(host_path=str(shared), container_path="/shared")), UID, allowing)
    assert (v.kind, v.medium) == ("tree", "memory")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(shared / "s.sock"))
    try:
        with pytest.raises(VolumeError, match="socket"):
            plan(_config(pb.Mount(host_path=str(shared / "s.sock"), container_path="/s")), UID, allowing)
    finally:
        sock.close()
    with pytest.raises(VolumeError, match="device"):
        plan(_config(pb.Mount(host_path="/dev/null", container_path="/n")), UID,
             VolumeSettings(kubelet_root=settings.kubelet_root, allowed_host_paths="/dev"))
