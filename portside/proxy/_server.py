"""The proxy's HTTP/1.1 server: asyncio protocols and the llhttp parser (`httptools`), one task
per request, bodies streamed with backpressure both ways, WebSocket upgrades handed over as raw
connections. What a hop needs and no more: no routing, no middleware, no framework objects.

    server = HttpServer(handle, name="edge")
    await server.listen("127.0.0.1:8080", ssl_context, reuse_port=True)
    ...
    await server.shutdown(grace_s=10)     # stop listening, finish or cut what is in flight

`handle(request)` answers through the request: `respond(...)` for a whole answer, or `start`,
`write`, `end` to stream one (what ProxyCore.deliver does). A handler that raises gets a 500
(its head not sent yet) or a cut connection (it was), and the traceback goes to the log; one
whose client goes away is cancelled at once, so what it holds is freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final, cast
from urllib.parse import parse_qsl

import httptools
from multidict import CIMultiDict, MultiDict

from portside.proxy._wire import (
    CRLF,
    Framing,
    chunk_size_line,
    last_chunk,
    reason_phrase,
    request_framing,
    response_head,
)

log = logging.getLogger(__name__)

Handler = Callable[["Request"], Awaitable[None]]
#: Why a connection may not serve: "" admits it (called once a connection is up, with its TLS
#: object or None); a refused connection gets 403 with the reason for every request.
Admission = Callable[[ssl.SSLObject | None], str]

# Request body bytes held while nobody takes them (the upstream is still being opened): beyond
# this the client is not read from until they go.
_BODY_BUFFER: Final = 256 * 1024
_WRITE_HIGH: Final = 256 * 1024  # a client's unsent bytes beyond this pause whoever feeds it
_KEEPALIVE_S: Final = 75.0  # an idle kept-alive client connection closes after this (nginx's)
_SWEEP_S: Final = 10.0
_NO_BODY_STATUSES: Final = frozenset({204, 304})


class ClientGone(ConnectionError):
    """The client's connection closed while its request was being read."""


class RequestBody:
    """A request's body as it arrives: held (up to a bound) until someone takes it, then passed
    on as it comes — `pipe` to a sink (the upstream connection), or `read` chunk by chunk.
    `started` tells whether any of it was taken: after that it cannot be sent again."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_conn",
        "_failure",
        "_sink",
        "_waiter",
        "done",
        "framing",
        "length",
        "started",
        "trailers",
    )

    def __init__(self, conn: _Connection, framing: Framing, length: int | None) -> None:
        self._conn = conn
        self.framing = framing
        self.length = length
        self.started = False
        self.done = False
        self.trailers: list[tuple[str, str]] = []
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._sink: BodySink | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None

    # -- from the connection --

    def _feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.body_data(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > _BODY_BUFFER:
            self._conn.reading.pause("body")
        self._wake()

    def _finish(self, trailers: list[tuple[str, str]]) -> None:
        self.done = True
        self.trailers = trailers
        if self._sink is not None:
            self._sink.body_end(trailers)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self._failure = exc
        if self._sink is not None:
            self._sink.body_failed(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for whoever takes it --

    def pipe(self, sink: BodySink) -> None:
        """Pass what came and what comes to `sink`; the client is read from only as fast as
        `sink` takes it (it calls `pause`/`resume`)."""
        self.started = True
        self._sink = sink
        while self._buffer:
            sink.body_data(self._buffer.popleft())
        self._buffered = 0
        self._conn.reading.resume("body")
        if self.done:
            sink.body_end(self.trailers)
        elif self._failure is not None:
            sink.body_failed(self._failure)

    def unpipe(self) -> None:
        """The sink is gone (its upstream broke): what comes from here on is dropped."""
        if self._sink is not None:
            self._sink = _DROP
            self._conn.reading.resume("sink")

    def pause(self) -> None:
        self._conn.reading.pause("sink")

    def resume(self) -> None:
        self._conn.reading.resume("sink")

    async def read(self) -> bytes:
        """The next chunk; b"" at the end. Raises ClientGone if the client left midway."""
        self.started = True
        while not self._buffer:
            if self.done:
                return b""
            if self._failure is not None:
                raise ClientGone("the client closed its connection during the request body")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        data = self._buffer.popleft()
        self._buffered -= len(data)
        if self._buffered <= _BODY_BUFFER:
            self._conn.reading.resume("body")
        return data


class BodySink:
    """What takes a request body as it comes (the upstream connection implements it)."""

    def body_data(self, data: bytes) -> None:
        raise NotImplementedError

    def body_end(self, trailers: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    def body_failed(self, exc: BaseException) -> None:
        raise NotImplementedError


class _Drop(BodySink):
    def body_data(self, data: bytes) -> None:
        pass

    def body_end(self, trailers: list[tuple[str, str]]) -> None:
        pass

    def body_failed(self, exc: BaseException) -> None:
        pass


_DROP: Final = _Drop()


class Request:
    """One request a hop received, and its answer. `target` is the path and query exactly as the
    client sent them; `headers` as received (case-insensitive); `body` None without one."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_cookies",
        "_head",
        "_query",
        "body",
        "ended",
        "headers",
        "keep_alive",
        "method",
        "status",
        "target",
        "version",
        "websocket",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        version: str,
        keep_alive: bool,
        body: RequestBody | None,
        websocket: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.target = target
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.body = body
        self.websocket = websocket
        self.status = 0  # the status answered; 0 until the answer's head is out
        self.ended = False  # the whole answer is out
        self._chunked = False
        self._head: bytes | None = None  # the head, held to go out with the first body bytes
        self._query: MultiDict[str] | None = None
        self._cookies: dict[str, str] | None = None

    # -- what was asked --

    @property
    def path(self) -> str:
        """The path as sent (not decoded), without the query."""
        return self.target.partition("?")[0]

    @property
    def query_string(self) -> str:
        return self.target.partition("?")[2]

    @property
    def query(self) -> MultiDict[str]:
        if self._query is None:
            self._query = MultiDict(parse_qsl(self.query_string, keep_blank_values=True))
        return self._query

    @property
    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            jar: SimpleCookie = SimpleCookie()
            for value in self.headers.getall("Cookie", ()):
                with contextlib.suppress(CookieError):
                    jar.load(value)
            self._cookies = {name: morsel.value for name, morsel in jar.items()}
        return self._cookies

    @property
    def peer(self) -> str | None:
        """The client's IP address."""
        return self._conn.peer

    @property
    def scheme(self) -> str:
        return self._conn.scheme

    @property
    def host(self) -> str:
        """The Host the client asked for, else the address it reached."""
        return self.headers.get("Host") or self._conn.local

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._conn.ssl_object

    def connection_info(self, name: str) -> Any:
        """What the connection's transport knows by `name` (`socket`, `peername`...): the
        egress proxy reads the connection's original destination from its socket."""
        return self._conn.transport.get_extra_info(name)

    # -- the answer --

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        *,
        content_type: str = "text/plain; charset=utf-8",
        close: bool = False,
    ) -> None:
        """A whole answer at once (`close`: the connection closes after it)."""
        if close:
            self.keep_alive = False
        fields = [*headers, ("Content-Type", content_type), ("Content-Length", str(len(body)))]
        self.start(status, None, fields, Framing.LENGTH)
        if self.method != "HEAD":
            self.write(body)
        self.end()

    def start(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        framing: Framing,
    ) -> None:
        """The answer's head: `headers` carry Content-Length when `framing` is LENGTH; a body of
        unknown length goes chunked to an HTTP/1.1 client, and to be read until the connection
        closes by an HTTP/1.0 one. Held until the first body bytes (or `end`), so a small
        answer leaves in one write."""
        fields = list(headers)
        if self.method == "HEAD" or status < 200 or status in _NO_BODY_STATUSES:
            pass  # no body, whatever the framing says (a HEAD answer keeps its Content-Length)
        elif framing in (Framing.CHUNKED, Framing.CLOSE):
            if self.version == "1.1":
                self._chunked = True
                fields.append(("Transfer-Encoding", "chunked"))
            else:
                self.keep_alive = False
        if self._conn.closing:
            self.keep_alive = False
        if not self.keep_alive:
            fields.append(("Connection", "close"))
        elif self.version == "1.0":
            fields.append(("Connection", "keep-alive"))
        self.status = status
        self._head = response_head(status, reason_phrase(status, reason), fields)

    def write(self, data: bytes) -> None:
        """Body bytes; the caller respects `paused` (see `follow`), or awaits `drain`."""
        transport = self._conn.transport
        head = self._head
        if self._chunked:
            if not data:
                if head is not None:
                    self._head = None
                    transport.write(head)
                return
            pieces = [chunk_size_line(len(data)), data, CRLF]
            if head is not None:
                pieces.insert(0, head)
                self._head = None
            transport.writelines(pieces)
        elif head is not None:
            self._head = None
            transport.writelines((head, data) if data else (head,))
        elif data:
            transport.write(data)

    def end(self, trailers: Iterable[tuple[str, str]] = ()) -> None:
        """The answer is whole (trailers go out if it is chunked)."""
        if self._head is not None:
            self.write(b"")
        if self._chunked:
            self._conn.transport.write(last_chunk(trailers))
        self.ended = True

    def abort(self) -> None:
        """Cut the connection: a client must not take a broken answer for a whole one."""
        self.keep_alive = False
        self._conn.transport.abort()

    @property
    def paused(self) -> bool:
        """The client is not taking bytes as fast as they come."""
        return self._conn.writing_paused

    def follow(self, source: Any) -> None:
        """While the client is slow, `source` is paused (`pause_reading`/`resume_reading`)."""
        self._conn.flow_source = source
        if self._conn.writing_paused:
            source.pause_reading()

    def unfollow(self) -> None:
        self._conn.flow_source = None

    async def drain(self) -> None:
        await self._conn.drained()

    def flush_head(self) -> None:
        if self._head is not None:
            self.write(b"")

    def take_over(self) -> _Connection:
        """For a WebSocket: the raw connection, once the 101 is out (`early` is what the client
        sent after its upgrade request, before the answer)."""
        self.flush_head()
        self.ended = True
        return self._conn


class _Reading:
    """Why a connection is not being read, if it is not: it reads while nobody objects."""

    __slots__ = ("_reasons", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self._reasons:
            with contextlib.suppress(RuntimeError, AttributeError):
                self._transport.pause_reading()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons and not self._transport.is_closing():
            with contextlib.suppress(RuntimeError, AttributeError):
                self._transport.resume_reading()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs one handler at a time (pipelined requests
    wait their turn), closes when either side says so."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reading: _Reading = None  # type: ignore[assignment]
        self.peer: str | None = None
        self.local = ""
        self.scheme = "http"
        self.ssl_object: ssl.SSLObject | None = None
        self.refusal = ""
        self.closing = False  # no more requests on this connection
        self.lost = False
        self.writing_paused = False
        self.flow_source: Any = None  # what to pause while the client is slow
        self.idle_since = time.monotonic()
        self.tunnel: Any = None  # the WebSocket tunnel this connection was handed to
        self.early = b""  # bytes after an upgrade request, before the tunnel is up
        self._drain_waiter: asyncio.Future[None] | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._incoming: Request | None = None  # the request being read
        self._pending: deque[Request] = deque()  # read (heads at least), not yet handled
        self._active: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._upgraded = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are asyncio.Transport in all but name (no subclass).
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.reading = _Reading(transport)
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        local = transport.get_extra_info("sockname")
        self.local = f"{local[0]}:{local[1]}" if local else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ssl_object = transport.get_extra_info("ssl_object")
        if self.ssl_object is not None:
            self.scheme = "https"
        if self._server.admission is not None:
            self.refusal = self._server.admission(self.ssl_object)
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.received(self, data)
            return
        if self._upgraded:
            self.early += data  # the tunnel is not up yet
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_received(data[int(exc.args[0]) :])
        except httptools.HttpParserError as exc:
            self._malformed(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._server.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel.lost(self)
        if self._incoming is not None and self._incoming.body is not None:
            self._incoming.body._fail(ClientGone())
        for request in (self._active, *self._pending):
            if request is not None and request.body is not None:
                request.body._fail(ClientGone())
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: what the handler holds is freed now
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("the client went away"))
            self._drain_waiter.exception()  # retrieved: whoever waits hears it, if anyone

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.tunnel is not None:
            self.tunnel.writing_paused(self)
        elif self.flow_source is not None:
            self.flow_source.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.tunnel is not None:
            self.tunnel.writing_resumed(self)
        elif self.flow_source is not None:
            self.flow_source.resume_reading()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    async def drained(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client went away")
        if not self.writing_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    # -- llhttp callbacks --

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        method = parser.get_method().decode("ascii")
        headers = CIMultiDict(self._headers)
        self._headers = []  # from here on: trailers
        websocket = (
            parser.should_upgrade()
            and method == "GET"
            and headers.get("Upgrade", "").lower() == "websocket"
        )
        framing, length = request_framing(headers.items())
        body = None if framing is Framing.NONE or websocket else RequestBody(self, framing, length)
        request = Request(
            self,
            method,
            self._url.decode("latin-1"),
            headers,
            parser.get_http_version(),
            parser.should_keep_alive(),
            body,
            websocket,
        )
        self._incoming = request
        self._pending.append(request)
        if self._active is None:
            self._next()

    def on_body(self, body: bytes) -> None:
        if self._incoming is not None and self._incoming.body is not None:
            self._incoming.body._feed(body)

    def on_message_complete(self) -> None:
        request = self._incoming
        self._incoming = None
        if request is None:
            return
        if request.body is not None:
            request.body._finish(self._headers)
        self._headers = []
        if self._active is not None and self._active is not request:
            self.reading.pause("pipelined")  # one request waits its turn; more are not read

    # -- requests --

    def _next(self) -> None:
        if not self._pending or self.closing:
            return
        request = self._pending.popleft()
        self._active = request
        body = request.body
        if (
            body is not None
            and not body.done
            and request.version == "1.1"
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # This hop takes the body whatever comes next: say so, as nginx does; only now,
            # after the answers before it (RFC 9110 15.2: never to an HTTP/1.0 client).
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.reading.resume("pipelined")
        self._task = asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        try:
            if self.refusal:
                request.respond(403, (self.refusal + "\n").encode())
            else:
                await self._server.handler(request)
        except asyncio.CancelledError:
            if not self.lost:
                self.transport.abort()  # shut down mid-request: the client must not wait on
            return
        except Exception:
            log.exception("%s failed on %s %s", self._server.name, request.method, request.path)
            if request.status:
                request.abort()
                return
            request.respond(
                500, f"{self._server.name} failed on this request; see its log\n".encode()
            )
        if self.lost or request.websocket and request.ended and self.tunnel is not None:
            return
        if not request.ended:
            if request.status:
                request.abort()
                return
            log.error("%s sent no answer to %s %s", self._server.name, request.method, request.path)
            request.respond(500, b"no answer\n")
        self._finished(request)

    def _finished(self, request: Request) -> None:
        self._active = None
        self._task = None
        self.idle_since = time.monotonic()
        unread = request.body is not None and not request.body.done
        # An upgrade answered without switching leaves the parser past the request: close.
        if not request.keep_alive or unread or request.websocket or self.closing:
            self.closing = True
            self.transport.close()
            return
        self._next()

    def _upgrade_received(self, rest: bytes) -> None:
        request = self._incoming or (self._pending[-1] if self._pending else self._active)
        if request is not None and request.websocket:
            self._upgraded = True
            self.early = rest
            self.reading.pause("upgrade")  # read again once the tunnel is up
            return
        # Another protocol's upgrade (h2c...): not passed on; the request is served as it is.
        self._parser = httptools.HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    def _malformed(self, exc: Exception) -> None:
        self.closing = True
        if self._active is None:
            reason = str(exc) or type(exc).__name__
            body = f"malformed HTTP request: {reason}\n".encode()
            self.transport.write(
                response_head(
                    400,
                    "Bad Request",
                    (
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                    ),
                )
                + body
            )
        self.transport.close()

    def close_if_idle(self, idle_s: float) -> None:
        if self._active is None and self.tunnel is None and not self._upgraded:
            if time.monotonic() - self.idle_since >= idle_s:
                self.closing = True
                self.transport.close()

    @property
    def busy(self) -> bool:
        return self._active is not None

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


class HttpServer:
    """Serves `handler` on listening sockets. `admission` vets each connection (a mutual-TLS
    hop's peer roles)."""

    def __init__(self, handler: Handler, *, name: str, admission: Admission | None = None) -> None:
        self.handler = handler
        self.name = name
        self.admission = admission
        self.connections: set[_Connection] = set()
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def listen(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, *, reuse_port: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            ssl=ssl_context,
            reuse_address=True,
            reuse_port=reuse_port,
            backlog=1024,
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    async def serve(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Serve a connection accepted elsewhere (the egress proxy's, once its first bytes
        were seen to be HTTP, or TLS it terminates with `tls`); it is closed with the others."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: _Connection(self), sock, ssl=tls)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for server in self._servers for s in server.sockets]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            for conn in list(self.connections):
                conn.close_if_idle(_KEEPALIVE_S)

    def stop_listening(self) -> None:
        """New connections are refused from here on; idle kept-alive ones close, busy ones after
        their answer."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.closing = True
            conn.close_if_idle(0)

    def in_flight(self) -> list[asyncio.Task[None]]:
        return [c.task for c in self.connections if c.task is not None and not c.task.done()]

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop listening, let handlers in flight finish within `grace_s`, then cancel what is
        left and close every connection."""
        self.stop_listening()
        tasks = self.in_flight()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        await self.close()

    async def close(self) -> None:
        """Cancel every handler and close every connection now."""
        self.stop_listening()
        tasks = self.in_flight()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for conn in list(self.connections):
            conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
