"""Local cells run the node's one unpack of an image (pods/shared_images.py): two pods'
containers share one read-only tree on the node, no cell unpacks the image itself, and
RemoveImage takes the tree away once no container uses it."""

from __future__ import annotations

import json

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import cell_dir, new_pod, remove_pod, run, wait_state


def test_local_cells_share_the_nodes_one_unpack(service, cri, img, test_images, tmp_path):
    ref = test_images["busybox"].ref
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    unpacked = service.state_dir / "shared-images" / "images" / "unpacked"
    pods = [new_pod(cri, f"shared-{i}", tmp_path) for i in range(2)]
    try:
        for i, pod in enumerate(pods):
            cid = run(cri, pod, "writer", ref, ["sh", "-c", f"echo {i} > /etc/written && cat /etc/written"])
            assert wait_state(cri, cid, pb.CONTAINER_EXITED).exit_code == 0
        trees = {p.name for p in unpacked.iterdir()}
        for sandbox_id, _ in pods:
            images = json.loads((cell_dir(service.state_dir, sandbox_id) / "agent" / "images" / "images.json")
                                .read_text())
            (entry,) = images.values()
            assert entry["shared"] == str(unpacked / entry["tag"]) and entry["tag"] in trees
            assert not (cell_dir(service.state_dir, sandbox_id) / "agent" / "images" / "unpacked").exists()
        (tag,) = {json.loads((cell_dir(service.state_dir, s) / "agent" / "images" / "images.json").read_text())
                  .popitem()[1]["tag"] for s, _ in pods}
        assert not (unpacked / tag / "rootfs" / "etc" / "written").exists()  # each wrote in its overlay

        img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))
        assert (unpacked / tag).is_dir()  # containers still have it as their lower layer
    finally:
        for sandbox_id, _ in pods:
            remove_pod(cri, sandbox_id)
    img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))  # idempotent: prunes what is unused
    assert not (unpacked / tag).exists()
