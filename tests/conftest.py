"""Shared session fixtures: a local OCI registry and the test images pushed to it.

- `registry` -> "127.0.0.1:5000": whatever answers at http://127.0.0.1:5000/v2/ (scripts/test.sh
  starts one), else a `docker-registry` started here for the session.
- `test_images` -> dict[str, tests.support.images.TestImage], keyed by short name:
  busybox, busybox-oci, busybox-index, app, evil-dotdot, evil-abs, evil-hardlink, evil-symlink.

Other fixtures belong in the directories' own conftest.py files.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import images as _images
from tests.support import registry as _registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """"127.0.0.1:5000", once its /v2/ answers (started here if nothing answers)."""
    addr = _registry.REGISTRY
    if _registry.v2_up(addr):
        yield addr
        return
    try:
        proc = _registry.start_registry(tmp_path_factory.mktemp("registry"), addr)
    except _registry.RegistryError as e:
        pytest.fail(f"no OCI registry for the tests: {e}", pytrace=False)
    try:
        yield addr
    finally:
        _registry.stop_registry(proc)


@pytest.fixture(scope="session")
def test_images(registry: str) -> dict[str, _images.TestImage]:
    """The test images, pushed to `registry` (idempotent: present blobs are skipped)."""
    try:
        return _images.push_test_images(registry)
    except FileNotFoundError as e:
        pytest.fail(f"cannot build the test images: {e}", pytrace=False)


@pytest.fixture
async def fake():
    """A registry of the tests' own on loopback for auth flows, multi-arch indexes and
    misbehaviour (tests/registry/fake.py)."""
    from tests.registry.fake import FakeRegistry

    f = FakeRegistry()
    await f.start()
    yield f
    await f.stop()
