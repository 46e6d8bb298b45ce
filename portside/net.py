"""The one place that creates gRPC servers and channels, and HTTP servers and client sessions,
so that deadlines, keep-alive, message limits, TLS and tokens apply everywhere alike.

TLS: a client trusts the cluster CA and checks that its server presents the name of the role it
expects (`pki.SERVER_NAMES`: every control plane is `portside-controlplane`, every agent
`portside-agent`), whatever address it was reached at; a part of the cluster also presents its
own certificate (mutual TLS), and a server that admits only some roles (an agent's API: control
planes) refuses the others. A person or program sends an API token with every call instead.

A part's certificate is short-lived: it holds it in a `LiveIdentity`, and every server, session
and channel made from that follows its renewal — servers present the new certificate from their
next handshake on, sessions and channels use it for their next connections, and the connections
(and calls) already open finish as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import socket
import ssl
import tempfile
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
from aiohttp import web

from portside.errors import InvalidArgument
from portside.pki import SERVER_NAMES, Identity, Peer, PeerRole, parse_common_name, peer_of

log = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


@dataclass(frozen=True)
class Deadlines:
    """How long each kind of network call may take, in seconds."""

    rpc: float = 5.0  # a unary control-plane call
    resolve: float = 10.0  # resolve may place an instance: a few store round trips
    connect: float = 5.0  # TCP connect to an agent or a container
    # From the request's last byte sent to the response's head (as Cloudflare's 100 s origin
    # timeout): covers a cold boot; a request held longer by a silent node is answered 504.
    first_byte: float = 100.0
    upstream_read: float = 300.0  # between bytes from an upstream response, once it has begun


def split_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """("127.0.0.1", 8787) from "127.0.0.1:8787"; a clear error for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:8787)")
    return host.strip("[]"), int(port)


def with_port_offset(address: str, offset: int) -> str:
    host, port = split_hostport(address)
    return f"{host}:{port + offset}"


#: A control plane serves the parts of the cluster on its --listen port + this, where a client
#: certificate is required: gRPC's Python server cannot ask for one without requiring it, and
#: people and programs, who call --listen with a token, have none. A node calls Join on --listen
#: (it has no certificate yet), and everything else on the cluster port.
CLUSTER_PORT_OFFSET = 2


def cluster_target(target: str) -> str:
    """The cluster port of every control plane in `target`: "A:7070,B:7070" → "A:7072,B:7072"."""
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    return ",".join(with_port_offset(a, CLUSTER_PORT_OFFSET) for a in addresses)


# --- identity -------------------------------------------------------------------------------


class LiveIdentity:
    """A part's identity as it is now: replaced whole when its certificate is renewed. What is
    made from it (`ServerTls`, `ClientTls` with it) follows: SSL contexts are reloaded in place
    and channels are replaced, so that renewal happens in one place."""

    def __init__(self, identity: Identity) -> None:
        self._state = (0, identity, identity.peer)
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._listeners: list[Callable[[Identity], None]] = []

    @property
    def current(self) -> Identity:
        return self._state[1]

    @property
    def peer(self) -> Peer:
        """Who this part is, and until when its certificate is valid."""
        return self._state[2]

    @property
    def version(self) -> int:
        """Grows by one with every renewal."""
        return self._state[0]

    def snapshot(self) -> tuple[int, Identity]:
        """(version, identity), read together (gRPC's certificate fetcher runs on its threads)."""
        version, identity, _ = self._state
        return version, identity

    def replace(self, identity: Identity) -> None:
        """Use `identity` from now on: for new handshakes and new connections."""
        if identity.ca_pem != self.current.ca_pem:
            raise InvalidArgument("a renewed certificate must come from the same cluster CA")
        peer = identity.peer
        self._state = (self._state[0] + 1, identity, peer)
        for context in list(self._contexts):
            load_identity(context, identity)
        for listener in list(self._listeners):
            listener(identity)

    def follow(self, context: ssl.SSLContext) -> ssl.SSLContext:
        """Load the identity into `context` now and again on every renewal (in place: the
        connections it made keep theirs)."""
        load_identity(context, self.current)
        self._contexts.add(context)
        return context

    def on_change(self, listener: Callable[[Identity], None]) -> Callable[[], None]:
        """Call `listener` with each new identity; returns what stops that."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None


def load_identity(context: ssl.SSLContext, identity: Identity) -> None:
    """Load a key and certificate into an SSL context. Python's ssl reads keys only from files:
    they exist for the moment of loading, in a directory only this user may enter."""
    with tempfile.TemporaryDirectory(prefix="portside-tls-") as tmp:  # mode 0700
        key, cert = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.key_pem)
        cert.write_bytes(identity.cert_pem)
        context.load_cert_chain(cert, key)


def _as_identity(identity: Identity | LiveIdentity) -> Identity:
    return identity.current if isinstance(identity, LiveIdentity) else identity


@dataclass(frozen=True)
class ServerTls:
    """How a server of the cluster proves who it is (its certificate, renewed in place), and whom
    it lets in: with `peers`, only callers presenting a certificate of the cluster CA that names
    one of those roles (mutual TLS; others fail the handshake or are refused with the reason);
    without, any client (which proves itself with a token instead)."""

    identity: LiveIdentity
    peers: frozenset[PeerRole] | None = None

    @property
    def mutual(self) -> bool:
        return self.peers is not None


def describe_roles(roles: Collection[PeerRole]) -> str:
    """ "control planes", "edges and control planes": who a server admits, for its refusals."""
    names = {PeerRole.CONTROLPLANE: "control planes", PeerRole.AGENT: "agents"}
    words = [names.get(r, f"{r}s") for r in sorted(roles, key=str, reverse=True)]
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def refusal(peer: Peer | None, allowed: Collection[PeerRole], what: str) -> str:
    """ "" if `peer` may use `what`; otherwise why not, in one line."""
    if peer is None:
        return f"{what} admits only {describe_roles(allowed)}: no client certificate"
    if peer.role not in allowed:
        return f"{what} admits only {describe_roles(allowed)}, not {peer.common_name}"
    return ""


# --- gRPC servers -------------------------------------------------------------------------


def grpc_server(tls: ServerTls | None = None, what: str = "this server") -> grpc.aio.Server:
    """A gRPC server. With `tls` that names `peers`, every call is checked: a caller whose
    certificate names another role is refused with PERMISSION_DENIED and the reason (`what`
    names the server in it). Give the same `tls` to `add_grpc_port`."""
    interceptors = [_PeerRoles(tls.peers, what)] if tls is not None and tls.peers else []
    return grpc.aio.server(options=_GRPC_OPTIONS, interceptors=interceptors)


def add_grpc_port(server: grpc.aio.Server, address: str, tls: ServerTls | None = None) -> int:
    """Listen on HOST:PORT: TLS with `tls` (its certificate follows renewals: each new
    connection gets the current one), plaintext without (a cluster run with --insecure)."""
    split_hostport(address, "listen address")
    if tls is None:
        port = int(server.add_insecure_port(address))
    else:
        port = int(server.add_secure_port(address, grpc_server_credentials(tls)))
    if port == 0:
        raise InvalidArgument(f"cannot listen on {address}: address in use or not local")
    return port


def grpc_server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    live = tls.identity
    served = live.version

    def configuration(identity: Identity) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(identity.key_pem, identity.cert_pem)], identity.ca_pem if tls.mutual else None
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # gRPC asks before every handshake; None keeps what it has.
        nonlocal served
        version, identity = live.snapshot()
        if version == served:
            return None
        served = version
        return configuration(identity)

    return grpc.dynamic_ssl_server_credentials(
        configuration(live.current), fetch, require_client_authentication=tls.mutual
    )


def grpc_peer(context: grpc.aio.ServicerContext[Any, Any]) -> Peer | None:
    """Who called, by the certificate it presented (mutual TLS); None without one."""
    names = context.auth_context().get("x509_common_name") or []
    if not names:
        return None
    return parse_common_name(names[0].decode(errors="replace"))


class _PeerRoles(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits only callers whose certificate names one of `allowed`."""

    def __init__(self, allowed: Collection[PeerRole], what: str) -> None:
        self.allowed = frozenset(allowed)
        self.what = what

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _guarded(handler, self._check)

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = grpc_peer(context)
        reason = refusal(peer, self.allowed, self.what)
        if reason:
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if peer is None
                else grpc.StatusCode.PERMISSION_DENIED
            )
            await context.abort(code, reason)


_Check = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def _guarded(handler: grpc.RpcMethodHandler, check: _Check) -> grpc.RpcMethodHandler:
    """`handler` with `check(context)` before its behaviour (which it may end by aborting)."""
    h: Any = handler
    if h.unary_unary is not None:
        kind, inner = "unary_unary", h.unary_unary
    elif h.unary_stream is not None:
        kind, inner = "unary_stream", h.unary_stream
    elif h.stream_unary is not None:
        kind, inner = "stream_unary", h.stream_unary
    else:
        kind, inner = "stream_stream", h.stream_stream
    behaviour: Callable[..., Any]
    if inspect.isasyncgenfunction(inner):

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            await check(context)
            async for reply in inner(request, context):
                yield reply

        behaviour = streaming
    else:

        async def unary(request: Any, context: Any) -> Any:
            await check(context)
            return await inner(request, context)

        behaviour = unary
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return cast(
        grpc.RpcMethodHandler,
        make(
            behaviour,
            request_deserializer=h.request_deserializer,
            response_serializer=h.response_serializer,
        ),
    )


# --- gRPC channels ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """How a client reaches a server of the cluster: the CA it trusts, the role the server must
    be, and (for a part of the cluster: mutual TLS) its own identity — a `LiveIdentity` for one
    that is renewed, which the channels and sessions made with this then follow."""

    ca_pem: bytes
    server: PeerRole = PeerRole.CONTROLPLANE
    identity: Identity | LiveIdentity | None = field(default=None, compare=False)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        if self.identity is None:
            return grpc.ssl_channel_credentials(self.ca_pem)
        identity = _as_identity(self.identity)
        return grpc.ssl_channel_credentials(self.ca_pem, identity.key_pem, identity.cert_pem)

    @property
    def server_name(self) -> str:
        return SERVER_NAMES[self.server]

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context for HTTP clients: trusts the cluster CA only, checks the server's
        role by its name, and presents this part's certificate (following its renewals)."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if isinstance(self.identity, LiveIdentity):
            self.identity.follow(context)
        elif self.identity is not None:
            load_identity(context, self.identity)
        return context


def grpc_channel(
    target: str, *, tls: ClientTls | None = None, bearer: str | None = None
) -> grpc.aio.Channel:
    """A channel to one control plane, or to several replicas ("10.0.0.1:7070,10.0.0.2:7070"):
    gRPC then connects to the first that answers and moves on when it fails. With `tls`, over
    TLS to a server of that role (presenting `tls.identity`, whose renewals the channel follows:
    new calls go over a new channel, calls in flight finish on the old one); with `bearer` (a
    token's "ID.SECRET"), sent with every call. Without `tls`: plaintext, for a cluster run
    with --insecure."""
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    for address in addresses:
        split_hostport(address, "control plane address")
    if len(addresses) > 1:
        hosts = [split_hostport(a)[0] for a in addresses]
        if not all(_is_ipv4(h) for h in hosts):
            raise InvalidArgument(
                f"control plane addresses {target!r}: several replicas must be given as "
                "IPv4 addresses (or put them behind one name)"
            )
        target = "ipv4:" + ",".join(addresses)
    if tls is None:
        if bearer is not None:
            raise InvalidArgument("a token is only ever sent over TLS")
        return grpc.aio.insecure_channel(target, options=_GRPC_OPTIONS)

    def make() -> grpc.aio.Channel:
        credentials = tls.grpc_credentials()
        if bearer is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(bearer)
            )
        options = [*_GRPC_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
        return grpc.aio.secure_channel(target, credentials, options=options)

    if isinstance(tls.identity, LiveIdentity):
        return _RenewingChannel(make, tls.identity)
    return make()


class _RenewingChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A channel whose certificate is renewed: stubs made on it send each call over the channel
    made with the current certificate. A replaced channel is closed once the calls made on it
    are done, never before: closing a gRPC channel ends its streams with CancelledError, which
    would silently end the task that follows them (a heartbeat, a watch). A stream stays on
    its connection; when that breaks, its follower opens it again on the current channel."""

    def __init__(self, make: Callable[[], grpc.aio.Channel], identity: LiveIdentity) -> None:
        self._make = make
        self._channel = make()
        self._in_flight: dict[grpc.aio.Channel, int] = {}  # calls not done, by channel
        self._retired: set[grpc.aio.Channel] = set()  # replaced, with calls in flight
        self._closing: set[asyncio.Task[None]] = set()
        self._stop_following = identity.on_change(self._renewed)

    @property
    def current(self) -> grpc.aio.Channel:
        return self._channel

    def track(self, channel: grpc.aio.Channel, call: Any) -> Any:
        """Count `call` as in flight on `channel` until it is done."""
        self._in_flight[channel] = self._in_flight.get(channel, 0) + 1
        call.add_done_callback(lambda _call: self._done(channel))
        return call

    def _done(self, channel: grpc.aio.Channel) -> None:
        left = self._in_flight.get(channel, 1) - 1
        if left > 0:
            self._in_flight[channel] = left
            return
        self._in_flight.pop(channel, None)
        if channel in self._retired:
            self._retired.discard(channel)
            self._close_later(channel)

    def _renewed(self, _identity: Identity) -> None:
        old, self._channel = self._channel, self._make()
        if old in self._in_flight:
            self._retired.add(old)  # closed by the last of its calls (see _done)
        else:
            self._close_later(old)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, lambda c: c.unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, lambda c: c.unary_stream(method, *args, **kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, lambda c: c.stream_unary(method, *args, **kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, lambda c: c.stream_stream(method, *args, **kwargs))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        self._stop_following()
        retired, self._retired = self._retired, set()
        await asyncio.gather(*self._closing, *(c.close(grace) for c in retired))
        await self._channel.close(grace)

    async def __aenter__(self) -> _RenewingChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _FollowingCall:
    """A stub's method on a renewing channel: made again on the current channel after each
    renewal (one identity check per call otherwise)."""

    __slots__ = ("_channel", "_made", "_make", "_owner")

    def __init__(self, owner: _RenewingChannel, make: Callable[[grpc.aio.Channel], Any]) -> None:
        self._owner = owner
        self._make = make
        self._channel: grpc.aio.Channel | None = None
        self._made: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current
        if channel is not self._channel:
            self._made = self._make(channel)
            self._channel = channel
        return self._owner.track(channel, self._made(*args, **kwargs))


def _is_ipv4(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return host.count(".") == 3


# --- HTTP -----------------------------------------------------------------------------------


def http_client_session(
    deadlines: Deadlines, limit: int = 1000, tls: ClientTls | None = None
) -> aiohttp.ClientSession:
    """A pooled keep-alive session for proxying: no total timeout (bodies stream for as long as
    they flow), but bounded connect and between-bytes reads. With `tls`, its connections are
    TLS to servers of `tls.server` (send each request with `server_hostname=tls.server_name`
    to an https:// URL), presenting `tls.identity` (the current one, for new connections)."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=0,
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
        keepalive_timeout=30,
        ssl=tls.ssl_context() if tls is not None else True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=deadlines.connect, sock_read=deadlines.upstream_read
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    )


def server_ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """An SSL context for an HTTP server of the cluster: its certificate follows renewals; with
    `tls.peers`, a client must present a certificate of the cluster CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.mutual:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=tls.identity.current.ca_pem.decode())
    return tls.identity.follow(context)


def public_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """An SSL context for a public HTTPS listener, from the operator's certificate chain and
    key files (PEM); a clear error naming the file that cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"--tls-cert/--tls-key: {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise InvalidArgument(
            f"--tls-cert {cert_file} / --tls-key {key_file}: not a PEM certificate chain and "
            f"its key ({exc})"
        ) from None
    return context


def request_peer(request: web.Request) -> Peer | None:
    """Who sent `request`, by the certificate its connection presented; None without one."""
    transport = request.transport
    return connection_peer(transport.get_extra_info("ssl_object") if transport else None)


def connection_peer(ssl_object: ssl.SSLObject | None) -> Peer | None:
    """Who is at the other end of a TLS connection, by its certificate; None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return peer_of(ssl.DER_cert_to_PEM_cert(der).encode())
    except InvalidArgument:
        return None


def peer_admission(
    allowed: Collection[PeerRole], what: str
) -> Callable[[ssl.SSLObject | None], str]:
    """For a server that admits only clients whose certificate names one of `allowed`: why a
    connection may not be served ("" if it may), decided once per connection."""

    def admit(ssl_object: ssl.SSLObject | None) -> str:
        return refusal(connection_peer(ssl_object), allowed, what)

    return admit


def _admit_peers(allowed: Collection[PeerRole], what: str) -> Any:
    """A middleware that serves only clients whose certificate names one of `allowed`; the
    verdict is kept per connection (it presented its certificate once)."""
    verdicts: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()

    @web.middleware
    async def admit(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        transport = request.transport
        key = transport.get_extra_info("ssl_object") if transport is not None else None
        reason = verdicts.get(key) if key is not None else None
        if reason is None:
            reason = refusal(request_peer(request), allowed, what)
            if key is not None:
                verdicts[key] = reason
        if reason:
            return web.Response(status=403, text=reason + "\n")
        return await handler(request)

    return admit


async def start_http_server(
    app: web.Application,
    address: str,
    tls: ServerTls | ssl.SSLContext | None = None,
    what: str = "this server",
) -> web.AppRunner:
    """Serve `app` on HOST:PORT; the handler is cancelled when its client goes away, so an
    aborted request frees what it holds (in-flight counts, upstream connections) at once.
    With `tls`: HTTPS (a `ServerTls` with `peers` admits only those roles' certificates; a
    client without one fails the handshake); an `ssl.SSLContext` is served as it is."""
    host, port = split_hostport(address, "listen address")
    context: ssl.SSLContext | None = None
    if isinstance(tls, ServerTls):
        context = server_ssl_context(tls)
        if tls.peers:
            app.middlewares.insert(0, _admit_peers(tls.peers, what))
    elif tls is not None:
        context = tls
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise InvalidArgument(f"cannot listen on {address}: {exc.strerror}") from exc
    return runner


async def speaks_tls(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at HOST:PORT answers a TLS handshake (a plaintext client's failures
    say little: this is how a node without a token tells "the control plane requires TLS")."""
    host, port = split_hostport(address)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on `host`, for tests and benchmarks that start servers.

    Chosen below the kernel's ephemeral range (where outgoing connections take their source
    ports), so that a connection made between this call and the server's bind cannot take it.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low - 1)  # port + 1 stays below too
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded host: take what the kernel gives
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
