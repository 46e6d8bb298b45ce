"""The control plane's gRPC service: deploy, config watch, resolve, listing, node heartbeats, the
lifecycle API (see controlplane.lifecycle) and the image store's. PortsideErrors become gRPC
statuses here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc

from controlplane import records
from controlplane.access import peer_of_call
from controlplane.discovery import peer_host, reachable_address
from controlplane.events import EventLog, watch_events
from controlplane.identity import ControlPlaneIdentity, Issued
from controlplane.imagecatalog import ImageCatalog
from controlplane.imagecopy import ReplicaCopier
from controlplane.images import ImageStore, StoredImage, check_digest, check_reference
from controlplane.lifecycle import Lifecycle
from controlplane.metrics import (
    DEPLOYS,
    HEARTBEAT_STREAMS,
    HEARTBEATS_UNCONFIRMED,
    IMAGE_EXPORT_SECONDS,
    IMAGE_PULLS,
    IMAGE_PUSHES,
    IMAGE_SENT_BYTES,
    IMAGE_STORED_BYTES,
    IMAGES_HELD,
    RESOLVE_SECONDS,
    ROLLOUT_ROLLBACKS,
    VERSIONS_MADE,
)
from controlplane.placement import resolve_instance
from controlplane.ratelimits import SYNC_EVERY_S, RateLimitBook
from controlplane.rolloutloop import (
    RolloutBook,
    class_instances,
    control_rollout,
    end_in_progress,
    read_rollout,
    roll_back,
    start_rollout,
)
from controlplane.rollouts import (
    GRADUAL,
    IMMEDIATE,
    NONE,
    RolloutRecord,
    deploy_mode,
    has_awake_old,
)
from controlplane.routewatch import RouteChangeLog, follow_route_changes, route_updates
from controlplane.scheduleloop import (
    create_schedule,
    delete_class_schedules,
    delete_schedule,
    list_schedules,
)
from controlplane.schedules import check_request, new_schedule_id
from controlplane.secrets import SealedSecret, Secrets
from controlplane.snapshots import Snapshots, check_agent_push
from controlplane.store import Compacted, Store
from controlplane.tokens import TokenRegistry
from controlplane.usage import UsageLedger
from controlplane.versions import history, newest_first, version_class
from controlplane.view import ClusterView
from portside import geo
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.config import validate_config
from portside.convert import (
    class_to_pb,
    config_from_pb,
    config_to_pb,
    event_from_pb,
    event_to_pb,
    instance_info_to_pb,
    instance_status_from_pb,
    node_from_pb,
    node_info_to_pb,
    outbound_from_pb,
    outbound_to_pb,
    pool_assignment_to_pb,
    pool_member_to_pb,
    rate_counts_from_pb,
    rate_counts_to_pb,
    route_update_to_pb,
    schedule_from_request,
    schedule_to_pb,
    snapshot_from_pb,
    snapshot_to_pb,
    token_info_to_pb,
    usage_from_pb,
    usage_to_pb,
)
from portside.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PortsideError,
    StoreError,
    Unauthenticated,
    Unavailable,
)
from portside.events import Event
from portside.instances import InstanceInfo, InstanceStatus, PoolAssignment, PoolMember
from portside.pki import PeerRole
from portside.routechanges import RouteUpdate
from portside.rpc import abort_with, grpc_errors
from portside.spec import ContainerClass, Node, NodeInfo, instance_id
from portside.states import InstanceState
from portside.tokens import Role

log = logging.getLogger(__name__)

DEMAND_EVERY_S = 2.0  # how often edges report their request rates
DEMAND_TTL_S = 10.0  # a report counts this long: an edge that stops reporting stops counting
RECONCILE_WAIT_S = 5.0  # how long a reconcile waits for the view to catch up with the store
ROUTES_PROGRESS_S = 5.0  # a route watch with no changes still tells its revision this often


class ControlPlaneService(cp_grpc.ControlPlaneServicer):
    def __init__(
        self,
        store: Store,
        view: ClusterView,
        *,
        node_ttl_s: int,
        default_region: str,
        lifecycle: Lifecycle,
        events: EventLog,
        identity: ControlPlaneIdentity | None = None,
        tokens: TokenRegistry | None = None,
        route_changes: RouteChangeLog | None = None,
        quorum_lost: Callable[[], Awaitable[bool]] | None = None,
        images: ImageStore | None = None,
        image_catalog: ImageCatalog | None = None,
        image_copier: ReplicaCopier | None = None,
        rollouts: RolloutBook | None = None,
        secrets: Secrets | None = None,
    ):
        self.store = store
        self.view = view
        self.node_ttl_s = node_ttl_s
        self.default_region = default_region
        self.lifecycle = lifecycle
        self.events = events
        self.usage = UsageLedger(store)
        # None with --insecure: no CA, no tokens; Join and the token calls say so.
        self.identity = identity
        self.tokens = tokens
        self.route_changes = route_changes or follow_route_changes(view)
        # Whether the store provably has no quorum now (see _unconfirmed); a store that cannot
        # tell never vouches.
        self.quorum_lost = quorum_lost or _cannot_tell
        # None (tests of other parts): the image RPCs say this replica has no image store.
        self.images = images
        self.image_catalog = image_catalog
        # None: a pull of an image this replica lacks names the replica that holds it.
        self.image_copier = image_copier
        # This replica's copy of the rollout records: heartbeat replies carry their `replace`.
        self.rollouts = rollouts or RolloutBook(store, view)
        self.snapshots = Snapshots(lifecycle)
        # Gateway secrets (None: a replica without --secrets-key-file) and rate limiters.
        self.secrets = secrets or Secrets(store, None)
        self.rate_limits = RateLimitBook(
            store, lambda: view.gateway.rate_limits if view.gateway is not None else ()
        )

    @grpc_errors
    async def Deploy(self, request: cp.DeployRequest, context: Any) -> cp.DeployResponse:
        try:
            config = config_from_pb(request.config)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        validate_config(config)
        mode = deploy_mode(request.rollout)
        # Write the new classes and routes, then delete what the new config no longer has.
        # Not one transaction: a watcher may briefly see a mix, never a route without its class.
        # A class is written with its version: the next one if its containers change. A class
        # whose version changed (a new one, or back from a rollback) starts a rollout of its
        # awake instances unless the mode is none.
        started = []
        for cls in config.classes:
            cls, made = await version_class(self.store, cls)
            if made is not None:
                VERSIONS_MADE.inc()
                log.info(
                    "class %s: version %d (%s)", cls.name, made.number, ", ".join(made.changes)
                )
            kv = await self.store.get(records.class_key(cls.name))
            previous = records.decode_class(kv.value) if kv is not None else None
            floor = previous.wake_min_version if previous is not None else 0
            changed = previous is not None and previous.version != cls.version
            # wake_min_version is the control plane's: whatever the config says is replaced.
            cls = replace(cls, wake_min_version=cls.version if changed and mode != NONE else floor)
            await self.store.put(records.class_key(cls.name), records.encode_class(cls))
            if changed:
                rollout = await self._start_deploy_rollout(cls, mode, floor)
                if rollout is not None:
                    started.append(rollout.to_pb())
        new_route_keys = set()
        for i, route in enumerate(config.routes):
            key = records.route_key(i)
            new_route_keys.add(key)
            await self.store.put(key, records.encode_route(route))
        old_routes, _ = await self.store.range(records.ROUTES)
        for kv in old_routes:
            if kv.key not in new_route_keys:
                await self.store.delete(kv.key)
        if config.gateway is not None:
            await self.store.put(records.GATEWAY, records.encode_gateway(config.gateway))
        else:
            await self.store.delete(records.GATEWAY)
        class_names = {c.name for c in config.classes}
        old_classes, _ = await self.store.range(records.CLASSES)
        for kv in old_classes:
            removed = kv.key[len(records.CLASSES) :]
            if removed not in class_names:
                await self.store.delete(kv.key)
                await delete_class_schedules(self.store, removed)  # they would fail forever
        DEPLOYS.inc()
        log.info("deployed %d classes, %d routes", len(config.classes), len(config.routes))
        return cp.DeployResponse(
            classes=len(config.classes), routes=len(config.routes), rollouts=started
        )

    async def _start_deploy_rollout(
        self, cls: ContainerClass, mode: str, previous_floor: int
    ) -> RolloutRecord | None:
        """The rollout a deploy starts for a class whose version changed: one if it has awake
        instances on another version; otherwise (or with mode none) its rollout in progress,
        if any, ends: sleeping instances move at their wake, new ones boot the new version."""
        if mode != NONE and has_awake_old(class_instances(self.view, cls.name), cls.version):
            assert mode in (GRADUAL, IMMEDIATE)
            return await start_rollout(
                self.store, self.view, cls, mode, previous_wake_min_version=previous_floor
            )
        why = f"superseded by version {cls.version}" + (
            " (deployed with rollout none)" if mode == NONE else " (no awake instance to move)"
        )
        await end_in_progress(self.store, cls.name, why)
        return None

    @grpc_errors
    async def ListVersions(
        self, request: cp.ListVersionsRequest, context: Any
    ) -> cp.ListVersionsResponse:
        kept = await history(self.store, request.class_name)
        current = self.view.classes.get(request.class_name)
        if not kept and current is None:
            raise NotFound(f"no class {request.class_name!r} and no versions of it")
        running: dict[int, int] = {}
        for r in self.view.instances.values():
            if r.class_name == request.class_name:
                info = self._listed_info(r)
                if info.version and info.state.awake:
                    running[info.version] = running.get(info.version, 0) + 1
        return cp.ListVersionsResponse(
            versions=[
                cp.ClassVersion(
                    number=v.number,
                    spec=class_to_pb(v.spec),
                    created_at=v.created_at,
                    changes=list(v.changes),
                    instances=running.get(v.number, 0),
                )
                for v in newest_first(kept)
            ],
            current=current.version if current is not None else 0,
        )

    # -- rollouts: controlplane.rollouts (records, planner), controlplane.rolloutloop (I/O) ------

    @grpc_errors
    async def GetRollout(
        self, request: cp.GetRolloutRequest, context: Any
    ) -> cp.GetRolloutResponse:
        found = await read_rollout(self.store, _class_name(request.class_name))
        if found is None:
            raise NotFound(f"class {request.class_name!r} has had no rollout")
        return cp.GetRolloutResponse(rollout=found[0].to_pb())

    @grpc_errors
    async def ControlRollout(
        self, request: cp.ControlRolloutRequest, context: Any
    ) -> cp.ControlRolloutResponse:
        if request.action not in ("pause", "resume", "abort"):
            raise InvalidArgument(f"action: {request.action!r} is not one of pause, resume, abort")
        record = await control_rollout(self.store, _class_name(request.class_name), request.action)
        return cp.ControlRolloutResponse(rollout=record.to_pb())

    @grpc_errors
    async def Rollback(self, request: cp.RollbackRequest, context: Any) -> cp.RollbackResponse:
        if request.rollout not in ("", IMMEDIATE, GRADUAL):
            raise InvalidArgument(
                f"rollout: {request.rollout!r} is not a rollback mode; one of immediate, gradual"
            )
        if request.version < 0:
            raise InvalidArgument(f"version: {request.version} is negative")
        record = await roll_back(
            self.store,
            self.view,
            _class_name(request.class_name),
            request.version,
            gradual=request.rollout == GRADUAL,
        )
        ROLLOUT_ROLLBACKS.labels("manual").inc()
        return cp.RollbackResponse(rollout=record.to_pb())

    @grpc_errors
    async def GetConfig(self, request: cp.GetConfigRequest, context: Any) -> cp.GetConfigResponse:
        return cp.GetConfigResponse(config=config_to_pb(self.view.config()))

    async def WatchConfig(
        self, request: cp.WatchConfigRequest, context: Any
    ) -> AsyncIterator[cp.WatchConfigResponse]:
        sent = -1
        while True:
            async with self.view.config_changed:
                while self.view.config_version == sent:
                    await self.view.config_changed.wait()
                sent = self.view.config_version
                config = self.view.config()
            yield cp.WatchConfigResponse(config=config_to_pb(config))

    @grpc_errors
    async def Resolve(self, request: cp.ResolveRequest, context: Any) -> cp.ResolveResponse:
        start = time.perf_counter()
        result = "error"
        try:
            resolved = await resolve_instance(
                self.store,
                self.view,
                request.class_name,
                request.instance_name,
                request.location_hint,
                self.default_region,
                self.events,
                self.lifecycle.placements,
            )
            result = "placed" if resolved.placed else "found"
            if resolved.placed:
                await self.lifecycle.outbound.placed(
                    resolved.record, resolved.node, resolved.own_outbound
                )
        finally:
            RESOLVE_SECONDS.labels(result).observe(time.perf_counter() - start)
        return cp.ResolveResponse(
            node_id=resolved.node.id,
            data_address=resolved.node.data_address,
            instance_id=resolved.record.instance_id,
            region=resolved.node.region,
            placed=resolved.placed,
            instance_name=resolved.record.name,
        )

    @grpc_errors
    async def ListNodes(self, request: cp.ListNodesRequest, context: Any) -> cp.ListNodesResponse:
        out = []
        for node_id in sorted(self.view.nodes):
            use = self.view.use_of(node_id)
            info = NodeInfo(self.view.nodes[node_id], True, use.used, use.instances)
            out.append(node_info_to_pb(info))
        return cp.ListNodesResponse(nodes=out)

    @grpc_errors
    async def ListInstances(
        self, request: cp.ListInstancesRequest, context: Any
    ) -> cp.ListInstancesResponse:
        wanted = InstanceState.parse(request.state) if request.state else None
        out = []
        for r in sorted(self.view.instances.values(), key=lambda r: (r.class_name, r.name)):
            if request.class_name and r.class_name != request.class_name:
                continue
            if request.node_id and r.node_id != request.node_id:
                continue
            info = self._listed_info(r)
            if wanted is None or info.state is wanted:
                out.append(instance_info_to_pb(info))
        return cp.ListInstancesResponse(instances=out)

    def _listed_info(self, r: records.InstanceRecord) -> InstanceInfo:
        """An instance as its node's last heartbeat reported it: cheap, for listing many (GetState
        asks the agent). Not reported yet: placed; its node gone: stopped."""
        node = self.view.nodes.get(r.node_id)
        status = self.view.status_of(r)
        if status is not None and node is not None:
            return replace(status.info, node_id=node.id, region=node.region, pool=r.pool)
        return InstanceInfo(
            class_name=r.class_name,
            name=r.name,
            instance_id=r.instance_id,
            state=InstanceState.PLACED if node is not None else InstanceState.STOPPED,
            node_id=r.node_id,
            region=node.region if node else "",
            since=r.placed_at,
            pool=r.pool,
        )

    @grpc_errors
    async def GetUsage(self, request: cp.GetUsageRequest, context: Any) -> cp.GetUsageResponse:
        days = await self.usage.read(request.class_name, request.since)
        return cp.GetUsageResponse(usage=[usage_to_pb(d.use) for d in days])

    @grpc_errors
    async def ListClasses(
        self, request: cp.ListClassesRequest, context: Any
    ) -> cp.ListClassesResponse:
        return cp.ListClassesResponse(
            classes=[class_to_pb(self.view.classes[n]) for n in sorted(self.view.classes)]
        )

    async def NodeHeartbeat(
        self, request_iterator: AsyncIterator[cp.NodeHeartbeatRequest], context: Any
    ) -> AsyncIterator[cp.NodeHeartbeatResponse]:
        """The node's key lives under a lease that each message refreshes. A clean end of the
        stream (agent shutting down) revokes the lease at once; a broken one lets it expire.
        Each reply lists the pool instances the node should run, and says whether the message
        refreshed the lease (the agent's fence runs on that: docs/architecture.md "Fencing").

        Whenever the lease is new (the stream's first message, or the old one had expired) or
        the agent says it is fenced, the reply reconciles: after the node's key is written, the
        view catches up to that write, and the reply names the reported named instances that
        are placed on another node (or nowhere) — the agent removes those before it serves."""
        HEARTBEAT_STREAMS.inc()
        lease = 0
        node: Node | None = None
        written: dict[str, InstanceStatus] | None = None
        # The images the agent reported (None: it reports none) and those written under the
        # current lease (None: not yet).
        images: frozenset[str] | None = None
        images_written: frozenset[str] | None = None
        keep_sent: list[str] | None = None  # the keep list this stream was last told
        try:
            async for message in request_iterator:
                if node is None or message.images_changed:
                    images = frozenset(message.images)
                if node is None:
                    if not message.HasField("node") or not message.node.id:
                        raise InvalidArgument("the first heartbeat must carry the node")
                    node = node_from_pb(message.node)
                    await _check_claim(context, node.id, "node")
                    try:
                        geo.lookup(node.region)
                    except InvalidArgument as exc:
                        raise InvalidArgument(f"node {node.id}: {exc}") from exc
                reconcile = message.fenced
                try:
                    if lease == 0:
                        lease = await self.store.grant_lease(self.node_ttl_s)
                        written, images_written, reconcile = None, None, True
                        log.info(
                            "node %s joined (%s, %s, %.2f vCPU, %d MiB)",
                            node.id,
                            node.region,
                            node.data_address,
                            node.vcpu,
                            node.memory_mib,
                        )
                    elif not await self.store.refresh_lease(lease):
                        # The lease expired (a long pause, or a partition): register again.
                        lease = await self.store.grant_lease(self.node_ttl_s)
                        written, images_written, reconcile = None, None, True
                        log.warning("node %s lease had expired; renewed", node.id)
                except StoreError as exc:
                    yield await self._unconfirmed(node, exc)
                    continue
                for event in message.events:
                    await self.events.record(_reported_event(event, node.id))
                if message.usage:
                    # Before the reply, which acknowledges it: a failure breaks the stream and
                    # the agent sends the batch again (added once per key, by its sequence).
                    await self.usage.add(
                        message.usage_source,
                        message.usage_sequence,
                        [usage_from_pb(u) for u in message.usage],
                    )
                statuses = _statuses(message)
                revision = 0
                if statuses != written or reconcile:
                    # Capacity follows awake instances and the autoscaler follows CPU: publish.
                    revision = await self.store.put(
                        records.node_key(node.id), records.encode_node(node, statuses), lease
                    )
                    written = statuses
                if self.image_catalog is not None and images != images_written:
                    assert images is not None  # images_written starts as None
                    await self.image_catalog.report_node(node.id, images, lease)
                    images_written = images
                reply = cp.NodeHeartbeatResponse(
                    lease_ttl_seconds=self.node_ttl_s,
                    pool=self._assignments(node.id),
                    lease_confirmed=True,
                    fence_after_seconds=fence_after(self.node_ttl_s),
                    prefetch_images=self._prefetch(node),
                    replace=self.rollouts.replace_for(node.id),
                )
                catalog = self.image_catalog
                keep = catalog.keep_images() if catalog is not None else None
                if keep is not None and keep != keep_sent:
                    reply.keep_images.digests.extend(keep)  # set: the agent may remove others
                    keep_sent = keep
                if reconcile:
                    reply.reconciled = True
                    reply.elsewhere.extend(await self._elsewhere(node.id, statuses, revision))
                    await self.lifecycle.outbound.reconciled(node)  # before its fence opens
                yield reply
            if node is not None and lease:
                await self.store.revoke_lease(lease)
                log.info("node %s left", node.id)
        finally:
            HEARTBEAT_STREAMS.dec()

    async def _unconfirmed(self, node: Node, exc: StoreError) -> cp.NodeHeartbeatResponse:
        """A reply for a message whose lease could not be refreshed because the store failed.
        It confirms the node's time only when the store provably has no quorum (then no replica
        can place anything, and etcd gives every lease a full TTL again when a leader is
        elected); otherwise the agent's fence closes on time. Nothing of the message was
        recorded: the agent sends its events and usage again."""
        HEARTBEATS_UNCONFIRMED.inc()
        no_quorum = await self.quorum_lost()
        log.warning(
            "node %s: lease not refreshed (%s)%s",
            node.id,
            exc,
            "; the store has no quorum, so the node serves on" if no_quorum else "",
        )
        return cp.NodeHeartbeatResponse(
            lease_ttl_seconds=self.node_ttl_s,
            pool=self._assignments(node.id),
            store_unavailable=no_quorum,
            fence_after_seconds=fence_after(self.node_ttl_s),
            prefetch_images=self._prefetch(node),
        )

    def _prefetch(self, node: Node) -> list[str]:
        """The images the node should have (every reply carries them: the agent keeps the
        latest), chosen by controlplane.imagecatalog.images_to_prefetch."""
        if self.image_catalog is None:
            return []
        return self.image_catalog.prefetch_for(node.region)

    async def _elsewhere(
        self, node_id: str, statuses: dict[str, InstanceStatus], revision: int
    ) -> list[str]:
        """The reported named instances not placed on `node_id`, as of a view that has applied
        the write at `revision` (so it holds every placement committed before it)."""
        if revision:
            try:
                async with asyncio.timeout(RECONCILE_WAIT_S):
                    await self.view.caught_up(revision)
            except TimeoutError as exc:
                raise StoreError(
                    f"node {node_id}: the store watch did not deliver revision {revision} "
                    f"within {RECONCILE_WAIT_S:g}s; cannot reconcile its instances yet"
                ) from exc
        elsewhere = []
        for iid, status in statuses.items():
            if status.info.pool:
                continue  # pool members follow the reply's assignments instead
            record = self.view.by_id.get(iid)
            if record is None or record.node_id != node_id:
                elsewhere.append(iid)
        if elsewhere:
            log.warning(
                "node %s runs %d named instances placed elsewhere meanwhile; it removes them",
                node_id,
                len(elsewhere),
            )
        return elsewhere

    def _assignments(self, node_id: str) -> list[pb.PoolAssignment]:
        return [
            pool_assignment_to_pb(PoolAssignment(r.class_name, r.name, r.instance_id, r.draining))
            for r in self.view.pool_members()
            if r.node_id == node_id
        ]

    async def WatchPools(
        self, request: cp.WatchPoolsRequest, context: Any
    ) -> AsyncIterator[cp.WatchPoolsResponse]:
        sent = -1
        last: list[pb.PoolMember] | None = None
        while True:
            async with self.view.pools_changed:
                while self.view.pools_version == sent:
                    await self.view.pools_changed.wait()
                sent = self.view.pools_version
                members = self._pool_members()
            if members != last:  # node heartbeats change the view often, members rarely
                last = members
                yield cp.WatchPoolsResponse(members=members)

    async def WatchRoutes(
        self, request: cp.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[cp.WatchRoutesResponse]:
        """Nodes lost and named instances moved or removed, from `since_revision` on, with a
        message every ROUTES_PROGRESS_S in any case (controlplane.routewatch.route_updates)."""
        async for update in route_updates(
            self.route_changes, request.since_revision, ROUTES_PROGRESS_S
        ):
            yield self._route_update(update)

    def _route_update(self, update: RouteUpdate) -> cp.WatchRoutesResponse:
        message = route_update_to_pb(update)
        message.node_ttl_seconds = self.node_ttl_s
        return message

    def _pool_members(self) -> list[pb.PoolMember]:
        out = []
        for rec in self.view.pool_members():
            node = self.view.nodes[rec.node_id]
            status = self.view.status_of(rec)
            member = PoolMember(
                class_name=rec.class_name,
                name=rec.name,
                instance_id=rec.instance_id,
                node_id=node.id,
                data_address=node.data_address,
                region=node.region,
                latitude=node.latitude,
                longitude=node.longitude,
                draining=rec.draining,
                ready=status is not None and status.state.ready,
            )
            out.append(pool_member_to_pb(member))
        return out

    @grpc_errors
    async def ReportDemand(
        self, request: cp.ReportDemandRequest, context: Any
    ) -> cp.ReportDemandResponse:
        if not request.edge_id:
            raise InvalidArgument("edge_id: must not be empty")
        await _check_claim(context, request.edge_id, "edge")
        region = geo.lookup(request.region).code
        lease = await self.store.grant_lease(int(DEMAND_TTL_S))
        demand = records.Demand(
            region=region,
            at=time.time(),
            requests_per_second=dict(request.requests_per_second),
            metrics_address=reachable_address(request.metrics_address, _peer_host(context)),
        )
        await self.store.put(records.demand_key(request.edge_id), demand.encode(), lease)
        return cp.ReportDemandResponse(report_every_seconds=DEMAND_EVERY_S)

    # --- the lifecycle API: see controlplane.lifecycle ---

    @grpc_errors
    async def Start(self, request: cp.StartRequest, context: Any) -> cp.StartResponse:
        snapshot = None
        if request.snapshot:
            cls = self.lifecycle.class_named(request.instance.class_name)
            snapshot = await self.snapshots.for_start(cls, request.snapshot)
        info = await self.lifecycle.start(
            request.instance.class_name,
            request.instance.name,
            entrypoint=request.entrypoint,
            env=request.env,
            location_hint=request.location_hint,
            no_wait=request.no_wait,
            snapshot=snapshot,
        )
        if snapshot is not None:
            await self.snapshots.restored(cls, snapshot)
        return cp.StartResponse(info=instance_info_to_pb(info))

    @grpc_errors
    async def Stop(self, request: cp.StopRequest, context: Any) -> cp.StopResponse:
        if request.grace_seconds < 0:
            raise InvalidArgument(f"grace_seconds: {request.grace_seconds} is negative")
        info = await self.lifecycle.stop(
            request.instance.class_name,
            request.instance.name,
            signal=request.signal,
            grace_s=request.grace_seconds,
        )
        return cp.StopResponse(info=instance_info_to_pb(info))

    @grpc_errors
    async def Signal(self, request: cp.SignalRequest, context: Any) -> cp.SignalResponse:
        await self.lifecycle.signal(
            request.instance.class_name, request.instance.name, request.signal
        )
        return cp.SignalResponse()

    @grpc_errors
    async def Destroy(self, request: cp.DestroyRequest, context: Any) -> cp.DestroyResponse:
        await self.lifecycle.destroy(request.instance.class_name, request.instance.name)
        return cp.DestroyResponse()

    @grpc_errors
    async def GetState(self, request: cp.GetStateRequest, context: Any) -> cp.GetStateResponse:
        info = await self.lifecycle.get_state(request.instance.class_name, request.instance.name)
        return cp.GetStateResponse(info=instance_info_to_pb(info))

    @grpc_errors
    async def RenewActivity(
        self, request: cp.RenewActivityRequest, context: Any
    ) -> cp.RenewActivityResponse:
        await self.lifecycle.renew_activity(request.instance.class_name, request.instance.name)
        return cp.RenewActivityResponse()

    @grpc_errors
    def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Any
    ) -> AsyncGenerator[pb.ExecResponse, None]:
        return self.lifecycle.exec(request_iterator)

    @grpc_errors
    def Logs(self, request: pb.LogsRequest, context: Any) -> AsyncGenerator[pb.LogsResponse, None]:
        return self.lifecycle.logs(request)

    @grpc_errors
    async def WatchEvents(
        self, request: cp.WatchEventsRequest, context: Any
    ) -> AsyncGenerator[pb.Event, None]:
        if request.name and not request.class_name:
            raise InvalidArgument("class_name: required when name is given")
        iid = instance_id(request.class_name, request.name) if request.name else ""
        prefix = records.events_prefix(request.class_name, iid)
        try:
            async for event in watch_events(self.store, prefix, request.after_revision):
                yield event_to_pb(event)
        except Compacted as exc:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"after_revision {request.after_revision} is no longer in the store's history "
                f"({exc}); watch from 0 (now) and read current states with GetState",
            )
        except StoreError as exc:
            # The store closed or failed under the watch: the client should reconnect.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"event watch ended: {exc}")

    @grpc_errors
    async def GetStateValue(
        self, request: cp.GetStateValueRequest, context: Any
    ) -> cp.GetStateValueResponse:
        value = await self.lifecycle.get_value(
            request.instance.class_name, request.instance.name, request.key
        )
        return cp.GetStateValueResponse(value=value)

    @grpc_errors
    async def PutStateValue(
        self, request: cp.PutStateValueRequest, context: Any
    ) -> cp.PutStateValueResponse:
        await self.lifecycle.put_value(
            request.instance.class_name, request.instance.name, request.key, request.value
        )
        return cp.PutStateValueResponse()

    @grpc_errors
    async def DeleteStateValue(
        self, request: cp.DeleteStateValueRequest, context: Any
    ) -> cp.DeleteStateValueResponse:
        existed = await self.lifecycle.delete_value(
            request.instance.class_name, request.instance.name, request.key
        )
        return cp.DeleteStateValueResponse(existed=existed)

    # --- per-instance schedules (issue 13): controlplane.schedules, controlplane.scheduleloop ---

    @grpc_errors
    async def Schedule(self, request: cp.ScheduleRequest, context: Any) -> cp.ScheduleResponse:
        asked = schedule_from_request(request)
        checked = check_request(asked, now=time.time(), generated_id=new_schedule_id())
        self.lifecycle.class_named(checked.class_name)  # NotFound: unknown class
        created = await create_schedule(self.store, checked)
        return cp.ScheduleResponse(schedule=schedule_to_pb(created))

    @grpc_errors
    async def ListSchedules(
        self, request: cp.ListSchedulesRequest, context: Any
    ) -> cp.ListSchedulesResponse:
        found = await list_schedules(self.store, request.class_name, request.name)
        return cp.ListSchedulesResponse(schedules=[schedule_to_pb(s) for s in found])

    @grpc_errors
    async def DeleteSchedule(
        self, request: cp.DeleteScheduleRequest, context: Any
    ) -> cp.DeleteScheduleResponse:
        deleted = await delete_schedule(
            self.store, request.instance.class_name, request.instance.name, request.id
        )
        return cp.DeleteScheduleResponse(schedule=schedule_to_pb(deleted))

    # --- per-instance outbound policies (issue 14): controlplane.outbound ---

    @grpc_errors
    async def SetOutbound(
        self, request: cp.SetOutboundRequest, context: Any
    ) -> cp.SetOutboundResponse:
        if request.clear and request.HasField("policy"):
            raise InvalidArgument("policy, clear: give one (clear goes back to the class's)")
        policy = None if request.clear else outbound_from_pb(request.policy)
        applied = await self.lifecycle.outbound.set(
            request.instance.class_name, request.instance.name, policy
        )
        return cp.SetOutboundResponse(policy=outbound_to_pb(applied.policy), own=applied.own)

    @grpc_errors
    async def GetOutbound(
        self, request: cp.GetOutboundRequest, context: Any
    ) -> cp.GetOutboundResponse:
        applied = await self.lifecycle.outbound.get(
            request.instance.class_name, request.instance.name
        )
        return cp.GetOutboundResponse(policy=outbound_to_pb(applied.policy), own=applied.own)

    # --- gateway secrets and rate limiters (issue 14): controlplane.secrets, .ratelimits ---

    @grpc_errors
    async def PutSecret(self, request: cp.PutSecretRequest, context: Any) -> cp.PutSecretResponse:
        sealed = await self.secrets.put(request.name, request.value)
        return cp.PutSecretResponse(secret=_secret_info(sealed))

    @grpc_errors
    async def ListSecrets(
        self, request: cp.ListSecretsRequest, context: Any
    ) -> cp.ListSecretsResponse:
        return cp.ListSecretsResponse(
            secrets=[_secret_info(s) for s in await self.secrets.listing()]
        )

    @grpc_errors
    async def DeleteSecret(
        self, request: cp.DeleteSecretRequest, context: Any
    ) -> cp.DeleteSecretResponse:
        return cp.DeleteSecretResponse(secret=_secret_info(await self.secrets.delete(request.name)))

    @grpc_errors
    async def WatchSecrets(
        self, request: cp.WatchSecretsRequest, context: Any
    ) -> AsyncGenerator[cp.WatchSecretsResponse, None]:
        async with contextlib.aclosing(self.secrets.watch()) as changes:
            async for values in changes:
                yield cp.WatchSecretsResponse(secrets=values)

    @grpc_errors
    async def SyncRateLimits(
        self, request: cp.SyncRateLimitsRequest, context: Any
    ) -> cp.SyncRateLimitsResponse:
        await _check_claim(context, request.edge_id, "edge")
        totals = await self.rate_limits.sync(request.edge_id, rate_counts_from_pb(request.counts))
        return cp.SyncRateLimitsResponse(
            totals=rate_counts_to_pb(totals), sync_every_seconds=SYNC_EVERY_S
        )

    # --- identity and access (issue 9); who may call each is in controlplane.access ---

    @grpc_errors
    async def Join(self, request: cp.JoinRequest, context: Any) -> cp.JoinResponse:
        identity = self._identity()
        issued = identity.join(request.role, request.node_id, request.csr)
        log.info("%s/%s joined the cluster", request.role, request.node_id)
        return _join_response(issued)

    @grpc_errors
    async def RenewCertificate(
        self, request: cp.RenewCertificateRequest, context: Any
    ) -> cp.JoinResponse:
        identity = self._identity()
        peer = peer_of_call(context)
        if peer is None:
            raise Unauthenticated("RenewCertificate needs the certificate it renews (mutual TLS)")
        return _join_response(identity.renew(peer, request.csr))

    @grpc_errors
    async def CreateToken(
        self, request: cp.CreateTokenRequest, context: Any
    ) -> cp.CreateTokenResponse:
        registry = self._tokens()
        role = None if request.role == "join" else Role.parse(request.role)
        created = await registry.create(
            role, classes=request.classes, ttl_s=request.ttl_seconds, name=request.name
        )
        return cp.CreateTokenResponse(
            token=created.token.text(), info=token_info_to_pb(created.record)
        )

    @grpc_errors
    async def ListTokens(
        self, request: cp.ListTokensRequest, context: Any
    ) -> cp.ListTokensResponse:
        return cp.ListTokensResponse(tokens=[token_info_to_pb(t) for t in self._tokens().list()])

    @grpc_errors
    async def RevokeToken(
        self, request: cp.RevokeTokenRequest, context: Any
    ) -> cp.RevokeTokenResponse:
        record = await self._tokens().revoke(request.token)
        return cp.RevokeTokenResponse(info=token_info_to_pb(record))

    # --- snapshots (issue 13): controlplane.snapshots ---

    @grpc_errors
    async def CreateSnapshot(
        self, request: cp.CreateSnapshotRequest, context: Any
    ) -> cp.CreateSnapshotResponse:
        snapshot = await self.snapshots.create(
            request.instance.class_name, request.instance.name, request.name
        )
        return cp.CreateSnapshotResponse(snapshot=snapshot_to_pb(snapshot))

    @grpc_errors
    async def ListSnapshots(
        self, request: cp.ListSnapshotsRequest, context: Any
    ) -> cp.ListSnapshotsResponse:
        listed = await self.snapshots.listing(request.class_name, request.instance_name)
        return cp.ListSnapshotsResponse(snapshots=[snapshot_to_pb(s) for s in listed])

    @grpc_errors
    async def DeleteSnapshot(
        self, request: cp.DeleteSnapshotRequest, context: Any
    ) -> cp.DeleteSnapshotResponse:
        deleted = await self.snapshots.delete(request.class_name, request.snapshot)
        return cp.DeleteSnapshotResponse(snapshot=snapshot_to_pb(deleted))

    @grpc_errors
    async def RecordSnapshot(
        self, request: cp.RecordSnapshotRequest, context: Any
    ) -> cp.RecordSnapshotResponse:
        recorded = await self.snapshots.record(
            snapshot_from_pb(request.snapshot), request.instance_id, _caller_id(context)
        )
        return cp.RecordSnapshotResponse(snapshot=snapshot_to_pb(recorded))

    @grpc_errors
    async def LatestSnapshot(
        self, request: cp.LatestSnapshotRequest, context: Any
    ) -> cp.LatestSnapshotResponse:
        found = await self.snapshots.latest(
            request.instance.class_name, request.instance.name, _caller_id(context)
        )
        if found is None:
            return cp.LatestSnapshotResponse(found=False)
        return cp.LatestSnapshotResponse(found=True, snapshot=snapshot_to_pb(found))

    # --- images without a registry (issue 12): controlplane.images, controlplane.imagecatalog ---

    @grpc_errors
    async def PushImage(
        self, request_iterator: AsyncIterator[cp.PushImageRequest], context: Any
    ) -> cp.PushImageResponse:
        """Take in a `docker save` archive, verified against the first message's digest. One
        this replica holds whole already is read to its end (so the client's sends finish) and
        answered with stored_bytes 0."""
        images, catalog = self._images()
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or not first.digest:
            raise InvalidArgument(
                "PushImage: the first message must carry digest (sha256:<64 hex>) and reference"
            )
        digest = check_digest(first.digest)
        reference = check_reference(first.reference, digest)
        peer = peer_of_call(context)
        if peer is not None and peer.role is PeerRole.AGENT:
            check_agent_push(peer.common_name, reference)
        held = await images.stored(digest)
        if held is not None:
            async for _ in messages:
                pass
            await catalog.note_held(held)
            IMAGE_PUSHES.labels("held").inc()
            return cp.PushImageResponse(digest=digest, size_bytes=held.size_bytes)

        async def archive() -> AsyncIterator[bytes]:
            yield first.data
            async for message in messages:
                yield message.data

        outcome = "failed"
        try:
            ingested = await images.ingest(digest, reference, archive())
            outcome = "stored"
        except InvalidArgument:
            outcome = "refused"
            raise
        finally:
            IMAGE_PUSHES.labels(outcome).inc()
        IMAGE_STORED_BYTES.inc(ingested.stored_bytes)
        IMAGES_HELD.inc()
        await catalog.note_held(ingested.image)
        log.info(
            "image %s (%s) pushed: %d bytes, %d new",
            digest,
            reference or "no reference",
            ingested.image.size_bytes,
            ingested.stored_bytes,
        )
        return cp.PushImageResponse(
            digest=digest,
            size_bytes=ingested.image.size_bytes,
            stored_bytes=ingested.stored_bytes,
        )

    @grpc_errors
    async def StatImages(
        self, request: cp.StatImagesRequest, context: Any
    ) -> cp.StatImagesResponse:
        """The digests this replica holds whole: the ones its agents can pull from it (a client
        pushes the rest to it, even if another replica holds them)."""
        images, _ = self._images()
        held = []
        for i, digest in enumerate(request.digests):
            check_digest(digest, f"digests[{i}]")
            if await images.stored(digest) is not None:
                held.append(digest)
        return cp.StatImagesResponse(held=held)

    @grpc_errors
    async def PullImage(
        self, request: cp.PullImageRequest, context: Any
    ) -> AsyncGenerator[cp.PullImageResponse, None]:
        images, catalog = self._images()
        digest = check_digest(request.digest)
        image = await images.stored(digest)
        if image is None:
            image = await self._copy_for_pull(digest, catalog)
        start = time.perf_counter()
        outcome = "failed"
        try:
            async for chunk in images.export(image, request.have_chain_ids):
                IMAGE_SENT_BYTES.inc(len(chunk))
                yield cp.PullImageResponse(data=chunk)
            outcome = "served"
            IMAGE_EXPORT_SECONDS.observe(time.perf_counter() - start)
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            IMAGE_PULLS.labels(outcome).inc()

    @grpc_errors
    async def ListImages(
        self, request: cp.ListImagesRequest, context: Any
    ) -> cp.ListImagesResponse:
        _, catalog = self._images()
        return cp.ListImagesResponse(
            images=[
                cp.ImageInfo(
                    digest=i.digest,
                    reference=i.reference,
                    size_bytes=i.size_bytes,
                    classes=i.classes,
                    replicas=i.replicas,
                    nodes=i.nodes,
                    pushed_at=i.pushed_at,
                )
                for i in catalog.listing()
            ]
        )

    async def _copy_for_pull(self, digest: str, catalog: ImageCatalog) -> StoredImage:
        """The image, copied first from a replica that holds it (the copy the background
        would make: one per digest); the pull fails as Unavailable if that copy fails."""
        others = [r for r in catalog.holders(digest) if r != catalog.replica_id]
        if not others or self.image_copier is None:
            raise not_held(digest, catalog)
        log.info("pull of image %s waits for its copy from replica %s", digest, ", ".join(others))
        try:
            return await self.image_copier.copy(digest)
        except PortsideError as exc:
            IMAGE_PULLS.labels("unavailable").inc()
            raise Unavailable(
                f"image {digest} is not in replica {catalog.replica_id}'s image store yet and "
                f"could not be copied from replica {', '.join(others)}: {exc}"
            ) from exc

    def _images(self) -> tuple[ImageStore, ImageCatalog]:
        if self.images is None or self.image_catalog is None:
            raise FailedPrecondition("this control plane replica runs without an image store")
        return self.images, self.image_catalog

    def _identity(self) -> ControlPlaneIdentity:
        if self.identity is None:
            raise FailedPrecondition(_INSECURE)
        return self.identity

    def _tokens(self) -> TokenRegistry:
        if self.tokens is None:
            raise FailedPrecondition(_INSECURE)
        return self.tokens


_INSECURE = (
    "this control plane runs with --insecure: it has no CA and checks no token; bootstrap "
    "the store (`portside bootstrap`) and start it without --insecure"
)


def _class_name(name: str) -> str:
    if not name:
        raise InvalidArgument("class_name: required")
    return name


def _secret_info(s: SealedSecret) -> cp.SecretInfo:
    return cp.SecretInfo(name=s.name, updated_at=s.updated_at, digest=s.digest)


def _join_response(issued: Issued) -> cp.JoinResponse:
    return cp.JoinResponse(
        certificate=issued.certificate,
        ca_certificate=issued.ca_certificate,
        not_after=issued.not_after,
    )


def _caller_id(context: Any) -> str | None:
    """The id the call's certificate names (a node's, for an agent); None without one
    (--insecure: nothing says who calls)."""
    peer = peer_of_call(context)
    return peer.id if peer is not None else None


async def _check_claim(context: Any, claimed: str, what: str) -> None:
    """A part of the cluster speaks only for itself: the id it reports must be its
    certificate's (without one, --insecure, nothing is checked). Ends the call if not."""
    peer = peer_of_call(context)
    if peer is not None and peer.id != claimed:
        await abort_with(
            context,
            PermissionDenied(
                f"{peer.common_name} may not report as {what} {claimed}: its certificate names "
                f"it {peer.id} (give it that id, or join it again under {claimed})"
            ),
        )


def not_held(digest: str, catalog: ImageCatalog) -> NotFound | Unavailable:
    """Why this replica cannot serve `digest`: no replica holds it, or another one does."""
    others = [r for r in catalog.holders(digest) if r != catalog.replica_id]
    if others:
        IMAGE_PULLS.labels("unavailable").inc()
        return Unavailable(
            f"image {digest} is not in replica {catalog.replica_id}'s image store; replica "
            f"{', '.join(others)} holds it: this replica copies it from there (try again)"
        )
    IMAGE_PULLS.labels("not_found").inc()
    return NotFound(
        f"image {digest} is in no replica's image store: `portside deploy` pushes the "
        "images of classes it builds (deploy again to push it)"
    )


def fence_after(node_ttl_s: float) -> float:
    """How long after the send of its last confirmed heartbeat an agent serves named instances:
    70% of the lease, so 3 s of a 10 s lease to spare (docs/architecture.md "Fencing")."""
    return round(node_ttl_s * 0.7, 3)


async def _cannot_tell() -> bool:
    return False


def _reported_event(m: pb.Event, node_id: str) -> Event:
    """An event an agent sent on its heartbeat, completed where an older agent left it out."""
    event = event_from_pb(m)
    return replace(
        event,
        time=event.time or time.time(),
        instance_id=event.instance_id or instance_id(event.class_name, event.name),
        node_id=event.node_id or node_id,
    )


def _statuses(message: cp.NodeHeartbeatRequest) -> dict[str, InstanceStatus]:
    out = {}
    for m in message.instances:
        status = instance_status_from_pb(m)
        if status.cpu_percent is not None:
            # A tenth of a percent is all the autoscaler needs; finer only churns the store.
            status = replace(status, cpu_percent=round(status.cpu_percent, 1))
        out[status.instance_id] = status
    return out


def _peer_host(context: Any) -> str:
    """The caller's IP, where the gRPC context knows it ("" for fakes in unit tests)."""
    peer = getattr(context, "peer", None)
    return peer_host(peer()) if callable(peer) else ""
