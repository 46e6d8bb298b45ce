"""The upstream transport on aiohttp's client: one pooled keep-alive session (made by
portside.net), its failures translated into Portside's tree at this one boundary."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
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
    loop) with the connect and between-bytes deadlines of `deadlines`. With `tls`, upstreams are
    servers of the cluster (agents) reached over mutual TLS."""

    def __init__(self, deadlines: Deadlines, tls: ClientTls | None = None) -> None:
        self._deadlines = deadlines
        self._tls = tls
        self._scheme = "https" if tls is not None else "http"
        # The name the upstream's certificate must carry, whatever address it is reached at.
        self._server_name = tls.server_name if tls is not None else None
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = http_client_session(self._deadlines, tls=self._tls)
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
            raise classify_failure(exc) from exc
        return _Response(response)

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
            raise classify_failure(exc) from exc
        return UpstreamSocket(socket, socket.protocol)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Response(UpstreamResponse):
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        super().__init__(response.status, response.reason, response.headers)
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise classify_failure(exc) from exc
            if not chunk:
                return
            yield chunk

    def release(self) -> None:
        self._response.release()


def classify_failure(exc: BaseException) -> UpstreamFailed:
    """One of aiohttp's client failures as one of the four the daemons tell apart."""
    # Order matters: a connect timeout is a ServerTimeoutError, a failed connect a ClientOSError.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamRefused("no connection within the connect deadline")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamRefused(_os_reason(exc.os_error))
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return UpstreamTimeout("no answer within the read deadline")
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
