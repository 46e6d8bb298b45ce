"""The edge's HTTP/WebSocket ingress: match a route, find the node agent of the named instance
(route cache with single-flight resolves), and hand the request to the proxy core to stream it
there and the response back. What is the edge's own: which node, the cache, one retry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from edge import metrics
from edge.pools import CountedRequest, InFlight, choose
from edge.routing import (
    RequestParts,
    RouteTable,
    describe_source,
    instance_name,
    location_hint,
    normalize_prefix,
)
from portside import constraints, geo, headers, proxy
from portside.daemon import Children
from portside.errors import (
    ERROR_KINDS,
    InvalidArgument,
    NodeFenced,
    NodeLost,
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
from portside.net import Deadlines, split_hostport
from portside.routechanges import RouteChangeKind, RouteUpdate
from portside.spec import Config, Constraints, Route, instance_id

log = logging.getLogger(__name__)

_REQUESTS: Final = Children(metrics.REQUESTS)
_PROXY_SECONDS: Final = Children(metrics.PROXY_SECONDS)

DEFAULT_ROUTE_CACHE_SIZE: Final = 100_000
_CLIENT_GONE: Final = 499  # the client went away before the edge answered (nginx's convention)
_FENCED: Final = ERROR_KINDS[NodeFenced].name
_FENCED_STATUS: Final = ERROR_KINDS[NodeFenced].http_status
# An agent restarting (an upgrade) listens again within a second or two.
_CONNECT_RETRY_FIRST_S: Final = 0.05
_CONNECT_RETRY_MOST_S: Final = 0.5
# A bound on sends of one request: each loss of its node allows one more (see EdgeProxy._open).
_MOST_ATTEMPTS: Final = 4
# How long a node the route watch reported lost counts as lost (no connect retries to it) unless
# a reset lists it alive: a node that comes back re-registers under the same id.
_LOST_FOR_S: Final = 60.0
# The control plane's default --node-ttl, until the route watch tells the real one: a node it
# counts alive but that cannot be reached is reachable again or declared lost within it.
NODE_LEASE_S: Final = 10.0


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

    def invalidate(self, class_name: str, name: str) -> int:
        """Forget one instance's route; says how many were dropped (0 or 1)."""
        key = (class_name, name)
        self._inflight.pop(key, None)
        return 0 if self._targets.pop(key, None) is None else 1

    def invalidate_node(self, node_id: str) -> int:
        """Forget every route to the node; says how many were dropped."""
        before = len(self._targets)
        self._targets = {k: t for k, t in self._targets.items() if t.node_id != node_id}
        # Which node a resolve in flight will name is unknown yet: none of them may cache.
        self._inflight.clear()
        return before - len(self._targets)

    def invalidate_named(self, pool_classes: Iterable[str]) -> int:
        """Forget every route but those of pool classes (the pool watch keeps those current);
        says how many were dropped."""
        keep = set(pool_classes)
        before = len(self._targets)
        self._targets = {k: t for k, t in self._targets.items() if k[0] in keep}
        self._inflight.clear()
        return before - len(self._targets)

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


@dataclass(eq=False, slots=True)
class _Attempt:
    """One request being sent to a node, until its response head."""

    node_id: str
    task: asyncio.Task[Any]
    sent: bool = True  # False while it waits to connect again: none of it is out
    cut: bool = False  # its node was lost: its task was cancelled for that


class _Cut(Exception):
    """The request's node was lost before the response head (`sent`: it may have run)."""

    def __init__(self, sent: bool) -> None:
        super().__init__("node lost")
        self.sent = sent


class Openings:
    """The requests in flight to each node that have no response head yet: a lost node's are
    cut at once (their tasks cancelled), not left to wait for a head that will not come."""

    def __init__(self) -> None:
        self._by_node: dict[str, set[_Attempt]] = {}

    def nodes(self) -> set[str]:
        return set(self._by_node)

    @contextlib.contextmanager
    def track(self, node_id: str) -> Iterator[_Attempt]:
        task = asyncio.current_task()
        assert task is not None, "a request runs in a task"
        attempt = _Attempt(node_id, task)
        attempts = self._by_node.setdefault(node_id, set())
        attempts.add(attempt)
        try:
            yield attempt
        finally:
            attempts.discard(attempt)
            if not attempts and self._by_node.get(node_id) is attempts:
                del self._by_node[node_id]

    def cut(self, node_id: str) -> int:
        """Cancel every request waiting on the node; says how many."""
        attempts = self._by_node.pop(node_id, set())
        for attempt in attempts:
            attempt.cut = True
            attempt.task.cancel()
        return len(attempts)


class EdgeProxy:
    """The ingress application: holds the route table, the route cache and the proxy core.

    Construction, start and stop (what `edge/main.py` does):

        proxy = EdgeProxy(region="weur", resolver=resolver, deadlines=Deadlines())
        proxy.set_config(config)                  # and again on every config the watch delivers
        await proxy.listen("127.0.0.1:8080")      # several workers may share the port
        scrape = await start_http_server(daemon.metrics_app(), "127.0.0.1:9090")
        ...
        proxy.invalidate(class_name, name)        # an instance moved or stopped
        proxy.invalidate_node(node_id)            # a node's lease expired
        ...
        await proxy.shutdown()                    # WebSockets going-away, then the upstream pool
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
        node_lease_s: float = NODE_LEASE_S,
    ) -> None:
        self.region = region
        self._deadlines = deadlines
        self.node_lease_s = node_lease_s  # the control plane's --node-ttl, from the route watch
        self._table = RouteTable(config.routes if config is not None else ())
        self.cache = RouteCache(resolver, deadlines.resolve, route_cache_size)
        self._core = proxy.ProxyCore(transport or proxy.HttpTransport(deadlines), name="edge")
        self.server = proxy.HttpServer(self._handle, name="edge")
        self._pools: dict[str, list[PoolMember]] = {}  # class -> members, from the pool watch
        self._limits: dict[str, int] = {}  # class -> concurrency_limit
        self._constraints: dict[str, Constraints] = {}  # class -> its placement constraints
        self._in_flight = InFlight()  # this edge's requests in flight per pool instance id
        self._openings = Openings()
        self._lost: dict[str, float] = {}  # node -> when the route watch said it was lost
        self._rng = random.Random()
        self.demand: dict[str, int] = {}  # class -> requests since the last demand report
        # Answers gateway routes (edge/gateway.py), once the edge has a gateway runtime.
        self.gateway: Callable[[proxy.Request], Awaitable[None]] | None = None

    @property
    def core(self) -> proxy.ProxyCore:
        """The proxy core requests go through (a gateway's answers are delivered by it too)."""
        return self._core

    # --- what the lead's watch stream calls -------------------------------------------------

    def set_config(self, config: Config) -> None:
        """Swap in the routes of `config`. A request reads the table once, so it sees either the
        old table or the new one, never a mix; cached routes of classes no longer routed go
        (with a gateway, whose bindings reach every class: of classes no longer deployed). A
        config with a gateway and no routes sends everything to the gateway."""
        routes = config.routes
        if config.gateway is not None and not routes:
            routes = (Route("/", gateway=True),)
        self._table = RouteTable(routes)
        self.cache.retain_classes(
            (c.name for c in config.classes)
            if config.gateway is not None
            else (route.class_name for route in routes)
        )
        self._limits = {
            c.name: c.autoscaling.concurrency_limit
            for c in config.classes
            if c.autoscaling is not None
        }
        self._constraints = {c.name: c.constraints for c in config.classes if c.constraints}

    def set_pool_members(self, pools: dict[str, list[PoolMember]]) -> None:
        """Swap in the members of every pool, by class (the pool watch calls this)."""
        self._pools = pools

    def invalidate(self, class_name: str, name: str) -> None:
        """The instance moved or stopped: its next request resolves again."""
        metrics.ROUTE_DROPS.labels("moved").inc(self.cache.invalidate(class_name, name))

    def invalidate_node(self, node_id: str) -> None:
        """The node is gone: every instance cached on it resolves again, and every request
        waiting there for its response head is cut (sent again elsewhere if it may be)."""
        now = time.monotonic()
        self._lost = {n: t for n, t in self._lost.items() if now - t < _LOST_FOR_S}
        self._lost[node_id] = now
        dropped = self.cache.invalidate_node(node_id)
        metrics.ROUTE_DROPS.labels("node_lost").inc(dropped)
        cut = self._openings.cut(node_id)
        log.info(
            "node %s lost: %d cached routes dropped, %d requests waiting on it cut",
            node_id,
            dropped,
            cut,
        )

    def apply_route_update(self, update: RouteUpdate) -> None:
        """One message of the route watch (edge/main.py `follow_routes`). A reset drops every
        named route (pool routes come from the pool watch and stay) and treats the nodes it
        does not list alive as lost."""
        if update.reset:
            dropped = self.cache.invalidate_named(self._limits)
            metrics.ROUTE_DROPS.labels("reset").inc(dropped)
            live = set(update.live_nodes)
            self._lost = {n: t for n, t in self._lost.items() if n not in live}
            for node_id in self._openings.nodes() - live:
                self.invalidate_node(node_id)
            log.info("route watch reset: %d cached named routes dropped", dropped)
        for change in update.changes:
            if change.kind is RouteChangeKind.NODE_LOST:
                self.invalidate_node(change.node_id)
                continue
            reason = "moved" if change.kind is RouteChangeKind.INSTANCE_MOVED else "removed"
            dropped = self.cache.invalidate(change.class_name, change.instance_name)
            metrics.ROUTE_DROPS.labels(reason).inc(dropped)

    def node_alive(self, node_id: str) -> bool:
        """Not reported lost by the route watch (lately)."""
        lost_at = self._lost.get(node_id)
        return lost_at is None or time.monotonic() - lost_at >= _LOST_FOR_S

    # --- the application --------------------------------------------------------------------

    async def listen(self, address: str, tls: ssl.SSLContext | None = None) -> None:
        """Serve the ingress on HOST:PORT; every path is a user's (no /metrics, no health path
        here). The port is shared (SO_REUSEPORT) with the other workers of this edge, if any."""
        host, port = split_hostport(address, "listen address")
        try:
            await self.server.listen(host, port, tls, reuse_port=True)
        except OSError as exc:
            raise InvalidArgument(f"cannot listen on {address}: {exc.strerror}") from exc

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop serving: open WebSockets hear going-away, requests in flight finish within
        `grace_s`, then the upstream pool and the resolves in flight close."""
        await self._core.shutdown(self.server, grace_s)
        await self.cache.close()

    async def _handle(self, request: proxy.Request) -> None:
        raw_path = request.path
        route = self._table.match(raw_path)  # one read of the table: config swaps are atomic
        if route is None:
            _REQUESTS("", "", "404", self.region).inc()
            proxy.answer_error(request, NoRoute(f"no route for {raw_path}"))
            return
        try:
            if route.gateway:
                await self._serve_gateway(request)
            else:
                await self._serve(request, route, raw_path)
        except PortsideError as exc:
            if request.status:
                request.abort()  # the head is out already: only a cut says it broke
            else:
                proxy.answer_error(request, exc)
        except Exception:
            # A bug, or a resolver raising outside the error tree: the client still gets a clear
            # answer, the operator the traceback.
            log.exception("edge failed on %s %s", request.method, raw_path)
            if request.status:
                request.abort()
                return
            proxy.answer_error(
                request, PortsideError("the edge failed on this request; see its log")
            )
        finally:
            _REQUESTS(
                route.class_name,
                normalize_prefix(route.path),
                str(request.status or _CLIENT_GONE),
                self.region,
            ).inc()

    async def _serve(self, request: proxy.Request, route: Route, raw_path: str) -> None:
        self.demand[route.class_name] = self.demand.get(route.class_name, 0) + 1
        source = route.instance
        if source is None:
            await self._serve_pool(request, route.class_name)
            return
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
        await self._proxy(request, route.class_name, name, hint)

    async def _serve_pool(self, request: proxy.Request, class_name: str) -> None:
        hint = location_hint(request.headers, self.region)
        name = await self.pool_member(class_name, hint)
        with self.hold(class_name, name):
            await self._proxy(request, class_name, name, hint, pool=True)

    async def pool_member(self, class_name: str, hint: str) -> str:
        """The pool member to serve a request: the nearest with room, by `pools.choose`; with
        none ready, the one the control plane names (starting it if the pool is empty). Its
        route is cached for the request to take."""
        member = choose(
            self._pools.get(class_name, ()),
            geo.lookup(hint),
            self._in_flight,
            self._limits.get(class_name, 0),
            self._rng,
            self._allowed_regions(class_name),
        )
        if member is not None:
            name = member.name
            self.cache.put(class_name, name, Target(member.node_id, member.data_address, name))
        else:
            target = await self.cache.target(class_name, "", hint)
            name = target.instance_name
            self.cache.put(class_name, name, target)
        return name

    def _allowed_regions(self, class_name: str) -> frozenset[str] | None:
        wanted = self._constraints.get(class_name)
        return None if wanted is None else constraints.allowed_regions(wanted)

    def moved_location(self, class_name: str, hint: str) -> str:
        """The Portside-Location value for a request to the class with location hint `hint`:
        the allowed region placement uses instead, "" when the hint lies within the class's
        constraints (the control plane moves it the same way: portside.constraints). Routes'
        answers carry it (a WebSocket's 101 too), and so do gateway bindings' responses
        (edge/gateway.py)."""
        wanted = self._constraints.get(class_name)
        moved = "" if wanted is None else constraints.moved_hint(wanted, hint)
        return f"{moved}; hint={hint}" if moved else ""

    def hold(self, class_name: str, name: str) -> CountedRequest:
        """Count a request in flight on a pool member until the lease is released."""
        return self._in_flight.acquire(instance_id(class_name, name))

    async def _serve_gateway(self, request: proxy.Request) -> None:
        if self.gateway is None:
            raise NoRoute(f"no gateway serves {request.path} on this edge")
        await self.gateway(request)

    async def open_upstream(
        self, forward: proxy.Forward, class_name: str, name: str, hint: str, *, pool: bool = False
    ) -> proxy.Upstream:
        """Send `forward` to the instance as a route's request goes (resolve, route cache,
        resends, metrics) and return the response head: what a gateway binding's fetch does.
        `pool`: a resend may go to another member."""
        self.demand[class_name] = self.demand.get(class_name, 0) + 1
        _, upstream = await self._open(forward, class_name, name, hint, pool=pool)
        return upstream

    async def _proxy(
        self, request: proxy.Request, class_name: str, name: str, hint: str, *, pool: bool = False
    ) -> None:
        # The Portside-* identity headers are the edge's to set: a client must not choose its
        # instance.
        forward = proxy.forward_request(
            request, ingress=True, add={headers.CLASS: class_name, headers.INSTANCE: name}
        )
        target, upstream = await self._open(forward, class_name, name, hint, pool=pool)
        head = None
        location = self.moved_location(class_name, hint)
        if location and isinstance(upstream, proxy.UpstreamResponse):
            head = (upstream.status, [*upstream.fields, (headers.LOCATION, location)])
        elif location and isinstance(upstream, proxy.UpstreamSocket):
            upstream = located(upstream, location)

        def broke_off(exc: UpstreamFailed) -> None:
            metrics.UPSTREAM_ERRORS.labels("broken").inc()
            log.warning(
                "response from node agent %s at %s broke off: %s",
                target.node_id,
                target.data_address,
                exc,
            )

        await self._core.deliver(request, upstream, on_break=broke_off, head=head)

    async def _open(
        self, forward: proxy.Forward, class_name: str, name: str, hint: str, *, pool: bool = False
    ) -> tuple[Target, proxy.Upstream]:
        """Send `forward` to the instance's node agent, and send it again to a freshly resolved
        node when the rule of `proxy.may_resend` allows (docs/architecture.md, "Edges follow
        the cluster"): once after a failed connect, a connection cut before the answer or a
        fenced agent's refusal; and after each loss of its node, which the next resolve no
        longer names. Otherwise the failure says what happened and whether it may have run.
        A pool request that goes again goes to another member (any member serves), never to
        the lost or unreachable one's name again."""
        target = await self.cache.target(class_name, name, hint)
        resent = False
        for _ in range(_MOST_ATTEMPTS):
            started = time.perf_counter()
            try:
                upstream = await self._attempt(target, forward)
            except _Cut as cut:
                # The route was dropped with the node. Nothing was sent if the cut came while
                # connecting again; otherwise the node may have acted on the request.
                failure = UpstreamReset("node lost") if cut.sent else UpstreamRefused("node lost")
                if not proxy.may_resend(forward, failure):
                    metrics.NODE_LOST_ABORTS.labels("failed").inc()
                    raise NodeLost(
                        f"node {target.node_id} was lost while this {forward.method} request was"
                        " in flight there; it may have run, so it was not sent again"
                    ) from None
                metrics.NODE_LOST_ABORTS.labels("resent").inc()
                log.info(
                    "node %s lost with %s %s/%s in flight; resolving again",
                    target.node_id,
                    forward.method,
                    class_name,
                    name,
                )
            except proxy.UpgradeRefused as exc:
                if exc.kind != _FENCED or resent:
                    raise _refused_upgrade(target, exc) from exc
                resent = self._fenced(target, class_name, name)
            except (UpstreamRefused, UpstreamReset) as exc:
                metrics.UPSTREAM_ERRORS.labels("connect").inc()
                self.cache.drop(class_name, name, target)
                if not proxy.may_resend(forward, exc) or (
                    resent and not await self._lost_meanwhile(target, exc)
                ):
                    raise NodeUnreachable(f"{_agent(target)} is unreachable: {exc}") from exc
                resent = True
                log.info(
                    "%s is unreachable (%s); resolving %s/%s again",
                    _agent(target),
                    exc,
                    class_name,
                    name,
                )
            except UpstreamTimeout as exc:
                metrics.UPSTREAM_ERRORS.labels("timeout").inc()
                raise UpstreamTimeout(f"{_agent(target)} sent {exc}") from exc
            except UpstreamFailed as exc:
                metrics.UPSTREAM_ERRORS.labels("failed").inc()
                raise UpstreamFailed(f"request to {_agent(target)} failed: {exc}") from exc
            else:
                if not isinstance(upstream, proxy.UpstreamResponse) or not _is_fenced(upstream):
                    _PROXY_SECONDS(class_name).observe(time.perf_counter() - started)
                    return target, upstream
                upstream.release()
                # The agent refused before running anything: sent again unless its body is gone.
                if resent or not proxy.may_resend(forward, UpstreamRefused("fenced")):
                    self.cache.drop(class_name, name, target)
                    raise NodeFenced(
                        f"{_agent(target)} is fenced (cut off from the control plane) and did not"
                        f" run this request for instance {name!r}; send it again"
                    )
                resent = self._fenced(target, class_name, name)
            if pool:
                target = await self._another_member(class_name, hint, avoid=target.node_id)
                name = target.instance_name
                forward.headers[headers.INSTANCE] = name
            else:
                target = await self.cache.target(class_name, name, hint)
        raise NodeUnreachable(
            f"instance {name!r} of class {class_name}: its node was lost {_MOST_ATTEMPTS} times"
            " while this request waited; send it again"
        )

    async def _another_member(self, class_name: str, hint: str, *, avoid: str) -> Target:
        """A pool member on another node than `avoid` and on none the route watch reported
        lost; with none left, the one the control plane names."""
        members = [
            m
            for m in self._pools.get(class_name, ())
            if m.node_id != avoid and m.node_id not in self._lost
        ]
        member = choose(
            members,
            geo.lookup(hint),
            self._in_flight,
            self._limits.get(class_name, 0),
            self._rng,
            self._allowed_regions(class_name),
        )
        if member is not None:
            target = Target(member.node_id, member.data_address, member.name)
        else:
            target = await self.cache.target(class_name, "", hint)
        self.cache.put(class_name, target.instance_name, target)
        return target

    async def _lost_meanwhile(self, target: Target, failure: UpstreamFailed) -> bool:
        """After a second failed connect to a node the control plane still counts alive (it
        named it again): a frozen or cut-off node, whose lease decides. Wait for its loss, at
        most a lease; True if it was lost (the request then goes to the instance's new place;
        nothing of it was sent)."""
        if not isinstance(failure, UpstreamRefused) or not self.node_alive(target.node_id):
            return False
        log.info("%s still counts alive; waiting for its lease to decide", _agent(target))
        with self._openings.track(target.node_id) as attempt:
            attempt.sent = False
            try:
                await asyncio.sleep(self.node_lease_s)
            except asyncio.CancelledError:
                if not attempt.cut or attempt.task.uncancel() > 0:
                    raise
                return True
        return False

    def _fenced(self, target: Target, class_name: str, name: str) -> bool:
        self.cache.drop(class_name, name, target)
        log.info("%s is fenced; resolving %s/%s again", _agent(target), class_name, name)
        return True

    async def _attempt(self, target: Target, forward: proxy.Forward) -> proxy.Upstream:
        """Open `forward` on the target's node agent, until the response head. A refused
        connect to a node still alive (its agent restarting) is tried again with short backoff
        for up to the connect deadline: nothing was sent. Raises _Cut if the node is lost
        meanwhile, else as UpstreamTransport.open does."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._deadlines.connect
        delay = _CONNECT_RETRY_FIRST_S
        with self._openings.track(target.node_id) as attempt:
            try:
                while True:
                    attempt.sent = True  # from here the agent may have it
                    try:
                        return await self._core.open(target.data_address, forward)
                    except proxy.UpgradeRefused:
                        raise
                    except UpstreamRefused:
                        if not self.node_alive(target.node_id) or loop.time() + delay > give_up:
                            raise
                    attempt.sent = False
                    metrics.CONNECT_RETRIES.inc()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _CONNECT_RETRY_MOST_S)
            except asyncio.CancelledError:
                # Ours (the node was lost) unless the client left too: then it is theirs.
                if not attempt.cut or attempt.task.uncancel() > 0:
                    raise
                raise _Cut(attempt.sent) from None


def located(upstream: proxy.UpstreamSocket, location: str) -> proxy.UpstreamSocket:
    """An upgraded WebSocket whose 101 says Portside-Location `location` as well."""
    fields = CIMultiDict(upstream.headers)
    fields[headers.LOCATION] = location
    return dataclasses.replace(upstream, headers=CIMultiDictProxy(fields))


def _agent(target: Target) -> str:
    return f"node agent {target.node_id} at {target.data_address}"


def _is_fenced(upstream: proxy.UpstreamResponse) -> bool:
    """A fenced agent's refusal (503 node-fenced): it ran nothing."""
    return upstream.status == _FENCED_STATUS and upstream.headers.get(headers.ERROR) == _FENCED


def _refused_upgrade(target: Target, exc: proxy.UpgradeRefused) -> PortsideError:
    """The agent refused a WebSocket upgrade: with its kind, the same error it gave (the
    transport keeps a refused handshake's status and kind, not its body, so the reason is
    rebuilt); without one, ours."""
    refusal = error_class(exc.kind) if exc.kind else None
    if refusal is None:
        return UpstreamRefused(f"{_agent(target)} {exc}")
    return refusal(
        f"node agent {target.node_id} refused the WebSocket upgrade: {exc.status} {exc.kind}"
    )
