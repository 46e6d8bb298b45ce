"""The states of an instance, by their public names: the one vocabulary the agent's lifecycle,
its heartbeats, the control plane, the cluster page, the CLI and the SDK share.

    placed ──▶ starting ──▶ running ◀─▶ healthy ──▶ stopping ──▶ sleeping | stopped
                  │            │           │                     (by Portside, or a Stop)
                  └────────────┴───────────┴──▶ stopped_with_code (it exited by itself)

healthy goes back to running when its class's health checks fail (health_check_failures in a
row), and to healthy again when one passes: a running pool member is out of routing meanwhile.

Cloudflare's `getState()` names are kept as they are (`running`, `healthy`, `stopping`,
`stopped`, `stopped_with_code`); `placed`, `starting` and `sleeping` are Portside's own. On the
wire a state is its value, a string (`InstanceState.parse` reads it back).
"""

from __future__ import annotations

import enum

from portside.errors import InvalidArgument


class InstanceState(enum.StrEnum):
    PLACED = "placed"  # it has a node, but no container there yet
    STARTING = "starting"  # its container is being created or started
    RUNNING = "running"  # its container runs; its port has not answered (yet), or its checks fail
    HEALTHY = "healthy"  # its container runs, its port answers and its health checks pass
    PAUSED = "paused"  # asleep frozen (sleep_mode "pause"): memory kept, thaws on a request
    STOPPING = "stopping"  # its container is being stopped
    SLEEPING = "sleeping"  # stopped after sleep_after without activity; wakes on a request
    STOPPED = "stopped"  # stopped by a Stop, by its agent, or with its lost node
    STOPPED_WITH_CODE = "stopped_with_code"  # its container exited by itself; see exit_code

    @property
    def awake(self) -> bool:
        """Its container runs or is starting or stopping: it takes its node's capacity."""
        return self in _AWAKE

    @property
    def running(self) -> bool:
        """Its container runs (whether or not its port answers)."""
        return self in (InstanceState.RUNNING, InstanceState.HEALTHY)

    @property
    def ready(self) -> bool:
        """It serves requests now: its port answers and its health checks pass (a pool routes
        only to ready members)."""
        return self is InstanceState.HEALTHY

    @classmethod
    def parse(cls, text: str, field: str = "state") -> InstanceState:
        """The state named `text`; InvalidArgument naming the allowed ones otherwise."""
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise InvalidArgument(f"{field}: {text!r} is not a state; one of {allowed}") from None


_AWAKE = frozenset(
    (InstanceState.STARTING, InstanceState.RUNNING, InstanceState.HEALTHY, InstanceState.STOPPING)
)

__all__ = ["InstanceState"]
