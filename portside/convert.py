"""Conversion between protobuf messages and Portside's domain types, at the gRPC boundary.

The logic above this module only sees `portside.spec` dataclasses, never a `_pb2` type.
"""

from __future__ import annotations

from portside.api.v1 import types_pb2 as pb
from portside.spec import (
    Autoscaling,
    Config,
    ContainerClass,
    InstanceSource,
    InstanceSourceKind,
    InstanceType,
    Node,
    Route,
)


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
    )


def route_to_pb(r: Route) -> pb.Route:
    msg = pb.Route(path=r.path, class_name=r.class_name)
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
    return Route(path=m.path, class_name=m.class_name, instance=source)


def config_to_pb(c: Config) -> pb.Config:
    return pb.Config(
        classes=[class_to_pb(x) for x in c.classes], routes=[route_to_pb(r) for r in c.routes]
    )


def config_from_pb(m: pb.Config) -> Config:
    return Config(
        classes=tuple(class_from_pb(x) for x in m.classes),
        routes=tuple(route_from_pb(r) for r in m.routes),
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
    )
