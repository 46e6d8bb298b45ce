"""`portside edge`: the ingress proxy wired to the control plane — resolves over gRPC, follows
the deployed config over a watch stream, serves /metrics on its own port."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import grpc

from edge.proxy import EdgeProxy, Target
from portside import daemon, net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.cluster import first_config, follow_config
from portside.convert import pool_member_from_pb
from portside.errors import from_rpc
from portside.instances import PoolMember
from portside.rpc import follow_stream

log = logging.getLogger("portside.edge")


@dataclass(frozen=True)
class EdgeOptions:
    controlplane: str
    listen: str
    metrics_listen: str
    region: str
    deadlines: net.Deadlines = net.Deadlines()


class GrpcResolver:
    """Resolves through the control plane; failures become Portside errors with its reason."""

    def __init__(self, channel: grpc.aio.Channel, controlplane: str, deadline_s: float) -> None:
        self.stub = cp_grpc.ControlPlaneStub(channel)
        self.controlplane = controlplane
        self.deadline_s = deadline_s

    async def resolve(self, class_name: str, instance_name: str, hint: str) -> Target:
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
    async with net.grpc_channel(opts.controlplane) as channel:
        proxy = EdgeProxy(
            opts.region,
            GrpcResolver(channel, opts.controlplane, opts.deadlines.resolve),
            opts.deadlines,
        )
        scrape = await net.start_http_server(daemon.metrics_app(), opts.metrics_listen)
        ingress = None
        try:
            async with asyncio.TaskGroup() as tasks:
                got_config = asyncio.Event()
                watch = tasks.create_task(follow_config(channel, proxy.set_config, got_config))
                pools = tasks.create_task(follow_pools(channel, proxy))
                demand = tasks.create_task(
                    report_demand(
                        channel,
                        proxy,
                        f"{socket.gethostname()}-{opts.listen}",
                        opts.region,
                        opts.metrics_listen,
                    )
                )
                await first_config(got_config, opts.deadlines.rpc, opts.controlplane, "routes")
                ingress = await net.start_http_server(proxy.app(), opts.listen)
                log.info(
                    "edge %s serving %s (metrics %s), control plane %s",
                    opts.region,
                    opts.listen,
                    opts.metrics_listen,
                    opts.controlplane,
                )
                await stop.wait()
                for task in (watch, pools, demand):
                    task.cancel()
        finally:
            if ingress is not None:
                await ingress.cleanup()
            await scrape.cleanup()
            log.info("edge stopped")
