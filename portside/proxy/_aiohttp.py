"""The upstream transport on aiohttp's client: one pooled keep-alive session (made by
portside.net), its failures translated into Portside's tree at this one boundary."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Final

import aiohttp
from aiohttp import hdrs
from yarl import URL

from portside.errors import UpstreamFailed, UpstreamRefused, UpstreamReset, UpstreamTimeout
from portside.headers import ERROR
from portside.net import ClientTls, Deadlines, http_client_session
from portside.proxy._transport import (
    WS_CLOSE_TIMEOUT,
    WS_MAX_MESSAGE,
    Forward,
    UpgradeRefused,
    Upstream,
    UpstreamResponse,
    UpstreamSocket,
)

# aiohttp adds these on its own; a transparent proxy must not (an unasked Accept-Encoding: gzip
# would reach a client that can't decompress, since the session passes bodies through undecoded).
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# ws_connect makes its own handshake; the client's key and extensions belong to the client's hop.
_WS_HANDSHAKE: Final = (
    hdrs.SEC_WEBSOCKET_KEY,
    hdrs.SEC_WEBSOCKET_VERSION,
    hdrs.SEC_WEBSOCKET_EXTENSIONS,
    hdrs.SEC_WEBSOCKET_PROTOCOL,
    hdrs.SEC_WEBSOCKET_ACCEPT,
)


class AiohttpTransport:
    """UpstreamTransport over one aiohttp ClientSession, made on first use (inside the running
    loop). With `tls`, upstreams are servers of the cluster (agents) reached over mutual TLS.

    Three deadlines of `deadlines`, none of them on the whole exchange (a response may stream
    for as long as its bytes flow): `connect` for the connection (TCP and TLS handshake),
    `first_byte` from the request's last byte sent until the response's first, and
    `upstream_read` between bytes of the response once its head has come."""

    def __init__(self, deadlines: Deadlines, tls: ClientTls | None = None) -> None:
        self._deadlines = deadlines
        self._tls = tls
        self._scheme = "https" if tls is not None else "http"
        # The name the upstream's certificate must carry, whatever address it is reached at.
        self._server_name = tls.server_name if tls is not None else None
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:
            # aiohttp's read deadline runs from the request's last byte sent and restarts with
            # every byte received; the session's is the head's, each response's body then gets
            # its own (`_Response`). A WebSocket has none once open.
            head = replace(self._deadlines, upstream_read=self._deadlines.first_byte)
            self._session = http_client_session(head, tls=self._tls)
        return self._session

    async def open(self, authority: str, forward: Forward) -> Upstream:
        url = URL(f"{self._scheme}://{authority}{forward.target}", encoded=True)
        if forward.websocket:
            return await self._upgrade(url, forward)
        body = forward.body
        try:
            response = await self._pool().request(
                forward.method,
                url,
                headers=forward.headers,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                server_hostname=self._server_name,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise classify_failure(exc, self._first_byte) from exc
        return _Response(response, self._deadlines.upstream_read)

    @property
    def _first_byte(self) -> str:
        return f"the first-byte deadline ({self._deadlines.first_byte:g}s)"

    async def _upgrade(self, url: URL, forward: Forward) -> UpstreamSocket:
        headers = forward.headers.copy()
        for name in _WS_HANDSHAKE:
            headers.popall(name, None)
        try:
            socket = await self._pool().ws_connect(
                url,
                headers=headers,
                protocols=forward.protocols,
                max_msg_size=WS_MAX_MESSAGE,
                compress=0,  # loopback/LAN hop: deflating costs CPU for nothing
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WS_CLOSE_TIMEOUT),
                server_hostname=self._server_name,
            )
        except aiohttp.WSServerHandshakeError as exc:
            # aiohttp drops the body of a refused handshake; the status and kind remain.
            kind = exc.headers.get(ERROR) if exc.headers is not None else None
            raise UpgradeRefused(exc.status, kind) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise classify_failure(exc, self._first_byte) from exc
        return UpstreamSocket(socket, socket.protocol)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Response(UpstreamResponse):
    __slots__ = ("_read", "_response")

    def __init__(self, response: aiohttp.ClientResponse, read_s: float) -> None:
        super().__init__(response.status, response.reason, response.headers)
        self._response = response
        self._read = f"the read deadline between bytes ({read_s:g}s)"
        # The head has come: from now on the deadline is between bytes, restarted at once (the
        # one running is the head's). A body read to its end already has none to restart, and
        # must not get one: its connection may be back in the pool.
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is not None and not response.content.is_eof():
            protocol.read_timeout = read_s
            protocol.start_timeout()

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise classify_failure(exc, self._read) from exc
            if not chunk:
                return
            yield chunk

    def release(self) -> None:
        self._response.release()


def classify_failure(
    exc: BaseException, read_deadline: str = "the read deadline"
) -> UpstreamFailed:
    """One of aiohttp's client failures as one of the four the daemons tell apart; a timeout
    reading names `read_deadline` (which one ran: the first byte's, or between bytes)."""
    # Order matters: a connect timeout is a ServerTimeoutError, a failed connect a ClientOSError.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamRefused("no connection within the connect deadline")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamRefused(_os_reason(exc.os_error))
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return UpstreamTimeout(f"no answer within {read_deadline}")
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | aiohttp.ClientPayloadError
        | ConnectionResetError,
    ):
        return UpstreamReset(_reason(exc))
    return UpstreamFailed(_reason(exc))


def _os_reason(exc: OSError) -> str:
    # "Connection refused" rather than "[Errno 111] Connect call failed ('172.18.0.2', 8080)".
    return os.strerror(exc.errno) if exc.errno else _reason(exc)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
