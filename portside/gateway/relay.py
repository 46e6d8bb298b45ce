"""Between the proxy core and the gateway's Request/Response, for the hosts that run handlers:
a client's request as a Request, a Request as the Forward a hop sends on, an upstream's answer
as a Response, and a Response written back to the client. Bodies stream with backpressure and
are never copied: a body nobody read passes straight through, as on a static route.

    with relay.exchange():                      # what the request opened is released at its end
        response = await runtime.fetch(relay.request_of(client))
        await relay.answer(client, response, core, on_break=note_it)

and in a Router's fetch: `forward_of(request, add=...)`, then `response_of(upstream)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Final
from urllib.parse import urlsplit

from portside.errors import GatewayError, UpstreamFailed
from portside.gateway import scope
from portside.gateway.module import CODE_FAILURES
from portside.gateway.scope import exchange
from portside.gateway.types import Request, Response
from portside.proxy import (
    BodySink,
    ClientGone,
    Forward,
    Framing,
    ProxyCore,
    RequestBody,
    Upstream,
    UpstreamResponse,
    UpstreamSocket,
    is_websocket_upgrade,
    offered_protocols,
    request_headers,
    response_fields,
)
from portside.proxy import Request as ClientRequest

log = logging.getLogger(__name__)

OnBreak = Callable[[UpstreamFailed], None]

# Methods whose empty body goes without a Content-Length (RFC 9110 8.6: a user agent should
# not send one for a request without content when the method defines no meaning for it).
_BODILESS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

# --- the client's request as a Request ------------------------------------------------------


class ClientBody:
    """A client's request body as a Request streams it: read chunk by chunk, or passed whole
    to the next hop by `forward_of` when nobody read it."""

    __slots__ = ("raw",)

    def __init__(self, raw: RequestBody) -> None:
        self.raw = raw

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.raw.read():
            yield chunk


def request_of(client: ClientRequest) -> Request:
    """The request a handler sees: the client's method, URL, headers (the same object, not a
    copy) and body, streaming."""
    target = client.target
    url = target if not target.startswith("/") else f"{client.scheme}://{client.host}{target}"
    raw = client.body
    request = Request(
        url,
        method=client.method,
        body=ClientBody(raw) if raw is not None else None,
        client=client.peer or "",
    )
    request.headers = client.headers
    if raw is not None:
        request.body.length = raw.length
    return request


# --- a Request as the Forward a hop sends ---------------------------------------------------


class _StreamedBody:
    """A request body the handler made (bytes, or an async iterable), sent as a client's is:
    piped to the upstream connection and paused while it is slow (a ForwardBody)."""

    __slots__ = ("_resume", "_source", "_task", "framing", "started")

    def __init__(self, source: bytes | bytearray | AsyncIterable[bytes]) -> None:
        self._source = source
        self.framing = Framing.LENGTH if isinstance(source, bytes | bytearray) else Framing.CHUNKED
        self.started = False
        self._task: asyncio.Task[None] | None = None
        self._resume: asyncio.Event | None = None

    def pipe(self, sink: BodySink) -> None:
        self.started = True
        source = self._source
        if isinstance(source, bytes | bytearray):
            sink.body_data(bytes(source))  # the transport buffers what the socket cannot take
            sink.body_end([])
            return
        self._resume = asyncio.Event()
        self._resume.set()
        self._task = asyncio.get_running_loop().create_task(self._feed(source, sink))

    async def _feed(self, source: AsyncIterable[bytes], sink: BodySink) -> None:
        assert self._resume is not None
        try:
            async for chunk in source:
                if chunk:
                    sink.body_data(bytes(chunk))
                await self._resume.wait()
        except ClientGone as exc:  # the handler's body came from a client that left
            log.info("a gateway request body broke off: %s", exc)
            sink.body_failed(exc)
            return
        except CODE_FAILURES as exc:
            log.error("a gateway request body raised while it was being sent", exc_info=exc)
            sink.body_failed(exc)
            return
        sink.body_end([])

    def unpipe(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def pause(self) -> None:
        if self._resume is not None:
            self._resume.clear()

    def resume(self) -> None:
        if self._resume is not None:
            self._resume.set()


def forward_of(request: Request, *, add: Mapping[str, str], ingress: bool = True) -> Forward:
    """`request` as it goes on to an instance, with the hop's header hygiene (as
    `proxy.forward_request`), `add` set, and its body: the client's own when nobody read it
    (streamed as it comes, its framing kept), else what the handler gave it (its length when
    known, chunked when not). Raises RuntimeError if its body was read already."""
    websocket = is_websocket_upgrade(request.method, request.headers)
    extra = dict(add)
    drop: tuple[str, ...] = ()
    body: RequestBody | _StreamedBody | None = None
    if not websocket:
        source = request.body.take()
        if isinstance(source, ClientBody):
            body = source.raw
        elif isinstance(source, bytes | bytearray):
            if source or request.method not in _BODILESS:
                extra["Content-Length"] = str(len(source))
            else:
                drop = ("Content-Length",)
            body = _StreamedBody(source) if source else None
        else:
            drop = ("Content-Length",)
            body = _StreamedBody(source)
    parts = urlsplit(request.url)
    headers = request_headers(
        request.headers,
        peer=request.client or None,
        scheme=parts.scheme or "http",
        host=request.host,
        ingress=ingress,
        drop=drop,
        add=extra,
    )
    if not request.host:
        headers.popall("X-Forwarded-Host", None)  # a request made from a path had none
    return Forward(
        method=request.method,
        target=request.target,
        headers=headers,
        body=body,
        websocket=websocket,
        protocols=offered_protocols(request.headers) if websocket else (),
    )


# --- an upstream's answer as a Response -----------------------------------------------------


class UpstreamBody:
    """An upstream response's body as a Response streams it: read chunk by chunk, or relayed
    straight to the client by `answer` when nobody read it. Its connection is released once:
    at the body's end, or at the exchange's."""

    __slots__ = ("_handed_over", "_on_release", "_released", "upstream")

    def __init__(self, upstream: UpstreamResponse, on_release: Callable[[], None] | None) -> None:
        self.upstream = upstream
        self._on_release = on_release
        self._released = False
        self._handed_over = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        chunks = self.upstream.chunks()
        try:
            # Each read is a stub call: a task the handler spawned that still reads when the
            # exchange ends is cancelled, not left waiting on the connection released under it.
            while chunk := await scope.stub_call(anext(chunks, b"")):
                yield chunk
        finally:
            self.release()

    def hand_over(self) -> UpstreamResponse:
        """The upstream, for a relay that releases it itself (a second release would close the
        connection it gave back to the pool); `release` then only runs `on_release`."""
        self._handed_over = True
        return self.upstream

    def release(self) -> None:
        if not self._released:
            self._released = True
            if not self._handed_over:
                self.upstream.release()
            if self._on_release is not None:
                self._on_release()


class Upgraded:
    """An upstream WebSocket, open, on its way to the client (`Response._socket`). Closed at the
    exchange's end unless the host took it to splice to its client."""

    __slots__ = ("_on_release", "_released", "socket", "taken")

    def __init__(self, socket: UpstreamSocket, on_release: Callable[[], None] | None) -> None:
        self.socket = socket
        self.taken = False
        self._on_release = on_release
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if not self.taken:
            self.socket.close()
        if self._on_release is not None:
            self._on_release()


def response_of(upstream: Upstream, on_release: Callable[[], None] | None = None) -> Response:
    """The upstream's answer as a Response (hop-by-hop headers gone, body still streaming); an
    upgraded WebSocket as a 101 carrying it. `on_release` runs once it is released."""
    if isinstance(upstream, UpstreamSocket):
        upgraded = Upgraded(upstream, on_release)
        scope.opened(upgraded)
        response = Response(status=101, headers=response_fields(list(upstream.headers.items())))
        response._socket = upgraded
        return response
    body = UpstreamBody(upstream, on_release)
    scope.opened(body)
    return Response(body, status=upstream.status, headers=response_fields(upstream.fields))


# --- a Response written back ----------------------------------------------------------------


async def answer(
    client: ClientRequest, response: Response, core: ProxyCore, *, on_break: OnBreak
) -> None:
    """Write `response` to `client` as it streams, as fast as the client takes it: an upstream
    body nobody read goes through the proxy core's relay, a stub's upgraded WebSocket is
    bridged. Raises GatewayError (before any of the answer went) when it cannot be sent: a body
    read already, a WebSocket for a client that asked for none."""
    upgraded = response._socket
    if isinstance(upgraded, Upgraded):
        if not client.websocket or upgraded.taken:
            raise GatewayError("the gateway answered with a WebSocket the client did not ask for")
        upgraded.taken = True
        await core.deliver(client, upgraded.socket, on_break=on_break)
        return
    try:
        source = response.body.take()
    except RuntimeError:
        raise GatewayError(
            "the gateway's response body was read already; answer with a new Response"
        ) from None
    if isinstance(source, UpstreamBody):
        # Its own Content-Length (if any) describes the body, which goes as it came.
        head = (response.status, list(response.headers.items()))
        try:
            await core.deliver(client, source.hand_over(), on_break=on_break, head=head)
        finally:
            source.release()
        return
    fields = response_fields(list(response.headers.items()), _LENGTH)
    if isinstance(source, bytes | bytearray):
        client.start(
            response.status,
            None,
            [*fields, ("Content-Length", str(len(source)))],
            Framing.LENGTH,
        )
        client.write(bytes(source))
        client.end()
        return
    client.start(response.status, None, fields, Framing.CHUNKED)
    try:
        async for chunk in source:
            client.write(chunk)
            if client.paused:
                await client.drain()
    except UpstreamFailed as exc:
        on_break(exc)
        client.abort()
        return
    except ConnectionError:
        return  # the client went away (its request's task is being cancelled)
    except CODE_FAILURES as exc:
        log.error("a gateway response body raised while it was being sent", exc_info=exc)
        client.abort()  # the head is out: only a cut tells the client the body is not whole
        return
    client.end()


_LENGTH: Final = frozenset({"content-length"})


__all__ = [
    "ClientBody",
    "Upgraded",
    "UpstreamBody",
    "answer",
    "exchange",
    "forward_of",
    "request_of",
    "response_of",
]
