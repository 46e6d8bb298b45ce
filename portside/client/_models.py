"""The SDK's value types: small frozen dataclasses built from the API's messages.

Users only ever see these; the `*_from_pb` functions are the one place protobuf is read.
"""

from __future__ import annotations

import json as _json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import types_pb2 as pb

#: The states `InstanceInfo.state` can take.
INSTANCE_STATES = ("stopped", "starting", "running", "healthy", "stopping", "exited")

#: The kinds `Event.kind` can take.
EVENT_KINDS = (
    "placed",
    "starting",
    "ready",
    "activity-expired",
    "slept",
    "exited",
    "failed",
    "removed",
)


@dataclass(frozen=True)
class InstanceInfo:
    """Where a named instance is and what it is doing.

    `state` is one of stopped, starting, running, healthy (running and its port answers),
    stopping or exited (stopped by its own exit: see `exit_code`). `since` is the unix time of
    the last state change.
    """

    class_name: str
    name: str
    instance_id: str = ""
    state: str = ""
    exit_code: int | None = None
    node_id: str = ""
    region: str = ""
    since: float = 0.0
    pool: bool = False
    in_flight: int = 0

    @property
    def running(self) -> bool:
        """True while the container runs (whether or not its port answers yet)."""
        return self.state in ("running", "healthy")


@dataclass(frozen=True)
class Event:
    """One lifecycle event: placed, starting, ready, activity-expired, slept, exited, failed or
    removed. `revision` is where it sits in the store's history: watch from it to resume."""

    revision: int
    time: float
    kind: str
    class_name: str
    name: str
    instance_id: str = ""
    node_id: str = ""
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class ExecResult:
    """A finished command: its exit code and everything it wrote."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class ExecChunk:
    """A piece of a running command's output (`stream` "stdout" or "stderr", with `data`), or
    its end (`stream` "exit", with `exit_code`): the last chunk `exec_stream` yields."""

    stream: Literal["stdout", "stderr", "exit"]
    data: bytes = b""
    exit_code: int | None = None


@dataclass(frozen=True)
class LogChunk:
    """A piece of a container's output: `stream` is "stdout" or "stderr"."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class NodeInfo:
    """A host running a node agent: where it is, what it offers and how much is used."""

    id: str
    region: str
    data_address: str = ""
    api_address: str = ""
    latitude: float = 0.0
    longitude: float = 0.0
    vcpu: float = 0.0
    memory_mib: int = 0
    used_vcpu: float = 0.0
    used_memory_mib: int = 0
    instances: int = 0
    alive: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """What one class used on one UTC day (`day`, YYYY-MM-DD), metered by the agents in 10 ms
    steps of running time: provisioned vCPU-seconds, GiB-seconds of memory and GB-seconds of
    disk, the CPU its containers actually used, and bytes sent out (enable_internet classes)."""

    class_name: str
    day: str
    running_ms: int = 0
    vcpu_seconds: float = 0.0
    memory_gib_seconds: float = 0.0
    disk_gb_seconds: float = 0.0
    cpu_seconds_used: float = 0.0
    egress_bytes: int = 0

    def cost(
        self,
        per_vcpu_second: float = 0.000020,
        per_gib_second: float = 0.0000025,
        per_gb_second_disk: float = 0.00000007,
    ) -> float:
        """In dollars, at these prices (defaults: Cloudflare Containers')."""
        return (
            self.vcpu_seconds * per_vcpu_second
            + self.memory_gib_seconds * per_gib_second
            + self.disk_gb_seconds * per_gb_second_disk
        )


@dataclass(frozen=True)
class ClassInfo:
    """A deployed container class. `pool` is true for an autoscaled pool."""

    name: str
    image: str
    default_port: int = 0
    instance_type: str = ""
    vcpu: float = 0.0
    memory_mib: int = 0
    sleep_after: float = 0.0
    max_instances: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] = ()
    enable_internet: bool = False
    boot_timeout: float = 0.0
    pool: bool = False


@dataclass(frozen=True)
class DeployResult:
    """What `deploy` registered."""

    classes: int
    routes: int


@dataclass(frozen=True)
class Response:
    """An HTTP response from an edge, read in full.

    `error` is the edge's `Portside-Error` reason (e.g. "no-capacity") when Portside, not the
    container, answered.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def error(self) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == "portside-error":
                return value
        return None

    def json(self) -> Any:
        return _json.loads(self.body)


# --- from the API's messages (the only code here that reads protobuf) ---


def instance_info_from_pb(m: pb.InstanceInfo) -> InstanceInfo:
    return InstanceInfo(
        class_name=m.class_name,
        name=m.name,
        instance_id=m.instance_id,
        state=m.state,
        exit_code=m.exit_code if m.HasField("exit_code") else None,
        node_id=m.node_id,
        region=m.region,
        since=m.since,
        pool=m.pool,
        in_flight=m.in_flight,
    )


def placed_instance_from_pb(m: cp.PlacedInstance) -> InstanceInfo:
    """A listed instance: its reported state, completed from its placement."""
    info = instance_info_from_pb(m.info) if m.HasField("info") else None
    return InstanceInfo(
        class_name=m.class_name or (info.class_name if info else ""),
        name=m.name or (info.name if info else ""),
        instance_id=m.instance_id or (info.instance_id if info else ""),
        state=(info.state if info else "") or "unknown",
        exit_code=info.exit_code if info else None,
        node_id=m.node_id or (info.node_id if info else ""),
        region=info.region if info else "",
        since=(info.since if info else 0.0) or m.placed_at,
        pool=info.pool if info else False,
        in_flight=info.in_flight if info else 0,
    )


def event_from_pb(m: pb.Event) -> Event:
    return Event(
        revision=m.revision,
        time=m.time,
        kind=m.kind,
        class_name=m.class_name,
        name=m.name,
        instance_id=m.instance_id,
        node_id=m.node_id,
        exit_code=m.exit_code if m.HasField("exit_code") else None,
        signal=m.signal if m.HasField("signal") else None,
        reason=m.reason,
    )


def node_info_from_pb(m: cp.NodeInfo) -> NodeInfo:
    n = m.node
    return NodeInfo(
        id=n.id,
        region=n.region,
        data_address=n.data_address,
        api_address=n.api_address,
        latitude=n.latitude,
        longitude=n.longitude,
        vcpu=n.vcpu,
        memory_mib=n.memory_mib,
        used_vcpu=m.used_vcpu,
        used_memory_mib=m.used_memory_mib,
        instances=m.instances,
        alive=m.alive,
        labels=dict(n.labels),
    )


def usage_from_pb(m: cp.ClassUsage) -> Usage:
    return Usage(
        class_name=m.class_name,
        day=m.day,
        running_ms=m.running_ms,
        vcpu_seconds=m.vcpu_seconds,
        memory_gib_seconds=m.memory_gib_seconds,
        disk_gb_seconds=m.disk_gb_seconds,
        cpu_seconds_used=m.cpu_seconds_used,
        egress_bytes=m.egress_bytes,
    )


def class_info_from_pb(m: pb.ContainerClass) -> ClassInfo:
    return ClassInfo(
        name=m.name,
        image=m.image,
        default_port=m.default_port,
        instance_type=m.instance_type.name,
        vcpu=m.instance_type.vcpu,
        memory_mib=m.instance_type.memory_mib,
        sleep_after=m.sleep_after_seconds,
        max_instances=m.max_instances,
        env=dict(m.env),
        entrypoint=tuple(m.entrypoint),
        enable_internet=m.enable_internet,
        boot_timeout=m.boot_timeout_seconds,
        pool=m.HasField("autoscaling"),
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


def log_chunks_from_pb(m: pb.LogsResponse) -> list[LogChunk]:
    out = []
    if m.stdout:
        out.append(LogChunk("stdout", m.stdout))
    if m.stderr:
        out.append(LogChunk("stderr", m.stderr))
    return out
