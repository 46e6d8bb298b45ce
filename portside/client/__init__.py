"""Portside's Python SDK: `connect()` (async) and `connect_sync()`; re-exported by `portside`.

The implementation is private (`_async`, `_sync`, `_models`); import from `portside`.
"""

from portside.client._async import Container, Portside, connect
from portside.client._models import (
    ClassVersion,
    DeployResult,
    ExecChunk,
    ExecResult,
    ImageInfo,
    LogChunk,
    Outbound,
    Response,
    Rollout,
    Schedule,
    SecretInfo,
)
from portside.client._sync import SyncContainer, SyncPortside, connect_sync
from portside.snapshots import Snapshot
from portside.terminal import TerminalSize

__all__ = [
    "Container",
    "DeployResult",
    "ExecChunk",
    "ExecResult",
    "ClassVersion",
    "ImageInfo",
    "LogChunk",
    "Outbound",
    "Portside",
    "Response",
    "Rollout",
    "Schedule",
    "SecretInfo",
    "Snapshot",
    "SyncContainer",
    "SyncPortside",
    "TerminalSize",
    "connect",
    "connect_sync",
]
