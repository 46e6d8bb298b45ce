"""The edge's HTTP/WebSocket ingress: match a route, find the node agent of the named instance
(route cache with single-flight resolves), and stream the request there and the response back."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from edge import metrics
from edge.pools import InFlight, PoolMember, choose
from edge.routing import (
    RequestParts,
    RouteTable,
    describe_source,
    instance_name,
    location_hint,
    normalize_prefix,
)
from portside import geo
from portside.errors import InvalidArgument, PortsideError, Unavailable, http_status
from portside.net import Deadlines, http_client_session
from portside.spec import Config, Route, instance_id

log = logging.getLogger(__name__)

ERROR_HEADER: Final = "Portside-Error"
CLASS_HEADER: Final = "Portside-Class"
INSTANCE_HEADER: Final = "Portside-Instance"

DEFAULT_ROUTE_CACHE_SIZE: Final = 100_000
# A WebSocket message is held whole by aiohttp on each side, so some bound is needed; this one
# is far above what interactive sessions send and far below what would hurt the edge.
WS_MAX_MESSAGE: Final = 64 * 1024 * 1024
# After one side of a WebSocket closes, how long the other side may take to finish closing.
WS_CLOSE_TIMEOUT: Final = 5.0

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
_HOP_BY_HOP: Final = (
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
# Host names the edge, not the agent; Expect is answered by the edge's own server; the
# Portside-* identity headers are the edge's to set, a client must not choose its instance.
_NOT_FORWARDED: Final = (*_HOP_BY_HOP, "Host", "Expect", CLASS_HEADER, INSTANCE_HEADER)
# ws_connect makes its own handshake; the client's key and extensions belong to the client side.
_WS_HANDSHAKE: Final = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)
# aiohttp adds Accept, Accept-Encoding, User-Agent and a payload Content-Type on its own; a
# transparent proxy must not (an unasked Accept-Encoding: gzip would reach a client that can't
# decompress, since the session passes bodies through undecoded).
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# Failures before any response byte, where the agent is gone or the route is stale. Safe to retry
# on another node as long as no request body byte was read (see _RequestBody).
_CONNECT_FAILURES: Final = (
    aiohttp.ClientOSError,  # includes ClientConnectorError: refused, unreachable
    aiohttp.ClientConnectionResetError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ConnectionTimeoutError,
)


@dataclass(frozen=True)
class Target:
    """Where an instance runs: its node and the node agent's HTTP data plane ("host:port").
    For a pool, `instance_name` is the member the control plane chose."""

    node_id: str
    data_address: str
    instance_name: str = ""


class Resolver(Protocol):
    """Names the node of a named instance, placing it first if it has none (the control plane
    does; the lead's gRPC client implements this). Raises portside.errors: NoCapacity,
    NotFound, Unavailable, InvalidArgument."""

    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target: ...


_Key = tuple[str, str]  # (class, instance name)


class RouteCache:
    """(class, instance name) → Target, filled by the resolver. A warm lookup is one dict get;
    concurrent cold lookups of one key share one resolve (single-flight)."""

    def __init__(
        self, resolver: Resolver, deadline: float, max_entries: int = DEFAULT_ROUTE_CACHE_SIZE
    ) -> None:
        self._resolver = resolver
        self._deadline = deadline
        self._max_entries = max_entries
        self._targets: dict[_Key, Target] = {}
        self._inflight: dict[_Key, asyncio.Task[Target]] = {}
        self._hit = metrics.ROUTE_CACHE.labels("hit")
        self._miss = metrics.ROUTE_CACHE.labels("miss")

    def __len__(self) -> int:
        return len(self._targets)

    def get(self, class_name: str, name: str) -> Target | None:
        return self._targets.get((class_name, name))

    async def target(self, class_name: str, name: str, hint: str) -> Target:
        key = (class_name, name)
        target = self._targets.get(key)
        if target is not None:
            self._hit.inc()
            return target
        self._miss.inc()
        task = self._inflight.get(key)
        if task is None:
            # The first request's hint places the instance; those joining it share its answer.
            task = asyncio.create_task(self._resolve(key, hint), name=f"resolve {key}")
            # If every waiter is gone (clients hung up), nobody reads a failure: retrieve it
            # so asyncio does not log "exception was never retrieved".
            task.add_done_callback(_retrieve_exception)
            self._inflight[key] = task
        # Shielded: one client hanging up must not cancel the resolve others are waiting for.
        return await asyncio.shield(task)

    async def _resolve(self, key: _Key, hint: str) -> Target:
        me = asyncio.current_task()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._deadline):
                target = await self._resolver.resolve(key[0], key[1], hint)
        except TimeoutError as exc:
            raise Unavailable(
                f"resolving instance {key[1]!r} of class {key[0]} took longer than"
                f" {self._deadline:g}s: the control plane is slow or unreachable"
            ) from exc
        finally:
            metrics.RESOLVE_SECONDS.observe(time.perf_counter() - started)
            # An invalidation during the resolve unregisters it: its answer may predate the
            # event that invalidated it, so it serves its waiters but is not cached.
            current = self._inflight.get(key) is me
            if current:
                del self._inflight[key]
        if current:
            self._store(key, target)
        return target

    def _store(self, key: _Key, target: Target) -> None:
        if len(self._targets) >= self._max_entries and key not in self._targets:
            # Oldest inserted goes first: a bound on memory against floods of new names, not an
            # LRU (that would cost a move on every warm hit); an evicted route resolves again.
            del self._targets[next(iter(self._targets))]
        self._targets[key] = target

    def put(self, class_name: str, name: str, target: Target) -> None:
        """Cache a route known without a resolve (a pool member from the pool watch)."""
        self._store((class_name, name), target)

    def drop(self, class_name: str, name: str, stale: Target) -> None:
        """Forget the route only if it still is `stale`: a concurrent request may already have
        resolved a fresh one."""
        key = (class_name, name)
        if self._targets.get(key) == stale:
            del self._targets[key]

    def invalidate(self, class_name: str, name: str) -> None:
        key = (class_name, name)
        self._targets.pop(key, None)
        self._inflight.pop(key, None)

    def invalidate_node(self, node_id: str) -> None:
        self._targets = {k: t for k, t in self._targets.items() if t.node_id != node_id}
        # Which node a resolve in flight will name is unknown yet: none of them may cache.
        self._inflight.clear()

    def retain_classes(self, class_names: Iterable[str]) -> None:
        keep = set(class_names)
        self._targets = {k: t for k, t in self._targets.items() if k[0] in keep}

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve_exception(task: asyncio.Task[Target]) -> None:
    if not task.cancelled():
        task.exception()


class _RequestBody:
    """The client's request body as the upstream request's payload, streamed chunk by chunk.
    Remembers whether any of it was read: after that, a retry would send a truncated body."""

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._content = content
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        async for chunk in self._content.iter_any():
            yield chunk


def error_response(status: int, kind: str, message: str) -> web.Response:
    """Every refusal the edge makes: a one-line text/plain reason and its kind in a header."""
    return web.Response(
        status=status, text=message + "\n", content_type="text/plain", headers={ERROR_HEADER: kind}
    )


def error_kind(exc: PortsideError) -> str:
    """NoCapacity → "no-capacity": the Portside-Error kind of an exception from the tree."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", type(exc).__name__).lower()


class EdgeProxy:
    """The ingress application: holds the route table, the route cache and the upstream pool.

    Construction, start and stop (what `edge/main.py` does):

        proxy = EdgeProxy(region="weur", resolver=resolver, deadlines=Deadlines())
        proxy.set_config(config)                  # and again on every config the watch delivers
        ingress = await start_http_server(proxy.app(), "127.0.0.1:8080")
        scrape = await start_http_server(metrics_app(), "127.0.0.1:9090")
        ...
        proxy.invalidate(class_name, name)        # an instance moved or stopped
        proxy.invalidate_node(node_id)            # a node's lease expired
        ...
        await ingress.cleanup()                   # closes open WebSockets, then the upstream pool
        await scrape.cleanup()
    """

    def __init__(
        self,
        region: str,
        resolver: Resolver,
        deadlines: Deadlines,
        config: Config | None = None,
        *,
        route_cache_size: int = DEFAULT_ROUTE_CACHE_SIZE,
    ) -> None:
        self.region = region
        self._deadlines = deadlines
        self._table = RouteTable(config.routes if config is not None else ())
        self.cache = RouteCache(resolver, deadlines.resolve, route_cache_size)
        self._session: aiohttp.ClientSession | None = None
        self._websockets: set[web.WebSocketResponse] = set()
        self._stopping = asyncio.Event()
        self._resolver = resolver
        self._pools: dict[str, list[PoolMember]] = {}  # class -> members, from the pool watch
        self._limits: dict[str, int] = {}  # class -> concurrency_limit
        self._in_flight = InFlight()  # this edge's requests in flight per pool instance id
        self._rng = random.Random()
        self.demand: dict[str, int] = {}  # class -> requests since the last demand report

    # --- what the lead's watch stream calls -------------------------------------------------

    def set_config(self, config: Config) -> None:
        """Swap in the routes of `config`. A request reads the table once, so it sees either the
        old table or the new one, never a mix; cached routes of classes no longer routed go."""
        self._table = RouteTable(config.routes)
        self.cache.retain_classes(route.class_name for route in config.routes)
        self._limits = {
            c.name: c.autoscaling.concurrency_limit
            for c in config.classes
            if c.autoscaling is not None
        }

    def set_pool_members(self, pools: dict[str, list[PoolMember]]) -> None:
        """Swap in the members of every pool, by class (the pool watch calls this)."""
        self._pools = pools

    def invalidate(self, class_name: str, name: str) -> None:
        """The instance moved or stopped: its next request resolves again."""
        self.cache.invalidate(class_name, name)

    def invalidate_node(self, node_id: str) -> None:
        """The node is gone: every instance cached on it resolves again."""
        self.cache.invalidate_node(node_id)

    # --- the application --------------------------------------------------------------------

    def app(self) -> web.Application:
        """The ingress application; every path is a user's (no /metrics, no health path here)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_shutdown.append(self._close_websockets)
        app.cleanup_ctx.append(self._upstream_pool)
        return app

    async def _upstream_pool(self, _app: web.Application) -> AsyncIterator[None]:
        # The session must be made inside the running loop, so it lives with the app.
        self._session = http_client_session(self._deadlines)
        try:
            yield
        finally:
            await self.cache.close()
            await self._session.close()
            self._session = None

    async def _close_websockets(self, _app: web.Application) -> None:
        # Runs before the server waits for handlers to finish: an open WebSocket would otherwise
        # hold shutdown for its whole timeout. 1001 tells clients to reconnect elsewhere, and the
        # relays pass 1001 on to the agents.
        self._stopping.set()
        await asyncio.gather(
            *(
                ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"edge shutting down")
                for ws in list(self._websockets)
            ),
            return_exceptions=True,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("EdgeProxy.app() is not running: serve it with start_http_server")
        return self._session

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        route = self._table.match(raw_path)  # one read of the table: config swaps are atomic
        if route is None:
            metrics.REQUESTS.labels("", "", "404", self.region).inc()
            return error_response(404, "no-route", f"no route for {raw_path}")
        status = 499  # the client went away before the edge answered (nginx's convention)
        try:
            response = await self._serve(request, route, raw_path)
            status = response.status
            return response
        except PortsideError as exc:
            status = http_status(exc)
            return error_response(status, error_kind(exc), str(exc))
        except Exception:
            # A bug, or a resolver raising outside the error tree: the client still gets a clear
            # answer, the operator the traceback.
            log.exception("edge failed on %s %s", request.method, raw_path)
            status = 500
            return error_response(500, "internal", "the edge failed on this request; see its log")
        finally:
            metrics.REQUESTS.labels(
                route.class_name, normalize_prefix(route.path), str(status), self.region
            ).inc()

    async def _serve(self, request: web.Request, route: Route, raw_path: str) -> web.StreamResponse:
        self.demand[route.class_name] = self.demand.get(route.class_name, 0) + 1
        source = route.instance
        if source is None:
            return await self._serve_pool(request, route.class_name)
        # Parse the query string and cookies only for routes that read them.
        parts = RequestParts(
            path=raw_path,
            headers=request.headers,
            query=request.query if source.kind == "query" else {},
            cookies=request.cookies if source.kind == "cookie" else {},
        )
        try:
            name = instance_name(route, parts)
        except InvalidArgument as exc:
            return error_response(400, "invalid-instance-name", str(exc))
        if name is None:
            return error_response(
                400,
                "no-instance-name",
                f"no instance name: route {normalize_prefix(route.path)} takes it from"
                f" {describe_source(route)}",
            )
        hint = location_hint(request.headers, self.region)
        headers = _upstream_headers(request, route.class_name, name)
        if _is_websocket_upgrade(request):
            return await self._proxy_websocket(request, route.class_name, name, hint, headers)
        return await self._proxy_http(request, route.class_name, name, hint, headers)

    async def _serve_pool(self, request: web.Request, class_name: str) -> web.StreamResponse:
        """Any member serves: the nearest with room, by `pools.choose`; with none ready, the
        control plane names one (starting it if the pool is empty) and the request waits."""
        hint = location_hint(request.headers, self.region)
        member = choose(
            self._pools.get(class_name, ()),
            geo.lookup(hint),
            self._in_flight,
            self._limits.get(class_name, 0),
            self._rng,
        )
        if member is not None:
            name = member.name
            self.cache.put(class_name, name, Target(member.node_id, member.data_address, name))
        else:
            target = await self.cache.target(class_name, "", hint)
            name = target.instance_name
            self.cache.put(class_name, name, target)
        headers = _upstream_headers(request, class_name, name)
        with self._in_flight.acquire(instance_id(class_name, name)):
            if _is_websocket_upgrade(request):
                return await self._proxy_websocket(request, class_name, name, hint, headers)
            return await self._proxy_http(request, class_name, name, hint, headers)

    # --- plain HTTP -------------------------------------------------------------------------

    async def _proxy_http(
        self, request: web.Request, class_name: str, name: str, hint: str, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        body = _RequestBody(request.content) if request.body_exists else None
        target = await self.cache.target(class_name, name, hint)
        for attempt in (1, 2):
            url = URL(f"http://{target.data_address}{request.rel_url.raw_path_qs}", encoded=True)
            started = time.perf_counter()
            try:
                upstream = await self.session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body.chunks() if body is not None else None,
                    allow_redirects=False,
                    skip_auto_headers=_NO_AUTO_HEADERS,
                )
            except _CONNECT_FAILURES as exc:
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                self.cache.drop(class_name, name, target)
                if attempt == 2 or (body is not None and body.started):
                    return _unreachable(target, exc)
                log.info(
                    "node agent %s at %s is unreachable (%s); resolving %s/%s again",
                    target.node_id,
                    target.data_address,
                    _reason(exc),
                    class_name,
                    name,
                )
                target = await self.cache.target(class_name, name, hint)
                continue
            except aiohttp.ServerTimeoutError:
                metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                return error_response(
                    504,
                    "upstream-timeout",
                    f"node agent {target.node_id} at {target.data_address} sent no response"
                    f" within {self._deadlines.upstream_read:g}s",
                )
            except aiohttp.ClientError as exc:
                metrics.UPSTREAM_ERRORS.labels("failed").inc()
                return error_response(
                    502,
                    "upstream-failed",
                    f"request to node agent {target.node_id} at {target.data_address} failed:"
                    f" {_reason(exc)}",
                )
            metrics.PROXY_SECONDS.labels(class_name).observe(time.perf_counter() - started)
            try:
                return await _relay(request, upstream, target)
            finally:
                upstream.release()
        raise AssertionError("unreachable: the second attempt always returns")

    # --- WebSocket --------------------------------------------------------------------------

    async def _proxy_websocket(
        self, request: web.Request, class_name: str, name: str, hint: str, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        for header in _WS_HANDSHAKE:
            headers.popall(header, None)
        protocols = tuple(
            p.strip()
            for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")
            if p.strip()
        )
        target = await self.cache.target(class_name, name, hint)
        # Connect to the agent before answering the client, so that a refusal (no capacity,
        # boot timeout...) still reaches the client as an HTTP status, not a closed socket.
        for attempt in (1, 2):
            url = URL(f"http://{target.data_address}{request.rel_url.raw_path_qs}", encoded=True)
            started = time.perf_counter()
            try:
                upstream = await self.session.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    max_msg_size=WS_MAX_MESSAGE,
                    compress=0,  # loopback/LAN hop: deflating costs CPU for nothing
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WS_CLOSE_TIMEOUT),
                )
            except aiohttp.WSServerHandshakeError as exc:
                # The agent answered, but not with 101: pass its status and kind on. aiohttp
                # drops the body of a refused handshake, so the reason is rebuilt here.
                refusal = exc.headers.get(ERROR_HEADER) if exc.headers is not None else None
                kind = refusal or "upgrade-refused"
                return error_response(
                    exc.status,
                    kind,
                    f"node agent {target.node_id} refused the WebSocket upgrade: {exc.status}"
                    f" {kind}",
                )
            except _CONNECT_FAILURES as exc:
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                self.cache.drop(class_name, name, target)
                if attempt == 2:
                    return _unreachable(target, exc)
                target = await self.cache.target(class_name, name, hint)
                continue
            except aiohttp.ServerTimeoutError:
                metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                return error_response(
                    504,
                    "upstream-timeout",
                    f"node agent {target.node_id} at {target.data_address} did not answer the"
                    f" WebSocket upgrade within {self._deadlines.upstream_read:g}s",
                )
            except aiohttp.ClientError as exc:
                metrics.UPSTREAM_ERRORS.labels("failed").inc()
                return error_response(
                    502,
                    "upstream-failed",
                    f"WebSocket upgrade at node agent {target.node_id} at {target.data_address}"
                    f" failed: {_reason(exc)}",
                )
            metrics.PROXY_SECONDS.labels(class_name).observe(time.perf_counter() - started)
            break
        else:
            raise AssertionError("unreachable: the second attempt always returns or breaks")

        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), max_msg_size=WS_MAX_MESSAGE
        )
        try:
            await client.prepare(request)
        except BaseException:
            await upstream.close()
            raise
        self._websockets.add(client)
        relay = asyncio.create_task(
            _pump_both_ways(client, upstream, self._stopping), name="ws relay"
        )
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
            await upstream.close()  # a no-op unless the relay was cut short
        return client


def _is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.method == hdrs.METH_GET
        and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
    )


def _upstream_headers(request: web.Request, class_name: str, name: str) -> CIMultiDict[str]:
    incoming = request.headers
    headers = CIMultiDict(incoming)
    for header in _NOT_FORWARDED:
        headers.popall(header, None)
    _drop_connection_tokens(headers, incoming)
    headers[CLASS_HEADER] = class_name
    headers[INSTANCE_HEADER] = name
    # Appended to, like nginx's $proxy_add_x_forwarded_for: the edge is one more hop.
    peer = request.remote or ""
    prior = incoming.get(hdrs.X_FORWARDED_FOR)
    headers[hdrs.X_FORWARDED_FOR] = f"{prior}, {peer}" if prior else peer
    # Set, not appended: the edge is where the client's scheme and host are known for certain.
    headers[hdrs.X_FORWARDED_PROTO] = request.scheme
    headers[hdrs.X_FORWARDED_HOST] = request.host
    return headers


def _drop_connection_tokens(
    headers: CIMultiDict[str], incoming: CIMultiDictProxy[str] | CIMultiDict[str]
) -> None:
    # Headers a Connection header names are hop-by-hop too (RFC 9110 section 7.6.1).
    for value in incoming.getall(hdrs.CONNECTION, ()):
        for token in value.split(","):
            token = token.strip()
            if token:
                headers.popall(token, None)


def _downstream_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    headers = CIMultiDict(upstream.headers)
    for header in _HOP_BY_HOP:
        headers.popall(header, None)
    _drop_connection_tokens(headers, upstream.headers)
    return headers


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, target: Target
) -> web.StreamResponse:
    """Stream the agent's response to the client chunk by chunk, status and headers (with the
    agent's own Portside-Error refusals) unchanged."""
    response = web.StreamResponse(
        status=upstream.status, reason=upstream.reason, headers=_downstream_headers(upstream)
    )
    try:
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                metrics.UPSTREAM_ERRORS.labels("broken").inc()
                log.warning(
                    "response from node agent %s at %s broke off: %s",
                    target.node_id,
                    target.data_address,
                    _reason(exc),
                )
                # The status line is sent already; cutting the connection is the only way left
                # to tell the client the body is incomplete (a clean end would pass it as whole).
                if request.transport is not None:
                    request.transport.close()
                return response
            if not chunk:
                break
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left mid-response; nobody is left to tell
    return response


_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: _Socket, sink: _Socket) -> tuple[int | None, bytes]:
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
            return msg.data, (msg.extra or "").encode()
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return source.close_code, b""


def _close_code(code: int | None) -> int:
    # 1005 (no code) and 1006 (dropped) describe what was received and must never be sent.
    if code is None or code == 1005:
        return aiohttp.WSCloseCode.OK
    if code == 1006:
        return aiohttp.WSCloseCode.INTERNAL_ERROR
    return code


async def _pump_both_ways(
    client: web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    stopping: asyncio.Event,
) -> None:
    to_agent = asyncio.create_task(_pump(client, upstream), name="ws client->agent")
    to_client = asyncio.create_task(_pump(upstream, client), name="ws agent->client")
    try:
        done, _pending = await asyncio.wait(
            (to_agent, to_client), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # The other direction stops before the close is passed on, so nothing is sent on a
        # socket being closed and each side gets exactly one close frame, from here.
        for task in (to_agent, to_client):
            task.cancel()
        results = await asyncio.gather(to_agent, to_client, return_exceptions=True)
    ended = to_agent if to_agent in done else to_client
    other: _Socket = upstream if ended is to_agent else client
    result = results[0] if ended is to_agent else results[1]
    code: int | None
    if stopping.is_set():
        code, reason = aiohttp.WSCloseCode.GOING_AWAY, b"edge shutting down"
    elif isinstance(result, tuple):
        code, reason = result
    else:
        # A send failed: the receiving side is gone, so the sending side learns it broke.
        if not isinstance(result, ConnectionError | asyncio.CancelledError):
            log.warning("WebSocket relay failed: %r", result)
        code, reason = aiohttp.WSCloseCode.INTERNAL_ERROR, b""
    await other.close(code=_close_code(code), message=reason)


def _unreachable(target: Target, exc: BaseException) -> web.Response:
    return error_response(
        502,
        "node-unreachable",
        f"node agent {target.node_id} at {target.data_address} is unreachable: {_reason(exc)}",
    )


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def metrics_app() -> web.Application:
    """`GET /metrics` for Prometheus, served on its own port (`--metrics-listen`): on the
    ingress port every path, `/metrics` included, may be a user's route."""

    async def serve_metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    return app
