"""What the parts say to each other about instances: an instance's state as the lifecycle API
reports it (`InstanceInfo`), the same plus its use as its agent reports it on every heartbeat
(`InstanceStatus`), a pool member as edges route to it (`PoolMember`), and a pool instance the
control plane wants on a node (`PoolAssignment`)."""

from __future__ import annotations

from dataclasses import dataclass

from portside.states import InstanceState


@dataclass(frozen=True)
class InstanceInfo:
    """Where a named instance (or a pool member) is and what it is doing.

    `exit_code` is set in `stopped_with_code` (and after an exit while stopped); `since` is the
    unix time of the last state change; `in_flight` counts requests, WebSockets and exec
    sessions (opened with `wake`) holding it awake. A crash loop: its container exited at start
    `restarts` times in a row, and no boot is tried before `backoff_until` (unix seconds; 0.0:
    none pending).
    """

    class_name: str
    name: str
    instance_id: str = ""
    state: InstanceState = InstanceState.PLACED
    exit_code: int | None = None
    node_id: str = ""
    region: str = ""
    since: float = 0.0
    pool: bool = False
    in_flight: int = 0
    backoff_until: float = 0.0
    restarts: int = 0
    version: int = 0  # the class version its container was made from (0: unknown)

    def backoff_left(self, now: float) -> float:
        """Seconds until its next boot may be tried (0.0: now), by the unix time `now`."""
        return max(0.0, self.backoff_until - now) if self.backoff_until else 0.0

    @property
    def running(self) -> bool:
        """True while the container runs (whether or not its port answers yet)."""
        return self.state.running


@dataclass(frozen=True)
class InstanceStatus:
    """One instance as its node's agent reports it on the heartbeat: its state and what it uses
    (CPU in percent of its instance type's vCPU over the last 2 s sample, None before the
    first; memory its container's working set)."""

    info: InstanceInfo
    cpu_percent: float | None = None
    memory_bytes: int = 0

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def state(self) -> InstanceState:
        return self.info.state


@dataclass(frozen=True)
class PoolMember:
    """One instance of a pool as edges route to it, with where its node is."""

    class_name: str
    name: str
    instance_id: str
    node_id: str
    data_address: str  # host:port of the node agent's data plane
    region: str
    latitude: float
    longitude: float
    draining: bool = False
    ready: bool = True


@dataclass(frozen=True)
class PoolAssignment:
    """A pool instance the control plane wants on a node: started and kept awake, or (draining)
    finished, stopped and removed."""

    class_name: str
    name: str
    instance_id: str
    draining: bool = False


__all__ = ["InstanceInfo", "InstanceStatus", "PoolAssignment", "PoolMember"]
