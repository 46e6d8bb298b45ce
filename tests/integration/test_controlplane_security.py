"""The control plane's side of issue 9 with real TLS, in process: a control plane on a
bootstrapped embedded store (a real SQLite file), called by real gRPC clients with the tokens
`bootstrap` wrote and certificates issued at join. Plaintext gets no answer; tokens admit by
role; Join admits only a join token; nodes speak on the cluster port with their certificate;
the replica's own certificate is renewed under steady traffic; the cluster page needs a token;
audit lines are written; and no secret reaches a log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from controlplane.identity import bootstrap_url
from controlplane.main import ControlPlaneOptions, run
from portside import net, pki, tokens
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.convert import node_to_pb
from portside.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    PortsideError,
    Unauthenticated,
    from_rpc,
)
from portside.pki import PeerRole
from portside.spec import Node
from portside.tokens import Token
from tests.support import eventually

pytestmark = pytest.mark.integration


@dataclass
class Running:
    address: str
    metrics: str
    admin: Token
    join: Token
    out: Path
    store_url: str

    @property
    def cluster_address(self) -> str:
        return net.cluster_target(self.address)

    def tls(self, identity: pki.Identity | None = None) -> net.ClientTls:
        return net.ClientTls(self.admin.ca_pem, PeerRole.CONTROLPLANE, identity=identity)

    @contextlib.asynccontextmanager
    async def stub(
        self, bearer: str | None = None, identity: pki.Identity | None = None
    ) -> AsyncIterator[Any]:
        target = self.cluster_address if identity is not None else self.address
        async with net.grpc_channel(target, tls=self.tls(identity), bearer=bearer) as channel:
            yield cp_grpc.ControlPlaneStub(channel)


class Secrets(logging.Handler):
    """Every log line of the process while a test runs, to look for secrets in."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    handler = Secrets()
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(old_level)


async def _call(awaitable: Any) -> Any:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc, "control plane") from exc


@contextlib.asynccontextmanager
async def controlplane(tmp: Path, *, lifetime_s: float = 3600.0) -> AsyncIterator[Running]:
    store_url = f"sqlite://{tmp / 'store.db'}"
    out = tmp / "secrets"
    done = await asyncio.to_thread(bootstrap_url, store_url, out)
    assert done.created
    address, metrics = f"127.0.0.1:{net.free_port()}", f"127.0.0.1:{net.free_port()}"
    stop = asyncio.Event()
    opts = ControlPlaneOptions(
        listen=address,
        store_url=store_url,
        metrics_listen=metrics,
        replica_id="r1",
        cert_lifetime_s=lifetime_s,
    )
    task = asyncio.create_task(run(opts, stop))
    running = Running(
        address,
        metrics,
        tokens.parse_token((out / "admin.token").read_text()),
        tokens.parse_token((out / "join.token").read_text()),
        out,
        store_url,
    )

    async def serving() -> bool:
        assert not task.done(), task
        async with running.stub(running.admin.bearer) as stub:
            await stub.ListNodes(cp.ListNodesRequest(), timeout=1)
        return True

    try:
        await eventually(serving, within=15, what="the control plane serving")
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def secrets_of(*made: Token) -> list[str]:
    return [t.secret for t in made]


async def test_bootstrap_writes_two_tokens_once_and_then_nothing(tmp_path: Path) -> None:
    url, out = f"sqlite://{tmp_path / 'store.db'}", tmp_path / "new" / "dir"
    first = await asyncio.to_thread(bootstrap_url, url, out)
    assert first.created and len(first.ca_fingerprint) == 64
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    texts = {}
    for name in ("admin.token", "join.token"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
        texts[name] = (out / name).read_text()
    assert tokens.parse_token(texts["admin.token"]).kind == "api"
    assert tokens.parse_token(texts["join.token"]).kind == "join"
    assert first.ca_fingerprint in first.report()

    again = await asyncio.to_thread(bootstrap_url, url, out)
    assert not again.created and again.ca_fingerprint == first.ca_fingerprint
    assert {n: (out / n).read_text() for n in texts} == texts
    report = again.report()
    assert "bootstrapped already" in report and "nothing was written" in report
    assert str(out / "admin.token") in report and "portside token create" in report

    elsewhere = await asyncio.to_thread(bootstrap_url, url, tmp_path / "other")
    assert not elsewhere.created and not (tmp_path / "other").exists()
    assert "where its first bootstrap wrote them" in elsewhere.report()


async def test_a_store_never_bootstrapped_is_refused_with_what_to_run(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'store.db'}"
    opts = ControlPlaneOptions(
        listen=f"127.0.0.1:{net.free_port()}", store_url=url, metrics_listen="127.0.0.1:0"
    )
    with pytest.raises(FailedPrecondition, match="never bootstrapped") as caught:
        await run(opts, asyncio.Event())
    assert f"portside bootstrap --store {url} --out DIR" in str(caught.value)


async def test_plaintext_grpc_gets_no_answer_on_either_port(tmp_path: Path) -> None:
    async with controlplane(tmp_path) as cp_:
        for address in (cp_.address, cp_.cluster_address):
            async with net.grpc_channel(address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await cp_grpc.ControlPlaneStub(channel).ListNodes(
                        cp.ListNodesRequest(), timeout=2
                    )
            assert caught.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        # TLS without a client certificate gets no answer on the cluster port either.
        async with net.grpc_channel(
            cp_.cluster_address, tls=cp_.tls(), bearer=cp_.admin.bearer
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await cp_grpc.ControlPlaneStub(channel).ListNodes(cp.ListNodesRequest(), timeout=2)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_tokens_by_role_scope_and_revocation(
    tmp_path: Path, log_lines: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    async with controlplane(tmp_path) as c:
        async with c.stub(c.admin.bearer) as admin:
            made = {}
            for role, name, classes in (
                ("read", "dash", []),
                ("deploy", "ci", []),
                ("deploy", "echo-ci", ["Echo"]),
            ):
                reply = await _call(
                    admin.CreateToken(
                        cp.CreateTokenRequest(role=role, name=name, classes=classes), timeout=5
                    )
                )
                made[name] = tokens.parse_token(reply.token)
                assert reply.info.name == name and reply.info.role == role
            listed = await _call(admin.ListTokens(cp.ListTokensRequest(), timeout=5))
            assert {t.name for t in listed.tokens} == {"admin", "join", "dash", "ci", "echo-ci"}
            assert all(t.secret not in str(listed) for t in made.values())
            with pytest.raises(PortsideError, match="taken"):
                await _call(admin.CreateToken(cp.CreateTokenRequest(role="read", name="ci")))

        start = cp.StartRequest(instance=pb.InstanceRef(class_name="Echo", name="a"))
        async with c.stub(made["dash"].bearer) as reader:
            assert not (await _call(reader.ListNodes(cp.ListNodesRequest(), timeout=5))).nodes
            with pytest.raises(PermissionDenied, match="needs deploy"):
                await _call(reader.Start(start, timeout=5))
            with pytest.raises(PermissionDenied, match="needs admin"):
                await _call(reader.ListTokens(cp.ListTokensRequest(), timeout=5))
        async with c.stub(made["echo-ci"].bearer) as scoped:
            with pytest.raises(NotFound):  # admitted; the class is not deployed
                await _call(scoped.Start(start, timeout=5))
            with pytest.raises(PermissionDenied, match="reaches every class"):
                await _call(scoped.ListClasses(cp.ListClassesRequest(), timeout=5))
        async with c.stub() as nobody:
            with pytest.raises(Unauthenticated, match="no API token"):
                await _call(nobody.ListNodes(cp.ListNodesRequest(), timeout=5))

        async with c.stub(c.admin.bearer) as admin:
            await _call(admin.RevokeToken(cp.RevokeTokenRequest(token="dash"), timeout=5))
            with pytest.raises(FailedPrecondition, match="last admin token"):
                await _call(admin.RevokeToken(cp.RevokeTokenRequest(token="admin"), timeout=5))
        async with c.stub(made["dash"].bearer) as revoked:
            with pytest.raises(Unauthenticated, match="revoked"):
                await _call(revoked.ListNodes(cp.ListNodesRequest(), timeout=5))

    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "portside.audit"]
    assert ("CreateToken", "token admin", "dash", "OK") in [
        (a["method"], a["who"], a.get("token"), a["result"]) for a in audit
    ]
    assert ("Start", "token dash", "PERMISSION_DENIED") in [
        (a["method"], a["who"], a["result"]) for a in audit
    ]
    assert ("Start", "token echo-ci", "Echo", "a", "NOT_FOUND") in [
        (a["method"], a["who"], a.get("class"), a.get("instance"), a["result"]) for a in audit
    ]
    assert ("RevokeToken", "dash", "OK") in [
        (a["method"], a.get("token"), a["result"]) for a in audit
    ]
    text = "\n".join(log_lines)
    for secret in secrets_of(c.admin, c.join, *made.values()):
        assert secret not in text


def _node(node_id: str) -> Node:
    return Node(node_id, "127.0.0.1:1", "127.0.0.1:2", "fra", 50.1, 8.7, 1.0, 512)


@contextlib.asynccontextmanager
async def heartbeat(stub: Any, node_id: str) -> AsyncIterator[cp.NodeHeartbeatResponse]:
    """A heartbeat stream, open (and the node's lease alive) while the block runs; its first
    reply."""

    async def messages() -> AsyncIterator[cp.NodeHeartbeatRequest]:
        yield cp.NodeHeartbeatRequest(node=node_to_pb(_node(node_id)))
        await asyncio.sleep(60)

    call = stub.NodeHeartbeat(messages(), timeout=30)
    try:
        async for reply in call:
            yield reply
            break
        else:
            raise AssertionError("no heartbeat reply")
    finally:
        call.cancel()


async def _heartbeat(stub: Any, node_id: str) -> None:
    async with heartbeat(stub, node_id):
        pass


async def _join(c: Running, bearer: str, role: str, node_id: str) -> pki.Identity:
    key = pki.new_key()
    async with c.stub(bearer) as stub:
        reply = await _call(
            stub.Join(
                cp.JoinRequest(role=role, node_id=node_id, csr=pki.signing_request(key)),
                timeout=5,
            )
        )
    assert reply.ca_certificate == c.admin.ca_pem
    return pki.Identity(key, reply.certificate, reply.ca_certificate)


async def test_nodes_join_with_the_join_token_and_speak_with_their_certificate(
    tmp_path: Path, log_lines: list[str]
) -> None:
    async with controlplane(tmp_path, lifetime_s=600) as c:
        wrong = tokens.new_token("join", c.admin.ca_pem)
        with pytest.raises(Unauthenticated, match="not valid here"):
            await _join(c, wrong.bearer, "agent", "n1")
        refusal = [line for line in log_lines if "refused Join" in line]
        assert refusal and wrong.id in refusal[0] and "127.0.0.1" in refusal[0]
        with pytest.raises(Unauthenticated, match="API token"):
            await _join(c, c.admin.bearer, "agent", "n1")
        with pytest.raises(PortsideError, match="agent or edge"):
            await _join(c, c.join.bearer, "controlplane", "n1")

        agent = await _join(c, c.join.bearer, "agent", "n1")
        peer = agent.peer
        assert (peer.role, peer.id) == (PeerRole.AGENT, "n1")
        assert 590 < peer.not_after - time.time() <= 601

        # Not on the API port (no certificate asked there), not as another node, not as an edge.
        async with c.stub() as plain:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _heartbeat(plain, "n1")
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "cluster port" in (caught.value.details() or "")
        async with c.stub(identity=agent) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _heartbeat(stub, "n2")
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        edge = await _join(c, c.join.bearer, "edge", "e1")
        async with c.stub(identity=edge) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _heartbeat(stub, "e1")
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        async with c.stub(c.admin.bearer) as admin:
            assert not (await admin.ListNodes(cp.ListNodesRequest(), timeout=5)).nodes

        async with c.stub(identity=agent) as stub, heartbeat(stub, "n1") as reply:
            assert reply.lease_ttl_seconds > 0
            async with c.stub(c.admin.bearer) as admin:

                async def listed() -> list[str]:
                    reply = await admin.ListNodes(cp.ListNodesRequest(), timeout=5)
                    return [n.node.id for n in reply.nodes]

                assert await eventually(listed, what="n1 listed") == ["n1"]
            # Renewal: the same role and id, a new key.
            key = pki.new_key()
            renewed = await stub.RenewCertificate(
                cp.RenewCertificateRequest(csr=pki.signing_request(key)), timeout=5
            )
            assert pki.peer_of(renewed.certificate).common_name == "agent/n1"
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # an agent is no edge
                await stub.ReportDemand(cp.ReportDemandRequest(), timeout=5)
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert c.join.secret not in "\n".join(log_lines)
    assert wrong.secret not in "\n".join(log_lines)


async def test_the_replicas_certificate_is_renewed_under_steady_traffic(
    tmp_path: Path, log_lines: list[str]
) -> None:
    """A 3 s certificate, renewed every 1.5 s: calls on one channel and on new channels all
    succeed for 5 s, well past the first certificate's end."""
    async with controlplane(tmp_path, lifetime_s=3.0) as c:
        failures: list[str] = []
        calls = 0
        deadline = time.monotonic() + 5.0
        async with c.stub(c.admin.bearer) as steady:
            while time.monotonic() < deadline:
                async with c.stub(c.admin.bearer) as fresh:
                    for stub in (steady, fresh):
                        try:
                            await stub.ListNodes(cp.ListNodesRequest(), timeout=2)
                            calls += 1
                        except grpc.aio.AioRpcError as exc:
                            failures.append(f"{exc.code()}: {exc.details()}")
                await asyncio.sleep(0.1)
        assert not failures and calls > 40
    renewals = [line for line in log_lines if "renewed this replica's certificate" in line]
    assert len(renewals) >= 2


async def test_the_cluster_page_needs_a_token(tmp_path: Path, log_lines: list[str]) -> None:
    async with controlplane(tmp_path) as c:
        base = f"http://{c.metrics}"
        async with c.stub(c.admin.bearer) as admin:
            reader = (
                await admin.CreateToken(cp.CreateTokenRequest(role="read", name="dash"), timeout=5)
            ).token
            scoped = (
                await admin.CreateToken(
                    cp.CreateTokenRequest(role="read", name="scoped", classes=["Echo"]), timeout=5
                )
            ).token
        bearer = tokens.parse_token(reader).bearer
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/ui", "/api/cluster"):
                async with http.get(base + path) as resp:
                    assert resp.status == 401, path
                    body = await resp.text()
            async with http.get(base + "/") as resp:
                assert 'action="/login"' in await resp.text()
                assert "form-action 'self'" in resp.headers["Content-Security-Policy"]
            headers = {"Authorization": f"Bearer {bearer}"}
            async with http.get(base + "/api/cluster", headers=headers) as resp:
                assert resp.status == 200 and "nodes" in await resp.json()
            scoped_headers = {"Authorization": f"Bearer {tokens.parse_token(scoped).bearer}"}
            async with http.get(base + "/api/cluster", headers=scoped_headers) as resp:
                assert resp.status == 401
                assert "reaches every class" in (await resp.json())["error"]
            async with http.post(base + "/login", data={"token": "pst1.api.nonsense"}) as resp:
                assert resp.status == 401
                assert "nonsense" not in await resp.text()
            # /metrics stays open without --metrics-token-file.
            async with http.get(base + "/metrics") as resp:
                assert resp.status == 200
                assert "portside_controlplane_audit_total" in await resp.text()

        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as browser:
            async with browser.post(
                base + "/login", data={"token": reader}, allow_redirects=False
            ) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/"
                cookie = resp.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            async with browser.get(base + "/") as resp:
                assert resp.status == 200 and "/ui/cluster.js" in await resp.text()
            async with browser.get(base + "/api/cluster") as resp:
                assert resp.status == 200
            async with c.stub(c.admin.bearer) as admin:
                await admin.RevokeToken(cp.RevokeTokenRequest(token="dash"), timeout=5)
            async with browser.get(base + "/api/cluster") as resp:
                assert resp.status == 401
        del body
    text = "\n".join(log_lines)
    assert tokens.parse_token(reader).secret not in text


def test_a_token_file_never_leaves_its_mode(tmp_path: Path) -> None:
    # The files bootstrap writes are made 0600 at creation (never readable by others, not even
    # for a moment): O_EXCL also refuses to write through an existing file or link.
    out = tmp_path / "o"
    out.mkdir()
    (out / "admin.token").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FailedPrecondition, match="exists"):
        bootstrap_url(f"sqlite://{tmp_path / 'store.db'}", out)
    assert not (tmp_path / "elsewhere").exists()
    assert os.listdir(out) == ["admin.token"]


async def test_a_revocation_ends_the_streams_its_token_opened(tmp_path: Path) -> None:
    async with controlplane(tmp_path) as c:
        async with c.stub(c.admin.bearer) as admin:
            reply = await admin.CreateToken(cp.CreateTokenRequest(role="read", name="w"), timeout=5)
        watcher = tokens.parse_token(reply.token)
        async with c.stub(watcher.bearer) as stub:
            stream = stub.WatchEvents(cp.WatchEventsRequest())
            await asyncio.sleep(0.5)  # the watch is open and admitted
            async with c.stub(c.admin.bearer) as admin:
                await admin.RevokeToken(cp.RevokeTokenRequest(token="w"), timeout=5)
            revoked_at = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream:
                    pass
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "token w was revoked" in (caught.value.details() or "")
            assert time.monotonic() - revoked_at < 2.5


async def test_an_agent_pushes_snapshots_only_and_records_them_with_its_certificate(
    tmp_path: Path,
) -> None:
    digest = "sha256:" + "a" * 64

    async def push(stub: Any, reference: str) -> None:
        async def messages() -> AsyncIterator[cp.PushImageRequest]:
            yield cp.PushImageRequest(digest=digest, reference=reference, data=b"not an archive")

        await _call(stub.PushImage(messages(), timeout=5))

    async with controlplane(tmp_path) as c:
        agent = await _join(c, c.join.bearer, "agent", "n1")
        async with c.stub(identity=agent) as stub:
            with pytest.raises(PermissionDenied, match="may push snapshots only"):
                await push(stub, "portside/web:aaaaaaaaaaaa")
            # A snapshot's name passes the rule: the archive itself is what is refused then.
            with pytest.raises(PortsideError, match="docker save"):
                await push(stub, "portside/web.snapshot:aaaaaaaaaaaa")
        async with c.stub(c.admin.bearer) as admin:
            with pytest.raises(Unauthenticated, match="for agents"):
                await _call(admin.RecordSnapshot(cp.RecordSnapshotRequest(), timeout=5))
