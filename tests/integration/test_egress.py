"""Outbound control against the real engine and the real iptables: containers of classes with
outbound policies, on a pair of Portside networks of the test's own, reach a stand-in "outside"
server (an echo container on a third Docker network the test makes) only as their policy says;
everything goes through the agent's egress proxy and DNS responder.

Nothing leaves the machine: the containers only ever aim at the outside server's address, the
node's own address on the test's egress bridge, and names the test's policies intercept."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import cast

import docker
import pytest

from nodeagent.egress.dns import intercepted_answer, question
from nodeagent.egress.rules import EgressFirewall, chain_for, owner_lock_path, script
from nodeagent.egress.service import Egress
from nodeagent.firewall import FileLock, isolate_host, run_command
from nodeagent.instances import InstanceSnapshot, Upstream
from nodeagent.runtime import DockerRuntime
from nodeagent.runtime.labels import LABEL_NODE
from portside.gateway.runtime import OutboundContext
from portside.gateway.types import Request, Response
from portside.net import Deadlines
from portside.spec import INSTANCE_TYPES, ContainerClass, OutboundPolicy
from portside.states import InstanceState
from tests.images.build import ECHO_IMAGE
from tests.integration.test_host_isolation import RecordingFirewall

pytestmark = pytest.mark.integration

LITE = INSTANCE_TYPES["lite"]
OUTSIDE_NAME = "outside.test"  # what the Host header says; no DNS ever answers it


class Handlers:
    """The gateway's outbound handlers as a node calls them: one handler, `bill`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, OutboundContext]] = []

    def has(self, name: str) -> bool:
        return name == "bill"

    async def outbound(self, handler: str, request: Request, ctx: OutboundContext) -> Response:
        self.seen.append((handler, request.url, ctx))
        return Response(f"billed {request.path} for {ctx.class_name}/{ctx.instance}\n")


@dataclass
class Node:
    runtime: DockerRuntime
    egress: Egress
    docker: docker.DockerClient
    classes: dict[str, ContainerClass]
    outside_ip: str
    outside_subnet: str
    handlers: Handlers

    async def run(self, cls: ContainerClass, name: str = "probe") -> str:
        """A container of `cls` as the agent runs it, in the egress table; its id."""
        self.classes[cls.name] = cls
        container_id = await self.runtime.create(cls, name)
        info = await self.runtime.start(container_id)
        assert info.ip is not None
        snap = InstanceSnapshot(
            f"{cls.name}/{name}",
            name,
            cls.name,
            InstanceState.RUNNING,
            container_id,
            Upstream(info.ip, 8080),
            0,
            0.0,
            None,
        )
        self.egress.containers_changed([snap])
        await self.egress.synced()
        return container_id

    async def sh(self, container_id: str, *argv: str) -> str:
        container = self.docker.containers.get(container_id)
        done = await asyncio.to_thread(
            container.exec_run, list(argv) if argv[1:] else ["sh", "-c", *argv]
        )
        output: bytes = done.output
        return output.decode(errors="replace")

    async def http(
        self, container_id: str, host: str, path: str = "/whoami", to: str = "", port: int = 8080
    ) -> str:
        """What the container gets for GET `path` with Host `host`, sent to `to` (default: the
        outside server). nc, not wget: the static busybox's wget crashes here; nc -e, so that
        the request side is not half-closed before the answer (the proxy takes that for the
        client leaving)."""
        return await self.ask(container_id, [f"GET {path} HTTP/1.0", f"Host: {host}"], to, port)

    async def ask(self, container_id: str, head: list[str], to: str = "", port: int = 8080) -> str:
        crlf = "\\r\\n"
        send = f"printf '{crlf.join(head)}{crlf}{crlf}'; cat >&2"
        address = to or self.outside_ip
        return await self.sh(
            container_id, "nc", "-w", "3", address, str(port), "-e", "sh", "-c", send
        )

    async def dropped(self) -> int:
        """Packets DOCKER-USER dropped from the egress bridge so far."""
        assert self.egress.bridge is not None
        listing = await run_command(["iptables", "-w", "10", "-L", "DOCKER-USER", "-v", "-x", "-n"])
        interface = self.egress.bridge.interface
        lines = listing.stdout.splitlines()
        return sum(int(line.split()[0]) for line in lines if f" {interface} " in line)


@pytest.fixture
def outside(docker_client: docker.DockerClient, echo_image: str) -> Iterator[tuple[str, str]]:
    """The stand-in outside world: an echo server (HTTP on 8080, a raw TCP service on 9000 that
    speaks first) on a Docker network of the test's own."""
    network = docker_client.networks.create(f"portside-test-{uuid.uuid4().hex[:8]}-outside")
    script = "nc -ll -p 9000 -e /bin/echo raw-service & exec nc -ll -p 8080 -e /app/serve"
    container = docker_client.containers.run(
        ECHO_IMAGE,
        ["sh", "-c", script],
        detach=True,
        network=network.name,
        environment={"PORTSIDE_INSTANCE": "outside"},
    )
    try:
        container.reload()
        settings = container.attrs["NetworkSettings"]["Networks"][network.name]
        subnet = docker_client.api.inspect_network(network.id)["IPAM"]["Config"][0]["Subnet"]
        yield settings["IPAddress"], subnet
    finally:
        container.remove(force=True)
        network.remove()


class _Resolver(asyncio.DatagramProtocol):
    """The node's upstream resolver in these tests: every name is the outside server."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asked = question(data)
        if asked is not None and self.transport is not None:
            self.transport.sendto(intercepted_answer(data, asked, self.address), addr)


async def the_outside_resolver(address: str) -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Resolver(address), local_addr=("127.0.0.1", 0)
    )
    port: int = transport.get_extra_info("sockname")[1]
    return transport, port


@pytest.fixture
async def node(
    node_id: str, docker_client: docker.DockerClient, outside: tuple[str, str]
) -> AsyncIterator[Node]:
    tag = uuid.uuid4().hex[:8]
    internal, egress_name = f"portside-test-{tag}-internal", f"portside-test-{tag}-egress"
    runtime = DockerRuntime(node_id, internal_network=internal, egress_network=egress_name)
    classes: dict[str, ContainerClass] = {}
    handlers = Handlers()
    resolver, port = await the_outside_resolver(outside[0])
    egress = Egress(
        node_id,
        classes.get,
        Deadlines(connect=2.0),
        network=egress_name,
        handlers=handlers,
        resolvers=[f"127.0.0.1:{port}"],
    )
    firewall = RecordingFirewall()
    try:
        await runtime.ensure_networks()
        await isolate_host(runtime, allow_host_access=False, firewall=firewall, egress=egress.guard)
        yield Node(runtime, egress, docker_client, classes, *outside, handlers)
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_NODE}={node_id}"}
        ):
            container.remove(force=True)
        await egress.close()
        bridges = list(firewall.seen.values())
        await egress.firewall.remove([b for b in bridges if b.network == egress_name])
        await firewall.remove(bridges)
        for name in (internal, egress_name):
            docker_client.api.remove_network(name)
        await runtime.close()
        resolver.close()
        nat = await egress.firewall.table("nat")
        assert chain_for(node_id) not in nat.chains, "the test left its nat chain"


async def test_allowed_hosts_by_name_lets_http_through_and_nothing_else(node: Node) -> None:
    cls = ContainerClass("named", ECHO_IMAGE, instance_type=LITE, allowed_hosts=(OUTSIDE_NAME,))
    probe = await node.run(cls)
    # The container is on the egress network, its DNS is the node's responder.
    assert node.egress.bridge is not None
    gateway = node.egress.bridge.gateways[0]
    inspected = node.docker.api.inspect_container(probe)
    assert list(inspected["NetworkSettings"]["Networks"]) == [node.egress.network]
    assert inspected["HostConfig"]["Dns"] == [gateway]

    answer = await node.http(probe, OUTSIDE_NAME, "/headers")
    assert answer.startswith("HTTP/1.1 200"), answer
    # Host went as the container sent it, and nothing says where it came from.
    assert f"Host: {OUTSIDE_NAME}" in answer and "X-Forwarded" not in answer

    other = await node.http(probe, "elsewhere.test")
    assert other.startswith("HTTP/1.1 403"), other
    assert "Portside-Error: outbound-denied" in other and "not in allowed_hosts" in other

    # Not HTTP, straight at the same address: reset, never connected (the service speaks
    # first, so its banner would show); UDP is dropped on the way.
    raw = await node.sh(probe, f"nc -w 3 {node.outside_ip} 9000 </dev/null; echo end")
    assert "raw-service" not in raw and raw.endswith("end\n"), raw
    before = await node.dropped()
    udp = await node.sh(probe, f"timeout 2 tftp -g -r x {node.outside_ip} 9001; echo end")
    # ("end" may be followed by the shell's "Terminated" for the tftp that timeout stopped.)
    assert "end" in udp.splitlines() and await node.dropped() > before, udp
    # Nor the node itself, on a port that is not the proxy's.
    host = await node.http(probe, OUTSIDE_NAME, to=gateway)
    assert "403" in host.splitlines()[0] and "this node" in host, host
    # Names not intercepted are asked of the node's resolvers (here the test's own).
    assert node.outside_ip in await node.sh(probe, f"nslookup {OUTSIDE_NAME}")
    by_name = await node.http(probe, OUTSIDE_NAME, to=OUTSIDE_NAME)
    assert by_name.startswith("HTTP/1.1 200"), by_name


async def test_allowed_by_ip_passes_any_tcp_and_set_outbound_takes_effect(node: Node) -> None:
    cls = ContainerClass("byip", ECHO_IMAGE, instance_type=LITE, allowed_hosts=(node.outside_ip,))
    probe = await node.run(cls)
    assert "raw-service" in await node.sh(probe, f"nc -w 3 {node.outside_ip} 9000 </dev/null")
    assert (await node.http(probe, "anything.test")).startswith("HTTP/1.1 200")

    # SetOutbound: the same container, denied by IP, by CIDR, by name; from its next request.
    open_ = OutboundPolicy(enable_internet=True)
    for denied, host in (
        (node.outside_ip, "anything.test"),
        (node.outside_subnet, "anything.test"),
        ("*.blocked.test", "api.blocked.test"),
    ):
        node.egress.set_policy(
            cls.name, "probe", dataclasses.replace(open_, denied_hosts=(denied,))
        )
        answer = await node.http(probe, host)
        assert answer.startswith("HTTP/1.1 403"), (denied, answer)
        assert "Portside-Error: outbound-denied" in answer and repr(denied) in answer
    # Denied by name only: another name at the same address goes out.
    assert (await node.http(probe, "fine.test")).startswith("HTTP/1.1 200")
    # Non-HTTP to a denied address is reset.
    node.egress.set_policy(
        cls.name, "probe", dataclasses.replace(open_, denied_hosts=(node.outside_ip,))
    )
    assert "raw-service" not in await node.sh(probe, f"nc -w 3 {node.outside_ip} 9000 </dev/null")
    # None: the class's policy again.
    node.egress.set_policy(cls.name, "probe", None)
    assert (await node.http(probe, "anything.test")).startswith("HTTP/1.1 200")


async def test_intercepted_names_resolve_to_the_node_and_reach_the_handler(node: Node) -> None:
    cls = ContainerClass(
        "mesh", ECHO_IMAGE, instance_type=LITE, outbound_by_host={"billing.internal": "bill"}
    )
    probe = await node.run(cls)
    assert node.egress.bridge is not None
    gateway = node.egress.bridge.gateways[0]
    resolved = await node.sh(probe, "nslookup billing.internal")
    assert gateway in resolved, resolved
    # By name, through the node's DNS; two requests on one connection are each decided.
    head = ["GET /a HTTP/1.1", "Host: billing.internal", "", "GET /b HTTP/1.1", "Host: other.test"]
    answer = await node.ask(probe, [*head, "Connection: close"], "billing.internal", 80)
    assert "billed /a for mesh/probe" in answer, answer
    assert "403 Forbidden" in answer and "outbound-denied" in answer, answer
    handler, url, ctx = node.handlers.seen[0]
    assert (handler, url) == ("bill", "http://billing.internal/a")
    assert (ctx.class_name, ctx.instance, ctx.container_id) == ("mesh", "probe", probe)


async def test_a_class_without_outbound_stays_on_the_internal_network(node: Node) -> None:
    cls = ContainerClass("closed", ECHO_IMAGE, instance_type=LITE)
    probe = await node.run(cls)
    inspected = node.docker.api.inspect_container(probe)
    assert list(inspected["NetworkSettings"]["Networks"]) != [node.egress.network]
    assert node.egress.policies.addresses == frozenset()  # no redirect rules for it
    answer = await node.http(probe, OUTSIDE_NAME)
    assert "HTTP/1.1" not in answer, answer


async def test_the_rules_of_a_killed_agent_are_taken_away_and_a_running_ones_kept(
    node: Node,
) -> None:
    """An agent killed outright leaves its chain and jumps behind: the next agent to change its
    rules takes them away, as long as nothing holds the chain's owner lock."""
    bridge = node.egress.bridge
    assert bridge is not None
    dead, alive = chain_for("killed-" + uuid.uuid4().hex), chain_for("alive-" + uuid.uuid4().hex)
    lines = [f":{c} - [0:0]" for c in (dead, alive)]
    lines += [f"-A {c} -p tcp -j REDIRECT --to-ports 9" for c in (dead, alive)]
    lines += [f"-I PREROUTING 1 -s 192.0.2.{i}/32 -i {bridge.interface} -j {c}"
              for i, c in enumerate((dead, alive), 1)]  # fmt: skip
    done = await run_command(["iptables-restore", "-w", "5", "--noflush"], script("nat", lines))
    assert done.returncode == 0, done.stderr
    held = FileLock(owner_lock_path(alive))
    assert held.try_acquire()
    try:
        cls = ContainerClass("any", ECHO_IMAGE, instance_type=LITE, enable_internet=True)
        await node.run(cls)  # a change of this agent's rules
        await node.egress.synced()
        nat = await node.egress.firewall.table("nat")
        assert dead not in nat.chains
        assert not [r for r in nat.of("PREROUTING") if r.endswith(dead)]
        assert alive in nat.chains
    finally:
        held.release()
        await EgressFirewall(alive).leave()
    assert alive not in (await node.egress.firewall.table("nat")).chains
