"""The proxy's upstream transport: pooled keep-alive HTTP/1.1 connections per upstream, on asyncio
protocols and the llhttp parser (`httptools`); request and response bodies stream with
backpressure; a 101 hands the connection over raw. Failures arrive classified once, as
portside.errors classes (see UpstreamTransport).

Three deadlines, none on the whole exchange (a response may stream for as long as its bytes
flow): `connect` for the connection (TCP and TLS handshake), `first_byte` from the request's
last byte sent until the response's head, and `upstream_read` between bytes once it has come."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from portside.errors import UpstreamFailed, UpstreamRefused, UpstreamReset, UpstreamTimeout
from portside.headers import ERROR
from portside.net import ClientTls, Deadlines, split_hostport
from portside.proxy._server import BodySink, Request
from portside.proxy._transport import (
    IDEMPOTENT_METHODS,
    Forward,
    UpgradeRefused,
    Upstream,
    UpstreamResponse,
    UpstreamSocket,
)
from portside.proxy._wire import (
    CRLF,
    Framing,
    chunk_size_line,
    last_chunk,
    request_head,
    response_framing,
)

_IDLE_S: Final = 30.0  # a pooled connection unused this long is closed
_MOST_IDLE_PER_UPSTREAM: Final = 256
_QUEUE_HIGH: Final = 256 * 1024  # response bytes held for a reader before the upstream pauses


class HttpTransport:
    """UpstreamTransport over pooled connections. With `tls`, upstreams are servers of the
    cluster (agents) reached over mutual TLS, verified by the name their certificates carry."""

    def __init__(self, deadlines: Deadlines, tls: ClientTls | None = None) -> None:
        self._deadlines = deadlines
        self._tls = tls
        self._server_name = tls.server_name if tls is not None else None
        self._context: ssl.SSLContext | None = None
        self._idle: dict[str, deque[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._closed = False

    def _ssl(self) -> ssl.SSLContext | None:
        if self._tls is None:
            return None
        if self._context is None:
            self._context = self._tls.ssl_context()
        return self._context

    async def open(self, authority: str, forward: Forward) -> Upstream:
        conn = self._pooled(authority)
        if conn is not None:
            try:
                return await conn.exchange(forward, authority)
            except _Stale:
                pass  # it was closed under us before answering anything: a new one, once
        conn = await self._connect(authority)
        try:
            return await conn.exchange(forward, authority)
        except _Stale as exc:
            raise UpstreamReset(str(exc)) from None

    async def prepare(self, authority: str) -> None:
        if self._idle.get(authority):
            return  # one is pooled already (the upstream keeps connections alive)
        conn = await self._connect(authority)
        conn._used = True  # idle in the pool before its first exchange, as a reused one
        self._return(conn)

    def _pooled(self, authority: str) -> _Connection | None:
        idle = self._idle.get(authority)
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, authority: str) -> _Connection:
        if self._closed:
            raise UpstreamRefused("the transport is closed")
        host, port = split_hostport(authority, "upstream")
        loop = asyncio.get_running_loop()
        context = self._ssl()
        try:
            async with asyncio.timeout(self._deadlines.connect):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, authority),
                    host,
                    port,
                    ssl=context,
                    server_hostname=self._server_name if context is not None else None,
                )
        except TimeoutError:
            raise UpstreamRefused("no connection within the connect deadline") from None
        except ssl.SSLError as exc:
            raise UpstreamRefused(f"TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise UpstreamRefused(os.strerror(exc.errno) if exc.errno else str(exc)) from None
        return conn

    def _return(self, conn: _Connection) -> None:
        if self._closed or conn.transport.is_closing():
            conn.transport.close()
            return
        idle = self._idle.setdefault(conn.authority, deque())
        if len(idle) >= _MOST_IDLE_PER_UPSTREAM:
            conn.transport.close()
            return
        conn.idle(_IDLE_S)
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.authority)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)
            if not idle:
                del self._idle[conn.authority]

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.transport.close()
        self._idle.clear()


class _Stale(Exception):
    """A reused connection closed before any of the answer came (the upstream had closed it
    while idle): the request may go once more on a new one."""


class _Connection(asyncio.Protocol, BodySink):
    """One connection to an upstream: one exchange at a time."""

    def __init__(self, pool: HttpTransport, authority: str) -> None:
        self._pool = pool
        self.authority = authority
        self._deadlines = pool._deadlines
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._used = False  # it waited in the pool before this exchange (it may be stale)
        self._forward: Forward | None = None
        self._head: asyncio.Future[None] | None = None
        self._status = 0
        self._reason = ""
        self._headers: list[tuple[str, str]] = []  # the head's, then the trailers
        self._head_fields: list[tuple[str, str]] = []
        self._framing = Framing.NONE
        self._got_head = False
        self._arm_read = False
        self._got_any = False
        self._request_sent = False
        self._chunked_request = False
        self._body_sink: _ResponseSink | None = None
        self._pending: deque[bytes] = deque()  # response body that came before a sink
        self._pending_size = 0
        self._trailers: list[tuple[str, str]] = []
        self._complete = False
        self._failure: UpstreamFailed | None = None
        self._upgrade_rest = b""
        self._keep_alive = False
        self.tunnel: Any = None
        self._writing_paused = False
        self._flow_source: Any = None  # the client body being sent, paused while we are slow
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._deadline = 0.0  # loop time; 0: none running
        self._deadline_s = 0.0
        self._deadline_what = ""
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are asyncio.Transport in all but name (no subclass).
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_QUEUE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pool._all.add(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.received(self, data)
            return
        if self._deadline:
            self._deadline = self._loop.time() + self._deadline_s
        self._got_any = True
        if self._forward is None:
            self.transport.close()  # an idle connection has nothing to say
            return
        try:
            self._parser.feed_data(data)
            if self._arm_read:
                self._arm_read = False
                if not self._complete:
                    self._start_deadline(self._deadlines.upstream_read, "between-bytes")
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_rest = data[int(exc.args[0]) :]
            self.pause_reading()  # what comes next waits for the tunnel
            self._fail(None)  # nothing more is parsed: the connection is the tunnel's now
        except httptools.HttpParserError as exc:
            self._fail(UpstreamFailed(f"malformed HTTP response: {exc}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._forget(self)
        self._stop_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.tunnel is not None:
            self.tunnel.lost(self)
            return
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._forward is None or self._complete:
            return
        if self._got_head and self._framing is Framing.CLOSE:
            self._message_end()  # its body ends with its connection
            return
        reason = _reason(exc) if exc is not None else "the connection closed"
        if not self._got_any and self._used and self._may_go_again():
            self._fail(_Stale(reason))
        elif self._got_head:
            self._fail(UpstreamReset(f"{reason} midway through the answer"))
        else:
            self._fail(UpstreamReset(reason))

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.tunnel is not None:
            self.tunnel.writing_paused(self)
        elif self._flow_source is not None:
            self._flow_source.pause()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.tunnel is not None:
            self.tunnel.writing_resumed(self)
        elif self._flow_source is not None:
            self._flow_source.resume()

    # pause_reading/resume_reading: what a slow client's connection calls (Request.follow)

    def pause_reading(self) -> None:
        if not self._paused_reading and not self.transport.is_closing():
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused_reading and not self.transport.is_closing():
            self._paused_reading = False
            self.transport.resume_reading()

    # -- the exchange --

    async def exchange(self, forward: Forward, authority: str) -> Upstream:
        self._forward = forward
        self._head = self._loop.create_future()
        self._stop_deadline()  # not idle any more; the first-byte deadline runs once it is sent
        self._send(forward, authority)
        try:
            await self._head
        except BaseException:
            if forward.body is not None:
                forward.body.unpipe()  # what the client still sends is dropped, not written here
            self._forward = None
            self.transport.close()
            raise
        if forward.websocket:
            if self._status == 101:
                return self._take_over()
            kind = CIMultiDict(self._head_fields).get(ERROR)
            self.transport.close()
            raise UpgradeRefused(self._status, kind)
        if self._status == 101:
            self.transport.close()
            raise UpstreamFailed("switched protocols without being asked to")
        return _Response(self)

    def _send(self, forward: Forward, authority: str) -> None:
        fields = list(forward.headers.items())
        if "Host" not in forward.headers:  # a hop names the next; the egress proxy keeps it
            fields.append(("Host", authority))
        if forward.websocket:
            fields.extend((("Connection", "Upgrade"), ("Upgrade", "websocket")))
        body = forward.body
        if body is not None and body.framing is Framing.CHUNKED:
            self._chunked_request = True
            fields.append(("Transfer-Encoding", "chunked"))
        self.transport.write(request_head(forward.method, forward.target, fields))
        if body is None:
            self._sent()
        else:
            self._flow_source = body
            body.pipe(self)
            if self._writing_paused:
                body.pause()

    # BodySink: the client's request body, as it comes

    def body_data(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # the exchange failed: the rest of the body goes nowhere
        if self._chunked_request:
            self.transport.writelines((chunk_size_line(len(data)), data, CRLF))
        else:
            self.transport.write(data)

    def body_end(self, trailers: list[tuple[str, str]]) -> None:
        if self.transport.is_closing():
            return
        if self._chunked_request:
            self.transport.write(last_chunk(trailers))
        self._flow_source = None
        self._sent()

    def body_failed(self, exc: BaseException) -> None:
        # The client left mid-body: the upstream must not take the rest as missing by design.
        self._flow_source = None
        self.transport.abort()

    def _may_go_again(self) -> bool:
        """After a reused connection closed without a byte of answer: the upstream closed it
        while idle as the request went (or it crashed with it). RFC 9112 9.3.1 lets a client
        send again what is idempotent and whose body was not taken."""
        forward = self._forward
        return (
            forward is not None
            and forward.method in IDEMPOTENT_METHODS
            and (forward.body is None or not forward.body.started)
        )

    def _sent(self) -> None:
        self._request_sent = True
        if not self._got_head:
            self._start_deadline(self._deadlines.first_byte, "first-byte")

    # llhttp callbacks

    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._headers = []  # an interim answer (103 Early Hints...): not passed on
            return
        assert self._forward is not None
        self._status = status
        self._got_head = True
        self._head_fields = self._headers
        self._headers = []
        self._keep_alive = self._parser.should_keep_alive()
        self._framing, _ = response_framing(status, self._forward.method, self._head_fields)
        self._stop_deadline()
        # Between bytes from here: armed after this read unless the body came whole with it.
        self._arm_read = self._framing is not Framing.NONE
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._framing is Framing.NONE and self._forward.method == "HEAD":
            # llhttp would wait for the body its Content-Length announces: this answer has none.
            self._parser = httptools.HttpResponseParser(self)
            self._message_end()

    def on_body(self, body: bytes) -> None:
        if self._body_sink is not None:
            self._body_sink.data(body)
            return
        self._pending.append(body)
        self._pending_size += len(body)
        if self._pending_size > _QUEUE_HIGH:
            self.pause_reading()

    def on_message_complete(self) -> None:
        if not self._got_head:
            return  # the end of an interim answer
        self._trailers = self._headers
        self._message_end()

    def _message_end(self) -> None:
        if self._complete:
            return
        self._complete = True
        self._stop_deadline()
        if self._body_sink is not None:
            self._body_sink.end(self._trailers)

    def _fail(self, failure: Exception | None) -> None:
        self._stop_deadline()
        if self._head is not None and not self._head.done():
            if failure is not None:
                self._head.set_exception(failure)
            else:
                self._head.set_result(None)
            return
        if failure is None:
            return
        if isinstance(failure, UpstreamFailed) and not self._complete:
            self._failure = failure
            if self._body_sink is not None:
                self._body_sink.failed(failure)

    # deadlines: one timer, pushed on as bytes come rather than rescheduled per chunk

    def _start_deadline(self, seconds: float, what: str) -> None:
        self._deadline_s = seconds
        self._deadline_what = what
        self._deadline = self._loop.time() + seconds
        # The timer is kept across exchanges (a new one per request costs more than the rest of
        # the bookkeeping); one due too late for this deadline is replaced.
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)

    def _stop_deadline(self) -> None:
        self._deadline = 0.0  # the timer, when it fires, finds nothing due

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._deadline:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)
            return
        if self._paused_reading:
            # Paused for a slow client: the upstream is not the one late.
            self._start_deadline(self._deadline_s, self._deadline_what)
            return
        if self._deadline_what == "idle":
            self.transport.close()  # unused for its whole idle time: no more of it in the pool
            return
        if self._deadline_what == "first-byte":
            deadline = f"the first-byte deadline ({self._deadline_s:g}s)"
        else:
            deadline = f"the read deadline between bytes ({self._deadline_s:g}s)"
        self._fail(UpstreamTimeout(f"no answer within {deadline}"))
        self.transport.abort()

    # -- after the head --

    def head_headers(self) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict(self._head_fields))

    def pipe(self, sink: _ResponseSink) -> None:
        self._body_sink = sink
        while self._pending:
            sink.data(self._pending.popleft())
        self._pending_size = 0
        if self._failure is not None:
            sink.failed(self._failure)
        elif self._complete:
            sink.end(self._trailers)
        else:
            self.resume_reading()

    def release(self) -> None:
        """The exchange is over: back to the pool if it ended cleanly, else closed."""
        self._body_sink = None
        if self._complete and self._request_sent and self._keep_alive and self.tunnel is None:
            self._reset()
            self._pool._return(self)
        elif self.tunnel is None:
            body = self._forward.body if self._forward is not None else None
            if body is not None and not self._request_sent:
                body.unpipe()  # answered before the whole body went: the rest goes nowhere
            self.transport.close()

    def _reset(self) -> None:
        self._used = True
        self._forward = None
        self._head = None
        self._status = 0
        self._headers = []
        self._head_fields = []
        self._got_head = self._got_any = self._request_sent = self._complete = False
        self._arm_read = False
        self._chunked_request = False
        self._trailers = []
        self._failure = None
        self._pending.clear()
        self._pending_size = 0
        self.resume_reading()

    def idle(self, idle_s: float) -> None:
        self._start_deadline(idle_s, "idle")

    def _take_over(self) -> UpstreamSocket:
        self._stop_deadline()
        self._pool._forget(self)
        headers = self.head_headers()
        return UpstreamSocket(
            connection=self,
            protocol=headers.get("Sec-WebSocket-Protocol"),
            status=101,
            reason=self._reason,
            headers=headers,
            early=self._upgrade_rest,
        )

    async def drained(self) -> None:
        if not self._writing_paused or self.transport.is_closing():
            return
        self._drain_waiter = self._loop.create_future()
        await self._drain_waiter


class _ResponseSink:
    """Where a response body goes as it comes: a client (ProxyCore relays into the Request) or a
    queue read chunk by chunk."""

    def data(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self, trailers: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    def failed(self, exc: UpstreamFailed) -> None:
        raise NotImplementedError


class _ToClient(_ResponseSink):
    __slots__ = ("_done", "_request")

    def __init__(self, request: Request, done: asyncio.Future[list[tuple[str, str]]]) -> None:
        self._request = request
        self._done = done

    def data(self, data: bytes) -> None:
        self._request.write(data)

    def end(self, trailers: list[tuple[str, str]]) -> None:
        if not self._done.done():
            self._done.set_result(trailers)

    def failed(self, exc: UpstreamFailed) -> None:
        if not self._done.done():
            self._done.set_exception(exc)


class _Queue(_ResponseSink):
    __slots__ = ("_chunks", "_conn", "_end", "_failure", "_size", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._end = False
        self._failure: UpstreamFailed | None = None
        self._waiter: asyncio.Future[None] | None = None

    def data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _QUEUE_HIGH:
            self._conn.pause_reading()
        self._wake()

    def end(self, trailers: list[tuple[str, str]]) -> None:
        self._end = True
        self._wake()

    def failed(self, exc: UpstreamFailed) -> None:
        self._failure = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> bytes:
        while not self._chunks:
            if self._failure is not None:
                raise self._failure
            if self._end:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size <= _QUEUE_HIGH // 2:
            self._conn.resume_reading()
        return data


class _Response(UpstreamResponse):
    __slots__ = ("_conn", "framing", "trailers")

    def __init__(self, conn: _Connection) -> None:
        super().__init__(conn._status, conn._reason, conn._head_fields)
        self._conn = conn
        self.framing = conn._framing
        self.trailers: list[tuple[str, str]] = []

    async def relay(self, request: Request) -> None:
        """Stream the body into `request`'s answer as it comes, as fast as the client takes it;
        raises UpstreamFailed if it breaks off."""
        done: asyncio.Future[list[tuple[str, str]]] = asyncio.get_running_loop().create_future()
        try:
            self._conn.pipe(_ToClient(request, done))
            request.follow(self._conn)  # after pipe, which resumes reading: a slow client wins
            self.trailers = await done
        finally:
            request.unfollow()

    async def chunks(self) -> AsyncIterator[bytes]:
        queue = _Queue(self._conn)
        self._conn.pipe(queue)
        while True:
            data = await queue.next()
            if not data:
                self.trailers = self._conn._trailers
                return
            yield data

    def release(self) -> None:
        self._conn.release()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
