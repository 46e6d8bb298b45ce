"""What edges hear from WatchRoutes: nodes lost and named instances moved or removed, each
tagged with the store revision it happened at, so a watch resumes where it broke off."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RouteChangeKind(enum.Enum):
    NODE_LOST = "node_lost"  # the node's lease ended: every route to it is stale
    INSTANCE_MOVED = "instance_moved"  # placed on another node (node_id: the old one)
    INSTANCE_REMOVED = "instance_removed"  # destroyed (node_id: its node)


@dataclass(frozen=True, slots=True)
class RouteChange:
    kind: RouteChangeKind
    node_id: str
    class_name: str = ""
    instance_name: str = ""


@dataclass(frozen=True, slots=True)
class RouteUpdate:
    """One WatchRoutes message. With `reset`, what happened before `revision` is not known: drop
    every cached named route (`live_nodes` are the nodes alive at `revision`). Resume from
    `revision`: every change up to it has been sent."""

    revision: int
    changes: tuple[RouteChange, ...] = ()
    reset: bool = False
    live_nodes: tuple[str, ...] = ()
