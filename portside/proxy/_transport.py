"""What a hop sends upstream (`Forward`), what comes back (`UpstreamResponse`, `UpstreamSocket`),
and the interface of the transport between them (`UpstreamTransport`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from portside.errors import UpstreamFailed, UpstreamRefused, UpstreamReset
from portside.proxy._headers import offered_protocols, request_headers
from portside.proxy._server import BodySink, Request
from portside.proxy._wire import Framing

# RFC 9110 9.2.2: the methods a client expects may be sent more than once.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# After one side of a WebSocket closes, how long the other side may take to finish closing.
WS_CLOSE_TIMEOUT: Final = 5.0


class ForwardBody(Protocol):
    """A request body as the transport sends it: a client's (`RequestBody`), or one a gateway
    handler made (portside/gateway/relay.py). `pipe` passes it to the sink as it comes, the
    sink calls `pause`/`resume` while it is slow; `unpipe` drops what is still to come;
    `started` says whether any of it was taken (then it cannot be sent again)."""

    @property
    def framing(self) -> Framing: ...

    @property
    def started(self) -> bool: ...

    def pipe(self, sink: BodySink) -> None: ...

    def unpipe(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Forward:
    """A request as it goes on to the next hop. `target` is the path and query exactly as the
    client sent them (never decoded and encoded again); a WebSocket upgrade has no body."""

    method: str
    target: str
    headers: CIMultiDict[str]
    body: ForwardBody | None = None
    websocket: bool = False
    protocols: tuple[str, ...] = ()  # the WebSocket subprotocols the client offered


def forward_request(
    request: Request,
    *,
    ingress: bool,
    drop: Iterable[str] = (),
    add: Mapping[str, str] | None = None,
) -> Forward:
    """`request` as it goes on from this hop (`ingress`, `drop`, `add`: see request_headers).
    A WebSocket upgrade keeps its handshake fields: the client and the container shake hands
    through the hops, which pass the connection's bytes on once it is open."""
    target = request.target
    if not target.startswith("/"):
        # Absolute-form ("http://host/path"), from a client that takes this for a proxy.
        after_scheme = target.partition("://")[2]
        target = "/" + after_scheme.partition("/")[2]
    return Forward(
        method=request.method,
        target=target,
        headers=request_headers(
            request.headers,
            peer=request.peer,
            scheme=request.scheme,
            host=request.host,
            ingress=ingress,
            drop=drop,
            add=add,
        ),
        body=request.body,
        websocket=request.websocket,
        protocols=offered_protocols(request.headers) if request.websocket else (),
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

    __slots__ = ("_headers", "fields", "reason", "status")

    framing: Framing
    trailers: list[tuple[str, str]]  # the body's trailer fields, once it has ended

    def __init__(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDictProxy[str] | list[tuple[str, str]],
    ) -> None:
        self.status = status
        self.reason = reason
        # As received: hop-by-hop headers are the relay's to drop. The mapping is built only
        # for those who look a header up (the relay passes the fields on as they are).
        if isinstance(headers, list):
            self.fields = headers
            self._headers: CIMultiDictProxy[str] | None = None
        else:
            self.fields = list(headers.items())
            self._headers = headers

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(CIMultiDict(self.fields))
        return self._headers

    @abstractmethod
    async def relay(self, request: Request) -> None:
        """Stream the body into `request`'s answer (its head already started) as it comes, as
        fast as the client takes it. A break midway raises UpstreamReset, UpstreamTimeout or
        UpstreamFailed."""

    @abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (raises as `relay` does)."""

    @abstractmethod
    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if the body was read to
        its end, else it is closed."""


@dataclass(frozen=True, slots=True, eq=False)
class UpstreamSocket:
    """An upstream WebSocket, open: the upstream's 101 (its subprotocol in `protocol`), and its
    connection, to be bridged to the client's byte for byte (`early`: what came after the 101)."""

    connection: Any
    protocol: str | None
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    early: bytes = b""

    def close(self, code: int = 1001, reason: bytes = b"") -> None:
        """Close it from this hop (a close frame with `code`, then the connection)."""
        from portside.proxy._tunnel import close_upstream

        close_upstream(self.connection, code, reason)


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

    async def prepare(self, authority: str) -> None:
        """Open a connection to `authority` ahead of a request and pool it idle (none if one
        is pooled already), for the request's `open` to take without a connect of its own.
        Raises UpstreamRefused."""

    async def close(self) -> None: ...
