"""The control plane's Prometheus metrics: every placement and resolve is counted or timed."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PLACEMENTS = Counter(
    "portside_controlplane_placements_total",
    "Placement decisions for named instances, by outcome (placed, replaced, rejected) and reason.",
    ["class", "outcome", "reason"],
)
RESOLVE_SECONDS = Histogram(
    "portside_controlplane_resolve_seconds",
    "Time to resolve a named instance to its node, placing it if needed.",
    ["result"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
NODES_ALIVE = Gauge("portside_controlplane_nodes_alive", "Nodes whose lease is alive.")
INSTANCES_PLACED = Gauge(
    "portside_controlplane_instances_placed", "Named instances placed, by class.", ["class"]
)
HEARTBEAT_STREAMS = Gauge(
    "portside_controlplane_heartbeat_streams", "Node agents connected to this replica."
)
STORE_SECONDS = Histogram(
    "portside_controlplane_store_seconds",
    "Latency of store operations.",
    ["op"],
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
)
STORE_ERRORS = Counter(
    "portside_controlplane_store_errors_total", "Store operations that failed.", ["op"]
)
DEPLOYS = Counter("portside_controlplane_deploys_total", "Configs deployed.")
LEADER = Gauge(
    "portside_controlplane_leader", "1 if this replica is the leader (runs the autoscaler)."
)
POOL_DESIRED = Gauge(
    "portside_controlplane_pool_desired_instances",
    "Instances the autoscaler wants, by class.",
    ["class"],
)
POOL_CURRENT = Gauge(
    "portside_controlplane_pool_instances",
    "Pool instances placed and not draining, by class.",
    ["class"],
)
POOL_MAX = Gauge(
    "portside_controlplane_pool_max_instances",
    "The most instances a pool may have (its maximum_instances, else the class's "
    "max_instances); 0: only capacity limits it.",
    ["class"],
)
POOL_UTILISATION = Gauge(
    "portside_controlplane_pool_cpu_utilisation_percent",
    "Average CPU of a pool's sampled instances, in percent of the instance type.",
    ["class"],
)
SCALE_EVENTS = Counter(
    "portside_controlplane_scale_events_total",
    "Pool instances added (up) or drained (down) by the autoscaler.",
    ["class", "direction"],
)
AUDITED = Counter(
    "portside_controlplane_audit_total",
    "Mutating API calls written to the audit log, by method and result (OK or the gRPC status "
    "code).",
    ["method", "result"],
)
HEARTBEATS_UNCONFIRMED = Counter(
    "portside_controlplane_heartbeats_unconfirmed_total",
    "Heartbeat messages whose node lease could not be refreshed because the store failed.",
)
IMAGE_PUSHES = Counter(
    "portside_controlplane_image_pushes_total",
    "Image pushes, by outcome: stored (taken in), held (the store had it whole already), "
    "refused (not an image archive, or it did not match its digest), failed.",
    ["outcome"],
)
IMAGE_STORED_BYTES = Counter(
    "portside_controlplane_image_stored_bytes_total",
    "Bytes of configs and layers pushes added to this replica's image store (after dedupe).",
)
IMAGE_PULLS = Counter(
    "portside_controlplane_image_pulls_total",
    "Image pulls, by outcome: served, not_found (no replica holds it), elsewhere (another "
    "replica holds it, this one does not), failed, cancelled.",
    ["outcome"],
)
IMAGE_SENT_BYTES = Counter(
    "portside_controlplane_image_sent_bytes_total", "Bytes of image archives sent to pulls."
)
IMAGE_EXPORT_SECONDS = Histogram(
    "portside_controlplane_image_export_seconds",
    "Time to send an image archive to a pull, from its first byte to its last.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
IMAGES_HELD = Gauge("portside_controlplane_images_held", "Images this replica's store holds whole.")
