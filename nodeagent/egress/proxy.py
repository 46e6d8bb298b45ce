"""The egress proxy: every TCP connection a container on the egress network opens arrives here
(nat REDIRECT, nodeagent/egress/rules.py), and goes out, is refused, or is answered by a
gateway handler, as its instance's outbound policy decides (`CompiledPolicy.decide`).

Per connection: the original destination (SO_ORIGINAL_DST) and the container (its source
address, in `OutboundPolicies`); then its first bytes. An HTTP/1.x request is served by the
proxy core's HTTP server and every request on it is decided on its own, by its Host header:
allowed requests go on to the original destination (Host kept, nothing added), denied ones get
403 `outbound-denied`, intercepted ones go to the gateway's handler. A TLS ClientHello is
decided by its server name, anything else by the destination address alone: allowed, its bytes
are piped both ways; denied, the connection is reset at once.

Never reached, whatever the policy allows: the node's own addresses, loopback, link-local
(cloud metadata services), multicast, and Portside's networks (other containers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from multidict import CIMultiDict

from nodeagent import metrics
from nodeagent.egress.pipe import pipe
from nodeagent.egress.policies import Occupant, OutboundPolicies
from nodeagent.egress.sniff import MOST_PEEKED, Kind, Sniffed, sniff
from portside.errors import GatewayError, OutboundDenied, PortsideError, UpstreamFailed
from portside.gateway import relay
from portside.gateway.runtime import OUTBOUND, OutboundContext
from portside.gateway.types import Request, Response
from portside.net import Deadlines
from portside.outbound import Decision, Verdict, normal_host
from portside.proxy import (
    HOP_BY_HOP,
    ClientGone,
    Forward,
    HttpServer,
    HttpTransport,
    ProxyCore,
    answer_error,
    connection_tokens,
    offered_protocols,
)
from portside.proxy import Request as ClientRequest

log = logging.getLogger(__name__)

SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h
# How long a connection may stay silent before it is taken for one whose server speaks first
# (SMTP, MySQL...) and decided by its destination alone.
FIRST_BYTES_S: Final = 1.0
_MORE_BYTES_S: Final = 0.01  # between peeks while a ClientHello is still arriving
_STOPS_HERE: Final = HOP_BY_HOP | {"expect"}

IPv4Network = ipaddress.IPv4Network


class TlsInterception(Protocol):
    """intercept_https (H3b's hook; nodeagent/egress_tls.py implements it): a TLS server
    context for `host`, signed by the CA of `occupant`'s container, or None (not intercepted)."""

    async def context(self, occupant: Occupant, host: str) -> ssl.SSLContext | None: ...

    def forget(self, container_ids: set[str]) -> None: ...


class OutboundHandlers(Protocol):
    """The gateway's outbound handlers, as the node runs them (portside.gateway.runtime's
    GatewayRuntime is one): whether the module defines a handler, and calling it."""

    def has(self, name: str) -> bool: ...

    async def outbound(self, handler: str, request: Request, ctx: OutboundContext) -> Response: ...


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going before nat sent it here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def is_node_address(ip: ipaddress.IPv4Address) -> bool:
    """Whether `ip` is one of this host's own addresses (only those can be bound to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


class EgressProxy:
    """The proxy on one port of the egress bridge's gateway address. `handlers` may be set
    later (`handlers = ...`) and changed at any time; without them an intercepted request gets
    500 `gateway-error`. `closed_networks`: Portside's networks' subnets (never reached)."""

    def __init__(
        self,
        policies: OutboundPolicies,
        deadlines: Deadlines,
        *,
        handlers: OutboundHandlers | None = None,
        node_id: str = "",
        closed_networks: Iterable[IPv4Network] = (),
    ) -> None:
        self.policies = policies
        self.handlers = handlers
        self.interception: TlsInterception | None = None  # intercept_https (H3b's hook)
        self.closed_networks: Sequence[IPv4Network] = tuple(closed_networks)
        self._deadlines = deadlines
        self._node_id = node_id
        self._http = HttpServer(self._request, name="egress proxy")
        # Per container: its own upstream connections (never shared with another container).
        self._cores: dict[str, ProxyCore] = {}
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # forgotten containers' connections

    async def listen(self, host: str, port: int = 0) -> int:
        """Listen on host:port (0: any free port); the port listened on."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener), name="egress proxy")
        bound: int = listener.getsockname()[1]
        return bound

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("egress proxy: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._connection(sock, peer[0]))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def forget(self, container_ids: Iterable[str]) -> None:
        """Containers that left: their upstream connections close."""
        container_ids = set(container_ids)
        if self.interception is not None:
            self.interception.forget(container_ids)  # their CAs (H3b's hook)
        for container_id in container_ids:
            core = self._cores.pop(container_id, None)
            if core is not None:
                # Held until done: a task nobody references may be collected midway.
                task = asyncio.get_running_loop().create_task(core.transport.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def stop_listening(self) -> None:
        """No new connections (connections open go on)."""
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def close(self) -> None:
        self.stop_listening()
        for task in list(self._connections):
            task.cancel()
        await self._http.close()
        for core in self._cores.values():
            await core.transport.close()
        self._cores.clear()

    # -- one connection ---------------------------------------------------------------------

    async def _connection(self, sock: socket.socket, peer: str) -> None:
        handed_over = False
        try:
            occupant = self.policies.occupant(peer)
            if occupant is None:
                log.info("egress proxy: a connection from %s, which is no container of ours", peer)
                return
            host, port = original_destination(sock)
            sniffed = await _first_bytes(sock)
            if sniffed.kind is Kind.HTTP:
                await self._http.serve(sock)
                handed_over = True
                return
            ip = ipaddress.IPv4Address(host)
            if sniffed.kind is Kind.TLS and await self._terminate(sock, occupant, sniffed.host, ip):
                handed_over = True
                return
            decision = self._decide(occupant, sniffed.host, ip, http=False)
            if decision.verdict is not Verdict.ALLOW:
                log.info(
                    "egress: %s/%s to %s:%d refused: %s",
                    occupant.class_name,
                    occupant.name,
                    host,
                    port,
                    decision.reason,
                )
                _reset(sock)
                return
            handed_over = True
            try:
                await pipe(sock, host, port, self._deadlines.connect)
            except (OSError, TimeoutError) as exc:
                log.info("egress: %s:%d could not be reached: %s", host, port, exc)
                _reset(sock)
        except OSError as exc:
            log.info("egress proxy: a connection from %s failed: %s", peer, exc)
        finally:
            if not handed_over:
                sock.close()

    async def _terminate(
        self, sock: socket.socket, occupant: Occupant, host: str, ip: ipaddress.IPv4Address
    ) -> bool:
        """intercept_https (H3b's hook): TLS to a name that a handler answers is terminated
        here with the instance's CA, and its requests are served as HTTP ones (`_request`)."""
        interception = self.interception
        policy = self.policies.policy_of(occupant)
        if interception is None or not host or not policy.policy.intercept_https:
            return False
        name = normal_host(host)
        catch_all = self.handlers is not None and self.handlers.has(OUTBOUND)
        if policy.decide(name, ip, http=True, catch_all=catch_all).verdict is not Verdict.HANDLER:
            return False
        context = await interception.context(occupant, name)
        if context is None:
            return False
        await self._http.serve(sock, context)
        return True

    def _decide(
        self, occupant: Occupant, host: str, ip: ipaddress.IPv4Address, *, http: bool
    ) -> Decision:
        """The policy's decision, with what is never reached refused, counted."""
        catch_all = http and self.handlers is not None and self.handlers.has(OUTBOUND)
        policy = self.policies.policy_of(occupant)
        decision = policy.decide(normal_host(host), ip, http=http, catch_all=catch_all)
        if decision.verdict is Verdict.ALLOW and self._closed(ip):
            decision = Decision(
                Verdict.DENY, reason=f"{ip} is this node or on one of Portside's networks"
            )
        metrics.EGRESS_CONNECTIONS.labels(occupant.class_name, decision.verdict.value).inc()
        return decision

    def _closed(self, ip: ipaddress.IPv4Address) -> bool:
        return (
            ip.is_loopback
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_unspecified
            or any(ip in network for network in self.closed_networks)
            or is_node_address(ip)
        )

    # -- HTTP -------------------------------------------------------------------------------

    async def _request(self, request: ClientRequest) -> None:
        """One request on an HTTP connection (the next one on it is decided again)."""
        peer = request.peer or ""
        occupant = self.policies.occupant(peer)
        if occupant is None:  # the container went while its connection stayed
            answer_error(
                request, OutboundDenied(f"{peer} is no container of this node"), close=True
            )
            return
        host, port = original_destination(request.connection_info("socket"))
        ip = ipaddress.IPv4Address(host)
        decision = self._decide(occupant, request.headers.get("Host", ""), ip, http=True)
        if request.scheme == "https" and decision.verdict is Verdict.ALLOW:
            # intercept_https (H3b's hook): on TLS terminated here only handlers answer; this
            # request's plain text must not go on to where TLS was going.
            decision = Decision(
                Verdict.DENY, reason="on an intercepted HTTPS connection only handlers answer"
            )
        if decision.verdict is Verdict.DENY:
            answer_error(request, OutboundDenied(f"outbound request denied: {decision.reason}"))
        elif decision.verdict is Verdict.HANDLER:
            await self._handle(request, occupant, decision.handler)
        else:
            await self._forward(request, occupant, f"{host}:{port}")

    async def _forward(self, request: ClientRequest, occupant: Occupant, authority: str) -> None:
        """On to where the container was going, as it was sent (its Host too; no X-Forwarded
        headers: the outside sees the node, not the container)."""
        core = self._core(occupant)
        stops = _STOPS_HERE | connection_tokens(request.headers)
        forward = Forward(
            method=request.method,
            target=request.target,
            headers=CIMultiDict(
                [(k, v) for k, v in request.headers.items() if k.lower() not in stops]
            ),
            body=request.body,
            websocket=request.websocket,
            protocols=offered_protocols(request.headers) if request.websocket else (),
        )
        try:
            upstream = await core.open(authority, forward)
        except UpstreamFailed as exc:  # 502 upstream-refused and its kin, as a hop answers
            log.info("egress: %s could not be reached: %s", authority, exc)
            answer_error(request, exc)
            return
        await core.deliver(request, upstream, on_break=_broke(authority))

    async def _handle(self, request: ClientRequest, occupant: Occupant, handler: str) -> None:
        handlers = self.handlers
        ctx = OutboundContext(
            occupant.class_name, occupant.name, occupant.container_id, self._node_id
        )
        with relay.exchange():
            try:
                if handlers is None:
                    raise GatewayError("no gateway module is deployed to answer this request")
                response = await handlers.outbound(handler, relay.request_of(request), ctx)
                await relay.answer(
                    request, response, self._core(occupant), on_break=_broke(handler)
                )
            except PortsideError as exc:
                if request.status:
                    request.abort()
                else:
                    answer_error(request, exc)
            except ClientGone as exc:
                log.info("egress: %s %s: %s", occupant.container_id[:12], handler, exc)

    def _core(self, occupant: Occupant) -> ProxyCore:
        core = self._cores.get(occupant.container_id)
        if core is None:
            core = ProxyCore(HttpTransport(self._deadlines), name="egress proxy")
            self._cores[occupant.container_id] = core
        return core


def _broke(where: str) -> relay.OnBreak:
    def on_break(exc: UpstreamFailed) -> None:
        log.info("egress: a response from %s broke off: %s", where, exc)

    return on_break


async def _first_bytes(sock: socket.socket) -> Sniffed:
    """What the connection's first bytes are, without taking them from the socket; OTHER when
    it says nothing for FIRST_BYTES_S (or ends its side without a word)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIRST_BYTES_S
    if not await _readable(sock, FIRST_BYTES_S):
        return Sniffed(Kind.OTHER)
    while True:
        data = sock.recv(MOST_PEEKED, socket.MSG_PEEK)
        if not data:
            return Sniffed(Kind.OTHER)  # it ended its side at once: it may still read
        sniffed = sniff(data)
        if sniffed.kind is not Kind.MORE:
            return sniffed
        if loop.time() >= deadline:
            return Sniffed(Kind.OTHER)
        await asyncio.sleep(_MORE_BYTES_S)


async def _readable(sock: socket.socket, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await asyncio.wait_for(ready, timeout_s)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sock.fileno())
    return True


def _reset(sock: socket.socket) -> None:
    """Close with a reset, at once: the container learns now, not after a timeout."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


__all__ = [
    "FIRST_BYTES_S",
    "EgressProxy",
    "OutboundHandlers",
    "is_node_address",
    "original_destination",
]
