"""Host isolation against the real engine and the real iptables: from inside a container on each
of Portside's networks, a listener on 0.0.0.0 on the host answers on none of the host's addresses
the container can see, while the agent still reaches the container; with the rules removed the
same connect works.

Every test runs its own pair of networks and removes them, their containers and every rule it
added, even on failure. Nothing leaves the machine: the container only connects to the host's
addresses on the test's own Docker networks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import docker
import pytest

from nodeagent.doctor import check_host
from nodeagent.firewall import CHAIN, IPV4, HostFirewall, isolate_host, jump
from nodeagent.instances import Upstream
from nodeagent.runtime import DockerRuntime
from nodeagent.runtime.docker_engine import NetworkBridge, network_bridge
from nodeagent.runtime.labels import LABEL_NODE
from portside.spec import INSTANCE_TYPES, ContainerClass
from tests.images.build import ECHO_IMAGE
from tests.integration.test_agent_runtime import get_soon
from tests.support import eventually_sync

pytestmark = pytest.mark.integration

SECRET = f"host-secret-{uuid.uuid4().hex}"
ECHO = ContainerClass("echo", ECHO_IMAGE, instance_type=INSTANCE_TYPES["lite"])
OPEN = dataclasses.replace(ECHO, name="open", enable_internet=True)


class _Secret(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = SECRET.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def host_port() -> Iterator[int]:
    """A service of the host on 0.0.0.0 (every address), on a free port of its own."""
    server = ThreadingHTTPServer(("0.0.0.0", 0), _Secret)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class RecordingFirewall(HostFirewall):
    """The real firewall, remembering every bridge it guarded so that the test removes them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, NetworkBridge] = {}

    async def enforce(self, bridges: Sequence[NetworkBridge]) -> None:
        self.seen.update((b.interface, b) for b in bridges)
        await super().enforce(bridges)


@dataclass
class Node:
    runtime: DockerRuntime
    firewall: RecordingFirewall
    internal: str
    egress: str
    docker: docker.DockerClient
    extra: list[DockerRuntime] = field(default_factory=list)

    def bridge(self, name: str) -> NetworkBridge:
        return network_bridge(self.docker.api.inspect_network(name))


@pytest.fixture
async def node(
    node_id: str, echo_image: str, docker_client: docker.DockerClient
) -> AsyncIterator[Node]:
    """An agent's runtime on two networks of this test's own, guarded as the agent does."""
    tag = uuid.uuid4().hex[:8]
    internal, egress = f"portside-test-{tag}-internal", f"portside-test-{tag}-egress"
    runtime = DockerRuntime(node_id, internal_network=internal, egress_network=egress)
    firewall = RecordingFirewall()
    setup = Node(runtime, firewall, internal, egress, docker_client)
    try:
        await runtime.ensure_networks()  # what the agent's manager.adopt() does first
        await isolate_host(runtime, allow_host_access=False, firewall=firewall)
        yield setup
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_NODE}={node_id}"}
        ):
            container.remove(force=True)
        for name in (internal, egress):
            for network in docker_client.api.networks(names=[name]):
                if network["Name"] == name:
                    firewall.seen[network_bridge(network).interface] = network_bridge(network)
                    docker_client.api.remove_network(network["Id"])
        await firewall.remove(list(firewall.seen.values()))
        for rt in (runtime, *setup.extra):
            await rt.close()
        left = [r for r in (await firewall.listing(IPV4)).of("INPUT") if _ours(r, firewall)]
        assert left == [], "the test left rules in INPUT"


def _ours(rule: str, firewall: RecordingFirewall) -> bool:
    return any(f"-i {interface} " in rule for interface in firewall.seen)


async def connect_from(
    node: Node, container_id: str, addresses: Sequence[str], port: int
) -> dict[str, str]:
    """What the container gets when it asks the host's listener at each address, in one exec
    (each costs half a second). nc, not wget: the static busybox's wget crashes in a scratch
    image."""
    container = node.docker.containers.get(container_id)
    ask = "printf 'GET / HTTP/1.0\\r\\n\\r\\n'"
    script = "".join(f"echo '== {a}'; {ask} | nc -w 3 {a} {port} 2>&1; echo; " for a in addresses)
    done = await asyncio.to_thread(container.exec_run, ["sh", "-c", script])
    output: bytes = done.output
    answers = output.decode(errors="replace").split("== ")[1:]
    return dict(answer.split("\n", 1) for answer in answers)


@pytest.mark.parametrize("cls", [ECHO, OPEN], ids=["internal", "egress"])
async def test_a_container_reaches_nothing_on_its_host(
    node: Node, host_port: int, cls: ContainerClass
) -> None:
    container_id = await node.runtime.create(cls, "probe")
    info = await node.runtime.start(container_id)
    assert info.ip is not None
    network = node.egress if cls.enable_internet else node.internal
    bridge = node.bridge(network)
    assert await node.firewall.check([bridge]) == []
    assert bridge.gateways and not bridge.ipv6
    # Docker turns IPv6 off inside containers of a network without it: IPv4 rules suffice.
    disabled = await asyncio.to_thread(
        node.docker.containers.get(container_id).exec_run,
        ["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"],
    )
    assert disabled.output.strip() == b"1"

    # (a) The agent, on the host, still reaches the container (the replies pass the rules).
    await get_soon(Upstream(info.ip, 8080), "/session/whoami")

    # The host's addresses on the test's own two networks: its own network's gateway, and the
    # other network's (another host address). Nothing else is asked: test traffic stays on
    # networks the test made.
    other = node.bridge(node.internal if cls.enable_internet else node.egress)
    addresses = [*bridge.gateways, *(a for a in other.gateways if a not in bridge.gateways)]
    assert len(addresses) >= 2
    answers = await connect_from(node, container_id, addresses, host_port)
    assert list(answers) == addresses
    for address, said in answers.items():
        assert SECRET not in said and "Connection refused" in said, (address, said)

    # (b) Without the rules the very same connects reach the host: the test can fail.
    await node.firewall.remove(list(node.firewall.seen.values()))
    assert await node.firewall.check([bridge]) != []
    answers = await connect_from(node, container_id, addresses, host_port)
    assert list(answers) == addresses
    for address, said in answers.items():
        assert said.endswith(f"\r\n\r\n{SECRET}\n"), (address, said)


async def test_a_restart_or_a_second_agent_adds_nothing_twice(node: Node, node_id: str) -> None:
    bridges = list(node.firewall.seen.values())
    assert {b.network for b in bridges} == {node.internal, node.egress}
    second = DockerRuntime(
        f"{node_id}-b", internal_network=node.internal, egress_network=node.egress
    )
    node.extra.append(second)
    await isolate_host(second, allow_host_access=False, firewall=node.firewall)
    await isolate_host(node.runtime, allow_host_access=False, firewall=node.firewall)
    await asyncio.gather(*(HostFirewall().install(bridges) for _ in range(4)))
    listing = await node.firewall.listing(IPV4)
    for bridge in bridges:
        assert listing.of("INPUT").count(jump(bridge.interface)) == 1
    assert listing.of(CHAIN) == IPV4.chain_rules


async def test_networks_made_again_are_guarded_before_a_container_joins(node: Node) -> None:
    old = node.bridge(node.internal)
    node.docker.api.remove_network(node.internal)  # someone removed it while the agent ran
    await node.runtime.ensure_networks()  # as the runtime does when it finds it missing
    new = node.bridge(node.internal)
    assert new.interface != old.interface
    assert await node.firewall.check([new]) == []


async def test_doctor_sees_the_rules_and_their_absence(node: Node) -> None:
    networks = [(node.internal, True), (node.egress, False)]
    checks = await check_host(networks, node.firewall)
    assert [c.name for c in checks] == [
        "iptables",
        "docker engine",
        "cgroup limits",
        f"network {node.internal}",
        f"host isolation {node.internal}",
        f"network {node.egress}",
        f"host isolation {node.egress}",
    ]
    assert all(c.ok for c in checks), checks
    await node.firewall.remove([node.bridge(node.internal)])
    failed = [c for c in await check_host(networks, node.firewall) if not c.ok]
    assert [c.name for c in failed] == [f"host isolation {node.internal}"]
    assert "INPUT does not send" in failed[0].detail and "start the agent" in failed[0].fix
    wrong = await check_host([(node.egress, True)], node.firewall)
    assert [c.name for c in wrong if not c.ok] == [f"network {node.egress}"]
    absent = await check_host([(f"{node.internal}-never", True)], node.firewall)
    assert all(c.ok for c in absent) and "not created yet" in absent[-1].detail


def test_portside_doctor_prints_one_line_per_check_and_its_verdict() -> None:
    cli = [sys.executable, "-m", "portside", "doctor"]
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
    report = json.loads(as_json.stdout)
    assert as_json.returncode == (0 if report["ok"] else 1)
    assert report["ok"] == all(c["ok"] for c in report["checks"])
    lines = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert lines.returncode == as_json.returncode
    printed = lines.stdout.splitlines()
    assert len(printed) == len(report["checks"])
    for line, check in zip(printed, report["checks"], strict=True):
        verdict = "FAILED " if not check["ok"] else "warn " if check["warning"] else "ok "
        assert line.startswith(verdict) and check["name"] in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _agent(node_id: str, *flags: str, path: str) -> subprocess.Popen[str]:
    listen = f"127.0.0.1:{_free_port()}"
    argv = [sys.executable, "-m", "portside", "agent", "--listen", listen, "--region", "fra"]
    argv += ["--node-id", node_id, "--controlplane", f"127.0.0.1:{_free_port()}", *flags]
    env = {**os.environ, "PATH": path}
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


def test_the_agent_refuses_to_start_without_iptables(node_id: str) -> None:
    agent = _agent(node_id, path="/nonexistent")
    try:
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("portside agent: cannot keep containers away from this host:")
    assert "iptables is not installed" in last and "--allow-host-access" in last


def test_allow_host_access_starts_with_a_warning(node_id: str) -> None:
    agent = _agent(node_id, "--allow-host-access", path="/nonexistent")
    lines: list[str] = []
    assert agent.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(agent.stderr or ()), daemon=True)
    reader.start()
    try:
        eventually_sync(
            lambda: any("--allow-host-access: containers" in line for line in lines),
            within=30,
            what="the warning",
        )
        assert agent.poll() is None, lines  # it did not refuse to start
    finally:
        agent.kill()
        agent.wait(10)
