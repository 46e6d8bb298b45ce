"""How an agent or an edge becomes part of a cluster and stays in it: it makes its own key, has
the control plane sign a certificate for its role with its join token (which also pins the
cluster CA), and renews that certificate at two thirds of its lifetime over mutual TLS.

A renewed certificate goes into the part's `LiveIdentity`; its servers, sessions and channels
follow it (see portside.net), so that connections made from then on use it and the ones open
finish as they are. The private key never leaves the process: each certificate gets a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from portside import net, pki
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import (
    InvalidArgument,
    PermissionDenied,
    PortsideError,
    Unauthenticated,
    from_rpc,
)
from portside.rpc import Backoff
from portside.tokens import Token, find_token

log = logging.getLogger(__name__)

JOIN_TOKEN_VARIABLE = "PORTSIDE_JOIN_TOKEN"
#: When a certificate is renewed, as a fraction of its lifetime.
RENEW_AT = 2 / 3

T = TypeVar("T")


def join_token(path: str | None, flag: str = "--join-token-file") -> Token | None:
    """The join token of `flag` PATH, else of $PORTSIDE_JOIN_TOKEN (the token's text), else
    None (a cluster run with --insecure). InvalidArgument saying what is wrong, never echoing the
    token."""
    return find_token("join", path=path, flag=flag, variable=JOIN_TOKEN_VARIABLE)


@dataclass(frozen=True)
class Member:
    """What a node needs to take part: who it is, its token, and where the control plane is
    (its --listen addresses, where Join is called)."""

    controlplane: str
    token: Token
    role: pki.PeerRole
    id: str
    deadline_s: float = 5.0

    def controlplane_tls(self, identity: net.LiveIdentity | None = None) -> net.ClientTls:
        """How this member reaches the control plane: its CA, presenting `identity`."""
        return net.ClientTls(self.token.ca_pem, pki.PeerRole.CONTROLPLANE, identity=identity)

    @property
    def cluster_target(self) -> str:
        """Where a joined member makes every call but Join: the control planes' cluster port,
        which requires its certificate (`net.cluster_target`)."""
        return net.cluster_target(self.controlplane)

    @property
    def what(self) -> str:
        return f"{self.role} {self.id}"


async def join(member: Member) -> pki.Identity:
    """One attempt: a new key, and a certificate for it from the control plane, which admits
    the join token. Unauthenticated or PermissionDenied when it refuses the token; Unavailable
    (and its kin) when it cannot be reached."""
    key = pki.new_key()
    request = cp.JoinRequest(role=member.role, node_id=member.id, csr=pki.signing_request(key))
    async with net.grpc_channel(
        member.controlplane, tls=member.controlplane_tls(), bearer=member.token.bearer
    ) as channel:
        reply = await _call(
            cp_grpc.ControlPlaneStub(channel).Join(request, timeout=member.deadline_s),
            member.controlplane,
        )
    return _identity(key, reply, member)


async def join_until_admitted(
    member: Member, stop: asyncio.Event | None = None
) -> pki.Identity | None:
    """`join` again with backoff for as long as the control plane cannot be reached (a node may
    start before it); a refusal is raised at once, as SystemExit with one line saying so. None
    if `stop` is set meanwhile (the daemon was told to stop)."""
    stop = stop or asyncio.Event()
    backoff = Backoff(first=0.2, most=5.0)
    while not stop.is_set():
        try:
            identity = await join(member)
        except (Unauthenticated, PermissionDenied, InvalidArgument) as exc:
            raise SystemExit(
                f"portside {member.role}: the control plane at {member.controlplane} refused "
                f"to let {member.what} join: {exc}"
            ) from None
        except PortsideError as exc:
            log.warning("%s cannot join yet: %s; trying again", member.what, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff.next)
            backoff.next = min(backoff.most, backoff.next * 2)
            continue
        peer = identity.peer
        log.info(
            "%s joined: certificate valid for %.0fs", member.what, peer.not_after - time.time()
        )
        return identity
    return None


@dataclass(frozen=True)
class Membership:
    """How a node takes part in its cluster: joined (`member`, and its `identity`, renewed), or
    without a join token, plaintext (a cluster run with --insecure: every TLS part is None)."""

    controlplane: str
    member: Member | None = None
    identity: net.LiveIdentity | None = None
    joined_at: float = 0.0

    @property
    def target(self) -> str:
        """Where its calls to the control plane go (all but Join)."""
        return self.member.cluster_target if self.member is not None else self.controlplane

    def client_tls(self, server: pki.PeerRole) -> net.ClientTls | None:
        """Mutual TLS to a server of role `server`, following renewals."""
        if self.member is None:
            return None
        return net.ClientTls(self.member.token.ca_pem, server, identity=self.identity)

    def server_tls(self, *peers: pki.PeerRole) -> net.ServerTls | None:
        """A server of this node that admits only `peers`."""
        if self.identity is None:
            return None
        return net.ServerTls(self.identity, frozenset(peers))

    def renewal(self, channel: grpc.aio.Channel) -> CertificateRenewal | None:
        """What renews its certificate over `channel` (one made with `client_tls`)."""
        if self.member is None or self.identity is None:
            return None
        return CertificateRenewal(self.member, self.identity, channel, issued_at=self.joined_at)

    @property
    def security(self) -> str:
        """For the start's log line."""
        return "mutual TLS" if self.member is not None else "plaintext: an --insecure cluster"


async def take_part(
    controlplane: str,
    token: Token | None,
    role: pki.PeerRole,
    node_id: str,
    *,
    deadline_s: float,
    stop: asyncio.Event,
) -> Membership | None:
    """Join with `token`, retrying while the control plane cannot be reached; without one, check
    that the control plane speaks plaintext. Exits (SystemExit, one line) when it is refused
    either way; None if `stop` was set before it could join."""
    if token is None:
        await refuse_plaintext_to_tls(controlplane, str(role))
        return Membership(controlplane)
    member = Member(controlplane, token, role, node_id, deadline_s)
    joined = await join_until_admitted(member, stop)
    if joined is None:
        return None
    return Membership(controlplane, member, net.LiveIdentity(joined), time.time())


async def refuse_plaintext_to_tls(controlplane: str, daemon: str) -> None:
    """A node without a join token speaks plaintext, which only a control plane run with
    --insecure answers: if one that requires TLS is there, say so and exit (its plaintext
    failures alone would only say "unavailable", again and again)."""
    addresses = [a.strip() for a in controlplane.split(",") if a.strip()]
    answers = await asyncio.gather(*(net.speaks_tls(a, timeout_s=1.0) for a in addresses))
    if any(answers):
        raise SystemExit(
            f"portside {daemon}: the control plane at {controlplane} requires TLS: give "
            f"--join-token-file PATH (or ${JOIN_TOKEN_VARIABLE}) with the join token that "
            "`portside bootstrap` wrote"
        )


class CertificateRenewal:
    """Renews a joined part's certificate at two thirds of its lifetime: a new key, signed over
    mutual TLS with the certificate it replaces (RenewCertificate, on `channel`: one to the
    cluster port made with `identity`). A failed renewal is tried
    again with backoff; once the certificate has expired (the node was away), the join token is
    used again instead, as long as it is valid."""

    def __init__(
        self,
        member: Member,
        identity: net.LiveIdentity,
        channel: grpc.aio.Channel,
        *,
        issued_at: float | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.member = member
        self.identity = identity
        self.stub = cp_grpc.ControlPlaneStub(channel)
        self.now = now
        self.issued_at = now() if issued_at is None else issued_at
        self.renewed = 0  # how many times, for tests and logs

    def due_in(self) -> float:
        """Seconds until the current certificate is due for renewal."""
        lifetime = self.identity.peer.not_after - self.issued_at
        return max(0.0, self.issued_at + lifetime * RENEW_AT - self.now())

    async def run(self) -> None:
        """Renew for as long as the part runs (cancel to stop)."""
        backoff = Backoff(first=0.5, most=30.0)
        while True:
            await asyncio.sleep(self.due_in())
            try:
                identity = await self.renew_once()
            except PortsideError as exc:
                left = self.identity.peer.not_after - self.now()
                log.warning(
                    "%s could not renew its certificate (%s); %s; trying again",
                    self.member.what,
                    exc,
                    f"it expires in {left:.0f}s" if left > 0 else "it has expired",
                )
                await backoff.wait()
                continue
            backoff.reset()
            self.issued_at = self.now()
            self.identity.replace(identity)
            self.renewed += 1
            log.info(
                "%s renewed its certificate: valid for %.0fs",
                self.member.what,
                identity.peer.not_after - self.issued_at,
            )

    async def renew_once(self) -> pki.Identity:
        if self.identity.peer.not_after <= self.now():
            return await join(self.member)  # its certificate can no longer prove who it is
        key = pki.new_key()
        reply = await _call(
            self.stub.RenewCertificate(
                cp.RenewCertificateRequest(csr=pki.signing_request(key)),
                timeout=self.member.deadline_s,
            ),
            self.member.controlplane,
        )
        return _identity(key, reply, self.member)


def _identity(key_pem: bytes, reply: cp.JoinResponse, member: Member) -> pki.Identity:
    ca_pem = member.token.ca_pem
    if reply.ca_certificate and reply.ca_certificate.strip() != ca_pem.strip():
        # The token pins the CA: a control plane that signs with another is not this cluster's.
        raise InvalidArgument("the control plane's CA is not the one the join token names")
    identity = pki.Identity(key_pem, reply.certificate, ca_pem)
    peer = identity.peer  # InvalidArgument if it names no role
    if (peer.role, peer.id) != (member.role, member.id):
        raise InvalidArgument(
            f"the control plane signed a certificate for {peer.common_name}, not {member.what}"
        )
    return identity


async def _call(call: Awaitable[T], controlplane: str) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc, f"control plane {controlplane}") from exc


__all__ = [
    "JOIN_TOKEN_VARIABLE",
    "RENEW_AT",
    "CertificateRenewal",
    "Member",
    "Membership",
    "join",
    "join_token",
    "join_until_admitted",
    "refuse_plaintext_to_tls",
    "take_part",
]
