"""Conversion between protobuf messages and Portside's domain types, at the gRPC boundary: one
function each way per type. The logic above this module never sees a `_pb2` type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import types_pb2 as pb
from portside.capacity import Resources
from portside.client._models import ExecChunk, LogChunk, Rollout, Schedule
from portside.events import Event, EventKind
from portside.instances import InstanceInfo, InstanceStatus, PoolAssignment, PoolMember
from portside.routechanges import RouteChange, RouteChangeKind, RouteUpdate
from portside.snapshots import Snapshot
from portside.spec import (
    DEFAULT_GATEWAY_DEADLINE_S,
    DEFAULT_HEALTH_CHECK_FAILURES,
    DEFAULT_HEALTH_CHECK_INTERVAL_S,
    DEFAULT_HEALTH_CHECK_TIMEOUT_S,
    DEFAULT_PAUSE_MAX_S,
    DEFAULT_ROLLOUT_HEALTH_DEADLINE_S,
    DEFAULT_SNAPSHOT_KEEP,
    DEFAULT_SNAPSHOT_RETENTION_S,
    DEFAULT_STOP_TIMEOUT_S,
    Autoscaling,
    Config,
    Constraints,
    ContainerClass,
    Gateway,
    InstanceSource,
    InstanceSourceKind,
    InstanceType,
    Node,
    NodeInfo,
    OutboundPolicy,
    RateLimit,
    Route,
)
from portside.states import InstanceState
from portside.terminal import DEFAULT_SIZE, TerminalSize
from portside.tokens import Role, TokenRecord
from portside.usage import Usage


def instance_type_to_pb(t: InstanceType) -> pb.InstanceType:
    return pb.InstanceType(name=t.name, vcpu=t.vcpu, memory_mib=t.memory_mib, disk_mb=t.disk_mb)


def instance_type_from_pb(m: pb.InstanceType) -> InstanceType:
    return InstanceType(name=m.name, vcpu=m.vcpu, memory_mib=m.memory_mib, disk_mb=m.disk_mb)


def autoscaling_to_pb(a: Autoscaling) -> pb.Autoscaling:
    return pb.Autoscaling(
        minimum_instances=a.minimum_instances,
        maximum_instances=a.maximum_instances,
        cpu_target=a.cpu_target,
        scale_down_delay_seconds=a.scale_down_delay_s,
        concurrency_limit=a.concurrency_limit,
    )


def autoscaling_from_pb(m: pb.Autoscaling) -> Autoscaling:
    return Autoscaling(
        minimum_instances=m.minimum_instances,
        maximum_instances=m.maximum_instances,
        cpu_target=m.cpu_target,
        scale_down_delay_s=m.scale_down_delay_seconds,
        concurrency_limit=m.concurrency_limit,
    )


def class_to_pb(c: ContainerClass) -> pb.ContainerClass:
    msg = _class_to_pb(c)
    if c.autoscaling is not None:
        msg.autoscaling.CopyFrom(autoscaling_to_pb(c.autoscaling))
    if c.constraints:
        msg.constraints.CopyFrom(
            pb.Constraints(
                regions=list(c.constraints.regions),
                jurisdiction=c.constraints.jurisdiction,
                jurisdiction_regions=list(c.constraints.jurisdiction_regions),
                labels=dict(c.constraints.labels),
            )
        )
    return msg


def _class_to_pb(c: ContainerClass) -> pb.ContainerClass:
    return pb.ContainerClass(
        name=c.name,
        image=c.image,
        default_port=c.default_port,
        instance_type=instance_type_to_pb(c.instance_type),
        sleep_after_seconds=c.sleep_after_s,
        max_instances=c.max_instances,
        env=dict(c.env),
        entrypoint=list(c.entrypoint),
        enable_internet=c.enable_internet,
        boot_timeout_seconds=c.boot_timeout_s,
        image_digest=c.image_digest,
        ping_endpoint=c.ping_endpoint,
        health_check_interval_seconds=c.health_check_interval_s,
        health_check_failures=c.health_check_failures,
        health_check_timeout_seconds=c.health_check_timeout_s,
        version=c.version,
        rollout_step_percentage=list(c.rollout_step_percentage),
        rollout_active_grace_period_seconds=c.rollout_active_grace_period_s,
        rollout_health_deadline_seconds=c.rollout_health_deadline_s,
        rollout_on_unhealthy=c.rollout_on_unhealthy,
        stop_timeout_seconds=c.stop_timeout_s,
        wake_min_version=c.wake_min_version,
        sleep_mode=c.sleep_mode,
        pause_max_seconds=c.pause_max_s,
        snapshot_on_sleep=c.snapshot_on_sleep,
        snapshot_retention_seconds=c.snapshot_retention_s,
        snapshot_keep=c.snapshot_keep,
        binding=c.binding,
        allowed_hosts=list(c.allowed_hosts),
        denied_hosts=list(c.denied_hosts),
        outbound_by_host=dict(c.outbound_by_host),
        intercept_https=c.intercept_https,
    )


def class_from_pb(m: pb.ContainerClass) -> ContainerClass:
    return ContainerClass(
        name=m.name,
        image=m.image,
        default_port=m.default_port,
        instance_type=instance_type_from_pb(m.instance_type),
        sleep_after_s=m.sleep_after_seconds,
        max_instances=m.max_instances,
        env=dict(m.env),
        entrypoint=tuple(m.entrypoint),
        enable_internet=m.enable_internet,
        boot_timeout_s=m.boot_timeout_seconds,
        autoscaling=autoscaling_from_pb(m.autoscaling) if m.HasField("autoscaling") else None,
        image_digest=m.image_digest,
        # The path as sent ("": no checks); 0 is what a sender that predates the checks sends.
        ping_endpoint=m.ping_endpoint,
        health_check_interval_s=m.health_check_interval_seconds or DEFAULT_HEALTH_CHECK_INTERVAL_S,
        health_check_failures=m.health_check_failures or DEFAULT_HEALTH_CHECK_FAILURES,
        health_check_timeout_s=m.health_check_timeout_seconds or DEFAULT_HEALTH_CHECK_TIMEOUT_S,
        version=m.version,
        # 0 and "" are what a sender that predates rollouts sends: the defaults.
        rollout_step_percentage=tuple(m.rollout_step_percentage),
        rollout_active_grace_period_s=m.rollout_active_grace_period_seconds,
        rollout_health_deadline_s=(
            m.rollout_health_deadline_seconds or DEFAULT_ROLLOUT_HEALTH_DEADLINE_S
        ),
        rollout_on_unhealthy=m.rollout_on_unhealthy or "rollback",  # validate_config checks it
        stop_timeout_s=m.stop_timeout_seconds or DEFAULT_STOP_TIMEOUT_S,
        wake_min_version=m.wake_min_version,
        # "" and 0 are what a sender that predates issue 13 sends: the defaults.
        sleep_mode=m.sleep_mode or "stop",  # validate_config checks it
        pause_max_s=m.pause_max_seconds or DEFAULT_PAUSE_MAX_S,
        snapshot_on_sleep=m.snapshot_on_sleep,
        snapshot_retention_s=m.snapshot_retention_seconds or DEFAULT_SNAPSHOT_RETENTION_S,
        snapshot_keep=m.snapshot_keep or DEFAULT_SNAPSHOT_KEEP,
        binding=m.binding,
        allowed_hosts=tuple(m.allowed_hosts),
        denied_hosts=tuple(m.denied_hosts),
        outbound_by_host=dict(m.outbound_by_host),
        intercept_https=m.intercept_https,
        constraints=Constraints(
            regions=tuple(m.constraints.regions),
            jurisdiction=m.constraints.jurisdiction,
            jurisdiction_regions=tuple(m.constraints.jurisdiction_regions),
            labels=dict(m.constraints.labels),
        ),
    )


def outbound_to_pb(o: OutboundPolicy) -> pb.OutboundPolicy:
    return pb.OutboundPolicy(
        enable_internet=o.enable_internet,
        allowed_hosts=list(o.allowed_hosts),
        denied_hosts=list(o.denied_hosts),
        outbound_by_host=dict(o.outbound_by_host),
        intercept_https=o.intercept_https,
    )


def outbound_from_pb(m: pb.OutboundPolicy) -> OutboundPolicy:
    return OutboundPolicy(
        enable_internet=m.enable_internet,
        allowed_hosts=tuple(m.allowed_hosts),
        denied_hosts=tuple(m.denied_hosts),
        outbound_by_host=dict(m.outbound_by_host),
        intercept_https=m.intercept_https,
    )


def route_to_pb(r: Route) -> pb.Route:
    msg = pb.Route(path=r.path, class_name=r.class_name, gateway=r.gateway)
    if r.instance is not None:
        msg.instance.CopyFrom(
            pb.InstanceSource(kind=r.instance.kind, name=r.instance.name, index=r.instance.index)
        )
    return msg


_SOURCE_KINDS: dict[str, InstanceSourceKind] = {
    "header": "header",
    "query": "query",
    "cookie": "cookie",
    "path": "path",
}


def route_from_pb(m: pb.Route) -> Route:
    source = None
    if m.HasField("instance"):
        kind = _SOURCE_KINDS.get(m.instance.kind)
        if kind is None:
            raise ValueError(
                f"route {m.path}: instance kind {m.instance.kind!r} is not "
                "header, query, cookie or path"
            )
        source = InstanceSource(kind=kind, name=m.instance.name, index=m.instance.index)
    return Route(path=m.path, class_name=m.class_name, instance=source, gateway=m.gateway)


def gateway_to_pb(g: Gateway) -> pb.Gateway:
    return pb.Gateway(
        module=g.module,
        source=g.source,
        digest=g.digest,
        vars=dict(g.vars),
        rate_limits=[
            pb.RateLimit(binding=r.binding, limit=r.limit, period_seconds=r.period_s)
            for r in g.rate_limits
        ],
        deadline_seconds=g.deadline_s,
    )


def gateway_from_pb(m: pb.Gateway) -> Gateway:
    return Gateway(
        module=m.module,
        source=m.source,
        vars=dict(m.vars),
        rate_limits=tuple(
            RateLimit(binding=r.binding, limit=r.limit, period_s=r.period_seconds)
            for r in m.rate_limits
        ),
        deadline_s=m.deadline_seconds or DEFAULT_GATEWAY_DEADLINE_S,
    )


def config_to_pb(c: Config) -> pb.Config:
    msg = pb.Config(
        classes=[class_to_pb(x) for x in c.classes], routes=[route_to_pb(r) for r in c.routes]
    )
    if c.gateway is not None:
        msg.gateway.CopyFrom(gateway_to_pb(c.gateway))
    return msg


def config_from_pb(m: pb.Config) -> Config:
    return Config(
        classes=tuple(class_from_pb(x) for x in m.classes),
        routes=tuple(route_from_pb(r) for r in m.routes),
        gateway=gateway_from_pb(m.gateway) if m.HasField("gateway") else None,
    )


def node_to_pb(n: Node) -> pb.Node:
    return pb.Node(
        id=n.id,
        data_address=n.data_address,
        api_address=n.api_address,
        region=n.region,
        latitude=n.latitude,
        longitude=n.longitude,
        vcpu=n.vcpu,
        memory_mib=n.memory_mib,
        labels=dict(n.labels),
        metrics_address=n.metrics_address,
    )


def node_from_pb(m: pb.Node) -> Node:
    return Node(
        id=m.id,
        data_address=m.data_address,
        api_address=m.api_address,
        region=m.region,
        latitude=m.latitude,
        longitude=m.longitude,
        vcpu=m.vcpu,
        memory_mib=m.memory_mib,
        labels=dict(m.labels),
        metrics_address=m.metrics_address,
    )


def node_info_to_pb(n: NodeInfo) -> cp.NodeInfo:
    return cp.NodeInfo(
        node=node_to_pb(n.node),
        alive=n.alive,
        used_vcpu=n.used.vcpu,
        used_memory_mib=n.used.memory_mib,
        instances=n.instances,
    )


def node_info_from_pb(m: cp.NodeInfo) -> NodeInfo:
    return NodeInfo(
        node=node_from_pb(m.node),
        alive=m.alive,
        used=Resources(m.used_vcpu, m.used_memory_mib),
        instances=m.instances,
    )


def instance_info_to_pb(i: InstanceInfo) -> pb.InstanceInfo:
    msg = pb.InstanceInfo(
        class_name=i.class_name,
        name=i.name,
        instance_id=i.instance_id,
        state=i.state.value,
        node_id=i.node_id,
        region=i.region,
        since=i.since,
        pool=i.pool,
        in_flight=i.in_flight,
        backoff_until=i.backoff_until,
        restarts=i.restarts,
        version=i.version,
    )
    if i.exit_code is not None:
        msg.exit_code = i.exit_code
    return msg


def instance_info_from_pb(m: pb.InstanceInfo) -> InstanceInfo:
    return InstanceInfo(
        class_name=m.class_name,
        name=m.name,
        instance_id=m.instance_id,
        state=InstanceState.parse(m.state, "InstanceInfo.state"),
        exit_code=m.exit_code if m.HasField("exit_code") else None,
        node_id=m.node_id,
        region=m.region,
        since=m.since,
        pool=m.pool,
        in_flight=m.in_flight,
        backoff_until=m.backoff_until,
        restarts=m.restarts,
        version=m.version,
    )


def instance_status_to_pb(s: InstanceStatus) -> pb.InstanceStatus:
    msg = pb.InstanceStatus(info=instance_info_to_pb(s.info), memory_bytes=s.memory_bytes)
    if s.cpu_percent is not None:
        msg.cpu_percent = s.cpu_percent
    return msg


def instance_status_from_pb(m: pb.InstanceStatus) -> InstanceStatus:
    return InstanceStatus(
        info=instance_info_from_pb(m.info),
        cpu_percent=m.cpu_percent if m.HasField("cpu_percent") else None,
        memory_bytes=m.memory_bytes,
    )


def event_to_pb(e: Event) -> pb.Event:
    msg = pb.Event(
        revision=e.revision,
        time=e.time,
        kind=e.kind.value,
        class_name=e.class_name,
        name=e.name,
        instance_id=e.instance_id,
        node_id=e.node_id,
        reason=e.reason,
    )
    if e.exit_code is not None:
        msg.exit_code = e.exit_code
    if e.signal is not None:
        msg.signal = e.signal
    return msg


def event_from_pb(m: pb.Event) -> Event:
    try:
        kind = EventKind(m.kind)
    except ValueError:
        raise ValueError(f"event kind {m.kind!r} is not one of {', '.join(EventKind)}") from None
    return Event(
        kind=kind,
        time=m.time,
        class_name=m.class_name,
        name=m.name,
        instance_id=m.instance_id,
        node_id=m.node_id,
        exit_code=m.exit_code if m.HasField("exit_code") else None,
        signal=m.signal if m.HasField("signal") else None,
        reason=m.reason,
        revision=m.revision,
    )


def usage_to_pb(u: Usage) -> pb.Usage:
    return _flat_to_pb(u, pb.Usage)


def usage_from_pb(m: pb.Usage) -> Usage:
    return _flat_from_pb(m, Usage)


def token_info_to_pb(t: TokenRecord) -> cp.TokenInfo:
    """A token as it is listed: never its secret, nor the secret's digest."""
    return cp.TokenInfo(
        id=t.id,
        kind=t.kind,
        name=t.name,
        role=t.role.value if t.role else "",
        classes=list(t.classes),
        created=t.created,
        expires=t.expires,
    )


def token_info_from_pb(m: cp.TokenInfo) -> TokenRecord:
    """A listed token; its `digest` is "" (the control plane never sends it)."""
    return TokenRecord(
        id=m.id,
        kind="join" if m.kind == "join" else "api",
        name=m.name,
        digest="",
        created=m.created,
        role=Role(m.role) if m.role else None,
        classes=tuple(m.classes),
        expires=m.expires,
    )


def pool_member_to_pb(p: PoolMember) -> pb.PoolMember:
    return _flat_to_pb(p, pb.PoolMember)


def pool_member_from_pb(m: pb.PoolMember) -> PoolMember:
    return _flat_from_pb(m, PoolMember)


def pool_assignment_to_pb(a: PoolAssignment) -> pb.PoolAssignment:
    return _flat_to_pb(a, pb.PoolAssignment)


def pool_assignment_from_pb(m: pb.PoolAssignment) -> PoolAssignment:
    return _flat_from_pb(m, PoolAssignment)


def snapshot_to_pb(s: Snapshot) -> pb.Snapshot:
    return _flat_to_pb(s, pb.Snapshot)


def snapshot_from_pb(m: pb.Snapshot) -> Snapshot:
    return _flat_from_pb(m, Snapshot)


def schedule_to_pb(s: Schedule) -> cp.ScheduleInfo:
    return cp.ScheduleInfo(
        id=s.id,
        instance=pb.InstanceRef(class_name=s.class_name, name=s.name),
        at=s.at,
        every_seconds=s.every_s,
        path=s.path,
        method=s.method,
        command=list(s.command),
        no_wake=s.no_wake,
        no_activity=s.no_activity,
        created_at=s.created_at,
        next_run=s.next_run,
        last_run=s.last_run,
        last_result=s.last_result,
        runs=s.runs,
    )


def schedule_from_request(m: cp.ScheduleRequest | cp.ScheduleInfo) -> Schedule:
    """The schedule a Schedule call asks for (unchecked: controlplane.schedules checks it), or
    the part of a ScheduleInfo that a request gives."""
    return Schedule(
        id=m.id,
        class_name=m.instance.class_name,
        name=m.instance.name,
        at=m.at,
        every_s=m.every_seconds,
        path=m.path,
        method=m.method,
        command=tuple(m.command),
        no_wake=m.no_wake,
        no_activity=m.no_activity,
    )


def schedule_from_pb(m: cp.ScheduleInfo) -> Schedule:
    return dataclasses.replace(
        schedule_from_request(m),
        created_at=m.created_at,
        next_run=m.next_run,
        last_run=m.last_run,
        last_result=m.last_result,
        runs=m.runs,
    )


# Types whose fields are all scalars named as in their message convert field by field.
_M = TypeVar("_M", bound=Message)
_D = TypeVar("_D")


def _flat_to_pb(value: Any, message_type: type[_M]) -> _M:
    return message_type(**{f.name: getattr(value, f.name) for f in dataclasses.fields(value)})


def _flat_from_pb(m: Message, cls: type[_D]) -> _D:
    return cls(**{f.name: getattr(m, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def rollout_to_pb(r: Rollout) -> cp.Rollout:
    return cp.Rollout(
        class_name=r.class_name,
        to_version=r.to_version,
        from_versions=list(r.from_versions),
        mode=r.mode,
        steps=list(r.steps),
        step=r.step,
        state=r.state,
        reason=r.reason,
        started_at=r.started_at,
        step_started_at=r.step_started_at,
        instances=r.instances,
        updated=r.updated,
        healthy=r.healthy,
    )


def rollout_from_pb(m: cp.Rollout) -> Rollout:
    return Rollout(
        class_name=m.class_name,
        to_version=m.to_version,
        from_versions=tuple(m.from_versions),
        mode=m.mode,
        steps=tuple(m.steps) or (100,),
        step=m.step,
        state=m.state,
        reason=m.reason,
        started_at=m.started_at,
        step_started_at=m.step_started_at,
        instances=m.instances,
        updated=m.updated,
        healthy=m.healthy,
    )


def exec_chunk_from_pb(m: pb.ExecResponse) -> ExecChunk | None:
    which = m.WhichOneof("message")
    if which == "stdout":
        return ExecChunk("stdout", m.stdout)
    if which == "stderr":
        return ExecChunk("stderr", m.stderr)
    if which == "exit_code":
        return ExecChunk("exit", exit_code=m.exit_code)
    return None


def terminal_size_to_pb(size: TerminalSize) -> pb.TerminalSize:
    return pb.TerminalSize(rows=size.rows, cols=size.cols)


def terminal_size_from_pb(m: pb.TerminalSize) -> TerminalSize:
    """An unset (or zero) size is the API's default, 80x24."""
    return TerminalSize(m.rows, m.cols) if m.rows and m.cols else DEFAULT_SIZE


def log_chunks_from_pb(m: pb.LogsResponse) -> list[LogChunk]:
    out = []
    if m.stdout:
        out.append(LogChunk("stdout", m.stdout))
    if m.stderr:
        out.append(LogChunk("stderr", m.stderr))
    return out


_ROUTE_CHANGE_KINDS = {
    RouteChangeKind.NODE_LOST: cp.RouteChange.NODE_LOST,
    RouteChangeKind.INSTANCE_MOVED: cp.RouteChange.INSTANCE_MOVED,
    RouteChangeKind.INSTANCE_REMOVED: cp.RouteChange.INSTANCE_REMOVED,
}
_ROUTE_CHANGE_KINDS_FROM_PB = {v: k for k, v in _ROUTE_CHANGE_KINDS.items()}


def route_update_to_pb(u: RouteUpdate) -> cp.WatchRoutesResponse:
    return cp.WatchRoutesResponse(
        reset=u.reset,
        live_nodes=u.live_nodes,
        revision=u.revision,
        changes=[
            cp.RouteChange(
                kind=_ROUTE_CHANGE_KINDS[c.kind],
                node_id=c.node_id,
                class_name=c.class_name,
                instance_name=c.instance_name,
            )
            for c in u.changes
        ],
    )


def route_update_from_pb(m: cp.WatchRoutesResponse) -> RouteUpdate:
    """Changes of a kind this version does not know are left out (a newer control plane)."""
    return RouteUpdate(
        revision=m.revision,
        reset=m.reset,
        live_nodes=tuple(m.live_nodes),
        changes=tuple(
            RouteChange(
                _ROUTE_CHANGE_KINDS_FROM_PB[c.kind], c.node_id, c.class_name, c.instance_name
            )
            for c in m.changes
            if c.kind in _ROUTE_CHANGE_KINDS_FROM_PB
        ),
    )


#: Calls of a gateway rate limiter (issue 14) by (binding, key, period index), the period index
#: being floor(unix time / the limiter's period): what SyncRateLimits carries both ways.
RateCounts = dict[tuple[str, str, int], int]


def rate_counts_to_pb(counts: Mapping[tuple[str, str, int], int]) -> list[cp.RateCount]:
    return [
        cp.RateCount(binding=binding, key=key, period=period, count=count)
        for (binding, key, period), count in counts.items()
    ]


def rate_counts_from_pb(messages: Iterable[cp.RateCount]) -> RateCounts:
    """Counts by slot; a slot named twice counts both."""
    out: RateCounts = {}
    for m in messages:
        slot = (m.binding, m.key, m.period)
        out[slot] = out.get(slot, 0) + m.count
    return out
