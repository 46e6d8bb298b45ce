"""The control plane's gRPC service: deploy, config watch, resolve, listing, and node heartbeats.

Messages are converted to domain types here; PortsideErrors become gRPC statuses here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controlplane import records
from controlplane.metrics import DEPLOYS, HEARTBEAT_STREAMS, RESOLVE_SECONDS
from controlplane.placement import resolve_named_instance
from controlplane.store import Store
from controlplane.view import ClusterView
from portside import geo
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.convert import config_from_pb, config_to_pb, node_from_pb, node_to_pb
from portside.errors import InvalidArgument, PortsideError, grpc_code
from portside.spec import Config, Node

log = logging.getLogger(__name__)

R = TypeVar("R")


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
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        if not route.path.startswith("/"):
            raise InvalidArgument(f"{where}.path: {route.path!r} must start with /")
        if route.path in paths:
            raise InvalidArgument(f"{where}.path: {route.path!r} is routed twice")
        paths.add(route.path)
        if route.class_name not in names:
            raise InvalidArgument(f"{where}.class_name: no class named {route.class_name!r}")


class ControlPlaneService(cp_grpc.ControlPlaneServicer):
    def __init__(self, store: Store, view: ClusterView, *, node_ttl_s: int, default_region: str):
        self.store = store
        self.view = view
        self.node_ttl_s = node_ttl_s
        self.default_region = default_region

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
            resolved = await resolve_named_instance(
                self.store,
                self.view,
                request.class_name,
                request.instance_name,
                request.location_hint,
                self.default_region,
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
        out = [
            cp.PlacedInstance(
                class_name=r.class_name,
                name=r.name,
                instance_id=r.instance_id,
                node_id=r.node_id,
                placed_at=r.placed_at,
            )
            for r in sorted(self.view.instances.values(), key=lambda r: (r.class_name, r.name))
            if not request.class_name or r.class_name == request.class_name
        ]
        return cp.ListInstancesResponse(instances=out)

    async def NodeHeartbeat(
        self, request_iterator: AsyncIterator[cp.NodeHeartbeatRequest], context: Any
    ) -> AsyncIterator[cp.NodeHeartbeatResponse]:
        """The node's key lives under a lease that each message refreshes. A clean end of the
        stream (agent shutting down) revokes the lease at once; a broken one lets it expire."""
        HEARTBEAT_STREAMS.inc()
        lease = 0
        node: Node | None = None
        awake: frozenset[str] = frozenset()
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
                    awake = _awake(message)
                    await self.store.put(
                        records.node_key(node.id), records.encode_node(node, awake), lease
                    )
                    log.info(
                        "node %s joined (%s, %s, %.2f vCPU, %d MiB)",
                        node.id,
                        node.region,
                        node.data_address,
                        node.vcpu,
                        node.memory_mib,
                    )
                    yield cp.NodeHeartbeatResponse(lease_ttl_seconds=self.node_ttl_s)
                    continue
                now_awake = _awake(message)
                if not await self.store.refresh_lease(lease):
                    # The lease expired (a long pause, or a store failover): register again.
                    lease = await self.store.grant_lease(self.node_ttl_s)
                    awake = frozenset({"(renewed)"})  # forces the write below
                    log.warning("node %s lease had expired; renewed", node.id)
                if now_awake != awake:
                    # Capacity is accounted by awake instances: publish a change at once.
                    awake = now_awake
                    await self.store.put(
                        records.node_key(node.id), records.encode_node(node, awake), lease
                    )
            if node is not None:
                await self.store.revoke_lease(lease)
                log.info("node %s left", node.id)
        finally:
            HEARTBEAT_STREAMS.dec()


def _awake(message: cp.NodeHeartbeatRequest) -> frozenset[str]:
    return frozenset(s.instance_id for s in message.instances if s.state != "stopped")


async def await_view_ready(view: ClusterView) -> None:
    await asyncio.wait_for(view.ready.wait(), timeout=30)
