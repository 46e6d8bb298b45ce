"""`portside controlplane`: the gRPC server (with health checking and reflection, for grpcurl),
its store, its view of the cluster, and /metrics. One TaskGroup owns every task; SIGINT/SIGTERM
stop the server gracefully within a bound.

It starts only on a bootstrapped store (the cluster CA is there) and serves TLS only: the API on
--listen, the parts of the cluster on the cluster port (see controlplane.identity), every call
admitted by controlplane.access. `--insecure` (development) serves plaintext and checks nothing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane import records
from controlplane.access import Gate, guard
from controlplane.agents import AgentClients
from controlplane.discovery import ReplicaRegistration, reachable_address, targets_route
from controlplane.events import EventLog
from controlplane.identity import ControlPlaneIdentity, load_ca
from controlplane.imagecatalog import ImageCatalog
from controlplane.imagecopy import ReplicaCopier
from controlplane.imagegc import ImageCollector, ImageSweeper
from controlplane.images import ImageStore
from controlplane.leader import LeaderElection
from controlplane.lifecycle import Lifecycle
from controlplane.metrics import IMAGES_HELD, INSTANCES_PLACED, NODES_ALIVE
from controlplane.pools import PoolManager
from controlplane.rolloutloop import RolloutBook, RolloutLoop
from controlplane.routewatch import follow_route_changes
from controlplane.scheduleloop import ScheduleLoop
from controlplane.secrets import Secrets, load_key_file
from controlplane.service import ControlPlaneService
from controlplane.snapshots import SnapshotBook, SnapshotRetention
from controlplane.store import StoreTls, instrument, open_store, quorum_probe
from controlplane.store.sqlite import MEMORY, parse_sqlite_url
from controlplane.tokens import TokenRegistry
from controlplane.ui import ClusterPage
from controlplane.view import ClusterView
from portside import daemon, geo, net, pki
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import ConfigError
from portside.pki import PeerRole

log = logging.getLogger("portside.controlplane")


@dataclass(frozen=True)
class ControlPlaneOptions:
    listen: str
    store_url: str
    metrics_listen: str
    store_tls: StoreTls = StoreTls()  # the files of an etcd+https:// store
    # Each store call's deadline. With several etcd members, one member gets at most 2 s of it
    # before the call moves to the next (controlplane/store/etcd.py), so a lost quorum fails a
    # call after about 2 s, a hung cluster after this.
    store_timeout_s: float = 5.0
    region: str = "fra"  # the location hint used when a resolve carries none
    replica_id: str = ""  # default: HOSTNAME-PORT
    node_ttl_s: int = 10
    leader_ttl_s: int = 5
    grace_s: float = 5.0
    insecure: bool = False  # plaintext, no certificates, no tokens: development only
    cert_lifetime_s: float = pki.DEFAULT_LIFETIME_S  # of its own and the nodes' certificates
    # This replica's image store (controlplane.images); "": default_image_dir(store_url).
    image_dir: str = ""
    # Image garbage collection (controlplane.imagegc), run by the leader this often, keeping
    # each class's last this many images.
    image_gc_every_s: float = 600.0
    image_keep_versions: int = 3
    image_gc_grace_s: float = 3600.0  # a push this recent is kept: its deploy may still come
    # The cluster's key for gateway secrets (controlplane.secrets), the same file on every
    # replica; "": this replica can list and delete secrets, not put or serve them.
    secrets_key_file: str = ""


def default_image_dir(store_url: str) -> Path:
    """Beside a SQLite store's file (`<its folder>/images`: one machine's state in one place);
    otherwise `$XDG_DATA_HOME/portside/images` (~/.local/share/portside/images). Replicas on one
    machine may share it: every file is content-addressed and renamed into place."""
    if store_url.startswith("sqlite://"):
        path = parse_sqlite_url(store_url)
        if path != MEMORY:
            return Path(path).parent / "images"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "portside" / "images"


def open_image_store(image_dir: Path) -> ImageStore:
    """This replica's image store, its folders made (ConfigError naming --image-dir if not)."""
    images = ImageStore(image_dir)
    try:
        images.prepare()
    except OSError as exc:
        raise ConfigError("--image-dir", str(image_dir), f"cannot use it: {exc}") from exc
    return images


async def load_image_catalog(images: ImageStore, catalog: ImageCatalog) -> None:
    """Load the catalog (before view.follow(): it follows the view's watch from there) and
    bring the records in line with what this replica's folder holds."""
    await catalog.load()
    held = await images.held()
    IMAGES_HELD.set(len(held))
    await catalog.sync_replica(held)
    log.info("image store %s holds %d images", images.root, len(held))


async def run(opts: ControlPlaneOptions, stop: asyncio.Event | None = None) -> None:
    if opts.image_gc_every_s <= 0:
        raise ConfigError("--image-gc-every", f"{opts.image_gc_every_s:g}s", "must be positive")
    if opts.image_gc_grace_s < 0:
        raise ConfigError("--image-gc-grace", f"{opts.image_gc_grace_s:g}s", "must not be negative")
    if opts.image_keep_versions < 1:
        raise ConfigError(
            "--image-keep-versions",
            str(opts.image_keep_versions),
            "must be at least 1 (each class's current image is always kept)",
        )
    stop = stop or daemon.stop_on_signals()
    secrets_key = load_key_file(opts.secrets_key_file) if opts.secrets_key_file else None
    store = instrument(
        await open_store(opts.store_url, timeout_s=opts.store_timeout_s, tls=opts.store_tls)
    )
    replica_id = opts.replica_id or f"{socket.gethostname()}-{net.split_hostport(opts.listen)[1]}"
    identity: ControlPlaneIdentity | None = None
    if opts.insecure:
        log.warning(
            "--insecure: plaintext gRPC, no certificates, no tokens checked: anyone who reaches "
            "%s can run, exec into and destroy any container. For development only.",
            opts.listen,
        )
    else:
        try:
            ca = await load_ca(store, opts.store_url)
        except BaseException:
            await store.close()
            raise
        identity = ControlPlaneIdentity(ca, replica_id, opts.cert_lifetime_s)
    view = ClusterView(store)
    await view.load()
    # What was loaded lives as long as the process: out of the collector's sight, a full
    # collection no longer walks every placement (0.2-0.5 s at a million: bench/scale.py).
    gc.freeze()
    try:
        images = open_image_store(Path(opts.image_dir or default_image_dir(opts.store_url)))
    except BaseException:
        await store.close()
        raise
    image_catalog = ImageCatalog(store, view, replica_id)
    route_changes = follow_route_changes(view)  # fed by view.follow() from here on
    grpc_address = reachable_address(opts.listen, socket.gethostname())
    registration = ReplicaRegistration(
        store,
        replica_id,
        records.Replica(
            region=geo.lookup(opts.region).code,
            # Listening everywhere: advertised at the gRPC listen host, else the host name.
            metrics_address=reachable_address(
                opts.metrics_listen, net.split_hostport(grpc_address)[0]
            ),
            address=grpc_address,  # other replicas copy images from here (its cluster port)
        ),
    )
    leader = LeaderElection(store, replica_id, opts.leader_ttl_s)
    image_copier = ReplicaCopier(
        images,
        image_catalog,
        view,
        region=opts.region,
        tls=identity.client_tls(PeerRole.CONTROLPLANE) if identity is not None else None,
    )
    image_collector = ImageCollector(
        store,
        view,
        image_catalog,
        leader,
        every_s=opts.image_gc_every_s,
        keep_versions=opts.image_keep_versions,
        fresh_s=opts.image_gc_grace_s,
    )
    events = EventLog(store)
    agents = AgentClients(
        view, tls=identity.client_tls(pki.PeerRole.AGENT) if identity is not None else None
    )
    pools = PoolManager(
        store, view, leader, default_region=opts.region, events=events, agents=agents
    )
    # Rollouts: the leader drives them; every replica's heartbeat replies carry their replaces.
    rollout_book = RolloutBook(store, view)
    rollout_loop = RolloutLoop(store, view, lambda: leader.is_leader, pools=pools, events=events)
    lifecycle = Lifecycle(store, view, agents, events, default_region=opts.region)
    # Per-instance schedules: the leader claims and runs each tick (controlplane.scheduleloop).
    schedule_loop = ScheduleLoop(
        store, view, lifecycle, events, is_leader=lambda: leader.is_leader, replica_id=replica_id
    )
    server = net.grpc_server()
    service = ControlPlaneService(
        store,
        view,
        node_ttl_s=opts.node_ttl_s,
        default_region=opts.region,
        lifecycle=lifecycle,
        events=events,
        identity=identity,
        tokens=TokenRegistry(store, view, identity.ca_pem) if identity is not None else None,
        route_changes=route_changes,
        quorum_lost=quorum_probe(opts.store_url, opts.store_tls),
        images=images,
        image_catalog=image_catalog,
        image_copier=image_copier,
        rollouts=rollout_book,
        secrets=Secrets(store, secrets_key),
    )
    gate = Gate(view.tokens, enforce=identity is not None)
    descriptor = cp.DESCRIPTOR.services_by_name["ControlPlane"]
    cp_grpc.add_ControlPlaneServicer_to_server(guard(service, descriptor, gate), server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    service_name = descriptor.full_name
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    cluster_listen = net.with_port_offset(opts.listen, net.CLUSTER_PORT_OFFSET)
    if identity is None:
        net.add_grpc_port(server, opts.listen)
        serving = f"gRPC on {opts.listen} (plaintext)"
    else:
        net.add_grpc_port(server, opts.listen, identity.api_tls())
        net.add_grpc_port(server, cluster_listen, identity.cluster_tls())
        serving = f"gRPC on {opts.listen} (TLS), agents and edges on {cluster_listen} (mutual TLS)"
    # The live cluster page, on the same port as /metrics; it asks for a token unless --insecure.
    page = ClusterPage(view, store, protected=identity is not None)
    runner = await net.start_http_server(
        daemon.metrics_app([daemon.scrape_route(targets_route(view)), *page.routes()]),
        opts.metrics_listen,
    )
    await server.start()
    for name in ("", service_name):  # "": the server as a whole, as grpc-health-probe asks
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "control plane serving %s, metrics on %s, store %s",
        serving,
        opts.metrics_listen,
        opts.store_url,
    )
    try:
        problem = await service.secrets.key_problem()
        if problem is not None:
            log.error("gateway secrets cannot be served by this replica: %s", problem)
        await load_image_catalog(images, image_catalog)
        await rollout_book.load()  # before view.follow(): it follows the view's watch
        await schedule_loop.load()  # so does it
        async with asyncio.TaskGroup() as tasks:
            # A failed watch ends the group, and with it the process: a stale view must not serve.
            background = [
                tasks.create_task(view.follow()),
                tasks.create_task(_update_gauges(view)),
                tasks.create_task(leader.run()),
                tasks.create_task(registration.run()),
                tasks.create_task(pools.run()),
                tasks.create_task(rollout_loop.run()),
                tasks.create_task(schedule_loop.run()),
                tasks.create_task(agents.follow_nodes()),
                tasks.create_task(page.follow_events()),
                tasks.create_task(image_catalog.record_deployments()),
                tasks.create_task(image_copier.run()),
                tasks.create_task(image_collector.run()),
                tasks.create_task(ImageSweeper(images, image_catalog).run()),
                # The leader deletes snapshot records whose time is up (controlplane.snapshots).
                tasks.create_task(
                    SnapshotRetention(
                        SnapshotBook(store), lambda: view.classes, lambda: leader.is_leader
                    ).run()
                ),
            ]
            if identity is not None:
                background.append(tasks.create_task(identity.keep_renewed()))
            await stop.wait()
            for task in background:
                task.cancel()
        await leader.resign()
        await registration.deregister()
    finally:
        await health_service.enter_graceful_shutdown()  # NOT_SERVING while calls drain
        await server.stop(opts.grace_s)
        await image_copier.close()
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
