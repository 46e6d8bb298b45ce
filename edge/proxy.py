"""The edge's HTTP/WebSocket ingress: match a route, find the node agent of the named instance
(route cache with single-flight resolves), and hand the request to the proxy core to stream it
there and the response back. What is the edge's own: which node, the cache, one retry."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from aiohttp import web

from edge import metrics
from edge.pools import InFlight, choose
from edge.routing import (
    RequestParts,
    RouteTable,
    describe_source,
    instance_name,
    location_hint,
    normalize_prefix,
)
from portside import geo, headers, proxy
from portside.errors import (
    NodeUnreachable,
    NoInstanceName,
    NoRoute,
    PortsideError,
    Unavailable,
    UpstreamFailed,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
    error_class,
)
from portside.instances import PoolMember
from portside.net import Deadlines
from portside.spec import Config, Route, instance_id

log = logging.getLogger(__name__)

DEFAULT_ROUTE_CACHE_SIZE: Final = 100_000
_CLIENT_GONE: Final = 499  # the client went away before the edge answered (nginx's convention)


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


class EdgeProxy:
    """The ingress application: holds the route table, the route cache and the proxy core.

    Construction, start and stop (what `edge/main.py` does):

        proxy = EdgeProxy(region="weur", resolver=resolver, deadlines=Deadlines())
        proxy.set_config(config)                  # and again on every config the watch delivers
        ingress = await start_http_server(proxy.app(), "127.0.0.1:8080")
        scrape = await start_http_server(daemon.metrics_app(), "127.0.0.1:9090")
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
        transport: proxy.UpstreamTransport | None = None,
    ) -> None:
        self.region = region
        self._deadlines = deadlines
        self._table = RouteTable(config.routes if config is not None else ())
        self.cache = RouteCache(resolver, deadlines.resolve, route_cache_size)
        self._core = proxy.ProxyCore(transport or proxy.AiohttpTransport(deadlines), name="edge")
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
        self._core.attach(app)
        app.cleanup_ctx.append(self._route_cache)
        return app

    async def _route_cache(self, _app: web.Application) -> AsyncIterator[None]:
        yield
        await self.cache.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        route = self._table.match(raw_path)  # one read of the table: config swaps are atomic
        if route is None:
            metrics.REQUESTS.labels("", "", "404", self.region).inc()
            return proxy.error_response(NoRoute(f"no route for {raw_path}"))
        status = _CLIENT_GONE
        try:
            response = await self._serve(request, route, raw_path)
            status = response.status
            return response
        except PortsideError as exc:
            answer = proxy.error_response(exc)
            status = answer.status
            return answer
        except Exception:
            # A bug, or a resolver raising outside the error tree: the client still gets a clear
            # answer, the operator the traceback.
            log.exception("edge failed on %s %s", request.method, raw_path)
            status = 500
            return proxy.error_response(
                PortsideError("the edge failed on this request; see its log")
            )
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
        name = instance_name(route, parts)
        if name is None:
            raise NoInstanceName(
                f"no instance name: route {normalize_prefix(route.path)} takes it from"
                f" {describe_source(route)}"
            )
        hint = location_hint(request.headers, self.region)
        return await self._proxy(request, route.class_name, name, hint)

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
        with self._in_flight.acquire(instance_id(class_name, name)):
            return await self._proxy(request, class_name, name, hint)

    async def _proxy(
        self, request: web.Request, class_name: str, name: str, hint: str
    ) -> web.StreamResponse:
        # The Portside-* identity headers are the edge's to set: a client must not choose its
        # instance.
        forward = proxy.forward_request(
            request, ingress=True, add={headers.CLASS: class_name, headers.INSTANCE: name}
        )
        target, upstream = await self._open(forward, class_name, name, hint)

        def broke_off(exc: UpstreamFailed) -> None:
            metrics.UPSTREAM_ERRORS.labels("broken").inc()
            log.warning(
                "response from node agent %s at %s broke off: %s",
                target.node_id,
                target.data_address,
                exc,
            )

        return await self._core.deliver(request, upstream, on_break=broke_off)

    async def _open(
        self, forward: proxy.Forward, class_name: str, name: str, hint: str
    ) -> tuple[Target, proxy.Upstream]:
        """Send `forward` to the instance's node agent. A route that fails to connect (or is
        cut before the agent answers) is dropped and resolved once more, if the request may go
        again; a second failure means the node agent is unreachable."""
        target = await self.cache.target(class_name, name, hint)
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                upstream = await self._core.open(target.data_address, forward)
            except proxy.UpgradeRefused as exc:
                raise _refused_upgrade(target, exc) from exc
            except (UpstreamRefused, UpstreamReset) as exc:
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                self.cache.drop(class_name, name, target)
                if attempt == 2 or not proxy.may_resend(forward, exc):
                    raise NodeUnreachable(f"{_agent(target)} is unreachable: {exc}") from exc
                log.info(
                    "%s is unreachable (%s); resolving %s/%s again",
                    _agent(target),
                    exc,
                    class_name,
                    name,
                )
                target = await self.cache.target(class_name, name, hint)
                continue
            except UpstreamTimeout as exc:
                metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                raise UpstreamTimeout(
                    f"{_agent(target)} sent no response within {self._deadlines.upstream_read:g}s"
                ) from exc
            except UpstreamFailed as exc:
                metrics.UPSTREAM_ERRORS.labels("failed").inc()
                raise UpstreamFailed(f"request to {_agent(target)} failed: {exc}") from exc
            metrics.PROXY_SECONDS.labels(class_name).observe(time.perf_counter() - started)
            return target, upstream
        raise AssertionError("unreachable: the second attempt returns or raises")


def _agent(target: Target) -> str:
    return f"node agent {target.node_id} at {target.data_address}"


def _refused_upgrade(target: Target, exc: proxy.UpgradeRefused) -> PortsideError:
    """The agent refused a WebSocket upgrade: with its kind, the same error it gave (aiohttp
    drops a refused handshake's body, so the reason is rebuilt); without one, ours."""
    refusal = error_class(exc.kind) if exc.kind else None
    if refusal is None:
        return UpstreamRefused(f"{_agent(target)} {exc}")
    return refusal(
        f"node agent {target.node_id} refused the WebSocket upgrade: {exc.status} {exc.kind}"
    )
