"""TLS between the parts, on loopback with real certificates of a test CA: a node joins and
renews against a scripted control plane (TLS on its API port, mutual TLS on its cluster port);
servers admit only the roles they are for; renewed certificates reach new handshakes while the
connections and calls already open go on. The real control plane is in tests/e2e/test_node_tls.py.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from portside import net, pki, proxy, tokens
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.join import CertificateRenewal, Member, join, join_until_admitted
from portside.pki import PeerRole
from tests.support import eventually

CA = pki.CertificateAuthority.create("test", time.time())


def identity(role: PeerRole, ident: str, lifetime_s: float = 3600.0) -> pki.Identity:
    key = pki.new_key()
    cert = CA.issue(pki.signing_request(key), pki.Peer(role, ident), time.time(), lifetime_s)
    return pki.Identity(key, cert, CA.cert_pem)


class AdmittingControlPlane(cp_grpc.ControlPlaneServicer):
    """Join with the one join token it knows; RenewCertificate for the certificate presented."""

    def __init__(self, token: tokens.Token, lifetime_s: float) -> None:
        self.token = token
        self.lifetime_s = lifetime_s
        self.renewed_for: list[pki.Peer] = []
        self.calls = 0

    def _issued(self, csr: bytes, peer: pki.Peer) -> cp.JoinResponse:
        now = time.time()
        cert = CA.issue(csr, peer, now, self.lifetime_s)
        return cp.JoinResponse(
            certificate=cert, ca_certificate=CA.cert_pem, not_after=now + self.lifetime_s
        )

    async def Join(self, request: cp.JoinRequest, context: Any) -> cp.JoinResponse:
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if sent != f"Bearer {self.token.bearer}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this join token is not valid")
        return self._issued(request.csr, pki.Peer(PeerRole(request.role), request.node_id))

    async def RenewCertificate(
        self, request: cp.RenewCertificateRequest, context: Any
    ) -> cp.JoinResponse:
        peer = net.grpc_peer(context)
        assert peer is not None
        self.renewed_for.append(peer)
        return self._issued(request.csr, peer)

    async def WatchEvents(
        self, request: cp.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.Event]:
        revision = 0
        while True:  # a stream that outlives every certificate, like a heartbeat or a watch
            revision += 1
            yield pb.Event(revision=revision)
            await asyncio.sleep(0.05)

    async def ListNodes(self, request: cp.ListNodesRequest, context: Any) -> cp.ListNodesResponse:
        self.calls += 1
        await asyncio.sleep(0.05)  # long enough to be in flight when a renewal lands
        return cp.ListNodesResponse()


@dataclass
class Scripted:
    servicer: AdmittingControlPlane
    address: str  # the API port; the cluster port is its + 2
    token: tokens.Token
    identity: net.LiveIdentity


async def scripted_controlplane(lifetime_s: float) -> tuple[Scripted, grpc.aio.Server]:
    token = tokens.new_token("join", CA.cert_pem)
    servicer = AdmittingControlPlane(token, lifetime_s)
    live = net.LiveIdentity(identity(PeerRole.CONTROLPLANE, "cp1"))
    for _ in range(20):  # the API port and the cluster port, two apart, both free
        server = net.grpc_server()
        cp_grpc.add_ControlPlaneServicer_to_server(servicer, server)
        address = f"127.0.0.1:{net.free_port()}"
        try:
            net.add_grpc_port(server, address, net.ServerTls(live))
            net.add_grpc_port(
                server, net.cluster_target(address), net.ServerTls(live, frozenset(PeerRole))
            )
        except Exception:  # noqa: BLE001 - taken meanwhile: another pair
            await server.stop(0)
            continue
        await server.start()
        return Scripted(servicer, address, token, live), server
    raise AssertionError("no two free ports")


@pytest.fixture
async def controlplane() -> AsyncIterator[Scripted]:
    scripted, server = await scripted_controlplane(lifetime_s=3.0)
    yield scripted
    await server.stop(0)


async def test_a_node_joins_renews_at_two_thirds_and_no_call_fails_meanwhile(
    controlplane: Scripted,
) -> None:
    member = Member(controlplane.address, controlplane.token, PeerRole.AGENT, "fra-1")
    joined = await join(member)
    joined_at = time.time()
    assert joined.peer.role == PeerRole.AGENT and joined.peer.id == "fra-1"
    live = net.LiveIdentity(joined)
    failures: list[BaseException] = []
    calls = 0
    async with net.grpc_channel(member.cluster_target, tls=member.controlplane_tls(live)) as ch:
        renewal = CertificateRenewal(member, live, ch, issued_at=joined_at)
        assert 1.0 < renewal.due_in() <= 2.0  # two thirds of 3 s, from when it joined
        renewing = asyncio.create_task(renewal.run())
        stub = cp_grpc.ControlPlaneStub(ch)

        async def steady() -> None:
            nonlocal calls
            while True:
                try:
                    await stub.ListNodes(cp.ListNodesRequest(), timeout=5)
                    calls += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)

        streamed: list[int] = []

        async def stream() -> None:
            # Renewal never ends a stream open on an old channel (closing a channel would end
            # it with CancelledError, silently ending whatever task follows it).
            async for event in stub.WatchEvents(cp.WatchEventsRequest()):
                streamed.append(event.revision)

        traffic = [asyncio.create_task(steady()) for _ in range(4)]
        watch = asyncio.create_task(stream())
        await eventually(lambda: renewal.renewed >= 3, within=15, what="three renewals")
        assert not watch.done()
        seen = len(streamed)
        await eventually(lambda: len(streamed) > seen + 5, what="the stream still flowing")
        for task in (*traffic, renewing, watch):
            task.cancel()
        await asyncio.gather(*traffic, renewing, watch, return_exceptions=True)
    assert failures == []
    assert calls > 100
    assert streamed == list(range(1, len(streamed) + 1))
    renewed = controlplane.servicer.renewed_for
    assert {(p.role, p.id) for p in renewed} == {(PeerRole.AGENT, "fra-1")}
    # Each renewal proved itself with the certificate before: ever later ones.
    assert [p.not_after for p in renewed] == sorted(p.not_after for p in renewed)
    assert live.version == renewal.renewed and live.current.key_pem != joined.key_pem


async def test_a_wrong_join_token_is_refused_with_one_line(controlplane: Scripted) -> None:
    wrong = tokens.new_token("join", CA.cert_pem)
    member = Member(controlplane.address, wrong, PeerRole.EDGE, "edge-1")
    with pytest.raises(SystemExit) as refused:
        await join_until_admitted(member)
    text = str(refused.value.code)
    assert text.count("\n") == 0
    assert "refused to let edge edge-1 join" in text and "not valid" in text
    assert wrong.secret not in text


async def test_a_control_plane_of_another_ca_is_not_trusted(controlplane: Scripted) -> None:
    other = pki.CertificateAuthority.create("other", time.time())
    token = tokens.new_token("join", other.cert_pem)
    member = Member(controlplane.address, token, PeerRole.AGENT, "a", deadline_s=2)
    with pytest.raises(Exception, match="unreachable|handshake|certificate|did not answer"):
        await join(member)


@pytest.fixture
async def agent_api() -> AsyncIterator[tuple[str, net.LiveIdentity]]:
    """A gRPC server as an agent serves its API: only control planes admitted."""
    live = net.LiveIdentity(identity(PeerRole.AGENT, "fra-1"))
    tls = net.ServerTls(live, frozenset({PeerRole.CONTROLPLANE}))
    server = net.grpc_server(tls, "the API of agent fra-1")
    cp_grpc.add_ControlPlaneServicer_to_server(
        AdmittingControlPlane(tokens.new_token("join", CA.cert_pem), 60), server
    )
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address, tls)
    await server.start()
    yield address, live
    await server.stop(0)


async def list_nodes(address: str, who: pki.Identity | None, plaintext: bool = False) -> str:
    """ "ok", or the status code's name a call ended with."""
    tls = None if plaintext else net.ClientTls(CA.cert_pem, PeerRole.AGENT, identity=who)
    async with net.grpc_channel(address, tls=tls) as channel:
        try:
            await cp_grpc.ControlPlaneStub(channel).ListNodes(cp.ListNodesRequest(), timeout=3)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return "ok"


async def test_only_a_control_plane_may_call_an_agents_api(
    agent_api: tuple[str, net.LiveIdentity],
) -> None:
    address, _ = agent_api
    assert await list_nodes(address, identity(PeerRole.CONTROLPLANE, "cp1")) == "ok"
    assert await list_nodes(address, identity(PeerRole.AGENT, "fra-2")) == (
        "PERMISSION_DENIED: the API of agent fra-1 admits only control planes, not agent/fra-2"
    )
    assert (await list_nodes(address, identity(PeerRole.EDGE, "e"))).startswith("PERMISSION_DENIED")
    # No certificate, or plaintext: the handshake fails, no answer at all.
    assert (await list_nodes(address, None)).startswith("UNAVAILABLE")
    assert (await list_nodes(address, None, plaintext=True)).startswith("UNAVAILABLE")


async def served_certificate(address: str, alpn: str | None = None) -> bytes:
    """The certificate (DER) a TLS server presents to a new connection."""
    host, port = net.split_hostport(address)
    context = ssl.create_default_context(cadata=CA.cert_pem.decode())
    context.check_hostname = False
    client = identity(PeerRole.CONTROLPLANE, "probe")
    net.load_identity(context, client)
    if alpn:
        context.set_alpn_protocols([alpn])
    _, writer = await asyncio.open_connection(host, port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


def der(cert_pem: bytes) -> bytes:
    return pki.ca_der(cert_pem)  # any certificate's DER


async def test_a_renewed_grpc_server_certificate_serves_the_next_handshake(
    agent_api: tuple[str, net.LiveIdentity],
) -> None:
    address, live = agent_api
    assert await served_certificate(address, "h2") == der(live.current.cert_pem)
    live.replace(identity(PeerRole.AGENT, "fra-1"))
    assert await served_certificate(address, "h2") == der(live.current.cert_pem)


@pytest.fixture
async def data_port() -> AsyncIterator[tuple[str, net.LiveIdentity]]:
    """An HTTP server as an agent serves its data port: edges and control planes admitted."""

    async def hello(request: proxy.Request) -> None:
        request.respond(200, b"hello\n")

    live = net.LiveIdentity(identity(PeerRole.AGENT, "fra-1"))
    tls = net.ServerTls(live, frozenset({PeerRole.EDGE, PeerRole.CONTROLPLANE}))
    server = proxy.HttpServer(
        hello,
        name="agent",
        admission=net.peer_admission(tls.peers or (), "the data port of agent fra-1"),
    )
    port = net.free_port()
    await server.listen("127.0.0.1", port, net.server_ssl_context(tls), reuse_port=False)
    yield f"127.0.0.1:{port}", live
    await server.close()


async def fetch(session: aiohttp.ClientSession, address: str, tls: net.ClientTls) -> str:
    try:
        async with session.get(f"https://{address}/", server_hostname=tls.server_name) as r:
            return f"{r.status} {await r.text()}"
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def test_the_data_port_admits_only_edges_and_control_planes(
    data_port: tuple[str, net.LiveIdentity],
) -> None:
    address, _ = data_port
    seen = {}
    for name, who in [
        ("edge", identity(PeerRole.EDGE, "e")),
        ("controlplane", identity(PeerRole.CONTROLPLANE, "cp")),
        ("agent", identity(PeerRole.AGENT, "fra-2")),
        ("none", None),
    ]:
        tls = net.ClientTls(CA.cert_pem, PeerRole.AGENT, identity=who)
        async with net.http_client_session(net.Deadlines(), tls=tls) as session:
            seen[name] = await fetch(session, address, tls)
    assert seen["edge"] == seen["controlplane"] == "200 hello\n"
    assert seen["agent"] == (
        "403 the data port of agent fra-1 admits only edges and control planes, not agent/fra-2\n"
    )
    assert seen["none"] in ("ServerDisconnectedError", "ClientOSError", "ClientConnectorError")
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            await plain.get(f"http://{address}/")


async def test_a_renewed_http_certificate_serves_new_connections_and_open_ones_go_on(
    data_port: tuple[str, net.LiveIdentity],
) -> None:
    address, server = data_port
    edge = net.LiveIdentity(identity(PeerRole.EDGE, "e", lifetime_s=1.5))
    tls = net.ClientTls(CA.cert_pem, PeerRole.AGENT, identity=edge)
    async with net.http_client_session(net.Deadlines(), tls=tls) as session:
        assert await fetch(session, address, tls) == "200 hello\n"
        await asyncio.sleep(max(0.0, edge.peer.not_after - time.time()) + 0.2)
        # The edge's certificate expired: a new connection fails, the open one goes on.
        async with net.http_client_session(net.Deadlines(), tls=tls) as fresh:
            assert await fetch(fresh, address, tls) != "200 hello\n"
        assert await fetch(session, address, tls) == "200 hello\n"
        before = await served_certificate(address)
        server.replace(identity(PeerRole.AGENT, "fra-1"))
        edge.replace(identity(PeerRole.EDGE, "e", lifetime_s=60))
        # New connections: the server presents its new certificate, the edge its new one.
        assert await served_certificate(address) == der(server.current.cert_pem) != before
        async with net.http_client_session(net.Deadlines(), tls=tls) as fresh:
            assert await fetch(fresh, address, tls) == "200 hello\n"
        assert await fetch(session, address, tls) == "200 hello\n"
