"""CRI ImageService: one small method per RPC."""

from __future__ import annotations

import base64
import binascii
import json
import os

from kiyot_py.cri import convert
from kiyot_py.cri.errors import answer_unimplemented, rpc
from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.gen.runtime.v1 import api_pb2_grpc
from kiyot_py.model import Credentials, now_ns
from kiyot_py.pods.errors import InvalidArgument
from kiyot_py.pods.images import ImageManager


def credentials(auth: pb.AuthConfig) -> Credentials | None:
    if auth.username or auth.password:
        return Credentials(auth.username, auth.password)
    if auth.auth:
        try:
            user, _, password = base64.b64decode(auth.auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument("auth is not base64 of 'user:password'") from None
        return Credentials(user, password)
    return None


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, images: ImageManager, state_dir: str) -> None:
        self._images = images
        self._state_dir = state_dir

    @rpc
    async def PullImage(self, request, context):
        if not request.image.image:
            raise InvalidArgument("PullImage needs an image reference")
        record = await self._images.pull(
            request.image.image, credentials(request.auth), timeout=context.time_remaining()
        )
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
        self._images.remove(request.image.image)
        return pb.RemoveImageResponse()

    @rpc
    async def ImageFsInfo(self, request, context):
        st = os.statvfs(self._state_dir)
        usage = pb.FilesystemUsage(
            timestamp=now_ns(),
            fs_id=pb.FilesystemIdentifier(mountpoint=self._state_dir),
        )
        # The layers live in the cells; the node holds only records of them.
        usage.used_bytes.value = self._images.used_bytes()
        usage.inodes_used.value = max(st.f_files - st.f_ffree, 0)
        return pb.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])


answer_unimplemented(ImageService, pb.DESCRIPTOR.services_by_name["ImageService"])
