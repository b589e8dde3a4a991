"""One request to a registry endpoint, with the http/https choice of an insecure one.

Shared by the node's client and the pull path, so that both pick the scheme the same
way: a secure endpoint is https only; an insecure one (registries.conf ``insecure``)
tries plain http first, then https without verifying TLS, and remembers per host the
scheme that answered.
"""

from __future__ import annotations

from collections import OrderedDict

import aiohttp

from kiyot_py.registry.config import Endpoint

SCHEME_CACHE_SIZE = 1024  # hosts; a pod naming hosts at will cannot grow it past this


class SchemeCache:
    """Which scheme answered for each insecure host (http or https), the most recent kept."""

    def __init__(self, size: int = SCHEME_CACHE_SIZE) -> None:
        self._by_host: OrderedDict[str, str] = OrderedDict()
        self._size = size

    def schemes(self, endpoint: Endpoint) -> list[str]:
        if not endpoint.insecure:
            return ["https"]
        known = self._by_host.get(endpoint.api_host)
        return [known] if known else ["http", "https"]

    def remember(self, endpoint: Endpoint, scheme: str) -> None:
        if endpoint.insecure:
            self._by_host[endpoint.api_host] = scheme
            self._by_host.move_to_end(endpoint.api_host)
            while len(self._by_host) > self._size:
                self._by_host.popitem(last=False)


async def request(
    session: aiohttp.ClientSession,
    method: str,
    endpoint: Endpoint,
    path: str,
    headers: dict[str, str],
    schemes: SchemeCache,
) -> aiohttp.ClientResponse:
    """``method`` ``path`` on the endpoint, following redirects; the caller releases the answer.

    A connection failure (or a body cut short) moves on to the next scheme; when every
    scheme failed the last error is raised. Any other ``aiohttp.ClientError`` is raised
    at once. Go's TLS servers answer plain HTTP with 400 "Client sent an HTTP request
    to an HTTPS server": that moves on to https too (for HEAD, which has no body to
    tell by, the 400 is returned as is).
    """
    order = schemes.schemes(endpoint)
    host = endpoint.api_host
    last: aiohttp.ClientError | None = None
    for i, scheme in enumerate(order):
        url = f"{scheme}://{host}{path}"
        ssl = not (scheme == "https" and endpoint.insecure)
        try:
            resp = await session.request(method, url, headers=headers, ssl=ssl, allow_redirects=True)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            last = exc
            continue
        if scheme == "http" and resp.status == 400 and i + 1 < len(order):
            if method == "HEAD":
                return resp  # no body to tell an HTTPS-only server by: keep it, remember nothing
            peek = await resp.content.read(512)
            resp.release()
            if b"HTTPS" in peek:
                continue
            # Some other 400: ask again for an answer with its whole body.
            resp = await session.request(method, url, headers=headers, ssl=ssl, allow_redirects=True)
        schemes.remember(endpoint, scheme)
        return resp
    if last is None:  # SchemeCache.schemes never returns []
        raise aiohttp.ClientConnectionError(f"{host}: no scheme to try")
    raise last
