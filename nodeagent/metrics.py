"""The node agent's Prometheus metrics: boots, wakes, sleeps, proxied requests and their latency,
image pulls.

Module-level objects in prometheus_client's default registry; the data plane serves /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from portside.daemon import LATENCY_BUCKETS

# Boots range from ~100 ms (a warm wake) to the longest boot_timeout a class may set.
_BOOT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)

BOOTS = Counter(
    "portside_agent_boots_total",
    "Container boots (create or wake, until the port answers), by outcome: ok, exited, timeout, "
    "error.",
    ["class", "outcome"],
)
BOOT_SECONDS = Histogram(
    "portside_agent_boot_seconds",
    "Time from the request that triggered a boot until the container's port answered.",
    ["class"],
    buckets=_BOOT_BUCKETS,
)
WAKES = Counter(
    "portside_agent_wakes_total",
    "Boots that restarted an existing stopped container (its writable layer kept), any outcome.",
    ["class"],
)
SLEEPS = Counter(
    "portside_agent_sleeps_total",
    "Containers stopped because they were idle for their class's sleep_after (or, in pause "
    "mode, paused for its pause_max).",
    ["class"],
)
# A thaw is docker unpause: tens of milliseconds, more when the engine is busy.
_THAW_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

PAUSES = Counter(
    "portside_agent_pauses_total",
    "Containers frozen (docker pause) because they were idle for their class's sleep_after, in a "
    'class with sleep_mode "pause".',
    ["class"],
)
THAWS = Counter(
    "portside_agent_thaws_total",
    "Paused containers thawed (docker unpause) for a request, a Start or a pool assignment, by "
    "outcome: ok, error (its container was gone or exited, or the engine failed the call).",
    ["class", "outcome"],
)
THAW_SECONDS = Histogram(
    "portside_agent_thaw_seconds",
    "Time of one thaw, from its start until docker unpause answered and the instance was "
    "healthy again.",
    ["class"],
    buckets=_THAW_BUCKETS,
)
PROXIED_REQUESTS = Counter(
    "portside_agent_proxied_requests_total",
    "Requests the data plane answered for a class, by HTTP status (Portside's own errors too).",
    ["class", "code"],
)
PROXY_SECONDS = Histogram(
    "portside_agent_proxy_seconds",
    "Time from a request's arrival until its response was fully sent, boots included.",
    ["class"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS_IN_FLIGHT = Gauge(
    "portside_agent_requests_in_flight",
    "Requests and WebSockets that hold an instance awake right now (booting ones included).",
    ["class"],
)
INSTANCES = Gauge(
    "portside_agent_instances",
    "Instances this agent knows, by state: placed, starting, running, healthy, paused, "
    "stopping, sleeping, stopped, stopped_with_code.",
    ["state"],
)
LIFECYCLE_EVENTS = Counter(
    "portside_agent_lifecycle_events_total",
    "Lifecycle events the agent emitted (starting, ready, unhealthy, healthy, activity-expired, "
    "slept, paused, resumed, exited, failed, removed, replaced), by class and kind.",
    ["class", "kind"],
)
EVENTS_DROPPED = Counter(
    "portside_agent_events_dropped_total",
    "Lifecycle events dropped because the outbox was full while the control plane was away.",
)
INSTANCE_CPU = Gauge(
    "portside_agent_instance_cpu_ratio",
    "CPU an awake instance used over the last sample interval, as a fraction of its instance "
    "type's vCPU (1 = all of it).",
    ["class", "instance_name"],
)
INSTANCE_MEMORY = Gauge(
    "portside_agent_instance_memory_bytes",
    "Memory an awake instance's container uses (its cgroup's current usage).",
    ["class", "instance_name"],
)
CRASH_BACKOFF = Gauge(
    "portside_agent_crash_backoff_seconds",
    "The wait its last crash set before an instance's container is started again (1, 2, 4 … "
    "300 s; 0 once it served); present while the instance is crash-looping.",
    ["class", "instance_name"],
)
CRASH_RESTARTS = Counter(
    "portside_agent_crash_restarts_total",
    "Boots of a container that crashed at start (exited during its boot, or within 10 s "
    "without serving a request), each after its backoff.",
    ["class"],
)
HEALTH_CHECKS = Counter(
    "portside_agent_health_checks_total",
    "Health checks of running instances (GET of the class's ping_endpoint), by class and "
    "outcome: pass (any answer below 500), fail (a 5xx, no answer within the timeout, a refused "
    "or reset connection), skipped (the previous check of the instance was still running).",
    ["class", "outcome"],
)
HEALTH_CHECK_SECONDS = Histogram(
    "portside_agent_health_check_seconds",
    "Time of one health check, from the connect until the status line or the failure.",
    ["class"],
    buckets=LATENCY_BUCKETS,
)
HEALTH_TRANSITIONS = Counter(
    "portside_agent_health_transitions_total",
    "Instances that changed health: to unhealthy (health_check_failures checks in a row failed: "
    "state running, out of its pool's routing), or to healthy (a check passed again).",
    ["class", "to"],
)
ENGINE_UP = Gauge(
    "portside_agent_engine_up",
    "1 while the container engine answers and its event stream is followed; 0 from the moment "
    "the stream broke until the agent reached the engine again and took its containers anew.",
)
ENGINE_RECONNECTS = Counter(
    "portside_agent_engine_reconnects_total",
    "Times the agent reached the container engine again after losing it (a Docker restart).",
)
DRAINED_REQUESTS = Counter(
    "portside_agent_drained_requests_total",
    "Requests and WebSockets in flight when the agent began to drain (SIGTERM), by outcome: "
    "finished within --drain-grace, or cut at its end (WebSockets closed 1001 going away).",
    ["outcome"],
)
FENCED = Gauge(
    "portside_agent_fenced",
    "1 while this node serves no named instance: its lease is not confirmed within the fence "
    "window, or it has not reconciled its instances with the control plane since it started.",
)
FENCES = Counter(
    "portside_agent_fences_total",
    "Times this node fenced itself (stopped serving named instances for want of a lease).",
)
FENCED_REQUESTS = Counter(
    "portside_agent_fenced_requests_total",
    "Requests and Starts for named instances refused because the node was fenced.",
    ["class"],
)
RECONCILE_REMOVED = Counter(
    "portside_agent_reconcile_removed_total",
    "Named instances removed from this node on reconcile: the control plane placed them on "
    "another node (or destroyed them) while this node was out of touch.",
)
# A replace drains the old container's requests for up to the class's stop_timeout (15 min).
_REPLACE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

REPLACEMENTS = Counter(
    "portside_agent_replacements_total",
    "Instances a rollout asked this node to replace with its class's current version (once per "
    "instance and version), by class and outcome: ok (the new container's port answered), "
    "failed (the new container did not boot), error (the old one could not be stopped or "
    "removed), current (it already ran the current version, or no longer ran), cancelled (a "
    "stop, destroy, drain or the agent's shutdown came first), fenced (asked while the node was "
    "fenced: nothing replaced; counted per heartbeat reply).",
    ["class", "outcome"],
)
REPLACE_SECONDS = Histogram(
    "portside_agent_replace_seconds",
    "Time of one replace, from the rollout's ask until the new container answered (or failed): "
    "the old container's drain and stop included.",
    ["class"],
    buckets=_REPLACE_BUCKETS,
)
REPLACE_DRAINS = Counter(
    "portside_agent_replace_drains_total",
    "Old containers a replace stopped, by how their requests in flight ended: drained (none "
    "left before SIGTERM), timeout (some still in flight when stop_timeout passed: SIGTERM then).",
    ["class", "outcome"],
)
WAKES_NEW_VERSION = Counter(
    "portside_agent_wakes_new_version_total",
    "Wakes of a sleeping instance whose container was older than its class's wake_min_version: "
    "its old container removed and a new one of the current version made (writable layer fresh).",
    ["class"],
)
# A pull takes from well under a second (the layers were there) to minutes (a large image).
_PULL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

IMAGE_PULLS = Counter(
    "portside_agent_image_pulls_total",
    "Images the agent got for its engine, by source (controlplane: by digest, without a "
    "registry; registry: a reference the engine pulled) and outcome: ok, error, mismatch (the "
    "archive did not load as the digest it was asked for).",
    ["source", "outcome"],
)
IMAGE_PULL_SECONDS = Histogram(
    "portside_agent_image_pull_seconds",
    "Time to get an image into the engine (transfer and load), by source, any outcome.",
    ["source"],
    buckets=_PULL_BUCKETS,
)
IMAGE_PULL_BYTES = Counter(
    "portside_agent_image_pull_bytes_total",
    "Bytes of image archives received from the control plane (layers the engine had are left "
    "out of them).",
)
IMAGE_PREFETCHES = Counter(
    "portside_agent_image_prefetches_total",
    "Background pulls of images the control plane asked this node to have before a boot needs "
    "them, by outcome: ok, error.",
    ["outcome"],
)
IMAGE_CHECKS = Counter(
    "portside_agent_image_checks_total",
    "Images made sure of before a container was created, by outcome: present, tagged (the image "
    "was there under another name), pulled (the boot waited for a pull), failed.",
    ["outcome"],
)
IMAGES = Gauge(
    "portside_agent_images",
    "Portside images (built by portside deploy, known by digest) the node's engine has.",
)
IMAGE_REMOVALS = Counter(
    "portside_agent_image_removals_total",
    "Portside images the cluster no longer keeps that the agent tried to remove from its engine, "
    "by outcome: removed, in_use (a container uses it: kept, never forced), error.",
    ["outcome"],
)

# Snapshots (nodeagent/snapshots.py): a commit takes well under a second for a small layer; a
# large layer's read and push take longer.
_SNAPSHOT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

SNAPSHOTS = Counter(
    "portside_agent_snapshots_total",
    "Snapshots of an instance's writable layer, by class, trigger (create: asked for; sleep: "
    "snapshot_on_sleep) and outcome: taken (pushed and recorded), unchanged (a sleep's, skipped: "
    "the layer is the last snapshot's), failed.",
    ["class", "trigger", "outcome"],
)
SNAPSHOT_SECONDS = Histogram(
    "portside_agent_snapshot_seconds",
    "Time to take a snapshot, by step: commit (the container is held: a wake waits for it), "
    "total (commit, read, push to the image store and record).",
    ["class", "step"],
    buckets=_SNAPSHOT_BUCKETS,
)
SNAPSHOT_LAYER_BYTES = Counter(
    "portside_agent_snapshot_layer_bytes_total",
    "Bytes of writable layer in the snapshots taken, uncompressed (divided by the snapshots "
    "taken: the mean layer).",
    ["class"],
)
SNAPSHOT_RESTORES = Counter(
    "portside_agent_snapshot_restores_total",
    "Containers made from a snapshot, by class and cause: start (a Start named it), replaced "
    "(the instance's first container on this node after its node was lost).",
    ["class", "cause"],
)
EGRESS_CONNECTIONS = Counter(
    "portside_agent_egress_connections_total",
    "Containers' outbound connections (and HTTP requests on them) through the node's egress "
    "proxy, by class and verdict: allow, deny, handler (a gateway handler answered).",
    ["class", "verdict"],
)
OUTBOUND_HANDLER_ERRORS = Counter(
    "portside_agent_outbound_handler_errors_total",
    "Gateway outbound handler calls that failed on this node, by kind: gateway-error (the "
    "code raised, returned no Response, or its module failed to load), gateway-timeout (past "
    "the gateway's deadline), or the kind of a Portside error raised through a binding.",
    ["kind"],
)
EGRESS_DNS = Counter(
    "portside_agent_egress_dns_answers_total",
    "DNS questions from containers answered by the node, by how: intercepted (a name an "
    "outbound handler takes, answered with the node's address), forwarded, failed, dropped "
    "(the container had its most questions in flight already).",
    ["how"],
)
