"""The one place that creates gRPC servers and channels, and HTTP servers and client sessions,
so that deadlines, keep-alive, message limits, TLS and tokens apply everywhere alike.

TLS: a client trusts the cluster CA and checks that its server presents the name of the role it
expects (`pki.SERVER_NAMES`: every control plane is `portside-controlplane`, every agent
`portside-agent`), whatever address it was reached at; a part of the cluster also presents its
own certificate (mutual TLS). A person or program sends an API token with every call instead.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

import aiohttp
import grpc
from aiohttp import web

from portside.errors import InvalidArgument
from portside.pki import SERVER_NAMES, Identity, PeerRole

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
    upstream_read: float = 300.0  # between bytes from an upstream response


def split_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """("127.0.0.1", 8787) from "127.0.0.1:8787"; a clear error for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:8787)")
    return host.strip("[]"), int(port)


def with_port_offset(address: str, offset: int) -> str:
    host, port = split_hostport(address)
    return f"{host}:{port + offset}"


def grpc_server() -> grpc.aio.Server:
    return grpc.aio.server(options=_GRPC_OPTIONS)


def add_grpc_port(server: grpc.aio.Server, address: str) -> int:
    split_hostport(address, "listen address")
    port = int(server.add_insecure_port(address))
    if port == 0:
        raise InvalidArgument(f"cannot listen on {address}: address in use or not local")
    return port


@dataclass(frozen=True)
class ClientTls:
    """How a client reaches a server of the cluster: the CA it trusts, the role the server must
    be, and (for a part of the cluster: mutual TLS) its own identity."""

    ca_pem: bytes
    server: PeerRole = PeerRole.CONTROLPLANE
    identity: Identity | None = None

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        if self.identity is None:
            return grpc.ssl_channel_credentials(self.ca_pem)
        return grpc.ssl_channel_credentials(
            self.ca_pem, self.identity.key_pem, self.identity.cert_pem
        )

    @property
    def server_name(self) -> str:
        return SERVER_NAMES[self.server]


def grpc_channel(
    target: str, *, tls: ClientTls | None = None, bearer: str | None = None
) -> grpc.aio.Channel:
    """A channel to one control plane, or to several replicas ("10.0.0.1:7070,10.0.0.2:7070"):
    gRPC then connects to the first that answers and moves on when it fails. With `tls`, over
    TLS to a server of that role; with `bearer` (an API token's "ID.SECRET"), sent with every
    call. Without `tls`: plaintext, for a cluster run with --insecure."""
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
    credentials = tls.grpc_credentials()
    if bearer is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(bearer)
        )
    options = [*_GRPC_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.aio.secure_channel(target, credentials, options=options)


def _is_ipv4(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return host.count(".") == 3


def http_client_session(deadlines: Deadlines, limit: int = 1000) -> aiohttp.ClientSession:
    """A pooled keep-alive session for proxying: no total timeout (bodies stream for as long as
    they flow), but bounded connect and between-bytes reads."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=0,
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
        keepalive_timeout=30,
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


async def start_http_server(app: web.Application, address: str) -> web.AppRunner:
    """Serve `app` on HOST:PORT; the handler is cancelled when its client goes away, so an
    aborted request frees what it holds (in-flight counts, upstream connections) at once."""
    host, port = split_hostport(address, "listen address")
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise InvalidArgument(f"cannot listen on {address}: {exc.strerror}") from exc
    return runner


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
