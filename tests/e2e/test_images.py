"""ImageService through the socket: names, tags, digests, errors, deadlines."""

from __future__ import annotations

import grpc
import pytest

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import run


def pull(img, ref, **kw):
    return img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), **kw).image_ref


def status(img, ref):
    return img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)))


def test_tags_and_digests_name_one_image(img, test_images):
    t = test_images["busybox"]
    name = "127.0.0.1:5000/test/busybox"
    image_id = pull(img, f"{name}:latest")
    assert image_id == t.config_digest
    assert pull(img, f"{name}:1.36") == image_id
    found = status(img, image_id).image
    assert found.id == image_id
    assert set(found.repo_tags) >= {f"{name}:latest", f"{name}:1.36"}
    assert f"{name}@{t.manifest_digest}" in found.repo_digests
    assert found.size > 0
    listed = [i for i in img.ListImages(pb.ListImagesRequest()).images if i.id == image_id]
    assert len(listed) == 1
    # The same record by id, id prefix, tag and digest.
    for ref in [image_id, image_id[7:19], f"{name}:1.36", f"{name}@{t.manifest_digest}"]:
        assert status(img, ref).image.id == image_id, ref
    streamed = [i.id for r in img.StreamImages(pb.StreamImagesRequest()) for i in r.images]
    assert image_id in streamed


def test_pull_by_digest_has_no_tags(img, test_images):
    t = test_images["busybox-oci"]
    name = "127.0.0.1:5000/test/busybox-oci"
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=t.config_digest)))  # other tests' pulls
    image_id = pull(img, f"{name}@{t.manifest_digest}")
    found = status(img, image_id).image
    assert found.repo_digests == [f"{name}@{t.manifest_digest}"]
    assert list(found.repo_tags) == []
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))
    assert not status(img, image_id).HasField("image")


def test_index_resolves_to_this_platform(img, test_images):
    t = test_images["busybox-index"]
    image_id = pull(img, t.ref)
    assert image_id == t.config_digest
    found = status(img, t.ref).image
    assert f"127.0.0.1:5000/test/busybox-index@{t.manifest_digest}" in found.repo_digests


def test_image_user_becomes_username_or_uid(img, test_images):
    pull(img, test_images["app"].ref)
    assert status(img, test_images["app"].ref).image.username == "app"
    pull(img, test_images["busybox"].ref)
    found = status(img, test_images["busybox"].ref).image
    assert found.username == ""
    assert not found.HasField("uid")  # the image names no user


def test_short_names_are_normalised(img):
    # No registry at docker.io here: the error shows the name was normalised first.
    with pytest.raises(grpc.RpcError) as err:
        pull(img, "busybox", timeout=20)
    assert "docker.io/library/busybox:latest" in err.value.details()


def test_unknown_image(img):
    assert not status(img, "127.0.0.1:5000/test/never:1").HasField("image")
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image="127.0.0.1:5000/test/never:1")))
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image="sha256:" + "0" * 64)))


def test_malformed_reference_is_invalid_argument(img):
    for bad in ["UPPER/Case:1", "bad::ref", "x@sha256:123", ""]:
        with pytest.raises(grpc.RpcError) as err:
            pull(img, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_registry_failure_carries_registry_message(img):
    with pytest.raises(grpc.RpcError) as err:
        pull(img, "127.0.0.1:5000/test/busybox:no-such-tag")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "manifest unknown" in err.value.details().lower()


def test_client_deadline_is_honoured(img, registry):
    # A registry that accepts the connection and never answers.
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            pull(img, f"127.0.0.1:{port}/test/slow:1", timeout=1.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        listener.close()


def image_bytes(img) -> tuple[int, int]:
    fs = img.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems[0]
    assert fs.fs_id.mountpoint and fs.timestamp > 0
    return fs.used_bytes.value, fs.inodes_used.value


def test_image_fs_info_counts_the_cells_images_and_remove_image_frees_them(cri, img, pod, test_images):
    # The layers live in the cells: pulling on the node alone takes no room there.
    ref = test_images["busybox-oci"].ref
    before = image_bytes(img)
    pull(img, ref)
    assert image_bytes(img) == before
    # A container makes its cell pull and unpack it: the cell's disk holds it now.
    cid = run(cri, pod, "fs-info", ref, ["true"])
    after = image_bytes(img)
    assert after[0] - before[0] >= test_images["busybox-oci"].size
    assert after[1] > before[1]
    # No container uses it any more: RemoveImage forgets it on the node and frees the cell's copy.
    cri.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))
    assert not img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref))).HasField("image")
    freed = image_bytes(img)
    # What is left is the cell's empty layout: a few small files.
    assert after[0] - freed[0] >= test_images["busybox-oci"].size and freed[0] - before[0] < 64 * 1024
    assert freed[1] - before[1] < 16
