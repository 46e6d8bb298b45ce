"""The proxy's work after the daemon has chosen where to send: open the upstream, stream its
response back or bridge the WebSocket, close sockets going-away on shutdown, and answer errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Final

from aiohttp import WSCloseCode, WSMsgType, web

from portside.errors import PortsideError, UpstreamFailed, error_kind
from portside.headers import ERROR
from portside.proxy._headers import response_headers
from portside.proxy._transport import (
    WS_CLOSE_TIMEOUT,
    WS_MAX_MESSAGE,
    Forward,
    MessageSocket,
    Upstream,
    UpstreamResponse,
    UpstreamSocket,
    UpstreamTransport,
)

log = logging.getLogger(__name__)

# 1005 (no code), 1006 (dropped) and 1015 (TLS failed) say what a side saw; RFC 6455 7.4.1
# forbids sending them in a close frame.
_RECEIVED_ONLY: Final = {
    1005: WSCloseCode.OK,
    1006: WSCloseCode.INTERNAL_ERROR,
    1015: WSCloseCode.INTERNAL_ERROR,
}


def error_response(exc: PortsideError) -> web.Response:
    """Every answer Portside gives for itself: the status of `exc`'s kind in the one table
    (portside.errors), the kind in a Portside-Error header, its reason as one line of text."""
    kind = error_kind(exc)
    text = str(exc).strip()
    line = text.splitlines()[0] if text else kind.name
    return web.Response(
        status=kind.http_status,
        text=line + "\n",
        content_type="text/plain",
        headers={ERROR: kind.name},
    )


def forwardable_close_code(code: int | None) -> int:
    """The close code to pass on for the one a side closed with (None: it sent none)."""
    if code is None:
        return WSCloseCode.OK
    return _RECEIVED_ONLY.get(code, code)


OnBreak = Callable[[UpstreamFailed], None]


class ProxyCore:
    """One daemon's proxy: its upstream transport and its open WebSockets.

        core = ProxyCore(AiohttpTransport(deadlines), name="edge")
        core.attach(app)                          # going-away on shutdown, transport closed after
        upstream = await core.open("127.0.0.2:8788", forward)
        return await core.deliver(request, upstream, on_break=note_it)

    `drop_from_responses`: header names that never go back from the upstream (the agent drops
    a container's Portside-Error: that header is Portside's own)."""

    def __init__(
        self, transport: UpstreamTransport, *, name: str, drop_from_responses: Iterable[str] = ()
    ) -> None:
        self.transport = transport
        self._name = name
        self._drop = tuple(drop_from_responses)
        self._websockets: set[web.WebSocketResponse] = set()
        self._stopping = asyncio.Event()

    def attach(self, app: web.Application) -> None:
        app.on_shutdown.append(self._close_websockets)
        app.on_cleanup.append(self._close_transport)

    async def open(self, authority: str, forward: Forward) -> Upstream:
        """Send `forward` to `authority`; raises as UpstreamTransport.open does."""
        return await self.transport.open(authority, forward)

    async def deliver(
        self, request: web.Request, upstream: Upstream, *, on_break: OnBreak
    ) -> web.StreamResponse:
        """Answer `request` with the opened `upstream`: stream the response back, or bridge the
        WebSocket until either side closes. `on_break` hears of a response that broke off midway
        (the client's connection is cut then, so it never takes the rest as whole)."""
        if isinstance(upstream, UpstreamSocket):
            return await self._bridge(request, upstream)
        return await self._relay(request, upstream, on_break)

    async def _relay(
        self, request: web.Request, upstream: UpstreamResponse, on_break: OnBreak
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream.headers, self._drop),
        )
        try:
            await response.prepare(request)
            async for chunk in upstream.chunks():
                await response.write(chunk)
            await response.write_eof()
        except UpstreamFailed as exc:
            on_break(exc)
            # The status line is sent already: cutting the connection is the only way left to
            # tell the client the body is incomplete (a clean end would pass it off as whole).
            response.force_close()
            if request.transport is not None:
                request.transport.close()
        except ConnectionResetError:
            pass  # the client left mid-response; nobody is left to tell
        finally:
            upstream.release()
        return response

    async def _bridge(self, request: web.Request, upstream: UpstreamSocket) -> web.StreamResponse:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            max_msg_size=WS_MAX_MESSAGE,
        )
        try:
            await client.prepare(request)
        except BaseException:
            await upstream.socket.close()
            raise
        self._websockets.add(client)
        relay = asyncio.create_task(self._pump_both_ways(client, upstream.socket), name="ws relay")
        try:
            await asyncio.shield(relay)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client's connection ends, which a clean close
            # handshake does too, while the relay is still passing the close code on: let it.
            await asyncio.wait({relay}, timeout=WS_CLOSE_TIMEOUT)
            raise
        finally:
            relay.cancel()
            self._websockets.discard(client)
            await upstream.socket.close()  # a no-op unless the relay was cut short
        return client

    async def _pump_both_ways(self, client: MessageSocket, upstream: MessageSocket) -> None:
        to_upstream = asyncio.create_task(_pump(client, upstream), name="ws client->upstream")
        to_client = asyncio.create_task(_pump(upstream, client), name="ws upstream->client")
        try:
            done, _pending = await asyncio.wait(
                (to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            # The other direction stops before the close is passed on, so nothing is sent on a
            # socket being closed and each side gets exactly one close frame, from here.
            for task in (to_upstream, to_client):
                task.cancel()
            results = await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        ended_first = to_upstream if to_upstream in done else to_client
        other = upstream if ended_first is to_upstream else client
        result = results[0] if ended_first is to_upstream else results[1]
        code: int | None
        if self._stopping.is_set():
            code, reason = WSCloseCode.GOING_AWAY, f"{self._name} shutting down".encode()
        elif isinstance(result, tuple):
            code, reason = result
        else:
            # A send failed: the receiving side is gone, so the sending side learns it broke.
            if not isinstance(result, ConnectionError | asyncio.CancelledError):
                log.warning("WebSocket relay failed: %r", result)
            code, reason = WSCloseCode.INTERNAL_ERROR, b""
        await other.close(code=forwardable_close_code(code), message=reason)

    async def _close_websockets(self, _app: web.Application) -> None:
        # Runs before the server waits for handlers to finish: an open WebSocket would otherwise
        # hold shutdown for its whole timeout. 1001 tells clients to reconnect (elsewhere), and
        # the relays pass 1001 on upstream.
        self._stopping.set()
        reason = f"{self._name} shutting down".encode()
        await asyncio.gather(
            *(
                ws.close(code=WSCloseCode.GOING_AWAY, message=reason)
                for ws in list(self._websockets)
            ),
            return_exceptions=True,
        )

    async def _close_transport(self, _app: web.Application) -> None:
        await self.transport.close()


async def _pump(source: MessageSocket, sink: MessageSocket) -> tuple[int | None, bytes]:
    """Forward messages from `source` to `sink` until `source` closes; return the close code and
    reason `source` ended with. Pings are answered on each hop by aiohttp (autoping)."""
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            # The code the peer sent (close_code may hold the one aiohttp answered with).
            return msg.data, str(msg.extra or "").encode()
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return source.close_code, b""
