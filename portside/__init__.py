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

from portside.client import (
    ClassInfo,
    Container,
    DeployResult,
    Event,
    ExecChunk,
    ExecResult,
    InstanceInfo,
    LogChunk,
    NodeInfo,
    Portside,
    Response,
    SyncContainer,
    SyncPortside,
    Usage,
    connect,
    connect_sync,
)
from portside.errors import (
    BootTimeout,
    ConfigError,
    ContainerExited,
    FailedPrecondition,
    InvalidArgument,
    NoCapacity,
    NotFound,
    PortsideError,
    StoreError,
    Unavailable,
)

__version__ = "0.1.0"
__all__ = [
    "BootTimeout",
    "ClassInfo",
    "ConfigError",
    "Container",
    "ContainerExited",
    "DeployResult",
    "Event",
    "ExecChunk",
    "ExecResult",
    "FailedPrecondition",
    "InstanceInfo",
    "InvalidArgument",
    "LogChunk",
    "NoCapacity",
    "NodeInfo",
    "NotFound",
    "Portside",
    "PortsideError",
    "Response",
    "StoreError",
    "SyncContainer",
    "SyncPortside",
    "Unavailable",
    "Usage",
    "__version__",
    "connect",
    "connect_sync",
]
