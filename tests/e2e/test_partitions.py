"""Issue 10 end to end: network partitions on real processes. An agent cut off from the control
plane while edges still reach it, and an edge cut off from the control plane, by packet-filter
rules on their own group ids (tests/partition.py). Named instances: never two copies answering;
pools and warm routes: keep serving."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import docker
import pytest

import portside
from portside import headers
from portside.net import CLUSTER_PORT_OFFSET, Deadlines, with_port_offset
from tests.e2e.harness import Cluster, Proc
from tests.e2e.test_named_instances import config, containers_of, get
from tests.partition import Action, Partition, own_group_id, remove_leftover_rules
from tests.support import eventually

pytestmark = pytest.mark.e2e

NODE_TTL_S = 10.0  # the control plane's default --node-ttl: a node's lease
FENCE_S = 7.0  # the design: an agent fences this long after its last confirmed heartbeat
RESOLVE_S = Deadlines().resolve
POOL = """
[[containers]]
class_name = "Pool"
image = "{image}"
instance_type = "lite"
entrypoint = ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]

[containers.autoscaling]
minimum_instances = {minimum}
maximum_instances = 4
cpu_target = 50
scale_down_delay = "3s"

[[routes]]
path = "/cgi-bin"
class_name = "Pool"
"""


def with_pool(image: str, minimum: int) -> str:
    return config(image) + POOL.format(image=image, minimum=minimum)


@pytest.fixture
def partitions() -> Iterator[Callable[[int, Action], Partition]]:
    """Partitions of this test; every rule is removed at its end, passed or failed."""
    remove_leftover_rules()
    made: list[Partition] = []

    def make(gid: int, action: Action = "DROP") -> Partition:
        made.append(Partition(gid, action))
        return made[-1]

    try:
        yield make
    finally:
        for partition in made:
            partition.heal()


def controlplane_ports(cluster: Cluster) -> tuple[str, str]:
    """Both of a control plane's ports: --listen (API, Join) and the cluster port (heartbeats,
    resolves, watches)."""
    address = cluster.controlplane_address
    return address, with_port_offset(address, CLUSTER_PORT_OFFSET)


def node_of(proc: Proc) -> str:
    return proc.option("--node-id")


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic()
    received: float
    status: int  # 0: no HTTP answer
    who: str  # the answering container's hostname (200), else the Portside-Error kind or error
    via: str  # the url, and the instance name asked for
    text: str = ""  # the reason, when Portside answered with an error


@dataclass
class Probe:
    """Clients asking for one thing in a loop, each through its edge, recording every answer
    with its times: what a user of the instance saw during the whole test."""

    targets: list[tuple[str, dict[str, str]]]  # (url, headers)
    every: float = 0.05
    origin: float = field(default_factory=time.monotonic)  # where timelines count from
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _client(self, session: aiohttp.ClientSession, url: str, h: dict[str, str]) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                async with session.get(url, headers=h) as resp:
                    text = await resp.text()
                    who = (
                        text.split()[0]
                        if resp.status == 200 and text.strip()
                        else resp.headers.get(headers.ERROR, text.strip()[:80])
                    )
                    status = resp.status
                    reason = "" if status == 200 else text.strip()[:200]
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, who, reason = 0, type(exc).__name__, str(exc)[:200]
            via = f"{url} {h.get('X-Session-Id', '')}".strip()
            self.answers.append(Answer(sent, time.monotonic(), status, who, via, reason))
            await asyncio.sleep(self.every)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, u, h) for u, h in self.targets))

    def served(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 200]

    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]


@contextlib.asynccontextmanager
async def probing(probe: Probe) -> AsyncIterator[Probe]:
    task = asyncio.create_task(probe.run())
    try:
        yield probe
    finally:
        probe.stop.set()
        await task


def overlaps(answers: list[Answer]) -> list[tuple[str, str]]:
    """Pairs of containers that both answered while the other one did: c2 had answered (an
    answer received) before c1 was still asked and answered (a later request sent), and the
    other way round. A clean move from c1 to c2 has none."""
    first_received: dict[str, float] = {}
    last_sent: dict[str, float] = {}
    for a in answers:
        if a.status == 200:
            first_received[a.who] = min(first_received.get(a.who, a.received), a.received)
            last_sent[a.who] = max(last_sent.get(a.who, a.sent), a.sent)
    found = []
    names = sorted(first_received)
    for i, c1 in enumerate(names):
        for c2 in names[i + 1 :]:
            if first_received[c1] < last_sent[c2] and first_received[c2] < last_sent[c1]:
                found.append((c1, c2))
    return found


def timeline(answers: list[Answer], origin: float) -> str:
    """Per target asked, the runs of equal answers, with times relative to `origin` (the cut)."""
    lines: list[str] = []
    for via in sorted({a.via for a in answers}):
        lines.append(f"  {via}")
        run: list[Answer] = []
        asked = sorted((a for a in answers if a.via == via), key=lambda a: a.sent)
        for a in [*asked, Answer(0, 0, -1, "", "")]:
            if run and (a.status, a.who) != (run[0].status, run[0].who):
                lines.append(
                    f"    {run[0].sent - origin:+8.2f}s .. {run[-1].received - origin:+8.2f}s"
                    f"  {run[0].status} {run[0].who} x{len(run)}"
                    + (f": {run[0].text}" if run[0].text else "")
                )
                run = []
            run.append(a)
    return "\n".join(lines)


def running_by_node(
    client: docker.DockerClient, cluster: Cluster, class_name: str
) -> dict[str, set[str]]:
    """node id → names of the class's running containers there (one list call)."""
    found = client.api.containers(filters={"label": f"portside.class={class_name}"})
    out: dict[str, set[str]] = {}
    for c in found:
        node = c["Labels"]["portside.node"]
        if node.startswith(cluster.tag + "-"):
            out.setdefault(node, set()).add(c["Labels"]["portside.instance"])
    return out


async def listed_by_node(cluster: Cluster, class_name: str) -> dict[str, list[str]]:
    """node id → names ListInstances gives for the class, only on nodes alive now."""
    async with portside.connect(cluster.controlplane_address) as ps:
        live = {n.node.id for n in await ps.nodes() if n.alive}
        out: dict[str, list[str]] = {}
        for i in await ps.instances(class_name):
            if i.node_id in live:
                out.setdefault(i.node_id, []).append(i.name)
    return out


async def pool_consistent(
    client: docker.DockerClient, cluster: Cluster, nodes: set[str]
) -> dict[str, list[str]]:
    """Each pool member listed once, and per live node what the control plane lists is what
    runs there: no member counted twice, none lost from the count."""
    listed = await listed_by_node(cluster, "Pool")
    every = [name for names in listed.values() for name in names]
    assert len(every) == len(set(every)), f"a pool member listed twice: {listed}"
    assert set(listed) <= nodes, f"members listed on nodes not alive: {listed}"
    running = running_by_node(client, cluster, "Pool")
    for node in nodes:
        assert set(listed.get(node, [])) == running.get(node, set()), (node, listed, running)
    return listed


async def test_agent_cut_off_from_the_control_plane_fences_and_its_instance_moves_once(
    cluster: Cluster,
    test_image: str,
    docker_client: docker.DockerClient,
    partitions: Callable[[int, Action], Partition],
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    gid = own_group_id()
    fra = cluster.start_agent("fra", "127.0.0.2", group=gid)
    sin = cluster.start_agent("sin", "127.0.0.3")
    edges = [cluster.start_edge("fra"), cluster.start_edge("ams")]
    cluster.wait_for_nodes(2)
    a, b = node_of(fra), node_of(sin)
    # The pool comes once both nodes are there: its two members are spread, one on each.
    cluster.deploy(with_pool(test_image, minimum=2))
    await eventually(
        lambda: (
            {n: len(c) for n, c in running_by_node(docker_client, cluster, "Pool").items()}
            == {a: 1, b: 1}
        ),
        within=30,
        every=0.25,
        what="one pool member on each node",
    )
    await eventually(
        lambda: pool_consistent(docker_client, cluster, {a, b}), within=10, what="pool listed"
    )

    async with aiohttp.ClientSession() as s:
        # X and Y are placed near the edges (fra): on the agent about to be cut off.
        for name in ("x", "y"):
            status, text, _ = await get(s, f"http://{edges[0].address}/session/whoami", name)
            assert status == 200, text
        (x_on_a,) = containers_of(docker_client, "x", cluster)
        (y_on_a,) = containers_of(docker_client, "y", cluster)
        assert x_on_a.labels["portside.node"] == a and y_on_a.labels["portside.node"] == a
        for edge in edges:
            assert (await get(s, f"http://{edge.address}/cgi-bin/whoami"))[0] == 200

    named = Probe([(f"http://{e.address}/session/whoami", {"X-Session-Id": "x"}) for e in edges])
    pool = Probe([(f"http://{e.address}/cgi-bin/whoami", {}) for e in edges], every=0.1)
    cut = partitions(gid, "DROP")
    moments: dict[str, float] = {}
    try:
        async with probing(named), probing(pool):
            await asyncio.sleep(2)
            cut.calls_to(*controlplane_ports(cluster))
            cut.answers_from(fra.option("--api-listen"))
            t_cut = named.origin = time.monotonic()
            try:

                def moved() -> bool:
                    return any(x.who != x_on_a.id[:12] for x in named.served() if x.sent > t_cut)

                await eventually(
                    moved, within=NODE_TTL_S + 20, every=0.1, what="x answered from another node"
                )
                moments["x moved"] = time.monotonic()
                # The lease has expired: the pool counts the live node's members, up to 2 again.
                await eventually(
                    lambda: len(running_by_node(docker_client, cluster, "Pool").get(b, ())) >= 2,
                    within=20,
                    every=0.25,
                    what="a replacement pool member on the live node",
                )
                await eventually(
                    lambda: pool_consistent(docker_client, cluster, {b}), within=10, what="pool"
                )
                moments["pool replaced"] = time.monotonic()
                await asyncio.sleep(3)  # x keeps being served from b, and only from b
            finally:
                cut.heal()
            moments["healed"] = time.monotonic()

            # Healed: a registers again and reconciles: its copy of x goes, y is served again.
            async with portside.connect(cluster.controlplane_address) as ps:

                async def a_registered() -> bool:
                    return a in {n.node.id for n in await ps.nodes() if n.alive}

                await eventually(a_registered, within=90, every=0.25, what="a registered again")
            moments["a registered again"] = time.monotonic()

            def x_gone_from_a() -> bool:
                try:
                    x_on_a.reload()
                except docker.errors.NotFound:
                    return True
                return bool(x_on_a.status != "running")

            await eventually(x_gone_from_a, within=30, every=0.25, what="a's copy of x removed")
            moments["a's x removed"] = time.monotonic()
            async with aiohttp.ClientSession() as s:

                async def y_served() -> str:
                    status, text, _ = await get(s, f"http://{edges[0].address}/session/whoami", "y")
                    assert status == 200, text
                    return text

                text = await eventually(y_served, within=10, every=0.25, what="y served again")
                assert text.split()[0] == y_on_a.id[:12], "y is served by its container on a"
            moments["y served by a"] = time.monotonic()
            await eventually(
                lambda: pool_consistent(docker_client, cluster, {a, b}),
                within=30,
                every=0.5,
                what="pool consistent after the heal",
            )
            moments["pool consistent"] = time.monotonic()
            await asyncio.sleep(2)
    finally:
        # What a user saw, passed or failed: which container answered for x when.
        print(f"x answers (seconds from the cut; x was on a in {x_on_a.id[:12]}):")
        print(timeline(named.answers, named.origin))
        print("pool answers:")
        print(timeline(pool.answers, named.origin))
        print(", ".join(f"{k} {t - named.origin:+.2f}s" for k, t in moments.items()))

    served_by = [x.who for x in named.served()]
    assert set(served_by) - {x_on_a.id[:12]}, "x never answered from b"
    (x_on_b,) = [c for c in containers_of(docker_client, "x", cluster) if c.id != x_on_a.id]
    assert x_on_b.labels["portside.node"] == b
    # Never two copies: x moved once, from a to b, and a never answered for it after b did.
    assert set(served_by) == {x_on_a.id[:12], x_on_b.id[:12]}
    assert not overlaps(named.answers), timeline(named.answers, t_cut)
    # Fails only between the fence (7 s after the last confirmed heartbeat, which may be a
    # heartbeat period before the cut) and the move: the lease, a boot and a margin.
    failed = named.failed()
    if failed:
        assert failed[0].sent - t_cut >= FENCE_S - 3, timeline(named.answers, t_cut)
        assert failed[-1].received - t_cut <= NODE_TTL_S + 8, timeline(named.answers, t_cut)
    assert not pool.failed(), timeline(pool.answers, t_cut)


@pytest.mark.parametrize("action", ["DROP", "REJECT"])
async def test_edge_cut_off_serves_warm_routes_and_refuses_new_names_quickly(
    cluster: Cluster,
    test_image: str,
    docker_client: docker.DockerClient,
    partitions: Callable[[int, Action], Partition],
    action: Action,
) -> None:
    cluster.start_controlplane()
    cluster.deploy(with_pool(test_image, minimum=1))
    cluster.start_agent("fra")
    gid = own_group_id()
    edge = cluster.start_edge("fra", group=gid)
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    warm = [f"warm-{i}" for i in range(3)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        serving = {}
        for name in warm:
            status, text, _ = await get(s, f"{base}/session/whoami", name)
            assert status == 200, text
            serving[name] = text.split()[0]

        async def pool_serves() -> bool:
            return (await get(s, f"{base}/cgi-bin/whoami"))[0] == 200

        await eventually(pool_serves, within=30, every=0.25, what="the pool serves")

        async def new_name_refused(name: str) -> float:
            began = time.monotonic()
            status, text, hdrs = await get(s, f"{base}/session/whoami", name)
            took = time.monotonic() - began
            assert status == 503, (status, text)
            assert hdrs.get(headers.ERROR) == "unavailable", (hdrs.get(headers.ERROR), text)
            assert "control plane" in text, text
            assert took <= RESOLVE_S + 2, f"refused after {took:.1f}s: {text}"
            return took

        probe = Probe(
            [(f"{base}/session/whoami", {"X-Session-Id": n}) for n in warm]
            + [(f"{base}/cgi-bin/whoami", {})],
            every=0.2,
        )
        async with probing(probe):
            cut = partitions(gid, action)
            cut.calls_to(*controlplane_ports(cluster))
            t_cut = time.monotonic()
            first = await new_name_refused("new-while-cut-0")
            # Past the gRPC keepalive (20 s + 10 s): the edge's watch streams break meanwhile
            # (at once when refused) and what they fed must stay.
            hold = 35.0 if action == "DROP" else 3.0
            await asyncio.sleep(max(0.0, t_cut + hold - time.monotonic()))
            later = await new_name_refused("new-while-cut-1")
            # Past 12 s of silence on the route watch the edge knows the control plane is out
            # of reach: new names are refused at once, not after the resolve deadline.
            assert later < 1.0, f"second new name refused after {later:.1f}s"
            cut.heal()
            t_heal = time.monotonic()

            async def new_name_served() -> bool:
                status, _, _ = await get(s, f"{base}/session/whoami", "new-after-heal")
                return status == 200

            await eventually(new_name_served, within=60, every=0.25, what="new names again")
            t_served = time.monotonic()
            await asyncio.sleep(1)
        for name in warm:
            status, text, _ = await get(s, f"{base}/session/whoami", name)
            assert status == 200 and text.split()[0] == serving[name], (name, status, text)

    print(f"{action}: answers (times from the cut):")
    print(timeline(probe.answers, t_cut))
    print(
        f"{action}: new name refused after {first:.2f}s, {later:.2f}s (after {hold:g}s cut); "
        f"healed at {t_heal - t_cut:.1f}s, new names served {t_served - t_heal:.2f}s later"
    )
    assert not probe.failed(), timeline(probe.answers, t_cut)
    for name in warm:
        answered = {a.who for a in probe.served() if a.via.endswith(f" {name}")}
        assert answered == {serving[name]}, (name, answered)
    assert len(probe.served()) > 4 * hold
