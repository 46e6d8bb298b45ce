"""The access table and its checks, without I/O: which credential may call which method, class
scopes, the reasons given, the guard around a servicer (with a fake call context) and its audit
lines. Tokens and certificates are made in memory."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from controlplane import records
from controlplane.access import RULES, Credentials, Gate, admit, guard
from controlplane.audit import Audit, Target
from controlplane.tokens import check_bearer, safe_reference
from controlplane.view import ClusterView
from portside import pki, tokens
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import types_pb2 as pb
from portside.errors import PermissionDenied, Unauthenticated
from portside.pki import Peer, PeerRole
from portside.tokens import Role, TokenRecord

NOW = 1_800_000_000.0
SERVICE = cp.DESCRIPTOR.services_by_name["ControlPlane"]

READ_METHODS = {
    "GetConfig", "Logs", "GetState", "GetStateValue", "WatchEvents", "ListClasses",
    "ListInstances", "ListNodes", "GetUsage", "ListImages", "ListVersions", "GetRollout",
    "ListSnapshots", "ListSchedules", "GetOutbound", "ListSecrets",
}  # fmt: skip
DEPLOY_METHODS = {
    "Deploy", "Start", "Stop", "Signal", "Destroy", "Exec", "RenewActivity", "PutStateValue",
    "DeleteStateValue", "PushImage", "StatImages", "ControlRollout", "Rollback",
    "CreateSnapshot", "DeleteSnapshot", "Schedule", "DeleteSchedule", "SetOutbound",
}  # fmt: skip
ADMIN_METHODS = {"CreateToken", "ListTokens", "RevokeToken", "PutSecret", "DeleteSecret"}
AUDITED = (DEPLOY_METHODS - {"StatImages"}) | {
    "CreateToken", "RevokeToken", "Join", "PutSecret", "DeleteSecret",
}  # fmt: skip


def record(
    name: str, role: Role | None, classes: tuple[str, ...] = (), expires: float = 0.0
) -> tuple[TokenRecord, str]:
    """A token record and the authorization value that carries its token."""
    token = tokens.new_token("join" if role is None else "api", CA.cert_pem)
    rec = TokenRecord(
        token.id, token.kind, name, tokens.digest(token.secret), NOW - 10, role, classes, expires
    )
    return rec, f"Bearer {token.bearer}"


CA = pki.CertificateAuthority.create("test", NOW)
ADMIN, ADMIN_AUTH = record("root", Role.ADMIN)
DEPLOYER, DEPLOY_AUTH = record("ci", Role.DEPLOY)
READER, READ_AUTH = record("dash", Role.READ)
SCOPED, SCOPED_AUTH = record("echo-only", Role.DEPLOY, ("Echo",))
OLD, OLD_AUTH = record("old", Role.ADMIN, expires=NOW - 1)
JOIN, JOIN_AUTH = record("join", None)
KNOWN = {t.id: t for t in (ADMIN, DEPLOYER, READER, SCOPED, OLD, JOIN)}


def test_every_method_of_the_service_has_exactly_one_row() -> None:
    assert set(RULES) == {m.name for m in SERVICE.methods}


def test_the_table_says_what_the_issue_says() -> None:
    by_role = {role: {m for m, r in RULES.items() if r.role is role} for role in Role}
    assert by_role[Role.READ] == READ_METHODS
    assert by_role[Role.DEPLOY] == DEPLOY_METHODS
    assert by_role[Role.ADMIN] == ADMIN_METHODS
    assert RULES["NodeHeartbeat"].peers == {PeerRole.AGENT}
    assert RULES["WatchConfig"].peers == {PeerRole.AGENT, PeerRole.EDGE}
    for method in ("WatchPools", "ReportDemand", "SyncRateLimits"):
        assert RULES[method].peers == {PeerRole.EDGE}
    assert RULES["WatchSecrets"].peers == {PeerRole.AGENT, PeerRole.EDGE}
    # a gateway module's stubs reach and drive instances from the edge (fetch) and from a node
    # (outbound handlers)
    for method in (
        "Resolve", "Start", "Stop", "Signal", "Destroy", "GetState", "SetOutbound", "GetOutbound",
    ):  # fmt: skip
        assert RULES[method].peers == {PeerRole.EDGE, PeerRole.AGENT}
    assert RULES["RenewCertificate"].peers == set(PeerRole)
    assert RULES["Join"].join and RULES["Join"].role is None and not RULES["Join"].peers
    assert {m for m, r in RULES.items() if r.audited} == AUDITED


def _admit(method: str, auth: str | None = None, peer: Peer | None = None, cls: str = "") -> str:
    """ "" if admitted, else the refusal's class name and message."""
    try:
        admit(method, RULES[method], Credentials(auth, peer), KNOWN, Target(cls, "x"), NOW)
    except (Unauthenticated, PermissionDenied) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.mark.parametrize("method", sorted(READ_METHODS | DEPLOY_METHODS | ADMIN_METHODS))
def test_each_role_is_allowed_and_refused_per_verb(method: str) -> None:
    needed = RULES[method].role
    assert needed is not None
    for rec, auth in ((READER, READ_AUTH), (DEPLOYER, DEPLOY_AUTH), (ADMIN, ADMIN_AUTH)):
        assert rec.role is not None
        verdict = _admit(method, auth, cls="Echo")
        if rec.role.includes(needed):
            assert verdict == "", (method, rec.role)
        else:
            assert verdict.startswith("PermissionDenied"), (method, rec.role)
            assert f"needs {needed}" in verdict
            assert f"portside token create --role {needed}" in verdict


@pytest.mark.parametrize(
    ("auth", "words"),
    [
        (None, "no API token"),
        ("Basic dXNlcjpwYXNz", "not 'Bearer ID.SECRET'"),
        ("Bearer 0123456789abcdef.c2VjcmV0", "not valid here"),
        (ADMIN_AUTH[:-3] + "AAA", "not valid here"),
        (OLD_AUTH, "expired"),
        (JOIN_AUTH, "is a join token"),
    ],
)
def test_a_missing_wrong_expired_or_join_token_is_unauthenticated(
    auth: str | None, words: str
) -> None:
    verdict = _admit("ListNodes", auth)
    assert verdict.startswith("Unauthenticated") and words in verdict
    assert "portside token create" in verdict or "API token" in verdict
    secret = (auth or "").partition(".")[2]
    assert not secret or secret not in verdict


def test_a_revoked_token_is_unauthenticated_the_moment_its_record_is_gone() -> None:
    known = dict(KNOWN)
    assert not _admit("ListNodes", READ_AUTH)
    del known[READER.id]
    with pytest.raises(Unauthenticated, match="revoked"):
        admit("ListNodes", RULES["ListNodes"], Credentials(READ_AUTH), known, Target(), NOW)


def test_a_scoped_token_reaches_only_its_classes() -> None:
    assert _admit("Start", SCOPED_AUTH, cls="Echo") == ""
    outside = _admit("Start", SCOPED_AUTH, cls="Other")
    assert outside.startswith("PermissionDenied") and "not Other" in outside
    for method in ("ListClasses", "ListNodes", "Deploy", "GetConfig"):
        cluster_wide = _admit(method, SCOPED_AUTH)
        assert "reaches every class" in cluster_wide, method
        assert "unscoped token" in cluster_wide
    assert _admit("ListInstances", SCOPED_AUTH, cls="Echo") == ""
    assert "reaches every class" in _admit("ListInstances", SCOPED_AUTH)


def test_parts_of_the_cluster_by_their_certificates_role() -> None:
    agent, edge = Peer(PeerRole.AGENT, "fra-1"), Peer(PeerRole.EDGE, "e1")
    assert _admit("NodeHeartbeat", peer=agent) == ""
    assert _admit("NodeHeartbeat", peer=edge).startswith("PermissionDenied")
    assert _admit("Resolve", peer=edge) == _admit("Resolve", peer=agent) == ""
    assert "not agent/fra-1" in _admit("WatchPools", peer=agent)
    assert _admit("WatchConfig", peer=agent) == _admit("WatchConfig", peer=edge) == ""
    for peer in (agent, edge, Peer(PeerRole.CONTROLPLANE, "r1")):
        assert _admit("RenewCertificate", peer=peer) == ""
    # A token is no certificate: an admin token cannot heartbeat, nor can anybody without one.
    refused = _admit("NodeHeartbeat", ADMIN_AUTH)
    assert refused.startswith("Unauthenticated") and "cluster port" in refused
    # A certificate is no token: an agent cannot call the API.
    assert _admit("ListNodes", peer=agent).startswith("Unauthenticated")


def test_join_takes_a_join_token_only() -> None:
    assert _admit("Join", JOIN_AUTH) == ""
    assert "API token; a node joins with a join token" in _admit("Join", ADMIN_AUTH)
    assert "no join token" in _admit("Join")


def test_check_bearer_and_safe_references() -> None:
    assert check_bearer(KNOWN, READ_AUTH, "api", NOW) == READER
    whole = tokens.new_token("api", CA.cert_pem)
    assert safe_reference(whole.text()) == whole.id
    assert safe_reference("ci") == "ci" and safe_reference(ADMIN.id) == ADMIN.id
    assert safe_reference(f"{whole.id}.{whole.secret}") == safe_reference(whole.secret) == "?"


def test_token_records_round_trip_without_their_secret() -> None:
    data = records.encode_token(SCOPED)
    assert records.decode_token(SCOPED.id, data) == SCOPED
    assert SCOPED_AUTH.partition(".")[2] not in data.decode()


# --- the guard around a servicer, with a fake call context ---


class Aborted(Exception):
    pass


class FakeContext:
    """What the guard reads of a gRPC call: metadata, the TLS peer, and abort."""

    def __init__(self, authorization: str | None = None, cert_pem: bytes | None = None) -> None:
        self.metadata = (("authorization", authorization),) if authorization else ()
        self.cert_pem = cert_pem
        self._code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> Any:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.cert_pem]} if self.cert_pem else {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self._code, self.details = code, details
        raise grpc.aio.AbortError()


CHUNK = pb.ExecResponse(stdout=b"x")


class Servicer:
    """Answers every method; Destroy fails as a handler failing with NOT_FOUND does."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        async def unary(request: Any, context: Any) -> str:
            self.calls.append(name)
            if name == "Destroy":
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such instance")
            return "ok"

        async def streaming(
            requests: AsyncIterator[Any], context: Any
        ) -> AsyncIterator[pb.ExecResponse]:
            self.calls.append(name)
            async for _ in requests:
                yield CHUNK

        return streaming if name == "Exec" else unary


@pytest.fixture
def audit_lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="portside.audit")
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            lines.append(json.loads(rec.getMessage()))

    handler = Collect()
    logging.getLogger("portside.audit").addHandler(handler)
    yield lines
    logging.getLogger("portside.audit").removeHandler(handler)


def ref(cls: str, name: str) -> pb.InstanceRef:
    return pb.InstanceRef(class_name=cls, name=name)


async def test_the_guard_admits_audits_and_refuses(audit_lines: list[dict[str, Any]]) -> None:
    servicer = Servicer()
    guarded = guard(servicer, SERVICE, Gate(KNOWN, Audit(clock=lambda: NOW), clock=lambda: NOW))

    start = cp.StartRequest(instance=ref("Echo", "s1"))
    assert await guarded.Start(start, FakeContext(DEPLOY_AUTH)) == "ok"
    context = FakeContext(READ_AUTH)
    with pytest.raises(grpc.aio.AbortError):
        await guarded.Stop(cp.StopRequest(instance=ref("Echo", "s1")), context)
    assert context._code is grpc.StatusCode.PERMISSION_DENIED and "needs deploy" in context.details
    context = FakeContext(DEPLOY_AUTH)
    with pytest.raises(grpc.aio.AbortError):
        await guarded.Destroy(cp.DestroyRequest(instance=ref("Echo", "s2")), context)
    assert await guarded.ListNodes(cp.ListNodesRequest(), FakeContext(READ_AUTH)) == "ok"
    assert servicer.calls == ["Start", "Destroy", "ListNodes"]  # Stop never reached it

    assert [(a["method"], a["who"], a["result"]) for a in audit_lines] == [
        ("Start", "token ci", "OK"),
        ("Stop", "token dash", "PERMISSION_DENIED"),
        ("Destroy", "token ci", "NOT_FOUND"),
    ]  # ListNodes changes nothing: not audited
    assert audit_lines[0] == {
        "time": NOW,
        "who": "token ci",
        "method": "Start",
        "peer": "ipv4:127.0.0.1:40000",
        "class": "Echo",
        "instance": "s1",
        "result": "OK",
    }


async def test_exec_is_scoped_by_its_first_message(audit_lines: list[dict[str, Any]]) -> None:
    servicer = Servicer()
    guarded = guard(servicer, SERVICE, Gate(KNOWN, clock=lambda: NOW))

    async def requests(cls: str) -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(instance=ref(cls, "s1"), command=["true"]))
        yield pb.ExecRequest(stdin=b"x")

    replies = [r async for r in guarded.Exec(requests("Echo"), FakeContext(SCOPED_AUTH))]
    assert replies == [CHUNK, CHUNK]  # both messages reached the handler
    context = FakeContext(SCOPED_AUTH)
    with pytest.raises(grpc.aio.AbortError):
        _ = [r async for r in guarded.Exec(requests("Other"), context)]
    assert context._code is grpc.StatusCode.PERMISSION_DENIED
    assert [(a["class"], a["result"]) for a in audit_lines] == [
        ("Echo", "OK"),
        ("Other", "PERMISSION_DENIED"),
    ]


async def test_a_certificate_admits_its_role(audit_lines: list[dict[str, Any]]) -> None:
    key = pki.new_key()
    cert = CA.issue(pki.signing_request(key), Peer(PeerRole.EDGE, "e1"), NOW)
    guarded = guard(Servicer(), SERVICE, Gate(KNOWN, clock=lambda: NOW))
    assert await guarded.ReportDemand(cp.ReportDemandRequest(), FakeContext(cert_pem=cert)) == "ok"
    context = FakeContext(cert_pem=cert)
    with pytest.raises(grpc.aio.AbortError):
        await guarded.ListTokens(cp.ListTokensRequest(), context)
    assert context._code is grpc.StatusCode.UNAUTHENTICATED


async def test_insecure_checks_nothing_and_still_audits(
    audit_lines: list[dict[str, Any]],
) -> None:
    guarded = guard(Servicer(), SERVICE, Gate({}, enforce=False))
    assert await guarded.Start(cp.StartRequest(), FakeContext()) == "ok"
    assert await guarded.ListTokens(cp.ListTokensRequest(), FakeContext()) == "ok"
    assert [(a["who"], a["method"]) for a in audit_lines] == [("anonymous (--insecure)", "Start")]


def test_a_method_without_a_row_cannot_be_served() -> None:
    class Other:
        methods = [*SERVICE.methods]

    fake = Other()
    fake.methods.append(type("M", (), {"name": "Surprise"})())
    with pytest.raises(AssertionError, match="Surprise"):
        guard(Servicer(), fake, Gate(KNOWN))  # type: ignore[arg-type]


def test_the_view_follows_token_records() -> None:
    from controlplane.store import KeyValue, WatchEvent

    view = ClusterView(store=None)  # type: ignore[arg-type]
    kv = KeyValue(records.token_key(READER.id), records.encode_token(READER), 1, 1)
    view._apply(WatchEvent("put", kv))
    assert view.tokens == {READER.id: READER}
    view._apply(WatchEvent("delete", KeyValue(kv.key, b"", 1, 2)))
    assert view.tokens == {}


async def test_an_exec_cancelled_after_its_exit_code_is_audited_ok(
    audit_lines: list[dict[str, Any]],
) -> None:
    class Execs:
        def __getattr__(self, name: str) -> Any:
            async def relay(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                yield pb.ExecResponse(stdout=b"hi\n")
                if context.finishes:
                    yield pb.ExecResponse(exit_code=0)
                await asyncio.sleep(3600)  # the agent's call, not ended yet

            return relay

    async def start() -> AsyncIterator[pb.ExecRequest]:
        yield pb.ExecRequest(start=pb.ExecStart(instance=ref("Echo", "s1"), command=["true"]))

    guarded = guard(Execs(), SERVICE, Gate(KNOWN, clock=lambda: NOW))
    for finishes, wanted in ((True, 2), (False, 1)):
        context = FakeContext(DEPLOY_AUTH)
        context.finishes = finishes  # type: ignore[attr-defined]
        stream = guarded.Exec(start(), context)
        replies = [await anext(stream) for _ in range(wanted)]
        await stream.aclose()  # the client cancels
        assert len(replies) == wanted
    assert [a["result"] for a in audit_lines] == ["OK", "CANCELLED"]


def test_what_a_call_names_is_never_echoed_when_it_might_be_a_secret() -> None:
    whole = tokens.new_token("api", CA.cert_pem)
    named = RULES["CreateToken"].target(cp.CreateTokenRequest(role="read", name=whole.bearer))
    revoked = RULES["RevokeToken"].target(cp.RevokeTokenRequest(token=whole.text()))
    assert named.token == "?" and revoked.token == whole.id
