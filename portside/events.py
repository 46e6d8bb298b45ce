"""Lifecycle events: what happened to an instance, as agents and the control plane record it and
users watch it (`portside events`, `Container.events()`).

    placed            the control plane gave the instance a node (reason: "moved from node X")
    starting          a boot began (a request, a Start, a pool assignment)
    ready             the port answered: the instance is healthy
    unhealthy         its health checks failed N times in a row: it is running, not healthy, and
                      out of its pool's routing (reason: the last check's failure)
    healthy           a health check passed again after it was unhealthy
    activity-expired  sleep_after passed without activity; a sleep follows
    slept             the sleep's stop finished
    exited            the container stopped by itself, by a user's signal, or by a Stop
                      (exit_code; signal = code - 128 above 128; reason "out of memory")
    failed            a boot failed: the reason says why (timeout, exit, image missing ...)
    removed           Destroy, or a pool instance drained and removed
    replaced          its container is being made again from a newer version of its class: by a
                      rollout (its old container stops, requests wait for the new one), or at a
                      wake older than the class's wake_min_version (reason: "version 1 → 2 ...";
                      either way the new container's writable layer starts fresh)
    rolled-back       a rollout of its class failed its health gate and the class went back to
                      the version before, by itself (recorded for each instance that ran the
                      failed version; reason: why the rollout stopped)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EventKind(enum.StrEnum):
    PLACED = "placed"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    HEALTHY = "healthy"
    ACTIVITY_EXPIRED = "activity-expired"
    SLEPT = "slept"
    EXITED = "exited"
    FAILED = "failed"
    REMOVED = "removed"
    REPLACED = "replaced"
    ROLLED_BACK = "rolled-back"
    PAUSED = "paused"  # frozen after sleep_after idle (sleep_mode "pause")
    RESUMED = "resumed"  # thawed from paused (reason: what woke it)
    SNAPSHOT_TAKEN = "snapshot-taken"  # reason: the snapshot's id and layer size
    SNAPSHOT_RESTORED = "snapshot-restored"  # its container was made from a snapshot
    SCHEDULE_RAN = "schedule-ran"  # reason: the schedule's id and the run's result


@dataclass(frozen=True)
class Event:
    """One lifecycle event. `time` is unix seconds; `revision` is where it sits in the store's
    history once recorded (0 before): watch from it to resume."""

    kind: EventKind
    time: float
    class_name: str
    name: str
    instance_id: str = ""
    node_id: str = ""
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    revision: int = 0


__all__ = ["Event", "EventKind"]
