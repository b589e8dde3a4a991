"""Images as the node knows them: one record per image config, reached by tags and digests.

PullImage resolves the reference at the registry (manifest, config, size) and records
it; the layers themselves are pulled inside each cell that runs the image.
"""

from __future__ import annotations

import asyncio
import re

import structlog

from kiyot_py.model import Cell, Credentials, Image
from kiyot_py.pods.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from kiyot_py.registry.client import ImageNotFound, RegistryClient, RegistryError
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.pullpath import cell_reference
from kiyot_py.registry.reference import InvalidReference, Reference, parse_reference
from kiyot_py.store import Store

log = structlog.get_logger("kiyot.pods.images")

_HEX_ID = re.compile(r"^(sha256:)?[0-9a-f]{6,64}$")


class RegistryFailure(Unavailable):
    """The registry refused or failed; the message is the registry's own."""


class ImageManager:
    def __init__(self, store: Store, client: RegistryClient, config: RegistriesConfig) -> None:
        self._store = store
        self._client = client
        self._config = config
        self._images: dict[str, Image] = {img.id: img for img in store.load(Image)}

    async def pull(
        self, image: str, auth: Credentials | None, timeout: float | None = None
    ) -> Image:
        ref = _parse(image)
        try:
            resolved = await asyncio.wait_for(
                self._client.resolve(ref, auth=auth, config=self._config), timeout
            )
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"pulling {ref}: deadline exceeded") from None
        except ImageNotFound as exc:
            raise NotFound(f"pulling {ref}: {exc}") from None
        except RegistryError as exc:
            raise RegistryFailure(f"pulling {ref}: {exc}") from None

        record = self._images.get(resolved.config_digest) or Image(id=resolved.config_digest)
        if ref.tag is not None and ref.digest is None:
            tag = f"{ref.name}:{ref.tag}"
            for other in self._images.values():  # a tag names one image at a time
                if other is not record and tag in other.repo_tags:
                    other.repo_tags.remove(tag)
                    self._store.put(other)
            if tag not in record.repo_tags:
                record.repo_tags.append(tag)
        digest_ref = f"{ref.name}@{resolved.manifest_digest}"
        if digest_ref not in record.repo_digests:
            record.repo_digests.append(digest_ref)
        record.size = resolved.size
        record.platform_digest = resolved.platform_manifest_digest
        record.config = resolved.config
        if auth is not None:
            record.auth[ref.name] = auth
        self._images[record.id] = record
        self._store.put(record)
        log.info("image pulled", image=str(ref), id=record.id, size=record.size)
        return record

    def find(self, image: str) -> Image | None:
        """By id (or a unique id prefix), by name:tag, or by name@digest."""
        if _HEX_ID.match(image):
            wanted = image if image.startswith("sha256:") else f"sha256:{image}"
            matches = [i for i in self._images.values() if i.id.startswith(wanted)]
            if len(matches) == 1:
                return matches[0]
        try:
            ref = parse_reference(image)
        except InvalidReference:
            return None
        for record in self._images.values():
            if ref.digest is not None:
                if f"{ref.name}@{ref.digest}" in record.repo_digests:
                    return record
            elif f"{ref.name}:{ref.tag or 'latest'}" in record.repo_tags:
                return record
        return None

    def get(self, image: str) -> Image:
        record = self.find(image)
        if record is None:
            raise NotFound(f"image {image!r} not found: pull it first")
        return record

    def list(self) -> list[Image]:
        return list(self._images.values())

    def remove(self, image: str) -> None:
        record = self.find(image)
        if record is None:
            return  # RemoveImage is idempotent
        del self._images[record.id]
        self._store.delete(Image, record.id)
        log.info("image removed", id=record.id)

    def cell_pull(self, record: Image, cell: Cell) -> dict:
        """What a cell's agent needs to pull this image: where from, which digest, auth."""
        name = record.repo_digests[0].split("@", 1)[0]
        ref = parse_reference(name)
        creds = record.auth.get(ref.name)
        auth = {"username": creds.username, "password": creds.password} if creds else None
        if cell.pull_path:
            source = cell_reference(cell.pull_path, ref, record.platform_digest)
            return {"ref": source, "digest": record.platform_digest, "tls_verify": False, "auth": auth}
        endpoint = self._config.endpoints(ref)[-1]
        return {
            "ref": f"{ref.name}@{record.platform_digest}",
            "digest": record.platform_digest,
            "tls_verify": not endpoint.insecure,
            "auth": auth,
        }


def _parse(image: str) -> Reference:
    try:
        return parse_reference(image)
    except InvalidReference as exc:
        raise InvalidArgument(f"invalid image reference {image!r}: {exc}") from None
