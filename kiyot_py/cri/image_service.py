"""CRI ImageService: one small method per RPC."""

from __future__ import annotations

import base64
import binascii
import json

from kiyot_py.cri import convert
from kiyot_py.cri.errors import answer_unimplemented, rpc
from kiyot_py.errors import InvalidArgument
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from kiyot_py.model import Credentials, now_ns
from kiyot_py.pods.images import ImageManager
from kiyot_py.pods.runtime import PodRuntime


def credentials(auth: pb.AuthConfig) -> Credentials | None:
    """The PullImage's credentials, for the host `server_address` names (the image's own
    registry when it names none)."""
    if auth.username or auth.password:
        return Credentials(auth.username, auth.password, auth.server_address)
    if auth.auth:
        try:
            user, _, password = base64.b64decode(auth.auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument("auth is not base64 of 'user:password'") from None
        return Credentials(user, password, auth.server_address)
    return None


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, runtime: PodRuntime, state_dir: str) -> None:
        self._rt = runtime
        self._images: ImageManager = runtime.images
        self._state_dir = state_dir

    @rpc
    async def PullImage(self, request, context):
        if not request.image.image:
            raise InvalidArgument("PullImage needs an image reference")
        # The kubelet names the pod it pulls for: fetch its cell's platform at once too,
        # while the credentials are at hand (they are kept nowhere after this call).
        facts = self._rt.facts_of_pod(request.sandbox_config) if request.HasField("sandbox_config") else None
        auth = credentials(request.auth)
        record = await self._images.pull(request.image.image, auth, timeout=context.time_remaining(), for_facts=facts)
        if request.HasField("sandbox_config"):
            await self._rt.pull_into_pod_cell(request.sandbox_config, record, auth)
        return pb.PullImageResponse(image_ref=record.id)

    def _list(self, f: pb.ImageFilter) -> list[pb.Image]:
        if f.image.image:
            found = self._images.find(f.image.image)
            return [convert.image(found)] if found else []
        return [convert.image(i) for i in self._images.list()]

    @rpc
    async def ListImages(self, request, context):
        return pb.ListImagesResponse(images=self._list(request.filter))

    @rpc
    async def StreamImages(self, request, context):
        for page in convert.pages(self._list(request.filter)):
            yield pb.StreamImagesResponse(images=page)

    @rpc
    async def ImageStatus(self, request, context):
        found = self._images.find(request.image.image)
        if found is None:
            return pb.ImageStatusResponse()  # CRI: a missing image is not an error here
        info = {}
        if request.verbose:
            info = {"info": json.dumps({"platform_digest": found.platform_digest,
                                        "config": found.config})}
        return pb.ImageStatusResponse(image=convert.image(found), info=info)

    @rpc
    async def RemoveImage(self, request, context):
        await self._rt.cell_images.remove(request.image.image)
        return pb.RemoveImageResponse()

    @rpc
    async def ImageFsInfo(self, request, context):
        # The layers live in the cells, under the state dir (local cells) or on their own
        # disks; the node itself holds only records of them.
        usage = await self._rt.cell_images.usage()
        now = now_ns()

        def filesystem(kind: str) -> pb.FilesystemUsage:
            fs = pb.FilesystemUsage(timestamp=now, fs_id=pb.FilesystemIdentifier(mountpoint=self._state_dir))
            fs.used_bytes.value = usage[kind]["bytes"]
            fs.inodes_used.value = usage[kind]["inodes"]
            return fs
        return pb.ImageFsInfoResponse(image_filesystems=[filesystem("images")],
                                      container_filesystems=[filesystem("containers")])


answer_unimplemented(ImageService, pb.DESCRIPTOR.services_by_name["ImageService"])
