"""Images as the node knows them: one record per image config, reached by tags and digests.

PullImage resolves the reference at the registry for the provider's default platform
and fetches the image into the node's content store (manifest, config, layers; only
manifest and config for cells that pull from the registries themselves); the
record's id is that platform's config digest. A cell of another platform (an arm64 VM
behind an amd64 node) gets its own manifest of the same index, fetched once and kept in
the record (`for_cell`); when the kubelet names the pod it pulls for, and that pod's cell
is of another platform, its manifest is fetched in the same PullImage.

Credentials serve the one PullImage that brought them and are never kept. A local cell
fetches what it runs from the node's pull path by digest (`ImageManager.cell_pull`,
`ContentStore.manifest_blobs`), so it never sees a registry or a password. A cell that
is a VM of its own pulls from the registries itself: the pod's credentials go to it over
the agent channel during the PullImage that brought them (the kubelet names the pod),
and a CreateContainer that finds the image missing there pulls without credentials. A
fetch that needs content the node's store lacks later on (an image recorded before the
store existed, a platform no PullImage asked for) goes to the registry without credentials.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import structlog

from kiyot_py.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from kiyot_py.model import Cell, CellFacts, Credentials, Image, PlatformImage
from kiyot_py.platforms import Platform
from kiyot_py.registry.client import (
    ImageNotFound,
    PlatformNotFound,
    RegistryClient,
    RegistryError,
    ResolvedImage,
    auth_for,
)
from kiyot_py.registry.config import RegistriesConfig
from kiyot_py.registry.content import ContentStore
from kiyot_py.registry.reference import InvalidReference, Reference, parse_reference
from kiyot_py.store import Store

log = structlog.get_logger("kiyot.pods.images")

_HEX_ID = re.compile(r"^(sha256:)?[0-9a-f]{6,64}$")


class RegistryFailure(Unavailable):
    """The registry refused or failed; the message is the registry's own."""


# What CellFacts() says when a cell has told nothing: the fallback default platform.
DEFAULT_PLATFORM = Platform("linux", "amd64")


class ImageManager:
    def __init__(
        self,
        store: Store,
        client: RegistryClient,
        config: RegistriesConfig,
        content: ContentStore | None,
        *,
        default_platform: Platform = DEFAULT_PLATFORM,
    ) -> None:
        """`default_platform` is what PullImage resolves for (the provider's cells' usual
        platform); cells of other platforms get theirs through `for_cell`. `content` is
        where the layers are kept for the cells' pull path; None when the cells pull from
        the registries themselves (EC2): then the node resolves manifests and configs only."""
        self._store = store
        self._client = client
        self._config = config
        self.content = content
        self.default_platform = default_platform
        self._images: dict[str, Image] = {img.id: img for img in store.load(Image)}
        self._resolving: dict[tuple[str, str], asyncio.Lock] = {}
        self._fetches = 0  # fetches writing the content store; collection waits for none
        self._collect_due = False

    async def pull(
        self, image: str, auth: Credentials | None, timeout: float | None = None,
        *, for_facts: CellFacts | None = None,
    ) -> Image:
        """Resolve and fetch `image`; with `for_facts` (the cell of the pod the kubelet pulls
        for) that cell's platform too, while the credentials are at hand."""
        ref = _parse(image)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        resolved = await self._resolve(ref, self.default_platform, auth, timeout, f"pulling {ref}")

        record = self._images.get(resolved.config_digest) or Image(id=resolved.config_digest)
        changed = [record]
        if ref.tag is not None and ref.digest is None:
            tag = f"{ref.name}:{ref.tag}"
            for other in self._images.values():  # a tag names one image at a time
                if other is not record and tag in other.repo_tags:
                    other.repo_tags.remove(tag)
                    changed.append(other)
            if tag not in record.repo_tags:
                record.repo_tags.append(tag)
        digest_ref = f"{ref.name}@{resolved.manifest_digest}"
        if digest_ref not in record.repo_digests:
            record.repo_digests.append(digest_ref)
        record.size = resolved.size
        record.platform_digest = resolved.platform_manifest_digest
        record.config = resolved.config
        self._images[record.id] = record
        self._store.put_all(changed)  # a moved tag lands on both records at once, or on neither
        log.info("image pulled", image=str(ref), id=record.id, size=record.size, endpoint=resolved.endpoint)
        if for_facts is not None:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            await self.for_cell(record, for_facts, left, auth=auth)
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
        """Forget the image, and free the blobs no other image names."""
        record = self.find(image)
        if record is None:
            return  # RemoveImage is idempotent
        del self._images[record.id]
        self._store.delete(Image, record.id)
        log.info("image removed", id=record.id)
        self._collect_due = True
        self._collect_when_idle()

    def _collect_when_idle(self) -> None:
        if self._fetches or not self._collect_due or self.content is None:
            return
        self._collect_due = False
        keep: set[str] = set()
        for record in self._images.values():
            for digest in record.platform_digests():
                keep.update(self.content.manifest_blobs(digest))
        self.content.collect(keep)

    async def for_cell(self, record: Image, facts: CellFacts, timeout: float | None = None,
                       *, auth: Credentials | None = None) -> PlatformImage:
        """The manifest and config of `record` a cell with these facts runs, in the
        content store by the time this returns.

        The record's own when its config's platform matches the cell's; else the same
        index (``repo_digests[0]``) resolved at the registry for the cell's platform, kept
        in ``record.platforms``. FailedPrecondition when the image has no manifest for it.
        """
        wanted = Platform.from_facts(facts)
        own = Platform.from_image_config(record.config)
        if own is None or own.matches(wanted):
            chosen = PlatformImage(record.platform_digest, record.config)
            if not self._holds(chosen.platform_digest):
                await self._fetch_again(record, chosen, timeout)
            return chosen
        key = str(wanted)
        cached = record.platforms.get(key)
        if cached is not None and self._holds(cached.platform_digest):
            return cached
        lock = self._resolving.setdefault((record.id, key), asyncio.Lock())
        try:
            async with lock:
                cached = record.platforms.get(key)
                if cached is None or not self._holds(cached.platform_digest):
                    cached = await self._resolve_platform(record, wanted, timeout, auth)
                    record.platforms[key] = cached
                    if self._images.get(record.id) is record:
                        self._store.put(record)
                    log.info("image platform fetched", id=record.id, platform=key,
                             digest=cached.platform_digest)
                return cached
        finally:
            if not lock.locked():
                self._resolving.pop((record.id, key), None)

    def _holds(self, platform_digest: str) -> bool:
        """Whether the node has what a cell fetches of this manifest (always, for cells that
        fetch from the registries)."""
        return self.content is None or self.content.has(platform_digest)

    async def _fetch_again(self, record: Image, chosen: PlatformImage, timeout: float | None) -> None:
        """The store lacks a recorded manifest (recorded before the store, or freed): fetch
        it by digest, anonymously."""
        if not record.repo_digests:
            raise FailedPrecondition(f"image {record.id} is not in the node's store and names no repository")
        ref = parse_reference(record.repo_digests[0].split("@", 1)[0] + "@" + chosen.platform_digest)
        platform = Platform.from_image_config(chosen.config) or self.default_platform
        await self._resolve(ref, platform, None, timeout, f"fetching {ref} into the node's store")

    async def _resolve_platform(self, record: Image, wanted: Platform, timeout: float | None,
                                auth: Credentials | None) -> PlatformImage:
        name = record.repo_tags[0] if record.repo_tags else (record.repo_digests or [record.id])[0]
        missing = f"image {name} has no {wanted} manifest"
        if not record.repo_digests:
            raise FailedPrecondition(f"{missing}: the record names no repository to ask")
        ref = parse_reference(record.repo_digests[0])
        if ref.digest == record.platform_digest:  # a single manifest, not an index
            raise FailedPrecondition(f"{missing}: it is built for {Platform.from_image_config(record.config)} only")
        resolved = await self._resolve(ref, wanted, auth, timeout,
                                       f"resolving {ref} for {wanted}", platform_missing=missing)
        if resolved.platform is not None and not resolved.platform.matches(wanted):
            raise FailedPrecondition(f"{missing}: {ref} is built for {resolved.platform}")
        return PlatformImage(resolved.platform_manifest_digest, resolved.config)

    async def _resolve(self, ref: Reference, platform: Platform, auth: Credentials | None,
                       timeout: float | None, what: str, platform_missing: str = "") -> ResolvedImage:
        """Resolve at the registry and fetch into the content store, its failures as the
        kinds a CRI client tells apart. An index without the platform is NotFound for a
        pull, and FailedPrecondition (with `platform_missing`) for a cell whose platform
        the image lacks."""
        self._fetches += 1
        try:
            return await asyncio.wait_for(
                self._client.resolve(ref, platform=platform, auth=auth, config=self._config,
                                     store=self.content), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{what}: deadline exceeded") from None
        except PlatformNotFound as exc:
            if platform_missing:
                raise FailedPrecondition(f"{platform_missing}: {exc}") from None
            raise NotFound(f"{what}: {exc}") from None
        except ImageNotFound as exc:
            raise NotFound(f"{what}: {exc}") from None
        except RegistryError as exc:
            raise RegistryFailure(f"{what}: {exc}") from None
        finally:
            self._fetches -= 1
            self._collect_when_idle()


    @staticmethod
    def repository_of(record: Image) -> str:
        """The image's repository, as a pull path client names it (for its logs only)."""
        return parse_reference(record.repo_digests[0]).repository if record.repo_digests else "image"

    def cell_pull(self, record: Image, cell: Cell, platform_digest: str,
                  auth: Credentials | None = None) -> dict[str, Any]:
        """What a cell's agent pulls for this image's manifest `platform_digest`, by digest.

        A cell with a pull path fetches from the node (the repository name is only for the
        agent's logs; never credentials). A cell that pulls for itself (a VM of its own)
        gets the registries to try, mirrors first as the node's registries.conf lists
        them, and `auth` only with the one its `server_address` names."""
        if cell.pull_path:
            at_node = f"{cell.pull_path}/{self.repository_of(record)}@{platform_digest}"
            return {"ref": at_node, "digest": platform_digest}
        if not record.repo_digests:
            raise FailedPrecondition(f"image {record.id} names no repository for cell {cell.id} to pull from")
        ref = parse_reference(record.repo_digests[0].split("@", 1)[0] + "@" + platform_digest)
        sources: list[dict[str, Any]] = []
        for endpoint in self._config.endpoints(ref):
            source: dict[str, Any] = {"ref": f"{endpoint.host}/{endpoint.repository(ref)}@{platform_digest}",
                                      "tls_verify": not endpoint.insecure}
            given = auth_for(endpoint, ref, auth)
            if given is not None:
                source["auth"] = {"username": given.username, "password": given.password}
            sources.append(source)
        return {"digest": platform_digest, "sources": sources}


def _parse(image: str) -> Reference:
    try:
        return parse_reference(image)
    except InvalidReference as exc:
        raise InvalidArgument(f"invalid image reference {image!r}: {exc}") from None
