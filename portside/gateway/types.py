"""The request and response a gateway module sees (issue 14): small, and streaming.

    from portside.gateway import Request, Response

    async def fetch(request: Request, env) -> Response:
        if request.headers.get("x-version") == "v2":
            return await env.API_V2.get("main").fetch(request)
        return Response("not found\\n", status=404)

Headers are a case-insensitive multi-dict (`multidict.CIMultiDict`): `headers["X-A"]`,
`headers.get("x-a")`, `headers.getall("set-cookie", [])`, `headers.add(name, value)`. A body is
read once, as a stream (`async for chunk in request.body`) or whole (`await request.read()`,
`.text()`, `.json()`); a body given as bytes, str or an async iterable of bytes streams as it is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from multidict import CIMultiDict, MultiDict

Body = bytes | bytearray | str | AsyncIterable[bytes] | None
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]] | CIMultiDict[str] | None


def make_headers(headers: HeadersLike) -> CIMultiDict[str]:
    if headers is None:
        return CIMultiDict()
    if isinstance(headers, Mapping):
        return CIMultiDict(headers)
    return CIMultiDict(list(headers))


class BodyStream:
    """A body read once: its chunks as they come, or all of it."""

    __slots__ = ("_source", "_used", "length")

    def __init__(self, body: Body) -> None:
        if isinstance(body, str):
            body = body.encode()
        self.length: int | None = None  # bytes, when known before reading
        if body is None:
            body = b""
        if isinstance(body, bytes | bytearray):
            self.length = len(body)
        self._source: bytes | bytearray | AsyncIterable[bytes] = body
        self._used = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self._used:
            raise RuntimeError("this body was already read")
        self._used = True
        source = self._source
        if isinstance(source, bytes | bytearray):
            if source:
                yield bytes(source)
            return
        async for chunk in source:
            if chunk:
                yield bytes(chunk)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    def take(self) -> bytes | bytearray | AsyncIterable[bytes]:
        """What the body streams from, for a hop that passes it on unread (no copy); it counts
        as read from here on."""
        if self._used:
            raise RuntimeError("this body was already read")
        self._used = True
        return self._source


class _Message:
    headers: CIMultiDict[str]
    body: BodyStream

    async def read(self) -> bytes:
        return await self.body.read()

    async def text(self) -> str:
        return (await self.read()).decode()

    async def json(self) -> Any:
        return json.loads(await self.read())


class Request(_Message):
    """An HTTP request: `method`, `url` (absolute, or a path for a stub's fetch), `headers`,
    `body`. `path`, `query` and `host` are read from the URL."""

    def __init__(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: HeadersLike = None,
        body: Body = None,
        client: str = "",
    ) -> None:
        self.url = url
        self.method = method.upper()
        self.headers = make_headers(headers)
        self.body = BodyStream(body)
        self.client = client  # the client's IP address ("" when made by code)

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))

    @property
    def target(self) -> str:
        """The path and query, as a request line carries them."""
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc or self.headers.get("Host", "")

    @property
    def is_websocket(self) -> bool:
        return self.headers.get("Upgrade", "").lower() == "websocket"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url}>"


class Response(_Message):
    """An HTTP response: `status`, `headers`, `body`."""

    # A stub's 101 to a WebSocket upgrade carries the upgraded connection here, for the host
    # to splice to its client when the handler returns it (portside/gateway/relay.py).
    _socket: Any = None

    def __init__(
        self, body: Body = None, *, status: int = 200, headers: HeadersLike = None
    ) -> None:
        if not 100 <= status <= 599:
            raise ValueError(f"status {status} is not an HTTP status (100-599)")
        self.status = status
        self.headers = make_headers(headers)
        self.body = BodyStream(body)

    @classmethod
    def from_json(cls, value: Any, *, status: int = 200, headers: HeadersLike = None) -> Response:
        out = cls(json.dumps(value), status=status, headers=headers)
        out.headers.setdefault("Content-Type", "application/json")
        return out

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


__all__ = ["Body", "BodyStream", "HeadersLike", "Request", "Response", "make_headers"]
