"""Portside: containers on demand, near the people who use them.

The SDK::

    import portside

    async with portside.connect("127.0.0.1:7070") as ps:
        box = ps.container("CodeExecutor", name="session-42")
        await box.start(env={"MODE": "sandbox"})
        result = await box.exec(["sh", "-c", "echo $MODE"])

`portside.connect_sync()` is the same for scripts without asyncio. Every error is a
`portside.PortsideError` (see `portside.errors` for the tree). The daemons are `controlplane`,
`nodeagent` and `edge`.
"""

import os

# gRPC's fork handlers (on by default in grpcio's core) run in every child a process forks and
# can abort it, or hang it printing the abort, when the fork lands while another thread is in
# gRPC. Portside forks only to exec (iptables, docker), never to use gRPC in a child, so they
# are turned off before gRPC starts. A user who needs them sets the variable first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from portside.client import (  # noqa: E402
    ClassVersion,
    Container,
    DeployResult,
    ExecChunk,
    ExecResult,
    ImageInfo,
    LogChunk,
    Outbound,
    Portside,
    Response,
    Rollout,
    Schedule,
    SecretInfo,
    Snapshot,
    SyncContainer,
    SyncPortside,
    TerminalSize,
    connect,
    connect_sync,
)
from portside.errors import (
    AlreadyExists,
    BootTimeout,
    ConfigError,
    ContainerExited,
    EngineError,
    EngineUnavailable,
    FailedPrecondition,
    ImageUnavailable,
    InvalidArgument,
    NoCapacity,
    NodeUnreachable,
    NotFound,
    PermissionDenied,
    PortsideError,
    StoreError,
    Timeout,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
)
from portside.events import Event, EventKind
from portside.instances import InstanceInfo
from portside.spec import ContainerClass, NodeInfo, OutboundPolicy
from portside.states import InstanceState
from portside.usage import Usage

__version__ = "0.1.0"
__all__ = [
    "AlreadyExists",
    "BootTimeout",
    "ClassVersion",
    "ConfigError",
    "Container",
    "ContainerClass",
    "ContainerExited",
    "DeployResult",
    "EngineError",
    "EngineUnavailable",
    "Event",
    "EventKind",
    "ExecChunk",
    "ExecResult",
    "FailedPrecondition",
    "ImageInfo",
    "ImageUnavailable",
    "InstanceInfo",
    "InstanceState",
    "InvalidArgument",
    "LogChunk",
    "Outbound",
    "NoCapacity",
    "NodeInfo",
    "NodeUnreachable",
    "NotFound",
    "OutboundPolicy",
    "PermissionDenied",
    "Portside",
    "PortsideError",
    "Response",
    "Rollout",
    "Schedule",
    "SecretInfo",
    "Snapshot",
    "StoreError",
    "SyncContainer",
    "SyncPortside",
    "TerminalSize",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UpstreamFailed",
    "Usage",
    "__version__",
    "connect",
    "connect_sync",
]
