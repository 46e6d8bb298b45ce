"""Who may call what on the control plane's API: one table (method → who may call it), applied
around every method of the ControlPlane service where it is registered, and an audit line for
every mutating call, allowed or refused.

People and programs prove who they are with an API token (`authorization: Bearer ID.SECRET`)
whose role covers the method (read ⊂ deploy ⊂ admin), and, for a token scoped to classes, whose
classes cover the class the call names; a call that reaches every class is refused to a scoped
token. Parts of the cluster prove who they are with their certificate (mutual TLS); a node that
has none yet joins with a join token. No credential, or one not valid here: UNAUTHENTICATED; a
valid one without the right: PERMISSION_DENIED. Each says which and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from controlplane.audit import Audit, Target
from controlplane.secrets import is_name
from controlplane.tokens import check_bearer, safe_reference
from portside import net, pki
from portside.errors import PermissionDenied, PortsideError, Unauthenticated, error_kind
from portside.pki import Peer, PeerRole
from portside.rpc import abort_with
from portside.tokens import Role, TokenKind, TokenRecord

log = logging.getLogger(__name__)

#: How often a stream admitted by a token checks that the token is still good.
REVOKED_STREAM_CHECK_S = 1.0


def _cluster(_request: Any) -> Target:
    return Target()


def _instance(request: Any) -> Target:
    return Target(request.instance.class_name, request.instance.name)


def _class_field(request: Any) -> Target:
    return Target(request.class_name)


def _events(request: Any) -> Target:
    return Target(request.class_name, request.name)


def _exec(first: Any) -> Target:
    if first is None or first.WhichOneof("message") != "start":
        return Target()
    return _instance(first.start)


def _exit_code(reply: Any) -> bool:
    return bool(reply.WhichOneof("message") == "exit_code")


def _new_token(request: Any) -> Target:
    return Target(token=safe_reference(request.name), role=safe_reference(request.role))


def _token_reference(request: Any) -> Target:
    return Target(token=safe_reference(request.token))


def _secret(request: Any) -> Target:
    """A secret's name; "?" for what is not one (it may be a value given as a name)."""
    return Target(secret=request.name if is_name(request.name) else "?")


def _joining(request: Any) -> Target:
    return Target(node=f"{request.role}/{request.node_id}")


@dataclass(frozen=True)
class Rule:
    """Who may call one method: an API token of `role` (or above), or a certificate of one of
    `peers`, or a join token. `target` says what a request names (its class scopes a token;
    the audit line records it); `audited` methods change something."""

    role: Role | None = None
    peers: frozenset[PeerRole] = frozenset()
    join: bool = False
    target: Callable[[Any], Target] = _cluster
    audited: bool = False
    first_message: bool = False  # the target is in the first message of a request stream
    # The reply after which a stream's work is done: a client that cancels then lost nothing.
    final: Callable[[Any], bool] | None = None


def _token(role: Role, target: Callable[[Any], Target] = _cluster, audited: bool = False) -> Rule:
    return Rule(role=role, target=target, audited=audited)


def _peers(*roles: PeerRole) -> Rule:
    return Rule(peers=frozenset(roles))


READ, DEPLOY, ADMIN = Role.READ, Role.DEPLOY, Role.ADMIN
AGENT, EDGE = PeerRole.AGENT, PeerRole.EDGE


def _gateway(role: Role, audited: bool = False) -> Rule:
    """An instance's lifecycle, which a gateway module's stubs drive from an edge (fetch) and
    from a node (outbound handlers) too."""
    return Rule(role=role, peers=frozenset((EDGE, AGENT)), target=_instance, audited=audited)


#: Every method of portside.v1.ControlPlane and who may call it; a method missing here cannot
#: be served (`guard` refuses to start).
RULES: Mapping[str, Rule] = {
    # people and programs, by their API token's role
    "Deploy": _token(DEPLOY, audited=True),  # replaces every class: cluster-wide
    "Start": _gateway(DEPLOY, audited=True),
    "Stop": _gateway(DEPLOY, audited=True),
    "Signal": _gateway(DEPLOY, audited=True),
    "Destroy": _gateway(DEPLOY, audited=True),
    "Exec": Rule(role=DEPLOY, target=_exec, audited=True, first_message=True, final=_exit_code),
    "RenewActivity": _token(DEPLOY, _instance, audited=True),
    "PutStateValue": _token(DEPLOY, _instance, audited=True),
    "DeleteStateValue": _token(DEPLOY, _instance, audited=True),
    "GetConfig": _token(READ),
    "Logs": _token(READ, _instance),
    "GetState": _gateway(READ),
    "GetStateValue": _token(READ, _instance),
    "WatchEvents": _token(READ, _events),
    "ListClasses": _token(READ),
    "ListInstances": _token(READ, _class_field),
    "ListNodes": _token(READ),
    "ListVersions": _token(READ, _class_field),
    "GetRollout": _token(READ, _class_field),
    "ControlRollout": _token(DEPLOY, _class_field, audited=True),
    "Rollback": _token(DEPLOY, _class_field, audited=True),
    "GetUsage": _token(READ, _class_field),
    "CreateSnapshot": _token(DEPLOY, _instance, audited=True),
    "ListSnapshots": _token(READ, _class_field),
    "DeleteSnapshot": _token(DEPLOY, _class_field, audited=True),
    "Schedule": _token(DEPLOY, _instance, audited=True),
    "ListSchedules": _token(READ, _class_field),
    "DeleteSchedule": _token(DEPLOY, _instance, audited=True),
    "SetOutbound": _gateway(DEPLOY, audited=True),
    "GetOutbound": _gateway(READ),
    # gateway secrets: people set them; the parts that run gateway code read them
    "PutSecret": _token(ADMIN, _secret, audited=True),
    "ListSecrets": _token(READ),
    "DeleteSecret": _token(ADMIN, _secret, audited=True),
    "WatchSecrets": _peers(EDGE, AGENT),
    "SyncRateLimits": _peers(EDGE),
    "CreateToken": _token(ADMIN, _new_token, audited=True),
    "ListTokens": _token(ADMIN),
    "RevokeToken": _token(ADMIN, _token_reference, audited=True),
    # the image store is the cluster's; agents push the snapshots they take
    "PushImage": Rule(role=DEPLOY, peers=frozenset((AGENT,)), audited=True),
    "StatImages": _token(DEPLOY),
    "ListImages": _token(READ),
    # parts of the cluster, by their certificate's role
    "NodeHeartbeat": _peers(AGENT),
    "WatchConfig": _peers(AGENT, EDGE),
    "Resolve": _peers(EDGE, AGENT),  # agents: for outbound handlers' bindings
    "WatchPools": _peers(EDGE),
    "WatchRoutes": _peers(EDGE),
    "ReportDemand": _peers(EDGE),
    "PullImage": _peers(AGENT, PeerRole.CONTROLPLANE),  # replicas copy images between them
    "RecordSnapshot": _peers(AGENT),
    "LatestSnapshot": _peers(AGENT),
    "RenewCertificate": _peers(*PeerRole),
    # a node without a certificate yet
    "Join": Rule(join=True, target=_joining, audited=True),
}


@dataclass(frozen=True)
class Credentials:
    """What a call carries: the `authorization` metadata and the client certificate's owner."""

    authorization: str | None = None
    peer: Peer | None = None
    address: str = ""  # the caller's address, for logs


@dataclass(frozen=True)
class Caller:
    """Who a call was admitted as: for the audit line and for handlers that need it."""

    who: str
    peer: Peer | None = None
    token: TokenRecord | None = None
    address: str = ""  # where the call came from


def admit(
    method: str,
    rule: Rule,
    credentials: Credentials,
    tokens: Mapping[str, TokenRecord],
    target: Target,
    now: float,
) -> Caller:
    """The caller, if `rule` lets it call `method` on `target`; otherwise Unauthenticated or
    PermissionDenied with the reason and what to do."""
    if rule.peers and (
        rule.role is None or (credentials.peer is not None and credentials.peer.role in rule.peers)
    ):
        return _admit_peer(method, rule.peers, credentials)
    kind: TokenKind = "join" if rule.join else "api"
    found = check_bearer(tokens, credentials.authorization, kind, now)
    if isinstance(found, str):
        raise Unauthenticated(found)
    caller = Caller(f"token {found.name}", token=found, address=credentials.address)
    if rule.role is not None:
        why = found.may(rule.role, (target.class_name,) if target.class_name else ())
        if why:
            fix = (
                f"`portside token create --role {rule.role}`"
                if not found.role or not found.role.includes(rule.role)
                else "an unscoped token, or name the class"
            )
            raise PermissionDenied(f"{method}: {why}; use a token that may ({fix})")
    return caller


def _admit_peer(method: str, allowed: frozenset[PeerRole], credentials: Credentials) -> Caller:
    peer = credentials.peer
    roles = net.describe_roles(allowed)
    if peer is None:
        raise Unauthenticated(
            f"{method} is for {roles} of the cluster: call it with the certificate they get at "
            "join, on the control plane's cluster port (--listen port + 2)"
        )
    if peer.role not in allowed:
        raise PermissionDenied(f"{method} is for {roles}, not {peer.common_name}")
    return Caller(peer.common_name, peer=peer, address=credentials.address)


def credentials_of(context: grpc.aio.ServicerContext[Any, Any]) -> Credentials:
    """The credentials of the call `context` belongs to. The peer's certificate was verified
    against the cluster CA by the TLS handshake (the cluster port requires one). Read once, as
    the call starts: context.peer() on a call that has ended (a cancelled stream) crashes gRPC."""
    authorization = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            authorization = value if isinstance(value, str) else value.decode(errors="replace")
    peer = None
    pem = context.auth_context().get("x509_pem_cert") or []
    if pem:
        try:
            peer = pki.peer_of(pem[0])
        except PortsideError:
            peer = None
    return Credentials(authorization, peer, context.peer() or "")


@dataclass
class Gate:
    """Admits calls by `RULES` against the live `tokens` (the view's), and audits them. With
    `enforce` False (--insecure) nothing is checked, and calls are still audited."""

    tokens: Mapping[str, TokenRecord]
    audit: Audit = field(default_factory=Audit)
    enforce: bool = True
    clock: Callable[[], float] = time.time

    async def enter(
        self,
        method: str,
        rule: Rule,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[Caller, Target]:
        """The caller and what the call names; a refused call is logged, audited and aborted."""
        target = rule.target(request)
        credentials = credentials_of(context)
        if not self.enforce:
            anonymous = Caller(
                "anonymous (--insecure)", credentials.peer, None, credentials.address
            )
            return anonymous, target
        try:
            caller = admit(method, rule, credentials, self.tokens, target, self.clock())
        except (Unauthenticated, PermissionDenied) as exc:
            who = _claimed(credentials, self.tokens)
            log.warning("refused %s from %s (%s): %s", method, credentials.address, who, exc)
            if rule.audited:
                result = error_kind(exc).grpc_code.name
                self.audit.record(method, who, credentials.address, target, result)
            await abort_with(context, exc)
            raise  # unreachable: abort raises
        return caller, target

    def revoked(self, caller: Caller) -> str:
        """Why the token `caller` was admitted with is no longer good ("" if it is)."""
        if caller.token is None or not self.enforce:
            return ""
        current = self.tokens.get(caller.token.id)
        if current is None:
            return f"token {caller.token.name} was revoked"
        if current.expired(self.clock()):
            return f"token {caller.token.name} expired"
        return ""

    @contextlib.asynccontextmanager
    async def revocation(self, caller: Caller) -> AsyncIterator[list[str]]:
        """While the block runs, check every REVOKED_STREAM_CHECK_S that the caller's token is
        still good; once it is not, put the reason in the yielded list and cancel the task
        running the block (the call's own task: the stream is never driven from another)."""
        reasons: list[str] = []
        if caller.token is None or not self.enforce:
            yield reasons
            return
        call_task = asyncio.current_task()
        assert call_task is not None

        async def watch() -> None:
            while not reasons:
                await asyncio.sleep(REVOKED_STREAM_CHECK_S)
                why = self.revoked(caller)
                if why:
                    reasons.append(why)
                    call_task.cancel()

        watchdog = asyncio.create_task(watch(), name="token revocation watch")
        try:
            yield reasons
        finally:
            watchdog.cancel()

    @contextlib.contextmanager
    def outcome(
        self,
        method: str,
        rule: Rule,
        caller: Caller,
        target: Target,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Iterator[Progress]:
        """Audit the call's result (OK, or its status code's name) once it ends."""
        result = "UNKNOWN"
        progress = Progress()
        try:
            yield progress
            result = "OK"
        except grpc.aio.AbortError:
            code = context.code()
            result = code.name if code is not None else "UNKNOWN"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            result = "OK" if progress.finished else "CANCELLED"
            raise
        finally:
            if rule.audited:
                self.audit.record(method, caller.who, caller.address, target, result)


@dataclass
class Progress:
    """How far a call went: `finished` once its final reply was sent."""

    finished: bool = False


def _claimed(credentials: Credentials, tokens: Mapping[str, TokenRecord]) -> str:
    """Who a refused caller says it is, for the log: a token's name or id (never its secret),
    a certificate's owner, or no credential."""
    if credentials.peer is not None:
        return credentials.peer.common_name
    if credentials.authorization:
        _, _, credential = credentials.authorization.strip().partition(" ")
        token_id = safe_reference(credential.partition(".")[0])
        known = tokens.get(token_id)
        return f"token {known.name}" if known is not None else f"token id {token_id}"
    return "no credential"


def guard(servicer: Any, service: ServiceDescriptor, gate: Gate) -> Any:
    """`servicer` with every method of `service` admitted by `gate` first (register the result
    in its place). A method without a row in RULES is an error here, before anything serves."""
    missing = [m.name for m in service.methods if m.name not in RULES]
    if missing:
        raise AssertionError(f"no access rule for {', '.join(missing)} in controlplane.access")
    return SimpleNamespace(
        **{
            m.name: _guarded(
                gate,
                m.name,
                RULES[m.name],
                getattr(servicer, m.name),
                m.client_streaming,
                m.server_streaming,
            )
            for m in service.methods
        }
    )


def _guarded(
    gate: Gate,
    method: str,
    rule: Rule,
    behaviour: Callable[..., Any],
    client_streaming: bool,
    server_streaming: bool,
) -> Callable[..., Any]:
    """`behaviour` behind `gate`: its request (or a request stream's first message, for a rule
    that needs it) is what the rule's target reads."""

    async def probe(request: Any) -> tuple[Any, Any]:
        if not client_streaming:
            return request, request
        if not rule.first_message:
            return None, request
        first = await anext(aiter(request), None)
        return first, _chain(first, request)

    if not server_streaming:

        async def one_reply(request: Any, context: Any) -> Any:
            probed, request = await probe(request)
            caller, target = await gate.enter(method, rule, probed, context)
            with gate.outcome(method, rule, caller, target, context):
                return await behaviour(request, context)

        return one_reply

    async def replies(request: Any, context: Any) -> AsyncIterator[Any]:
        probed, request = await probe(request)
        caller, target = await gate.enter(method, rule, probed, context)
        with gate.outcome(method, rule, caller, target, context) as progress:
            async with gate.revocation(caller) as revoked:
                try:
                    async with contextlib.aclosing(behaviour(request, context)) as stream:
                        async for reply in stream:
                            progress.finished = rule.final is not None and rule.final(reply)
                            yield reply
                except asyncio.CancelledError:
                    if not revoked:
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    exc = Unauthenticated(f"{revoked[0]}: this stream ends")
                    log.warning("ended %s of %s: %s", method, caller.who, exc)
                    await abort_with(context, exc)

    return replies


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


def peer_of_call(context: grpc.aio.ServicerContext[Any, Any]) -> Peer | None:
    """The certificate owner of a call (None without one), for handlers that act on it."""
    return credentials_of(context).peer
