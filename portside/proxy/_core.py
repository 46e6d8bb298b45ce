"""The proxy's work after the daemon has chosen where to send: open the upstream, stream its
response back or bridge the WebSocket, say going-away to WebSockets on shutdown, and answer
errors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from portside.errors import PortsideError, UpstreamFailed, error_kind
from portside.headers import ERROR
from portside.proxy._headers import response_fields
from portside.proxy._server import HttpServer, Request
from portside.proxy._transport import (
    Forward,
    Upstream,
    UpstreamResponse,
    UpstreamSocket,
    UpstreamTransport,
)
from portside.proxy._tunnel import Tunnel
from portside.proxy._wire import Framing

log = logging.getLogger(__name__)

OnBreak = Callable[[UpstreamFailed], None]


def answer_error(request: Request, exc: PortsideError, *, close: bool = False) -> None:
    """Every answer Portside gives for itself: the status of `exc`'s kind in the one table
    (portside.errors), the kind in a Portside-Error header, its reason as one line of text."""
    kind = error_kind(exc)
    text = str(exc).strip()
    line = text.splitlines()[0] if text else kind.name
    request.respond(kind.http_status, (line + "\n").encode(), ((ERROR, kind.name),), close=close)


class ProxyCore:
    """One daemon's proxy: its upstream transport and its open WebSockets.

        core = ProxyCore(HttpTransport(deadlines), name="edge")
        upstream = await core.open("127.0.0.2:8788", forward)
        await core.deliver(request, upstream, on_break=note_it)
        ...
        await core.shutdown(server, grace_s)      # going-away to WebSockets, then the server

    `drop_from_responses`: header names that never go back from the upstream (the agent drops
    a container's Portside-Error: that header is Portside's own)."""

    def __init__(
        self, transport: UpstreamTransport, *, name: str, drop_from_responses: Iterable[str] = ()
    ) -> None:
        self.transport = transport
        self._name = name
        self._drop = frozenset(n.lower() for n in drop_from_responses)
        self._tunnels: set[Tunnel] = set()

    async def open(self, authority: str, forward: Forward) -> Upstream:
        """Send `forward` to `authority`; raises as UpstreamTransport.open does."""
        return await self.transport.open(authority, forward)

    async def deliver(
        self,
        request: Request,
        upstream: Upstream,
        *,
        on_break: OnBreak,
        head: tuple[int, list[tuple[str, str]]] | None = None,
    ) -> None:
        """Answer `request` with the opened `upstream`: stream the response back, or bridge the
        WebSocket until both sides have closed. `on_break` hears of a response that broke off
        midway (the client's connection is cut then, so it never takes the rest as whole).
        `head`: the status and header fields to answer with instead of the upstream's (a
        gateway handler may have changed them; the body still streams as it came)."""
        if isinstance(upstream, UpstreamSocket):
            await self._bridge(request, upstream)
        else:
            await self._relay(request, upstream, on_break, head)

    async def _relay(
        self,
        request: Request,
        upstream: UpstreamResponse,
        on_break: OnBreak,
        head: tuple[int, list[tuple[str, str]]] | None,
    ) -> None:
        status, fields = head if head is not None else (upstream.status, upstream.fields)
        request.start(
            status,
            upstream.reason if head is None else None,
            response_fields(fields, self._drop),
            upstream.framing,
        )
        try:
            await upstream.relay(request)
        except UpstreamFailed as exc:
            on_break(exc)
            # The status line is sent already: cutting the connection is the only way left to
            # tell the client the body is incomplete (a clean end would pass it off as whole).
            request.abort()
            return
        finally:
            upstream.release()
        request.end(upstream.trailers)

    async def _bridge(self, request: Request, upstream: UpstreamSocket) -> None:
        fields = response_fields(list(upstream.headers.items()), self._drop)
        fields += [("Upgrade", "websocket"), ("Connection", "Upgrade")]
        request.start(101, upstream.reason, fields, Framing.NONE)
        client = request.take_over()
        tunnel = Tunnel(client, upstream.connection)
        self._tunnels.add(tunnel)
        try:
            tunnel.start(client.early, upstream.early)
            await tunnel.done
        finally:
            self._tunnels.discard(tunnel)
            if not tunnel.done.done():
                tunnel.abort()

    def going_away(self) -> None:
        """Tell every open WebSocket's both sides that this hop is shutting down (1001): an
        open WebSocket would otherwise hold shutdown for its whole grace. Clients reconnect,
        elsewhere."""
        reason = f"{self._name} shutting down".encode()
        for tunnel in list(self._tunnels):
            tunnel.going_away(reason)

    async def shutdown(self, server: HttpServer, grace_s: float) -> None:
        """Stop `server` gracefully: no new connections, WebSockets told going-away, requests in
        flight finish within `grace_s` (then cut), and the upstream pool closed."""
        server.stop_listening()
        self.going_away()
        await server.shutdown(grace_s)
        await self.transport.close()
