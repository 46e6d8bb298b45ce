"""The container runtime the node agent drives, in three layers:

    protocol.py        the `ContainerRuntime` protocol and the values it speaks (no engine's terms)
    docker_engine.py   `DockerRuntime`, the Docker adapter: labels (labels.py), networks, limits,
                       Docker's errors translated; docker_streams.py: its raw exec and logs streams
    engine_events.py   the engine's event stream, followed on a thread of its own

Above this package nothing knows Docker's labels: what they say are `ContainerInfo` fields.
"""

from nodeagent.runtime.docker_engine import (
    CAP_DROP,
    NETWORK_EGRESS,
    NETWORK_INTERNAL,
    PIDS_LIMIT,
    DockerRuntime,
    container_name,
)
from nodeagent.runtime.protocol import (
    NO_OVERRIDES,
    ContainerEvent,
    ContainerEventKind,
    ContainerInfo,
    ContainerRuntime,
    ExecProcess,
    Overrides,
    Stream,
)

__all__ = [
    "CAP_DROP",
    "NETWORK_EGRESS",
    "NETWORK_INTERNAL",
    "NO_OVERRIDES",
    "PIDS_LIMIT",
    "ContainerEvent",
    "ContainerEventKind",
    "ContainerInfo",
    "ContainerRuntime",
    "DockerRuntime",
    "ExecProcess",
    "Overrides",
    "Stream",
    "container_name",
]
