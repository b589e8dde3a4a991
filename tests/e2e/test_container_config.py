"""What a container sees in its cell: the image's config and the kubelet's, mapped for real."""

from __future__ import annotations

import subprocess

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import container_config, create, log_lines, new_pod, pod_name, remove_pod, start, wait_for, wait_state


def exec_out(cri, cid, *cmd) -> str:
    r = cri.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=10))
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode()


def pull(img, ref):
    return img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref))).image_ref


def test_image_entrypoint_cmd_user_workdir_env(cri, img, pod, test_images):
    ref = test_images["app"].ref  # OCI manifest; Entrypoint sh -c, Cmd, User app, WorkingDir
    pull(img, ref)
    cid = start(cri, pod, container_config("app", ref))
    status = wait_state(cri, cid, pb.CONTAINER_EXITED)
    assert (status.exit_code, status.reason) == (0, "Completed")
    assert wait_for(lambda: ("stdout", "F", "default-cmd") in log_lines(status.log_path))

    # The image's user is resolved in the cell's rootfs, with its groups.
    cid = start(cri, pod, container_config("app-shell", ref, args=["sleep 3600"],
                                           envs=[pb.KeyValue(key="EXTRA", value=b"1")]))
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    ids = exec_out(cri, cid, "id")
    assert "uid=1000(app)" in ids and "gid=1000(app)" in ids and "2000(extra)" in ids
    assert exec_out(cri, cid, "pwd").strip() == "/home/app"
    env = exec_out(cri, cid, "env")
    assert "GREETING=hello" in env and "EXTRA=1" in env


def test_run_as_user_overrides_the_image(cri, img, pod, test_images):
    ref = test_images["app"].ref
    pull(img, ref)
    config = container_config("root", ref, command=["sleep", "3600"])
    config.linux.security_context.run_as_user.value = 0
    config.linux.security_context.supplemental_groups.append(2000)
    cid = start(cri, pod, config)
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    assert exec_out(cri, cid, "id", "-u").strip() == "0"
    assert "2000" in exec_out(cri, cid, "id", "-G").split()


def test_index_and_oci_images_run(cri, img, pod, test_images):
    for key in ("busybox-index", "busybox-oci"):
        ref = test_images[key].ref
        pull(img, ref)
        cid = start(cri, pod, container_config(key, ref, command=["sh", "-c", "exit 4"]))
        status = wait_state(cri, cid, pb.CONTAINER_EXITED)
        assert status.exit_code == 4, key


def test_hostname_and_dns_from_the_sandbox(cri, img, pod, test_images):
    ref = test_images["busybox"].ref
    pull(img, ref)
    cid = start(cri, pod, container_config("dns", ref, command=["sleep", "3600"]))
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    _, sandbox = pod
    assert exec_out(cri, cid, "hostname").strip() == sandbox.hostname
    resolv = exec_out(cri, cid, "cat", "/etc/resolv.conf")
    assert "nameserver 10.96.0.10" in resolv
    assert "search default.svc.cluster.local" in resolv
    assert "options ndots:5" in resolv


def test_the_kubelets_etc_hosts_mount_wins(cri, img, pod, test_images, tmp_path):
    # The kubelet writes the pod's hosts file (pod IP, hostAliases) and mounts it.
    hosts = tmp_path / "etc-hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n10.1.2.3\tfoo.alias bar.alias\n")
    ref = test_images["busybox"].ref
    pull(img, ref)
    config = container_config("aliases", ref, command=["sleep", "3600"])
    config.mounts.append(pb.Mount(container_path="/etc/hosts", host_path=str(hosts)))
    cid = start(cri, pod, config)
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    assert exec_out(cri, cid, "cat", "/etc/hosts") == hosts.read_text()
    # The files it does not mount still come from the sandbox.
    assert "nameserver 10.96.0.10" in exec_out(cri, cid, "cat", "/etc/resolv.conf")


def test_mirror_from_registries_conf(cri, img, pod, test_images):
    """registry.k8s.io is mapped to the local registry; the cell pulls it through the pull path."""
    ref = "registry.k8s.io/test/busybox:latest"
    image_id = pull(img, ref)
    assert image_id == test_images["busybox"].config_digest
    status = img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))).image
    assert ref in status.repo_tags
    cid = start(cri, pod, container_config("mirrored", ref, command=["sh", "-c", "exit 6"]))
    assert wait_state(cri, cid, pb.CONTAINER_EXITED).exit_code == 6


@pytest.mark.parametrize("key", ["evil-dotdot", "evil-abs", "evil-hardlink", "evil-symlink"])
def test_escaping_layers_are_refused(cri, img, pod, test_images, key, service):
    ref = test_images[key].ref
    pull(img, ref)  # the node only reads the manifest and config; the cell checks layers
    with pytest.raises(grpc.RpcError) as err:
        create(cri, pod, container_config(key, ref, command=["true"]))
    assert "refused" in err.value.details() or "layer" in err.value.details(), err.value.details()
    containers = cri.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=pod[0]))).containers
    assert containers == []
    cells = service.state_dir / "cells"
    assert not list(cells.rglob("escape.txt")) and not list(cells.rglob("abs.txt"))


def test_memory_limit_oom_kill_is_reported(cri, img, pod, test_images):
    ref = test_images["busybox"].ref
    pull(img, ref)
    config = container_config("hog", ref, command=["sh", "-c", "x=a; while true; do x=$x$x; done"])
    config.linux.resources.memory_limit_in_bytes = 16 * 1024 * 1024
    cid = start(cri, pod, config)
    status = wait_state(cri, cid, pb.CONTAINER_EXITED, seconds=60)
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 137, "OOMKilled")


def test_name_in_use_is_already_exists(cri, img, pod, test_images):
    ref = test_images["busybox"].ref
    pull(img, ref)
    create(cri, pod, container_config("twin", ref, command=["true"]))
    with pytest.raises(grpc.RpcError) as err:
        create(cri, pod, container_config("twin", ref, command=["true"]))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("policy, groups", [(pb.Merge, [1000, 1234, 2000]), (pb.Strict, [1000, 1234])])
def test_supplemental_groups_policy(cri, img, pod, test_images, policy, groups):
    # The image's /etc/group puts app (uid 1000) in extra (2000): Merge adds it, Strict not.
    ref = test_images["app"].ref
    pull(img, ref)
    config = container_config(f"groups-{pb.SupplementalGroupsPolicy.Name(policy).lower()}", ref,
                              command=["sleep", "3600"])
    sc = config.linux.security_context
    sc.run_as_user.value = 1000
    sc.supplemental_groups.append(1234)
    sc.supplemental_groups_policy = policy
    cid = start(cri, pod, config)
    wait_state(cri, cid, pb.CONTAINER_RUNNING)
    assert sorted(int(g) for g in exec_out(cri, cid, "id", "-G").split()) == groups
    user = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.user.linux
    assert (user.uid, user.gid, sorted(user.supplemental_groups)) == (1000, 1000, groups)


def test_status_advertises_what_the_cells_can_do(cri):
    status = cri.Status(pb.StatusRequest())
    assert status.features.supplemental_groups_policy
    handler, = [h for h in status.runtime_handlers if h.name == ""]
    assert handler.features.recursive_read_only_mounts  # runc 1.1 and kernel >= 5.12 here


def test_a_mount_the_node_makes_later_under_a_shared_mount_reaches_the_cell(cri, img, test_images, tmp_path, request):
    """A local cell's mount namespace is its own (for its own /proc) and a slave of the
    node's: a mount the node makes after the cell came up reaches it under a mount that is
    shared on the node (what the kubelet makes of its root directory)."""
    root = tmp_path / "kubelet-root"
    root.mkdir()
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    subprocess.run(["mount", "--make-rshared", str(root)], check=True)
    volume = root / "pods" / "vol"
    (volume / "tmpfs").mkdir(parents=True)
    pod = new_pod(cri, pod_name(request.node.name), tmp_path)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "none", str(volume / "tmpfs")], check=True)  # the cell is up
        (volume / "tmpfs" / "marker").write_text("made on the node later\n")
        ref = test_images["busybox"].ref
        pull(img, ref)
        config = container_config("later", ref, command=["sleep", "3600"],
                                  mounts=[pb.Mount(container_path="/mnt", host_path=str(volume))])
        cid = start(cri, pod, config)
        wait_state(cri, cid, pb.CONTAINER_RUNNING)
        assert exec_out(cri, cid, "cat", "/mnt/tmpfs/marker") == "made on the node later\n"
    finally:
        remove_pod(cri, pod[0])
        subprocess.run(["umount", "--lazy", str(volume / "tmpfs")], check=False)
        subprocess.run(["umount", "--lazy", str(root)], check=False)


def test_recursive_read_only_mount(cri, img, test_images, tmp_path, request):
    # A tmpfs under the volume: a plain read-only bind leaves it writable, rro does not.
    # Mounted before the pod's cell comes up, as the kubelet mounts a pod's volumes (a
    # cell sees the node's mounts as they were then, and later ones only under a shared
    # mount, such as the kubelet's rshared root directory).
    volume = tmp_path / "vol"
    (volume / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(volume / "tmpfs")], check=True)
    pod = new_pod(cri, pod_name(request.node.name), tmp_path)
    try:
        ref = test_images["busybox"].ref
        pull(img, ref)
        cids = {}
        for rro in (False, True):
            config = container_config(f"rro-{rro}".lower(), ref, command=["sleep", "3600"],
                                      mounts=[pb.Mount(container_path="/mnt", host_path=str(volume),
                                                       readonly=True, recursive_read_only=rro)])
            cids[rro] = start(cri, pod, config)
            wait_state(cri, cids[rro], pb.CONTAINER_RUNNING)
        touch = ["sh", "-c", "touch /mnt/tmpfs/f 2>&1"]
        assert cri.ExecSync(pb.ExecSyncRequest(container_id=cids[False], cmd=touch, timeout=10)).exit_code == 0
        r = cri.ExecSync(pb.ExecSyncRequest(container_id=cids[True], cmd=touch, timeout=10))
        assert r.exit_code != 0 and b"Read-only file system" in r.stdout
        for cid in cids.values():
            cri.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
            cri.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    finally:
        remove_pod(cri, pod[0])
        subprocess.run(["umount", "--lazy", str(volume / "tmpfs")], check=False)


@pytest.mark.parametrize("readonly, propagation", [(False, pb.PROPAGATION_PRIVATE),
                                                   (True, pb.PROPAGATION_HOST_TO_CONTAINER)])
def test_a_recursive_read_only_mount_needs_read_only_and_private(cri, img, pod, test_images, tmp_path,
                                                                  readonly, propagation):
    ref = test_images["busybox"].ref
    pull(img, ref)
    config = container_config("rro-bad", ref, command=["true"],
                              mounts=[pb.Mount(container_path="/mnt", host_path=str(tmp_path), readonly=readonly,
                                               recursive_read_only=True, propagation=propagation)])
    with pytest.raises(grpc.RpcError) as err:
        create(cri, pod, config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
