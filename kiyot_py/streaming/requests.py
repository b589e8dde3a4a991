"""What an Exec, Attach or PortForward RPC asked for, kept under a single-use token.

The RPC answers a URL that names the token; the client then connects to the streaming
server, which takes the request back by its token. As the kubelet's own request cache:
6 random bytes (8 characters of base64url), valid for a minute, used once, at most 1000
waiting at a time.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kiyot_py.errors import ResourceExhausted

TOKEN_TTL = 60.0
MAX_WAITING = 1000


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: tuple[str, ...]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    ports: tuple[int, ...] = field(default=())


StreamRequest = ExecRequest | AttachRequest | PortForwardRequest

KIND = {ExecRequest: "exec", AttachRequest: "attach", PortForwardRequest: "portforward"}


class RequestCache:
    def __init__(self, ttl: float = TOKEN_TTL, limit: int = MAX_WAITING) -> None:
        self._ttl = ttl
        self._limit = limit
        self._waiting: OrderedDict[str, tuple[float, StreamRequest]] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._waiting:
            token, (deadline, _) = next(iter(self._waiting.items()))
            if deadline > now:
                break
            del self._waiting[token]

    def put(self, request: StreamRequest) -> str:
        now = time.monotonic()
        self._expire(now)
        if len(self._waiting) >= self._limit:
            raise ResourceExhausted(f"{self._limit} streaming requests are waiting for their clients; try again later")
        token = base64.urlsafe_b64encode(secrets.token_bytes(6)).decode().rstrip("=")
        self._waiting[token] = (now + self._ttl, request)
        return token

    def take(self, token: str) -> StreamRequest | None:
        """The request of `token`, once: None when it is unknown, used or expired."""
        self._expire(time.monotonic())
        entry = self._waiting.pop(token, None)
        return entry[1] if entry is not None else None

    def __len__(self) -> int:
        return len(self._waiting)
