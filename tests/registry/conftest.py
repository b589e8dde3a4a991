"""Registry tests: the session fixtures `registry` ("127.0.0.1:5000") and `test_images`
and `fake` (the registry for auth and misbehaviour, fake.py) come from tests/conftest.py."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
