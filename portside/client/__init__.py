"""Portside's Python SDK: `connect()` (async) and `connect_sync()`; re-exported by `portside`.

The implementation is private (`_async`, `_sync`, `_models`); import from `portside`.
"""

from portside.client._async import Container, Portside, connect
from portside.client._models import (
    ClassInfo,
    DeployResult,
    Event,
    ExecChunk,
    ExecResult,
    InstanceInfo,
    LogChunk,
    NodeInfo,
    Response,
    Usage,
)
from portside.client._sync import SyncContainer, SyncPortside, connect_sync

__all__ = [
    "ClassInfo",
    "Container",
    "DeployResult",
    "Event",
    "ExecChunk",
    "ExecResult",
    "InstanceInfo",
    "LogChunk",
    "NodeInfo",
    "Portside",
    "Response",
    "SyncContainer",
    "SyncPortside",
    "Usage",
    "connect",
    "connect_sync",
]
