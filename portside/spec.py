"""The domain types every Portside part shares: container classes, routes, nodes.

Plain frozen dataclasses; protobuf messages are converted to these at the gRPC boundary.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from portside.capacity import Resources


@dataclass(frozen=True)
class InstanceType:
    """CPU, memory and disk one instance of a class gets (limits are enforced)."""

    name: str
    vcpu: float
    memory_mib: int
    disk_mb: int


# Cloudflare Containers' instance types, same names and sizes.
INSTANCE_TYPES: Mapping[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("lite", 1 / 16, 256, 2_000),
        InstanceType("basic", 1 / 4, 1_024, 4_000),
        InstanceType("standard-1", 1 / 2, 4_096, 8_000),
        InstanceType("standard-2", 1.0, 6_144, 12_000),
        InstanceType("standard-3", 2.0, 8_192, 16_000),
        InstanceType("standard-4", 4.0, 12_288, 20_000),
    )
}

DEFAULT_SLEEP_AFTER_S = 600.0
# Agents sample container CPU at wall-clock multiples of this and send each sample at once; the
# autoscaler ticks just after (controlplane.pools.SAMPLE_DELIVERY_S), so that every instance's
# sample covers the same interval.
CPU_SAMPLE_INTERVAL_S = 1.0
DEFAULT_BOOT_TIMEOUT_S = 30.0
# Health checks (Cloudflare's ping_endpoint): GET this path every interval; this many failures in
# a row make an instance unhealthy. The path's default answers 404 on most images, which passes.
DEFAULT_PING_ENDPOINT = "/ping"
DEFAULT_HEALTH_CHECK_INTERVAL_S = 10.0
DEFAULT_HEALTH_CHECK_FAILURES = 3
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 2.0
# Rollouts (wrangler's names): a step's new instances must be healthy within the deadline, else
# the rollout rolls back by itself ("rollback") or pauses ("pause").
DEFAULT_ROLLOUT_HEALTH_DEADLINE_S = 300.0
DEFAULT_STOP_TIMEOUT_S = 900.0
ROLLOUT_ON_UNHEALTHY = ("rollback", "pause")
# What a sleep does (issue 13): stop the container, or freeze it (cgroup freezer) and stop it
# only after pause_max paused.
SLEEP_MODES = ("stop", "pause")
DEFAULT_PAUSE_MAX_S = 3600.0
# Snapshots: kept this long after their creation or last restore; of those a sleep takes, the
# newest this many per instance.
DEFAULT_SNAPSHOT_RETENTION_S = 30 * 86400.0
DEFAULT_SNAPSHOT_KEEP = 5


@dataclass(frozen=True)
class Autoscaling:
    """A pool: any instance serves any request; the autoscaler keeps between minimum and maximum
    instances so that average CPU sits at `cpu_target` percent of the instance type's vCPU."""

    minimum_instances: int = 0
    maximum_instances: int = 0  # 0: the class's max_instances (and cluster capacity)
    cpu_target: float = 75.0
    scale_down_delay_s: float = 60.0
    concurrency_limit: int = 0  # requests in flight per instance before overflow; 0: none


@dataclass(frozen=True)
class Constraints:
    """Where a class's instances may run (wrangler's `constraints`; portside/constraints.py
    decides with it). Empty: anywhere. A node must be in one of `regions` (area or region codes)
    and of `jurisdiction_regions`, and carry every label of `labels`."""

    regions: tuple[str, ...] = ()  # lower case, as configured
    jurisdiction: str = ""  # its name, for messages ("": none)
    # The region codes the jurisdiction named when the class was deployed (the built-in table or
    # the config's [jurisdictions]): the class carries them, so no part needs the table.
    jurisdiction_regions: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.regions or self.jurisdiction or self.labels)


@dataclass(frozen=True)
class ContainerClass:
    """A named container spec, registered with `portside deploy`."""

    name: str
    image: str
    default_port: int = 8080
    instance_type: InstanceType = INSTANCE_TYPES["basic"]
    sleep_after_s: float = DEFAULT_SLEEP_AFTER_S
    max_instances: int = 0  # 0: no limit beyond node capacity
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] = ()
    enable_internet: bool = False
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S
    autoscaling: Autoscaling | None = None  # set: the class is a pool
    # sha256:<hex>, the image id of an image `portside deploy` built and pushed (then `image` is
    # its readable tag, portside/<class>:<12 hex>); empty: `image` is a registry reference.
    image_digest: str = ""
    # Health checks of a running instance: GET of `ping_endpoint` (a path; "": no checks) on
    # default_port every interval, each within the timeout.
    ping_endpoint: str = DEFAULT_PING_ENDPOINT
    health_check_interval_s: float = DEFAULT_HEALTH_CHECK_INTERVAL_S
    health_check_failures: int = DEFAULT_HEALTH_CHECK_FAILURES
    health_check_timeout_s: float = DEFAULT_HEALTH_CHECK_TIMEOUT_S
    version: int = 0  # the class version (controlplane/versions.py); 0: not versioned
    # Rollouts to a new version: percentages of instances on it after each step (ascending, ending
    # in 100; empty: `rollout_steps()`'s default), the wait after a step before its new instances
    # must be healthy, and how long they may take. Runtime policy: not part of a version.
    rollout_step_percentage: tuple[int, ...] = ()
    rollout_active_grace_period_s: float = 0.0
    rollout_health_deadline_s: float = DEFAULT_ROLLOUT_HEALTH_DEADLINE_S
    rollout_on_unhealthy: str = "rollback"  # one of ROLLOUT_ON_UNHEALTHY
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S  # SIGTERM, then SIGKILL after this
    # Set by the control plane: a sleeping instance whose container is older than this wakes in a
    # new container of the class's version. 0: it wakes its old container.
    wake_min_version: int = 0
    sleep_mode: str = "stop"  # one of SLEEP_MODES
    pause_max_s: float = DEFAULT_PAUSE_MAX_S  # paused this long, a paused instance is stopped
    snapshot_on_sleep: bool = False  # every stopping sleep snapshots a changed writable layer
    snapshot_retention_s: float = DEFAULT_SNAPSHOT_RETENTION_S
    snapshot_keep: int = DEFAULT_SNAPSHOT_KEEP  # sleep snapshots kept per instance
    # Issue 14. The gateway module's env name for this class ("": binding_name(name)).
    binding: str = ""
    # Outbound control (docs/security.md): host globs, IPs or CIDRs; denied first; allowed set
    # means deny the rest; else enable_internet decides. Host -> outbound handler's name.
    allowed_hosts: tuple[str, ...] = ()
    denied_hosts: tuple[str, ...] = ()
    outbound_by_host: Mapping[str, str] = field(default_factory=dict)
    intercept_https: bool = False
    # Issue 15: where its instances may be placed (runtime policy: not part of a version).
    constraints: Constraints = field(default_factory=Constraints)

    @property
    def run_image(self) -> str:
        """The image its containers are made from, as the engine names it: the digest of an
        image `portside deploy` built, else its image reference. Containers are labelled with it
        and snapshots record it: a snapshot restores only while the class runs the same one."""
        return self.image_digest or self.image

    @property
    def pool(self) -> bool:
        """True for an autoscaled pool (it has an `autoscaling` block)."""
        return self.autoscaling is not None

    @property
    def pool_maximum(self) -> int:
        """The most instances the pool may have (0: only capacity limits it)."""
        if self.autoscaling is None:
            return 0
        return self.autoscaling.maximum_instances or self.max_instances

    def rollout_steps(self) -> tuple[int, ...]:
        """The configured steps, or [10, 100] for a class that may have 2 or more instances
        (max_instances 0 is no limit), else [100]."""
        if self.rollout_step_percentage:
            return self.rollout_step_percentage
        return (10, 100) if self.max_instances >= 2 or self.max_instances == 0 else (100,)

    @property
    def health_checked(self) -> bool:
        """Its running instances are checked (it has a ping_endpoint)."""
        return bool(self.ping_endpoint)


def ping_path(endpoint: str) -> str:
    """A ping_endpoint as a request path: "ping" and "/ping" alike are "/ping"; "" stays "" (no
    checks)."""
    endpoint = endpoint.strip()
    if not endpoint or endpoint.startswith("/"):
        return endpoint
    return "/" + endpoint


InstanceSourceKind = Literal["header", "query", "cookie", "path"]


@dataclass(frozen=True)
class InstanceSource:
    """Where a route finds the instance name: `header:X-Session-Id`, `query:id`,
    `cookie:sid`, or `path:N` (the N-th path segment after the route's prefix, from 1)."""

    kind: InstanceSourceKind
    name: str = ""  # header, query parameter or cookie name
    index: int = 0  # path segment, for kind == "path"

    def __str__(self) -> str:
        return f"path:{self.index}" if self.kind == "path" else f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Route:
    """A path prefix served by a class; `instance` is None for pools (issue 3). A gateway
    route (issue 14) names no class: the gateway module's `fetch` answers."""

    path: str
    class_name: str = ""
    instance: InstanceSource | None = None
    gateway: bool = False


@dataclass(frozen=True)
class OutboundPolicy:
    """What one instance may reach outside its node: its class's outbound fields, or its own
    (SetOutbound). See docs/security.md."""

    enable_internet: bool = False
    allowed_hosts: tuple[str, ...] = ()
    denied_hosts: tuple[str, ...] = ()
    outbound_by_host: Mapping[str, str] = field(default_factory=dict)
    intercept_https: bool = False

    @staticmethod
    def of_class(cls: ContainerClass) -> OutboundPolicy:
        return OutboundPolicy(
            enable_internet=cls.enable_internet,
            allowed_hosts=cls.allowed_hosts,
            denied_hosts=cls.denied_hosts,
            outbound_by_host=cls.outbound_by_host,
            intercept_https=cls.intercept_https,
        )


DEFAULT_GATEWAY_DEADLINE_S = 30.0


@dataclass(frozen=True)
class RateLimit:
    """`await env.<binding>.limit(key=...)`: within the limit while at most `limit` calls with
    that key were made in the current `period_s`, counted across the cluster's edges."""

    binding: str
    limit: int
    period_s: float

    def period_at(self, unix_s: float) -> int:
        """The fixed window `unix_s` falls in: floor(unix time / period_s)."""
        return math.floor(unix_s / self.period_s)


@dataclass(frozen=True)
class Gateway:
    """The gateway module (issue 14): Python source every edge loads (`async def
    fetch(request, env)` and outbound handlers), its vars and rate limiters."""

    module: str  # its file name, for tracebacks
    source: str
    vars: Mapping[str, str] = field(default_factory=dict)
    rate_limits: tuple[RateLimit, ...] = ()
    deadline_s: float = DEFAULT_GATEWAY_DEADLINE_S

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.source.encode()).hexdigest()


def binding_name(class_name: str) -> str:
    """A class's default gateway binding: CodeExecutor -> CODE_EXECUTOR, my-app -> MY_APP."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", class_name)
    return re.sub(r"[^A-Za-z0-9_]", "_", spaced).upper()


def binding_of(cls: ContainerClass) -> str:
    return cls.binding or binding_name(cls.name)


@dataclass(frozen=True)
class Config:
    """What `portside deploy` registers: classes, routes and the gateway module."""

    classes: tuple[ContainerClass, ...] = ()
    routes: tuple[Route, ...] = ()
    gateway: Gateway | None = None

    def class_named(self, name: str) -> ContainerClass | None:
        for cls in self.classes:
            if cls.name == name:
                return cls
        return None


@dataclass(frozen=True)
class Node:
    """A host running a node agent, as it registered with the control plane."""

    id: str
    data_address: str  # host:port of the agent's HTTP data plane (what edges call)
    api_address: str  # host:port of the agent's gRPC service
    region: str
    latitude: float
    longitude: float
    vcpu: float
    memory_mib: int
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_address: str = ""  # host:port of the agent's /metrics, for Prometheus discovery


@dataclass(frozen=True)
class NodeInfo:
    """A node as ListNodes reports it: as it registered, whether its lease is alive, and what
    its awake instances (and fresh placements) take of it."""

    node: Node
    alive: bool = True
    used: Resources = field(default_factory=lambda: Resources())
    instances: int = 0


@functools.lru_cache(maxsize=1 << 16)  # on every proxied request, some of them twice
def instance_id(class_name: str, name: str) -> str:
    """The stable id of a named instance, like Cloudflare's `idFromName`."""
    return hashlib.sha256(f"{class_name}\x00{name}".encode()).hexdigest()
