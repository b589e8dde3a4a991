"""Registry tests: the session fixtures `registry` ("127.0.0.1:5000") and `test_images`
come from tests/conftest.py; the fake registry for auth and misbehaviour is in fake.py."""

from __future__ import annotations

import socket

import pytest

from tests.registry.fake import FakeRegistry


@pytest.fixture
async def fake():
    """A registry of the tests' own for auth flows and misbehaviour (see fake.py)."""
    f = FakeRegistry()
    await f.start()
    yield f
    await f.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
