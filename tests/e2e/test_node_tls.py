"""A secured cluster across real processes, as users start it: nodes join with the join token (a
wrong one, or none, is refused with one line and never listed); plaintext gRPC gets no answer on
any port; an agent's data port serves only edges and control planes and its API only control
planes; the edge's public listener can serve HTTPS; certificates are renewed under steady
traffic without one failed request."""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import portside
from portside import net, pki, tokens
from portside.api.v1 import nodeagent_pb2 as na
from portside.api.v1 import nodeagent_pb2_grpc as na_grpc
from portside.join import Member, join
from portside.net import free_port
from portside.pki import PeerRole
from tests.e2e.harness import PORTSIDE, Cluster, Proc
from tests.e2e.test_named_instances import config
from tests.support import eventually

pytestmark = pytest.mark.e2e


def flag(proc: Proc, name: str) -> str:
    argv = [str(a) for a in proc.popen.args]  # type: ignore[union-attr]
    return argv[argv.index(name) + 1]


def ca_of(cluster: Cluster) -> bytes:
    return tokens.parse_token(cluster.admin_token).ca_pem


def nodes(cluster: Cluster) -> dict[str, bool]:
    """`portside nodes`: each node's id, and whether it is alive."""
    out = subprocess.run(
        [*PORTSIDE, "nodes", "--json", "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return {n["id"]: n["alive"] for n in json.loads(out.stdout)}


def run_node(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """A daemon that must exit by itself (refused): its exit code and output."""
    return subprocess.run(
        [*PORTSIDE, *args, "--controlplane", cluster.controlplane_address, "--region", "fra"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_wrong_join_token_or_none_is_refused_and_the_node_never_listed(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_controlplane()
    wrong = tokens.new_token("join", ca_of(cluster))
    wrong_file = tmp_path / "wrong.token"
    wrong_file.write_text(wrong.text())
    host = "127.0.0.1"
    agent = run_node(
        cluster,
        "agent",
        "--listen",
        f"{host}:{free_port()}",
        "--node-id",
        f"{cluster.tag}-intruder",
        "--join-token-file",
        str(wrong_file),
    )
    edge = run_node(
        cluster, "edge", "--listen", f"{host}:{free_port()}", "--join-token-file", str(wrong_file)
    )
    for refused in (agent, edge):
        last = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode != 0, refused.stderr
        assert re.match(r"portside (agent|edge): the control plane at \S+ refused", last), last
        assert wrong.secret not in refused.stderr + refused.stdout
    # No token at all: plaintext, which a control plane that requires TLS does not answer.
    plain = run_node(
        cluster, "agent", "--listen", f"{host}:{free_port()}", "--node-id", f"{cluster.tag}-plain"
    )
    assert plain.returncode != 0
    assert "requires TLS: give --join-token-file" in plain.stderr.strip().splitlines()[-1]
    # An API token is not a join token.
    api = run_node(
        cluster,
        "agent",
        "--listen",
        f"{host}:{free_port()}",
        "--join-token-file",
        str(cluster.admin_token_file),
    )
    assert api.returncode != 0 and "not a join token" in api.stderr, api.stderr
    assert nodes(cluster) == {}


async def outcome(
    address: str, tls: net.ClientTls | None, call: Callable[[grpc.aio.Channel], Awaitable[object]]
) -> str:
    """ "ok", or the code and details a call ended with."""
    async with net.grpc_channel(address, tls=tls) as channel:
        try:
            await call(channel)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return "ok"


def health(channel: grpc.aio.Channel) -> Awaitable[object]:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # type: ignore[no-any-return]


def list_instances(channel: grpc.aio.Channel) -> Awaitable[object]:
    stub = na_grpc.NodeAgentStub(channel)
    return stub.ListInstances(na.ListAgentInstancesRequest(), timeout=5)  # type: ignore[no-any-return]


async def as_agent(cluster: Cluster, node_id: str) -> pki.Identity:
    """An agent's certificate, had with the join token, as any host with it can."""
    join_token = tokens.parse_token(cluster.join_token_file.read_text())
    return await join(Member(cluster.controlplane_address, join_token, PeerRole.AGENT, node_id))


async def test_plaintext_gets_no_answer_and_each_port_admits_only_its_parts(
    cluster: Cluster, test_image: str, tmp_path: Path
) -> None:
    cp = cluster.start_controlplane()
    cluster.deploy(config(test_image))
    first = cluster.start_agent("fra")
    second = cluster.start_agent("fra")
    edge_cert, edge_key = public_certificate(tmp_path)
    edge = cluster.start_edge("fra", "127.0.0.1", "--tls-cert", edge_cert, "--tls-key", edge_key)
    cluster.wait_for_nodes(2)
    ca = ca_of(cluster)

    # Plaintext gRPC: no answer on the control plane's ports nor on an agent's API.
    grpc_ports = {
        "control plane": cp.address,
        "cluster port": net.cluster_target(cp.address),
        "agent API": flag(first, "--api-listen"),
    }
    for what, address in grpc_ports.items():
        answer = await outcome(address, None, health)
        assert answer.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")), (what, answer)
    assert await outcome(cp.address, net.ClientTls(ca), health) == "ok"  # TLS: answered

    # Through the edge (HTTPS with its own certificate, here): served.
    public = ssl.create_default_context(cafile=edge_cert)
    async with aiohttp.ClientSession() as s:
        url = f"https://localhost:{edge.address.rsplit(':', 1)[1]}/session/whoami"
        async with s.get(url, headers={"X-Session-Id": "a"}, ssl=public) as r:
            assert r.status == 200, await r.text()
        with pytest.raises(aiohttp.ClientError):  # it serves no plain HTTP then
            await s.get(f"http://{edge.address}/session/whoami", headers={"X-Session-Id": "a"})

    # The agent's data port, asked directly: no answer to plain HTTP nor to HTTPS without a
    # client certificate. Another agent's certificate is admitted (an outbound handler's binding
    # reaches instances on other nodes), and only the node that holds Echo/a serves it: the
    # other makes no copy of it.
    direct = {"Portside-Class": "Echo", "Portside-Instance": "a"}
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            await s.get(f"http://{first.address}/session/whoami", headers=direct)
    intruder = await as_agent(cluster, f"{cluster.tag}-intruder")

    async def ask(address: str, who: pki.Identity | None) -> int | None:
        tls = net.ClientTls(ca, PeerRole.AGENT, identity=who)
        async with net.http_client_session(net.Deadlines(), tls=tls) as s:
            try:
                async with s.get(
                    f"https://{address}/session/whoami",
                    headers=direct,
                    server_hostname=tls.server_name,
                ) as r:
                    return r.status
            except aiohttp.ClientError:
                return None

    assert await ask(first.address, None) is None
    assert {await ask(a.address, intruder) for a in (first, second)} == {200, 503}

    # An agent's API: only control planes. Another agent's certificate is refused with the
    # reason; the control plane's own calls go through (start and exec, below).
    for address in (flag(first, "--api-listen"), flag(second, "--api-listen")):
        refused = await outcome(
            address, net.ClientTls(ca, PeerRole.AGENT, intruder), list_instances
        )
        assert refused.startswith("PERMISSION_DENIED: the API of agent "), refused
        assert refused.endswith(f"admits only control planes, not agent/{cluster.tag}-intruder")
        anonymous = await outcome(address, net.ClientTls(ca, PeerRole.AGENT), list_instances)
        assert anonymous.startswith("UNAVAILABLE"), anonymous
    async with portside.connect(cluster.controlplane_address) as ps:
        info = await ps.container("Echo", "b").start()
        assert info.state == "healthy"
        assert (await ps.container("Echo", "b").exec(["echo", "hi"])).stdout == b"hi\n"
    assert f"{cluster.tag}-intruder" not in nodes(cluster)


def public_certificate(tmp_path: Path) -> tuple[str, str]:
    """A certificate for "localhost" from a CA of the test's own (as an operator's would be),
    the chain and key written as PEM files."""
    ca = pki.CertificateAuthority.create("public", time.time())
    key = pki.new_key()
    cert = ca.issue(
        pki.signing_request(key),
        pki.Peer(PeerRole.EDGE, "public"),
        time.time(),
        extra_names=("localhost",),
    )
    chain, key_file = tmp_path / "edge.pem", tmp_path / "edge.key"
    chain.write_bytes(cert + ca.cert_pem)
    key_file.write_bytes(key)
    return str(chain), str(key_file)


async def test_certificates_are_renewed_under_steady_traffic_without_a_failed_request(
    cluster: Cluster, test_image: str
) -> None:
    lifetime_s = 6.0  # renewed at 4 s by agents and edges, at 3 s by the control plane
    # A node whose heartbeat stopped would be gone within 3 s: renewals must not end it.
    cluster.start_controlplane("--cert-lifetime", f"{lifetime_s:g}s", "--node-ttl", "3")
    cluster.deploy(config(test_image))
    agent = cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    failures: list[str] = []
    served = 0

    async def through_edge(session: aiohttp.ClientSession, name: str) -> None:
        nonlocal served
        while True:
            try:
                async with session.get(
                    f"http://{edge.address}/session/whoami", headers={"X-Session-Id": name}
                ) as r:
                    body = await r.text()
                    if r.status != 200:
                        failures.append(f"{r.status} {body}")
                    served += 1
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    async def through_controlplane(ps: portside.Portside) -> None:
        # Control plane → agent over mutual TLS: a new channel after each of its renewals.
        nonlocal served
        while True:
            try:
                await ps.container("Echo", "api").state()
                served += 1
            except portside.PortsideError as exc:
                failures.append(repr(exc))
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as s, portside.connect(cluster.controlplane_address) as ps:
        await ps.container("Echo", "api").start()
        workers = [asyncio.create_task(through_edge(s, f"steady-{i}")) for i in range(3)]
        workers.append(asyncio.create_task(through_controlplane(ps)))

        def renewals(proc: Proc) -> int:
            return proc.log_text().count("renewed its certificate")

        try:
            await eventually(
                lambda: renewals(agent) >= 3 and renewals(edge) >= 3,
                within=4 * lifetime_s,
                every=0.5,
                what="three renewals by the agent and by the edge",
            )
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    assert failures == [], failures[:5]
    assert served > 100
    assert agent.popen.poll() is None and edge.popen.poll() is None
    assert nodes(cluster) == {flag(agent, "--node-id"): True}


async def test_an_insecure_cluster_runs_in_plaintext_without_tokens(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane("--insecure")
    cluster.deploy(config(test_image))  # no token anywhere: plaintext, as before TLS
    agent = cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    assert "PORTSIDE_TOKEN" not in os.environ
    async with aiohttp.ClientSession() as s:
        url = f"http://{edge.address}/session/whoami"
        async with s.get(url, headers={"X-Session-Id": "a"}) as r:
            assert r.status == 200, await r.text()
        # The agent's data port answers plain HTTP (for edges; there is no TLS to ask for).
        direct = {"Portside-Class": "Echo", "Portside-Instance": "a"}
        async with s.get(f"http://{agent.address}/session/whoami", headers=direct) as r:
            assert r.status == 200
    async with portside.connect(cluster.controlplane_address) as ps:
        assert [i.name for i in await ps.instances()] == ["a"]
    assert "plaintext: an --insecure cluster" in agent.log_text()
