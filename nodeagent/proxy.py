"""The node agent's HTTP data plane: edges send `Portside-Class` and `Portside-Instance`; the agent
wakes that instance and streams the request (or WebSocket) to its container and back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from nodeagent import metrics
from nodeagent.instances import InstanceManager, Lease
from nodeagent.runtime import ContainerInfo
from portside.errors import (
    BootTimeout,
    ContainerExited,
    NoCapacity,
    NotFound,
    PortsideError,
    Unavailable,
    http_status,
)
from portside.net import Deadlines, http_client_session
from portside.spec import ContainerClass

log = logging.getLogger(__name__)

CLASS_HEADER = istr("Portside-Class")
INSTANCE_HEADER = istr("Portside-Instance")
# Portside's own errors are one-line text/plain reasons with this header naming their kind; an
# answer without it came from the container.
ERROR_HEADER = istr("Portside-Error")

# RFC 9110 7.6.1: meant for one connection only, never forwarded (plus the legacy
# Proxy-Connection); the names a Connection header lists are dropped too.
_HOP_BY_HOP = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# aiohttp writes its own handshake for the upstream WebSocket.
_WS_HANDSHAKE = frozenset(
    istr(h)
    for h in (
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Accept",
    )
)
# Without these, aiohttp would add Accept and "Accept-Encoding: gzip, deflate" to requests that
# did not have them, and the client could get a compressed body it never asked for.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_DYING_GRACE_S = 0.25
_CLIENT_GONE = 499  # nginx's code for "the client closed the request", for metrics only

_ERROR_KINDS: tuple[tuple[type[PortsideError], str], ...] = (
    (ContainerExited, "container-exited"),
    (BootTimeout, "boot-timeout"),
    (NotFound, "not-found"),
    (NoCapacity, "no-capacity"),
    (Unavailable, "unavailable"),
)


def error_kind(exc: PortsideError) -> str:
    for cls, kind in _ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    return "internal"


def error_response(status: int, kind: str, reason: str) -> web.Response:
    """One of Portside's own errors, as the client sees it."""
    return web.Response(status=status, text=reason + "\n", headers={ERROR_HEADER: kind})


class _UpstreamFailed(Exception):
    """The container could not be reached or cut the exchange; carries the answer to give."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.response = error_response(status, kind, reason)


class DataPlane:
    """The aiohttp application edges call. `app()` builds it; serve it with
    `portside.net.start_http_server(plane.app(), address)`. The upstream session lives with the
    application (made on its startup, closed on its cleanup)."""

    def __init__(
        self,
        manager: InstanceManager,
        get_class: Callable[[str], ContainerClass | None],
        deadlines: Deadlines | None = None,
    ) -> None:
        self._manager = manager
        self._get_class = get_class
        self._deadlines = deadlines or Deadlines()
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)  # bodies stream; no size limit to enforce here
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        self._session = http_client_session(self._deadlines)

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("DataPlane.app() has not started yet")
        return self._session

    # -- entry --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        class_name = request.headers.get(CLASS_HEADER)
        name = request.headers.get(INSTANCE_HEADER)
        if not name:
            if request.path == "/metrics" and request.method == "GET":
                return web.Response(
                    body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST}
                )
            if request.path == "/healthz":
                return web.Response(text="ok")
        if not class_name:
            return error_response(
                400,
                "no-class",
                "request has no Portside-Class header: send it through a Portside edge",
            )
        if not name:
            return error_response(
                400,
                "no-instance",
                f"request for class {class_name} has no "
                "Portside-Instance header: send it through a Portside edge",
            )
        cls = self._get_class(class_name)
        if cls is None:
            return error_response(
                404,
                "unknown-class",
                f"class {class_name} is not deployed (this node agent does not know it)",
            )
        started = time.perf_counter()
        status = _CLIENT_GONE
        try:
            if _is_websocket(request):
                response = await self._websocket(request, cls, name)
            else:
                response = await self._forward(request, cls, name)
            status = response.status
            return response
        finally:
            metrics.PROXIED_REQUESTS.labels(cls.name, str(status)).inc()
            metrics.PROXY_SECONDS.labels(cls.name).observe(time.perf_counter() - started)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _forward(
        self, request: web.Request, cls: ContainerClass, name: str
    ) -> web.StreamResponse:
        leases: list[Lease] = []  # more than one when a dead container was booted again
        try:
            leases.append(await self._manager.acquire(cls, name))
            upstream = await self._send(request, cls, name, leases)
            async with upstream:
                return await self._relay(request, upstream, cls, name)
        except PortsideError as exc:
            return error_response(http_status(exc), error_kind(exc), str(exc))
        except _UpstreamFailed as exc:
            return exc.response
        finally:
            for lease in leases:
                lease.release()

    async def _send(
        self, request: web.Request, cls: ContainerClass, name: str, leases: list[Lease]
    ) -> aiohttp.ClientResponse:
        """Send the request head (and body) upstream; if the container turns out to have died
        before the request was sent, boot it again and send once more (appending to `leases`).

        aiohttp itself already sends an idempotent request a second time when its connection
        drops (RFC 9112 9.3.1, for kept-alive connections the container had closed)."""
        headers = _upstream_headers(request)
        body = request.content if request.body_exists else None
        while True:
            lease = leases[-1]
            sent_at = datetime.now(UTC)
            try:
                return await self.session.request(
                    request.method,
                    _upstream_url(request, lease),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    skip_auto_headers=_NO_AUTO_HEADERS,
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                info = await self._recheck(lease)
                if info is not None and info.running:
                    raise _UpstreamFailed(
                        502, "upstream-refused", _refused(cls, name, lease, exc, info)
                    ) from exc
                if len(leases) > 1 or _exited_since(info, sent_at):
                    # It died with this request (or its retry by aiohttp) in hand, or again
                    # right after a reboot: sending it once more would do the same.
                    raise _UpstreamFailed(
                        502, "container-exited", _exited(cls, name, info)
                    ) from exc
                # It died while idle, before this request: boot it again and send once more.
                lease.release()
                leases.append(await self._manager.acquire(cls, name))
            except (
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError,
                aiohttp.ClientPayloadError,
            ) as exc:
                info = await self._recheck(lease)
                if info is None or not info.running:
                    raise _UpstreamFailed(
                        502, "container-exited", _exited(cls, name, info)
                    ) from exc
                raise _UpstreamFailed(
                    502,
                    "upstream-reset",
                    f"container for {cls.name}/{name} "
                    f"closed the connection before answering ({exc!r})",
                ) from exc
            except TimeoutError as exc:
                raise _UpstreamFailed(
                    504,
                    "upstream-timeout",
                    f"container for {cls.name}/{name} "
                    f"sent no answer within {self._deadlines.upstream_read:g}s",
                ) from exc

    async def _recheck(self, lease: Lease) -> ContainerInfo | None:
        """The container after a failed exchange. A container whose server just died can still
        be "running" for a moment (its init is exiting): look twice before blaming the app."""
        info = await self._manager.recheck(lease)
        if info is not None and info.running:
            await asyncio.sleep(_DYING_GRACE_S)
            info = await self._manager.recheck(lease)
        return info

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, cls: ContainerClass, name: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_downstream_headers(upstream.headers),
        )
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The head is sent, so no error answer is possible: cut the client's connection too,
            # so it sees a truncated response rather than a complete-looking short one.
            log.warning(
                "container for %s/%s broke off its answer to %s %s: %r",
                cls.name,
                name,
                request.method,
                request.path,
                exc,
            )
            response.force_close()
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    # -- WebSocket ------------------------------------------------------------------------------

    async def _websocket(
        self, request: web.Request, cls: ContainerClass, name: str
    ) -> web.StreamResponse:
        try:
            lease = await self._manager.acquire(cls, name)
        except PortsideError as exc:
            return error_response(http_status(exc), error_kind(exc), str(exc))
        # The lease is held while the socket is open: an open WebSocket keeps the instance awake.
        try:
            headers = _upstream_headers(request)
            for header in _WS_HANDSHAKE:
                headers.popall(header, None)
            protocols = [
                p.strip()
                for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                if p.strip()
            ]
            try:
                upstream = await self.session.ws_connect(
                    _upstream_url(request, lease),
                    headers=headers,
                    protocols=protocols,
                    max_msg_size=0,
                    autoping=True,
                )
            except aiohttp.WSServerHandshakeError as exc:
                return error_response(
                    502,
                    "upstream-refused",
                    f"container for {cls.name}/{name} "
                    f"refused the WebSocket upgrade with status {exc.status}",
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                info = await self._recheck(lease)
                return error_response(
                    502, "upstream-refused", _refused(cls, name, lease, exc, info)
                )
            except aiohttp.ClientError as exc:
                return error_response(
                    502,
                    "upstream-reset",
                    f"container for {cls.name}/{name} broke the WebSocket upgrade: {exc}",
                )
            async with upstream:
                client = web.WebSocketResponse(
                    protocols=(upstream.protocol,) if upstream.protocol else (),
                    max_msg_size=0,
                    autoping=True,
                )
                await client.prepare(request)
                await _pump_both_ways(client, upstream)
                return client
        finally:
            lease.release()


async def _pump_both_ways(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    try:
        await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
        # One side closed and the pump passed its close on; give the other a moment to see the
        # closing handshake end, then stop it.
        await asyncio.wait((to_upstream, to_client), timeout=2.0)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        for ws in (client, upstream):
            if not ws.closed:
                await ws.close()


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    while True:
        message = await source.receive()
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:  # CLOSE (answered already: autoclose), CLOSING, CLOSED or ERROR
            await sink.close(
                code=_forwardable_close_code(source.close_code),
                message=str(message.extra or "").encode()[:120],
            )
            return


def _forwardable_close_code(code: int | None) -> int:
    # 1005/1006/1015 only describe what happened; they may never be sent in a close frame.
    if code is None or code == 1005:
        return 1000
    if code in (1006, 1015):
        return 1011
    return code


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def _upstream_url(request: web.Request, lease: Lease) -> URL:
    host, port = lease.upstream
    # raw_path: the path and query exactly as the client sent them, not decoded and re-encoded.
    target = request.raw_path if request.raw_path.startswith("/") else str(request.rel_url)
    return URL(f"http://{host}:{port}{target}", encoded=True)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[istr]:
    return {
        istr(token.strip())
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }


def _upstream_headers(request: web.Request) -> CIMultiDict[str]:
    drop = _HOP_BY_HOP | _connection_tokens(request.headers) | {CLASS_HEADER}
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if istr(k) not in drop)
    forwarded_for = request.headers.get("X-Forwarded-For")
    if request.remote:
        headers["X-Forwarded-For"] = (
            f"{forwarded_for}, {request.remote}" if forwarded_for else request.remote
        )
    # An edge in front already set these from the original request: keep what it saw.
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    if request.host:
        headers.setdefault("X-Forwarded-Host", request.host)
    return headers


def _downstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = _HOP_BY_HOP | _connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if istr(k) not in drop)


def _refused(
    cls: ContainerClass, name: str, lease: Lease, exc: OSError, info: ContainerInfo | None
) -> str:
    host, port = lease.upstream
    if info is None:
        state = "was removed"
    elif info.running:
        state = "is running but did not accept a connection to"
    else:
        state = f"exited with code {info.exit_code} and did not accept a connection to"
    return (
        f"container for {cls.name}/{name} {state} its port {port} at {host}: {exc.strerror or exc}"
    )


def _exited_since(info: ContainerInfo | None, moment: datetime) -> bool:
    # The engine and the agent share the host's clock. A removed container (None) tells nothing.
    return info is not None and info.finished_at is not None and info.finished_at >= moment


def _exited(cls: ContainerClass, name: str, info: ContainerInfo | None) -> str:
    if info is None:
        return f"container for {cls.name}/{name} was removed while answering"
    return f"container for {cls.name}/{name} exited with code {info.exit_code} while answering"
