"""The control plane's gRPC service: deploy, config watch, resolve, listing, node heartbeats, and
the lifecycle API (see controlplane.lifecycle). PortsideErrors become gRPC statuses here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controlplane import records
from controlplane.discovery import peer_host, reachable_address
from controlplane.events import EventLog, EventRecord, watch_events
from controlplane.lifecycle import Lifecycle
from controlplane.metrics import DEPLOYS, HEARTBEAT_STREAMS, RESOLVE_SECONDS
from controlplane.placement import resolve_instance
from controlplane.store import Compacted, Store
from controlplane.usage import UsageLedger, UsageReport, Use
from controlplane.view import ClusterView
from portside import geo
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.convert import class_to_pb, config_from_pb, config_to_pb, node_from_pb, node_to_pb
from portside.errors import InvalidArgument, PortsideError, StoreError, grpc_code
from portside.spec import Config, Node, instance_id

log = logging.getLogger(__name__)

DEMAND_EVERY_S = 2.0  # how often edges report their request rates
DEMAND_TTL_S = 10.0  # a report counts this long: an edge that stops reporting stops counting

R = TypeVar("R")
M = TypeVar("M")

# How the view's heartbeat states read in InstanceInfo.state (the agent says "booting").
_LISTED_STATE = {"booting": "starting"}
_STATES = ("stopped", "starting", "running", "healthy", "stopping", "exited")


def _statuses(
    fn: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Turn a PortsideError raised by a unary handler into its gRPC status and one-line reason."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except PortsideError as exc:
            await context.abort(grpc_code(exc), str(exc))
            raise  # unreachable: abort raises

    return wrapper


def _stream_statuses(
    fn: Callable[..., AsyncGenerator[M, None]],
) -> Callable[..., AsyncGenerator[M, None]]:
    """As _statuses, for a handler that streams its replies."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[M, None]:
        try:
            # aclosing: when the client goes, the relay's own cleanup (cancelling the agent's
            # side of the stream) runs now, not whenever the generator is collected.
            async with contextlib.aclosing(fn(self, request, context)) as replies:
                async for reply in replies:
                    yield reply
        except PortsideError as exc:
            await context.abort(grpc_code(exc), str(exc))

    return wrapper


def validate_config(config: Config) -> None:
    """The checks a deploy must pass even when it did not come from `portside deploy`."""
    names = set()
    for i, cls in enumerate(config.classes):
        where = f"classes[{i}]"
        if not cls.name:
            raise InvalidArgument(f"{where}.name: must not be empty")
        if cls.name in names:
            raise InvalidArgument(f"{where}.name: class {cls.name!r} is declared twice")
        names.add(cls.name)
        if not cls.image:
            raise InvalidArgument(f"{where}.image: must not be empty")
        if not 0 < cls.default_port < 65536:
            raise InvalidArgument(f"{where}.default_port: {cls.default_port} is not 1..65535")
        if cls.instance_type.vcpu <= 0 or cls.instance_type.memory_mib <= 0:
            raise InvalidArgument(f"{where}.instance_type: vcpu and memory_mib must be > 0")
        if cls.sleep_after_s <= 0 or cls.boot_timeout_s <= 0:
            raise InvalidArgument(f"{where}: sleep_after and boot_timeout must be > 0")
    paths = set()
    pools = {c.name: c.autoscaling is not None for c in config.classes}
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        if not route.path.startswith("/"):
            raise InvalidArgument(f"{where}.path: {route.path!r} must start with /")
        if route.path in paths:
            raise InvalidArgument(f"{where}.path: {route.path!r} is routed twice")
        paths.add(route.path)
        if route.class_name not in names:
            raise InvalidArgument(f"{where}.class_name: no class named {route.class_name!r}")
        pool = pools[route.class_name]
        if route.instance is None and not pool:
            raise InvalidArgument(f"{where}.instance: missing; class {route.class_name} is no pool")
        if route.instance is not None and pool:
            raise InvalidArgument(
                f"{where}.instance: class {route.class_name} is a pool: its routes take no "
                "instance key"
            )


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
    ):
        self.store = store
        self.view = view
        self.node_ttl_s = node_ttl_s
        self.default_region = default_region
        self.lifecycle = lifecycle
        self.events = events
        self.usage = UsageLedger(store)

    @_statuses
    async def Deploy(self, request: cp.DeployRequest, context: Any) -> cp.DeployResponse:
        try:
            config = config_from_pb(request.config)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        validate_config(config)
        # Write the new classes and routes, then delete what the new config no longer has.
        # Not one transaction: a watcher may briefly see a mix, never a route without its class.
        for cls in config.classes:
            await self.store.put(records.class_key(cls.name), records.encode_class(cls))
        new_route_keys = set()
        for i, route in enumerate(config.routes):
            key = records.route_key(i)
            new_route_keys.add(key)
            await self.store.put(key, records.encode_route(route))
        old_routes, _ = await self.store.range(records.ROUTES)
        for kv in old_routes:
            if kv.key not in new_route_keys:
                await self.store.delete(kv.key)
        class_names = {c.name for c in config.classes}
        old_classes, _ = await self.store.range(records.CLASSES)
        for kv in old_classes:
            if kv.key[len(records.CLASSES) :] not in class_names:
                await self.store.delete(kv.key)
        DEPLOYS.inc()
        log.info("deployed %d classes, %d routes", len(config.classes), len(config.routes))
        return cp.DeployResponse(classes=len(config.classes), routes=len(config.routes))

    @_statuses
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

    @_statuses
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
            )
            result = "placed" if resolved.placed else "found"
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

    @_statuses
    async def ListNodes(self, request: cp.ListNodesRequest, context: Any) -> cp.ListNodesResponse:
        out = []
        for node_id in sorted(self.view.nodes):
            use = self.view.use_of(node_id)
            out.append(
                cp.NodeInfo(
                    node=node_to_pb(self.view.nodes[node_id]),
                    alive=True,
                    used_vcpu=use.vcpu,
                    used_memory_mib=use.memory_mib,
                    instances=use.instances,
                )
            )
        return cp.ListNodesResponse(nodes=out)

    @_statuses
    async def ListInstances(
        self, request: cp.ListInstancesRequest, context: Any
    ) -> cp.ListInstancesResponse:
        if request.state and request.state not in _STATES:
            raise InvalidArgument(f"state: {request.state!r} is not one of {', '.join(_STATES)}")
        out = []
        for r in sorted(self.view.instances.values(), key=lambda r: (r.class_name, r.name)):
            if request.class_name and r.class_name != request.class_name:
                continue
            if request.node_id and r.node_id != request.node_id:
                continue
            info = self._listed_info(r)
            if request.state and info.state != request.state:
                continue
            out.append(
                cp.PlacedInstance(
                    class_name=r.class_name,
                    name=r.name,
                    instance_id=r.instance_id,
                    node_id=r.node_id,
                    placed_at=r.placed_at,
                    info=info,
                )
            )
        return cp.ListInstancesResponse(instances=out)

    def _listed_info(self, r: records.InstanceRecord) -> pb.InstanceInfo:
        """An instance as its node's last heartbeat reported it: cheap, for listing many (GetState
        asks the agent). Not reported, or its node gone: stopped."""
        node = self.view.nodes.get(r.node_id)
        stat = self.view.stat_of(r)
        return pb.InstanceInfo(
            class_name=r.class_name,
            name=r.name,
            instance_id=r.instance_id,
            state=_LISTED_STATE.get(stat.state, stat.state) if stat else "stopped",
            node_id=r.node_id,
            region=node.region if node else "",
            pool=r.pool,
            in_flight=stat.in_flight if stat else 0,
        )

    @_statuses
    async def GetUsage(self, request: cp.GetUsageRequest, context: Any) -> cp.GetUsageResponse:
        days = await self.usage.read(request.class_name, request.since)
        return cp.GetUsageResponse(
            usage=[
                cp.ClassUsage(
                    class_name=d.class_name,
                    day=d.day,
                    running_ms=d.use.running_ms,
                    vcpu_seconds=d.use.vcpu_seconds,
                    memory_gib_seconds=d.use.memory_gib_seconds,
                    disk_gb_seconds=d.use.disk_gb_seconds,
                    cpu_seconds_used=d.use.cpu_seconds_used,
                    egress_bytes=d.use.egress_bytes,
                )
                for d in days
            ]
        )

    @_statuses
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
        Each reply lists the pool instances the node should run."""
        HEARTBEAT_STREAMS.inc()
        lease = 0
        node: Node | None = None
        written: dict[str, records.InstanceStat] | None = None
        try:
            async for message in request_iterator:
                if node is None:
                    if not message.HasField("node") or not message.node.id:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "the first heartbeat must carry the node",
                        )
                    node = node_from_pb(message.node)
                    try:
                        geo.lookup(node.region)
                    except PortsideError as exc:
                        await context.abort(grpc_code(exc), f"node {node.id}: {exc}")
                    lease = await self.store.grant_lease(self.node_ttl_s)
                    log.info(
                        "node %s joined (%s, %s, %.2f vCPU, %d MiB)",
                        node.id,
                        node.region,
                        node.data_address,
                        node.vcpu,
                        node.memory_mib,
                    )
                elif not await self.store.refresh_lease(lease):
                    # The lease expired (a long pause, or a store failover): register again.
                    lease = await self.store.grant_lease(self.node_ttl_s)
                    written = None
                    log.warning("node %s lease had expired; renewed", node.id)
                for event in message.events:
                    await self.events.record(_event_from_pb(event, node.id))
                if message.usage:
                    # Before the reply, which acknowledges it: a failure breaks the stream and
                    # the agent sends the batch again (added once per key, by its sequence).
                    await self.usage.add(
                        message.usage_source, message.usage_sequence, _usage_from_pb(message)
                    )
                stats = _stats(message)
                if stats != written:
                    # Capacity follows awake instances and the autoscaler follows CPU: publish.
                    await self.store.put(
                        records.node_key(node.id), records.encode_node(node, stats), lease
                    )
                    written = stats
                yield cp.NodeHeartbeatResponse(
                    lease_ttl_seconds=self.node_ttl_s, pool=self._assignments(node.id)
                )
            if node is not None:
                await self.store.revoke_lease(lease)
                log.info("node %s left", node.id)
        finally:
            HEARTBEAT_STREAMS.dec()

    def _assignments(self, node_id: str) -> list[pb.PoolAssignment]:
        return [
            pb.PoolAssignment(
                class_name=r.class_name, name=r.name, instance_id=r.instance_id, draining=r.draining
            )
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

    def _pool_members(self) -> list[pb.PoolMember]:
        out = []
        for rec in self.view.pool_members():
            node = self.view.nodes[rec.node_id]
            stat = self.view.stat_of(rec)
            out.append(
                pb.PoolMember(
                    class_name=rec.class_name,
                    name=rec.name,
                    instance_id=rec.instance_id,
                    node_id=node.id,
                    data_address=node.data_address,
                    region=node.region,
                    latitude=node.latitude,
                    longitude=node.longitude,
                    draining=rec.draining,
                    ready=stat is not None and stat.state == "running",
                )
            )
        return out

    @_statuses
    async def ReportDemand(
        self, request: cp.ReportDemandRequest, context: Any
    ) -> cp.ReportDemandResponse:
        if not request.edge_id:
            raise InvalidArgument("edge_id: must not be empty")
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

    @_statuses
    async def Start(self, request: cp.StartRequest, context: Any) -> cp.StartResponse:
        info = await self.lifecycle.start(
            request.instance.class_name,
            request.instance.name,
            entrypoint=request.entrypoint,
            env=request.env,
            location_hint=request.location_hint,
            no_wait=request.no_wait,
        )
        return cp.StartResponse(info=info)

    @_statuses
    async def Stop(self, request: cp.StopRequest, context: Any) -> cp.StopResponse:
        if request.grace_seconds < 0:
            raise InvalidArgument(f"grace_seconds: {request.grace_seconds} is negative")
        info = await self.lifecycle.stop(
            request.instance.class_name,
            request.instance.name,
            signal=request.signal,
            grace_s=request.grace_seconds,
        )
        return cp.StopResponse(info=info)

    @_statuses
    async def Signal(self, request: cp.SignalRequest, context: Any) -> cp.SignalResponse:
        await self.lifecycle.signal(
            request.instance.class_name, request.instance.name, request.signal
        )
        return cp.SignalResponse()

    @_statuses
    async def Destroy(self, request: cp.DestroyRequest, context: Any) -> cp.DestroyResponse:
        await self.lifecycle.destroy(request.instance.class_name, request.instance.name)
        return cp.DestroyResponse()

    @_statuses
    async def GetState(self, request: cp.GetStateRequest, context: Any) -> cp.GetStateResponse:
        info = await self.lifecycle.get_state(request.instance.class_name, request.instance.name)
        return cp.GetStateResponse(info=info)

    @_statuses
    async def RenewActivity(
        self, request: cp.RenewActivityRequest, context: Any
    ) -> cp.RenewActivityResponse:
        await self.lifecycle.renew_activity(request.instance.class_name, request.instance.name)
        return cp.RenewActivityResponse()

    @_stream_statuses
    def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Any
    ) -> AsyncGenerator[pb.ExecResponse, None]:
        return self.lifecycle.exec(request_iterator)

    @_stream_statuses
    def Logs(self, request: pb.LogsRequest, context: Any) -> AsyncGenerator[pb.LogsResponse, None]:
        return self.lifecycle.logs(request)

    @_stream_statuses
    async def WatchEvents(
        self, request: cp.WatchEventsRequest, context: Any
    ) -> AsyncGenerator[pb.Event, None]:
        if request.name and not request.class_name:
            raise InvalidArgument("class_name: required when name is given")
        iid = instance_id(request.class_name, request.name) if request.name else ""
        prefix = records.events_prefix(request.class_name, iid)
        try:
            async for stored in watch_events(self.store, prefix, request.after_revision):
                yield _event_to_pb(stored.revision, stored.event)
        except Compacted as exc:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"after_revision {request.after_revision} is no longer in the store's history "
                f"({exc}); watch from 0 (now) and read current states with GetState",
            )
        except StoreError as exc:
            # The store closed or failed under the watch: the client should reconnect.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"event watch ended: {exc}")

    @_statuses
    async def GetStateValue(
        self, request: cp.GetStateValueRequest, context: Any
    ) -> cp.GetStateValueResponse:
        value = await self.lifecycle.get_value(
            request.instance.class_name, request.instance.name, request.key
        )
        return cp.GetStateValueResponse(value=value)

    @_statuses
    async def PutStateValue(
        self, request: cp.PutStateValueRequest, context: Any
    ) -> cp.PutStateValueResponse:
        await self.lifecycle.put_value(
            request.instance.class_name, request.instance.name, request.key, request.value
        )
        return cp.PutStateValueResponse()

    @_statuses
    async def DeleteStateValue(
        self, request: cp.DeleteStateValueRequest, context: Any
    ) -> cp.DeleteStateValueResponse:
        existed = await self.lifecycle.delete_value(
            request.instance.class_name, request.instance.name, request.key
        )
        return cp.DeleteStateValueResponse(existed=existed)


def _event_from_pb(m: pb.Event, node_id: str) -> EventRecord:
    return EventRecord(
        kind=m.kind,
        time=m.time or time.time(),
        class_name=m.class_name,
        name=m.name,
        instance_id=m.instance_id or instance_id(m.class_name, m.name),
        node_id=m.node_id or node_id,
        exit_code=m.exit_code if m.HasField("exit_code") else None,
        signal=m.signal if m.HasField("signal") else None,
        reason=m.reason,
    )


def _event_to_pb(revision: int, e: EventRecord) -> pb.Event:
    return pb.Event(
        revision=revision,
        time=e.time,
        kind=e.kind,
        class_name=e.class_name,
        name=e.name,
        instance_id=e.instance_id,
        node_id=e.node_id,
        exit_code=e.exit_code,
        signal=e.signal,
        reason=e.reason,
    )


def _usage_from_pb(message: cp.NodeHeartbeatRequest) -> list[UsageReport]:
    return [
        UsageReport(
            class_name=u.class_name,
            instance_id=u.instance_id,
            day=u.day,
            use=Use(
                running_ms=u.running_ms,
                vcpu_seconds=u.vcpu_seconds,
                memory_gib_seconds=u.memory_gib_seconds,
                disk_gb_seconds=u.disk_gb_seconds,
                cpu_seconds_used=u.cpu_seconds_used,
                egress_bytes=u.egress_bytes,
            ),
        )
        for u in message.usage
    ]


def _stats(message: cp.NodeHeartbeatRequest) -> dict[str, records.InstanceStat]:
    return {
        s.instance_id: records.InstanceStat(
            state=s.state,
            cpu_percent=round(s.cpu_percent, 1) if s.HasField("cpu_percent") else None,
            memory_bytes=s.memory_bytes,
            in_flight=s.in_flight,
            pool=s.pool,
        )
        for s in message.instances
    }


def _peer_host(context: Any) -> str:
    """The caller's IP, where the gRPC context knows it ("" for fakes in unit tests)."""
    peer = getattr(context, "peer", None)
    return peer_host(peer()) if callable(peer) else ""
