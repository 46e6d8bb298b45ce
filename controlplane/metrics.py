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
VERSIONS_MADE = Counter(
    "portside_controlplane_class_versions_total",
    "Class versions made by deploys that changed what a class's containers are made from.",
)
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
    "Image pulls, by outcome: served, not_found (no replica holds it), unavailable (another "
    "replica holds it and the copy from it failed), failed, cancelled.",
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
IMAGE_COPIES = Counter(
    "portside_controlplane_image_copies_total",
    "Copies of images from other replicas into this one's store, by outcome: copied, held (a "
    "push had taken it in meanwhile), refused (it did not match its digest), failed.",
    ["outcome"],
)
IMAGE_COPY_SECONDS = Histogram(
    "portside_controlplane_image_copy_seconds",
    "Time to copy an image from another replica, from the call to the record.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
IMAGE_COPIED_BYTES = Counter(
    "portside_controlplane_image_copied_bytes_total",
    "Bytes of configs and layers copies from other replicas added to this store (after dedupe).",
)
IMAGE_GC_RUNS = Counter(
    "portside_controlplane_image_gc_runs_total",
    "Image garbage-collection rounds the leader ran, by outcome (ok, store_error).",
    ["outcome"],
)
IMAGE_GC_SECONDS = Histogram(
    "portside_controlplane_image_gc_seconds",
    "Time of one image garbage-collection round.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
)
IMAGE_GC_KEPT = Gauge(
    "portside_controlplane_image_gc_kept",
    "Images the last garbage-collection round kept, by why: current (a class's image), "
    "recent_version (among a class's last --image-keep-versions), snapshot (a snapshot's), "
    "fresh_push (pushed < 1 h ago).",
    ["reason"],
)
IMAGE_GC_DELETED = Counter(
    "portside_controlplane_image_gc_deleted_total",
    "Image records garbage collection deleted (every replica then removes the image's blobs).",
)
IMAGE_BLOBS_REMOVED = Counter(
    "portside_controlplane_image_blobs_removed_total",
    "Blobs this replica removed from its store: of garbage-collected images, used by no other.",
)
IMAGE_REMOVED_BYTES = Counter(
    "portside_controlplane_image_removed_bytes_total",
    "Bytes of blobs this replica removed from its store after garbage collection.",
)
ROLLOUTS_STARTED = Counter(
    "portside_controlplane_rollouts_started_total",
    "Rollouts started, by mode: gradual, immediate (deploys), rollback (Rollback, or a rollout "
    "that rolled back by itself).",
    ["mode"],
)
ROLLOUTS_ENDED = Counter(
    "portside_controlplane_rollouts_ended_total",
    "Rollouts ended, by outcome: done, rolled_back (a rollback rollout finished, or a rollout "
    "gave way to its automatic rollback), aborted, superseded (a newer deploy or rollback, or "
    "its class removed).",
    ["outcome"],
)
ROLLOUT_SECONDS = Histogram(
    "portside_controlplane_rollout_seconds",
    "Time from a rollout's start to its end, by outcome.",
    ["outcome"],
    buckets=(1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
ROLLOUT_STEPS = Counter(
    "portside_controlplane_rollout_steps_total",
    "Rollout steps completed (count reached, grace waited, new instances healthy), by class.",
    ["class"],
)
ROLLOUT_REPLACEMENTS = Counter(
    "portside_controlplane_rollout_replacements_total",
    "Instances a rollout asked to replace (each counted once when first asked), by class and "
    "kind: named (its agent replaces it in place), pool (a surge member replaces it).",
    ["class", "kind"],
)
ROLLOUT_ROLLBACKS = Counter(
    "portside_controlplane_rollout_rollbacks_total",
    "Rollbacks, by reason: unhealthy (a step's new instances not healthy within the deadline), "
    "stalled (a step short of its count too long), manual (the Rollback call).",
    ["reason"],
)
ROLLOUT_PAUSES = Counter(
    "portside_controlplane_rollout_pauses_total",
    "Rollouts paused, by reason: unhealthy, stalled (on_unhealthy = pause, or a rollback "
    "rollout that cannot roll back), manual (ControlRollout).",
    ["reason"],
)
ROLLOUT_CONTROLS = Counter(
    "portside_controlplane_rollout_controls_total",
    "ControlRollout calls, by action (pause, resume, abort) and result (ok, not_applicable).",
    ["action", "result"],
)
ROLLOUTS_MOVING = Gauge(
    "portside_controlplane_rollouts_moving",
    "Rollouts rolling or waiting, as the leader's last rollout tick saw them.",
)
POOL_SURGES = Counter(
    "portside_controlplane_pool_surges_total",
    "Pool rollout surges, by outcome: placed (a new-version member added beyond the count), "
    "completed (it was ready: an old member drained), abandoned (the class moved on, or a "
    "member left), no_capacity (no node could take the extra member; tried again).",
    ["class", "outcome"],
)
SNAPSHOTS_RECORDED = Counter(
    "portside_controlplane_snapshots_recorded_total",
    "Snapshots agents took and this replica recorded, by trigger: create (CreateSnapshot), "
    "sleep (snapshot_on_sleep).",
    ["trigger"],
)
SNAPSHOTS_RESTORED = Counter(
    "portside_controlplane_snapshots_restored_total",
    "Snapshots given to agents to restore, by how: start (a Start with a snapshot), replaced "
    "(LatestSnapshot for an instance placed anew after its node was lost).",
    ["how"],
)
SNAPSHOTS_RETIRED = Counter(
    "portside_controlplane_snapshots_retired_total",
    "Snapshot records deleted by retention, by reason: expired (snapshot_retention after their "
    "creation or last restore), beyond_keep (older than an instance's newest snapshot_keep "
    "sleep snapshots).",
    ["reason"],
)
SNAPSHOT_RETENTION_RUNS = Counter(
    "portside_controlplane_snapshot_retention_runs_total",
    "Snapshot retention rounds the leader ran, by outcome (ok, store_error, error).",
    ["outcome"],
)
SCHEDULE_RUNS = Counter(
    "portside_controlplane_schedule_runs_total",
    "Scheduled runs (issue 13) by result: ok (HTTP status below 400, exit 0), error (another "
    "status or exit code), skipped (asleep and no_wake), failed, lost (its claimer died).",
    ["result"],
)
SCHEDULE_RUN_SECONDS = Histogram(
    "portside_controlplane_schedule_run_seconds",
    "Time of one scheduled run, a wake included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
SCHEDULE_LAG_SECONDS = Histogram(
    "portside_controlplane_schedule_lag_seconds",
    "From a scheduled tick's due time to its claim (its run's start).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
