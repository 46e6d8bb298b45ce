"""`portside edge`: the ingress proxy wired to the control plane — resolves over gRPC, follows
the deployed config over a watch stream, serves /metrics on its own port.

With a join token it first joins the cluster (a certificate of role edge) and from then on
calls the control plane and the agents over mutual TLS; its public listener stays plain HTTP
unless given a certificate of its own (--tls-cert, --tls-key)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import grpc

from edge import metrics
from edge.gateway import EdgeRouter, GatewayIngress
from edge.proxy import EdgeProxy, Target
from edge.ratelimits import EdgeRateLimits
from portside import daemon, net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.cluster import first_config, follow_config
from portside.convert import pool_member_from_pb, route_update_from_pb
from portside.errors import Unavailable, from_rpc
from portside.gateway import ControlPlaneLifecycle, GatewayRuntime
from portside.instances import PoolMember
from portside.join import take_part
from portside.pki import PeerRole
from portside.proxy import HttpTransport
from portside.rpc import follow_stream
from portside.secretwatch import follow_secrets
from portside.spec import Config
from portside.tokens import Token

log = logging.getLogger("portside.edge")


@dataclass(frozen=True)
class EdgeOptions:
    controlplane: str
    listen: str
    metrics_listen: str
    region: str
    deadlines: net.Deadlines = net.Deadlines()
    join_token: Token | None = None  # None: a cluster run with --insecure (plaintext)
    tls_cert: str = ""  # the public listener's certificate chain and key (PEM): HTTPS
    tls_key: str = ""
    worker: int | None = None  # which of `portside edge --workers N` (None: the only one)


def edge_id(opts: EdgeOptions) -> str:
    """This edge's name in demand reports and its certificate (each worker has its own)."""
    ident = f"{socket.gethostname()}-{opts.listen}"
    return ident if opts.worker is None else f"{ident}-w{opts.worker}"


# On SIGTERM: how long requests in flight may take to finish before they are cut (the agent's
# --drain-grace default too); open WebSockets hear 1001 going away at once.
DRAIN_GRACE_S = 10.0

# The route watch brings a message at least every 5 s (its progress beat); silence this long
# means the control plane is out of reach, though the connection may not have failed yet.
SILENT_FOR_S = 12.0


class Heard:
    """When the control plane last spoke on the route watch (monotonic); 0: not yet."""

    def __init__(self) -> None:
        self.at = 0.0

    def now(self) -> None:
        self.at = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.at if self.at else 0.0


class GrpcResolver:
    """Resolves through the control plane; failures become Portside errors with its reason.
    While the route watch has been silent past SILENT_FOR_S (a cut-off control plane whose
    connection has not failed yet), a resolve fails at once instead of waiting its deadline."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        controlplane: str,
        deadline_s: float,
        heard: Heard | None = None,
    ) -> None:
        self.stub = cp_grpc.ControlPlaneStub(channel)
        self.controlplane = controlplane
        self.deadline_s = deadline_s
        self.heard = heard

    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target:
        silent = self.heard.silent_for() if self.heard is not None else 0.0
        if silent > SILENT_FOR_S:
            raise Unavailable(
                f"control plane {self.controlplane} is unreachable (no word from it for"
                f" {silent:.0f}s): cannot resolve {class_name}/{instance_name or '(pool)'} now"
            )
        try:
            reply = await self.stub.Resolve(
                cp.ResolveRequest(
                    class_name=class_name, instance_name=instance_name, location_hint=hint
                ),
                timeout=self.deadline_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, f"control plane {self.controlplane}") from exc
        return Target(
            node_id=reply.node_id,
            data_address=reply.data_address,
            instance_name=reply.instance_name,
        )


async def follow_pools(channel: grpc.aio.Channel, proxy: EdgeProxy) -> None:
    """Keep the proxy's pool members current; the last list stays while the stream is down."""
    stub = cp_grpc.ControlPlaneStub(channel)
    async for message in follow_stream(
        lambda: stub.WatchPools(cp.WatchPoolsRequest()), what="pool watch"
    ):
        pools: dict[str, list[PoolMember]] = {}
        for m in message.members:
            pools.setdefault(m.class_name, []).append(pool_member_from_pb(m))
        proxy.set_pool_members(pools)


async def follow_routes(
    channel: grpc.aio.Channel, proxy: EdgeProxy, heard: Heard | None = None
) -> None:
    """Drop cached routes as nodes are lost and instances move or go (WatchRoutes), resuming
    from the last revision seen after every break. While the control plane is unreachable the
    cache stays as it is, and warm routes serve."""
    stub = cp_grpc.ControlPlaneStub(channel)
    revision = 0

    def open_stream() -> grpc.aio.UnaryStreamCall[cp.WatchRoutesRequest, cp.WatchRoutesResponse]:
        return stub.WatchRoutes(cp.WatchRoutesRequest(since_revision=revision))

    async for message in follow_stream(open_stream, what="route watch"):
        if heard is not None:
            heard.now()
        update = route_update_from_pb(message)
        if message.node_ttl_seconds > 0:
            proxy.node_lease_s = message.node_ttl_seconds
        proxy.apply_route_update(update)
        revision = update.revision


async def report_demand(
    channel: grpc.aio.Channel,
    proxy: EdgeProxy,
    edge_id: str,
    region: str,
    metrics_address: str = "",
) -> None:
    """Tell the control plane how many requests per second each class gets here, so that new
    pool instances are placed near them; the report also says where this edge's /metrics is,
    for Prometheus discovery."""
    stub = cp_grpc.ControlPlaneStub(channel)
    every = 2.0
    while True:
        await asyncio.sleep(every)
        counts, proxy.demand = proxy.demand, {}
        try:
            reply = await stub.ReportDemand(
                cp.ReportDemandRequest(
                    edge_id=edge_id,
                    region=region,
                    requests_per_second={c: n / every for c, n in counts.items()},
                    metrics_address=metrics_address,
                ),
                timeout=net.Deadlines().rpc,
            )
            every = reply.report_every_seconds or every
        except grpc.aio.AioRpcError as exc:
            log.warning("demand report failed (%s)", exc.code().name)


async def run(opts: EdgeOptions, stop: asyncio.Event | None = None) -> None:
    stop = stop or daemon.stop_on_signals()
    public = net.public_ssl_context(opts.tls_cert, opts.tls_key) if opts.tls_cert else None
    ident = edge_id(opts)
    membership = await take_part(
        opts.controlplane,
        opts.join_token,
        PeerRole.EDGE,
        ident,
        deadline_s=opts.deadlines.rpc,
        stop=stop,
    )
    if membership is None:
        return  # told to stop before it could join
    to_controlplane = membership.client_tls(PeerRole.CONTROLPLANE)
    to_agents = membership.client_tls(PeerRole.AGENT)
    heard = Heard()
    async with net.grpc_channel(membership.target, tls=to_controlplane) as channel:
        proxy = EdgeProxy(
            opts.region,
            GrpcResolver(channel, opts.controlplane, opts.deadlines.resolve, heard),
            opts.deadlines,
            transport=HttpTransport(opts.deadlines, tls=to_agents),
        )
        limits = EdgeRateLimits(ident)
        secrets: dict[str, str] = {}  # the cluster's secrets, kept current from WatchSecrets
        gateway = GatewayRuntime(
            EdgeRouter(proxy),
            ControlPlaneLifecycle(channel, opts.controlplane),
            limits,
            secrets,
            errors=metrics.GATEWAY_ERRORS,
        )
        proxy.gateway = GatewayIngress(proxy, gateway).serve

        def apply_config(config: Config) -> None:
            proxy.set_config(config)
            limits.set_limits(config.gateway.rate_limits if config.gateway is not None else ())
            gateway.load(config)  # a new module serves new requests; those in flight finish

        scrape = await net.start_http_server(daemon.metrics_app(), opts.metrics_listen)
        serving = False
        try:
            async with asyncio.TaskGroup() as tasks:
                background = []
                renewal = membership.renewal(channel)
                if renewal is not None:
                    background.append(tasks.create_task(renewal.run()))
                # Rate limits and secrets keep their last state while the control plane is away.
                background.append(tasks.create_task(limits.run(channel, opts.deadlines.rpc)))
                background.append(tasks.create_task(follow_secrets(channel, secrets)))
                got_config = asyncio.Event()
                watch = tasks.create_task(follow_config(channel, apply_config, got_config))
                pools = tasks.create_task(follow_pools(channel, proxy))
                routes = tasks.create_task(follow_routes(channel, proxy, heard))
                demand = tasks.create_task(
                    report_demand(channel, proxy, ident, opts.region, opts.metrics_listen)
                )
                await first_config(got_config, opts.deadlines.rpc, opts.controlplane, "routes")
                await proxy.listen(opts.listen, public)
                serving = True
                log.info(
                    "edge %s serving %s %s (metrics %s), control plane %s (%s)",
                    opts.region,
                    "HTTPS" if public is not None else "HTTP",
                    opts.listen,
                    opts.metrics_listen,
                    opts.controlplane,
                    membership.security,
                )
                await stop.wait()
                for task in (*background, watch, pools, routes, demand):
                    task.cancel()
        finally:
            if serving:
                await proxy.shutdown(DRAIN_GRACE_S)
            await scrape.cleanup()
            log.info("edge stopped")
