"""`portside controlplane`: the gRPC server (with health checking and reflection, for grpcurl),
its store, its view of the cluster, and /metrics. One TaskGroup owns every task; SIGINT/SIGTERM
stop the server gracefully within a bound.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane import records
from controlplane.agents import AgentClients
from controlplane.discovery import ReplicaRegistration, reachable_address, targets_route
from controlplane.events import EventLog
from controlplane.leader import LeaderElection
from controlplane.lifecycle import Lifecycle
from controlplane.metrics import INSTANCES_PLACED, NODES_ALIVE
from controlplane.pools import PoolManager
from controlplane.service import ControlPlaneService
from controlplane.store import instrument, open_store
from controlplane.ui import ClusterPage
from controlplane.view import ClusterView
from portside import daemon, geo, net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc

log = logging.getLogger("portside.controlplane")


@dataclass(frozen=True)
class ControlPlaneOptions:
    listen: str
    store_url: str
    metrics_listen: str
    region: str = "fra"  # the location hint used when a resolve carries none
    replica_id: str = ""  # default: HOSTNAME-PORT
    node_ttl_s: int = 10
    leader_ttl_s: int = 5
    grace_s: float = 5.0


async def run(opts: ControlPlaneOptions, stop: asyncio.Event | None = None) -> None:
    stop = stop or daemon.stop_on_signals()
    store = instrument(await open_store(opts.store_url))
    view = ClusterView(store)
    await view.load()
    replica_id = opts.replica_id or f"{socket.gethostname()}-{net.split_hostport(opts.listen)[1]}"
    registration = ReplicaRegistration(
        store,
        replica_id,
        records.Replica(
            region=geo.lookup(opts.region).code,
            # Listening everywhere: advertised at the gRPC listen host, else the host name.
            metrics_address=reachable_address(
                opts.metrics_listen,
                net.split_hostport(reachable_address(opts.listen, socket.gethostname()))[0],
            ),
        ),
    )
    leader = LeaderElection(store, replica_id, opts.leader_ttl_s)
    events = EventLog(store)
    agents = AgentClients(view)
    pools = PoolManager(store, view, leader, default_region=opts.region, events=events)
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(
        ControlPlaneService(
            store,
            view,
            node_ttl_s=opts.node_ttl_s,
            default_region=opts.region,
            lifecycle=Lifecycle(store, view, agents, events, default_region=opts.region),
            events=events,
        ),
        server,
    )
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    service_name = cp.DESCRIPTOR.services_by_name["ControlPlane"].full_name
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    net.add_grpc_port(server, opts.listen)
    page = ClusterPage(view, store)  # the live cluster page, on the same port as /metrics
    runner = await net.start_http_server(
        daemon.metrics_app([targets_route(view), *page.routes()]), opts.metrics_listen
    )
    await server.start()
    for name in ("", service_name):  # "": the server as a whole, as grpc-health-probe asks
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "control plane serving gRPC on %s, metrics on %s, store %s",
        opts.listen,
        opts.metrics_listen,
        opts.store_url,
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            # A failed watch ends the group, and with it the process: a stale view must not serve.
            background = [
                tasks.create_task(view.follow()),
                tasks.create_task(_update_gauges(view)),
                tasks.create_task(leader.run()),
                tasks.create_task(registration.run()),
                tasks.create_task(pools.run()),
                tasks.create_task(agents.follow_nodes()),
                tasks.create_task(page.follow_events()),
            ]
            await stop.wait()
            for task in background:
                task.cancel()
        await leader.resign()
        await registration.deregister()
    finally:
        await health_service.enter_graceful_shutdown()  # NOT_SERVING while calls drain
        await server.stop(opts.grace_s)
        await agents.close()
        await runner.cleanup()
        await store.close()
        log.info("control plane stopped")


async def _update_gauges(view: ClusterView) -> None:
    while True:
        NODES_ALIVE.set(len(view.nodes))
        for name, count in view.placed_by_class().items():
            INSTANCES_PLACED.labels(name).set(count)
        await asyncio.sleep(1)
