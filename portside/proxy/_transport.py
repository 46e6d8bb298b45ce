"""What a hop sends upstream (`Forward`), what comes back (`UpstreamResponse`, `UpstreamSocket`),
and the interface of the transport between them (`UpstreamTransport`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from aiohttp import StreamReader, WSMessage, web
from multidict import CIMultiDict, CIMultiDictProxy

from portside.errors import UpstreamFailed, UpstreamRefused, UpstreamReset
from portside.proxy._headers import is_websocket_upgrade, offered_protocols, request_headers

# RFC 9110 9.2.2: the methods a client expects may be sent more than once.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A WebSocket message is held whole on each side of a hop, so some bound is needed; this one is
# far above what interactive sessions send and far below what would hurt a daemon.
WS_MAX_MESSAGE: Final = 64 * 1024 * 1024
# After one side of a WebSocket closes, how long the other side may take to finish closing.
WS_CLOSE_TIMEOUT: Final = 5.0


class RequestBody:
    """The client's request body as the upstream request's payload, streamed chunk by chunk.
    Remembers whether any of it was read: after that, sending again would send a truncated body."""

    __slots__ = ("_content", "started")

    def __init__(self, content: StreamReader) -> None:
        self._content = content
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self._content.iter_any():
            yield chunk


@dataclass(frozen=True, slots=True)
class Forward:
    """A request as it goes on to the next hop. `target` is the path and query exactly as the
    client sent them (never decoded and encoded again); a WebSocket upgrade has no body."""

    method: str
    target: str
    headers: CIMultiDict[str]
    body: RequestBody | None = None
    websocket: bool = False
    protocols: tuple[str, ...] = ()  # the WebSocket subprotocols the client offered


def forward_request(
    request: web.Request,
    *,
    ingress: bool,
    drop: Iterable[str] = (),
    add: Mapping[str, str] | None = None,
) -> Forward:
    """`request` as it goes on from this hop (`ingress`, `drop`, `add`: see request_headers)."""
    websocket = is_websocket_upgrade(request.method, request.headers)
    raw = request.raw_path  # absolute-form ("http://host/path") only from a misbehaving client
    return Forward(
        method=request.method,
        target=raw if raw.startswith("/") else request.rel_url.raw_path_qs,
        headers=request_headers(
            request.headers,
            peer=request.remote,
            scheme=request.scheme,
            host=request.host,
            ingress=ingress,
            drop=drop,
            add=add,
        ),
        body=RequestBody(request.content) if request.body_exists and not websocket else None,
        websocket=websocket,
        protocols=offered_protocols(request.headers) if websocket else (),
    )


class UpgradeRefused(UpstreamRefused):
    """The upstream answered a WebSocket upgrade with `status` instead of 101; `kind` is its
    Portside-Error header, if it sent one (another Portside hop refused, for that reason)."""

    def __init__(self, status: int, kind: str | None = None) -> None:
        self.status = status
        self.kind = kind
        answer = f"{status} {kind}" if kind else str(status)
        super().__init__(f"answered the WebSocket upgrade with {answer}")


def may_resend(forward: Forward, failure: UpstreamFailed) -> bool:
    """Whether `forward` may go out again (to a fresh route, or a container booted again) after
    `failure`. Never once any of its body was read. A failed connect sent nothing; after a reset
    the upstream may have acted on the request, so only an idempotent one goes again (RFC 9110
    9.2.2, what nginx's proxy_next_upstream does)."""
    if forward.body is not None and forward.body.started:
        return False
    if isinstance(failure, UpgradeRefused):
        return False  # an answer, not a failure to get one
    if isinstance(failure, UpstreamRefused):
        return True
    if isinstance(failure, UpstreamReset):
        return forward.method in IDEMPOTENT_METHODS
    return False


class UpstreamResponse(ABC):
    """The head of the upstream's response, and its body to stream."""

    __slots__ = ("headers", "reason", "status")

    def __init__(self, status: int, reason: str | None, headers: CIMultiDictProxy[str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as received: hop-by-hop headers are the relay's to drop

    @abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. A break midway raises UpstreamReset, UpstreamTimeout or
        UpstreamFailed."""

    @abstractmethod
    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if the body was read to
        its end, else it is closed."""


class MessageSocket(Protocol):
    """One side of a WebSocket, message by message (aiohttp's server and client sockets are)."""

    @property
    def close_code(self) -> int | None: ...

    async def receive(self) -> WSMessage: ...

    async def send_str(self, data: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool: ...


@dataclass(frozen=True, slots=True)
class UpstreamSocket:
    """An upstream WebSocket, open: the subprotocol the upstream chose, if any."""

    socket: MessageSocket
    protocol: str | None


Upstream = UpstreamResponse | UpstreamSocket


class UpstreamTransport(Protocol):
    """Sends a `Forward` to one upstream ("host:port") over pooled connections.

    `open` returns an UpstreamResponse for a request, an UpstreamSocket for a WebSocket
    upgrade; it raises, classified once here for every daemon: UpstreamRefused (no connection
    could be made: nothing was sent), UpstreamReset (the connection closed before a response),
    UpstreamTimeout (no response within the read deadline), UpgradeRefused (an answer other than
    101 to an upgrade) and UpstreamFailed (anything else). Their message is the bare reason
    ("Connection refused"); the daemon says which upstream it was."""

    async def open(self, authority: str, forward: Forward) -> Upstream: ...

    async def close(self) -> None: ...
