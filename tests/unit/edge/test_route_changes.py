"""The edge following the cluster, as pure logic: which cached routes each route change drops,
which requests waiting on a lost node are cut and which of those go again, connects retried to a
node still alive, a fenced agent's refusal. A fake resolver and transport stand in for the
control plane and the agents (tests/integration/test_edge_deadlines.py runs the real ones)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from edge.proxy import EdgeProxy, Target
from portside import proxy
from portside.errors import NodeFenced, NodeLost, NodeUnreachable, UpstreamRefused
from portside.headers import ERROR
from portside.net import Deadlines
from portside.routechanges import RouteChange, RouteChangeKind, RouteUpdate
from portside.spec import Autoscaling, Config, ContainerClass, Route

A = Target("a", "127.0.0.1:1")
B = Target("b", "127.0.0.1:2")


class Resolver:
    """Names `where[name]`, counting its calls."""

    def __init__(self, **where: Target) -> None:
        self.where = where
        self.calls = 0

    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target:
        self.calls += 1
        return self.where[instance_name]


class Answer(proxy.UpstreamResponse):
    """A response head with an empty body (the edge's decisions here never read a body)."""

    def __init__(self, status: int = 200, error_kind: str = "") -> None:
        headers = CIMultiDict({ERROR: error_kind} if error_kind else {})
        super().__init__(status, None, CIMultiDictProxy(headers))
        self.framing = proxy.Framing.NONE
        self.trailers = []
        self.released = False

    async def relay(self, request: proxy.Request) -> None:
        pass

    async def chunks(self) -> AsyncIterator[bytes]:
        return
        yield b""

    def release(self) -> None:
        self.released = True


class Transport:
    """Per agent address: a list of what each open does in turn — an Answer, an exception to
    raise, or None to hang (like a frozen agent) until cancelled."""

    def __init__(self, plans: Mapping[str, Sequence[object]] | None = None) -> None:
        self.plans = {addr: list(plan) for addr, plan in (plans or {}).items()}
        self.opened: list[str] = []

    async def open(self, authority: str, forward: proxy.Forward) -> proxy.Upstream:
        self.opened.append(authority)
        plan = self.plans[authority]
        step = plan.pop(0) if len(plan) > 1 else plan[0]
        if step is None:
            await asyncio.Event().wait()
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, Answer)
        return step

    async def prepare(self, authority: str) -> None:
        pass

    async def close(self) -> None:
        pass


def edge(
    resolver: Resolver, transport: Transport, connect: float = 1.0, lease: float = 0.5
) -> EdgeProxy:
    config = Config(
        classes=(
            ContainerClass(name="Echo", image="echo"),
            ContainerClass(name="Pool", image="echo", autoscaling=Autoscaling()),
        ),
        routes=(Route("/", "Echo"), Route("/pool", "Pool")),
    )
    deadlines = Deadlines(connect=connect)
    e = EdgeProxy("fra", resolver, deadlines, transport=transport, node_lease_s=lease)
    e.set_config(config)
    return e


def forward(method: str = "GET") -> proxy.Forward:
    return proxy.Forward(method, "/", CIMultiDict())


async def cached(e: EdgeProxy, *names: tuple[str, str]) -> None:
    for class_name, name in names:
        await e.cache.target(class_name, name, "fra")


def lost(node_id: str, revision: int = 5) -> RouteUpdate:
    return RouteUpdate(revision, (RouteChange(RouteChangeKind.NODE_LOST, node_id),))


async def test_each_change_drops_what_it_makes_stale() -> None:
    e = edge(Resolver(alice=A, bob=A, carol=B, dave=B), Transport())
    await cached(e, ("Echo", "alice"), ("Echo", "bob"), ("Echo", "carol"), ("Echo", "dave"))
    e.cache.put("Pool", "p-1", A)
    e.apply_route_update(
        RouteUpdate(
            3,
            (
                RouteChange(RouteChangeKind.INSTANCE_MOVED, "b", "Echo", "carol"),
                RouteChange(RouteChangeKind.INSTANCE_REMOVED, "b", "Echo", "nobody-cached"),
            ),
        )
    )
    assert e.cache.get("Echo", "carol") is None and e.cache.get("Echo", "dave") == B
    assert e.node_alive("a")
    e.apply_route_update(lost("a"))
    assert not e.node_alive("a")
    assert [e.cache.get("Echo", n) for n in ("alice", "bob", "dave")] == [None, None, B]
    assert e.cache.get("Pool", "p-1") is None  # every route to a lost node
    e.cache.put("Pool", "p-2", B)
    e.apply_route_update(RouteUpdate(9, reset=True, live_nodes=("a", "b")))
    assert e.cache.get("Echo", "dave") is None  # a reset: every named route
    assert e.cache.get("Pool", "p-2") == B  # pool routes follow the pool watch
    assert e.node_alive("a")  # listed alive again


@pytest.mark.parametrize(
    ("method", "resent"),
    [("GET", True), ("PUT", True), ("POST", False), ("PATCH", False)],
)
async def test_a_request_waiting_on_a_lost_node_is_cut(method: str, resent: bool) -> None:
    resolver = Resolver(alice=A)
    transport = Transport({A.data_address: [None], B.data_address: [Answer()]})
    e = edge(resolver, transport)
    request = asyncio.create_task(e._open(forward(method), "Echo", "alice", "fra"))
    await asyncio.sleep(0.01)  # sent to a, which does not answer
    resolver.where["alice"] = B  # placed again elsewhere, as the control plane does
    e.apply_route_update(lost("a"))
    if resent:
        target, upstream = await asyncio.wait_for(request, 1.0)
        assert target == B and isinstance(upstream, Answer)
    else:
        with pytest.raises(NodeLost, match="may have run"):
            await asyncio.wait_for(request, 1.0)
    assert transport.opened == [A.data_address] + [B.data_address] * resent


async def test_a_client_leaving_is_not_taken_for_a_lost_node() -> None:
    e = edge(Resolver(alice=A), Transport({A.data_address: [None]}))
    request = asyncio.create_task(e._open(forward(), "Echo", "alice", "fra"))
    await asyncio.sleep(0.01)
    request.cancel()  # the server cancels the handler when its client goes
    e.apply_route_update(lost("a"))
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_a_refused_connect_is_retried_while_the_node_lives() -> None:
    refused = UpstreamRefused("Connection refused")
    transport = Transport({A.data_address: [refused, refused, refused, Answer()]})
    e = edge(Resolver(alice=A), transport)
    target, _ = await e._open(forward("POST"), "Echo", "alice", "fra")
    assert target == A and transport.opened == [A.data_address] * 4


async def test_a_refusing_node_is_given_up_after_the_connect_deadline() -> None:
    refused = UpstreamRefused("Connection refused")
    resolver = Resolver(alice=A)
    e = edge(resolver, Transport({A.data_address: [refused]}), connect=0.3, lease=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NodeUnreachable):
        await e._open(forward(), "Echo", "alice", "fra")
    # Retried within the connect deadline, then resolved again (still a) and retried so again,
    # then a lease's wait for the node to be declared lost, which it was not.
    assert 0.75 <= loop.time() - started <= 1.3
    assert resolver.calls == 2


async def test_a_node_unreachable_twice_is_waited_for_until_its_loss() -> None:
    """A frozen node: its connects time out, the control plane still names it, until its lease
    ends. The request (nothing of it was sent, so even a POST) then goes to the new place."""
    refused = UpstreamRefused("no connection within the connect deadline")
    transport = Transport({A.data_address: [refused], B.data_address: [Answer()]})
    resolver = Resolver(alice=A)
    e = edge(resolver, transport, connect=0.1, lease=5.0)
    request = asyncio.create_task(e._open(forward("POST"), "Echo", "alice", "fra"))
    await asyncio.sleep(0.5)  # tried twice, now waiting for the node's fate
    assert not request.done() and resolver.calls == 2
    resolver.where["alice"] = B
    e.apply_route_update(lost("a"))
    target, _ = await asyncio.wait_for(request, 1.0)
    assert target == B


async def test_a_lost_node_gets_no_connect_retries() -> None:
    refused = UpstreamRefused("Connection refused")
    transport = Transport({A.data_address: [refused], B.data_address: [Answer()]})
    resolver = Resolver(alice=A)
    e = edge(resolver, transport)
    e.apply_route_update(lost("a"))
    resolver.where["alice"] = A  # a resolve in flight before the loss may still name it
    await e.cache.target("Echo", "alice", "fra")
    resolver.where["alice"] = B
    target, _ = await e._open(forward(), "Echo", "alice", "fra")
    assert target == B and transport.opened.count(A.data_address) == 1


async def test_a_fenced_agent_refusal_goes_to_a_fresh_target() -> None:
    fenced = Answer(503, "node-fenced")
    transport = Transport({A.data_address: [fenced], B.data_address: [Answer()]})
    resolver = Resolver(alice=A)
    e = edge(resolver, transport)
    await e.cache.target("Echo", "alice", "fra")
    resolver.where["alice"] = B
    target, _ = await e._open(forward("POST"), "Echo", "alice", "fra")
    assert target == B and fenced.released
    # Fenced twice: the client hears it (nothing ran; it may send again).
    e2 = edge(Resolver(alice=A), Transport({A.data_address: [Answer(503, "node-fenced")]}))
    with pytest.raises(NodeFenced):
        await e2._open(forward(), "Echo", "alice", "fra")
