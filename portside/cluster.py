"""Client-side helpers the daemons share for talking to the control plane: following the
deployed config over a watch stream that reconnects by itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.convert import config_from_pb
from portside.rpc import follow_stream
from portside.spec import Config

log = logging.getLogger(__name__)


async def follow_config(
    channel: grpc.aio.Channel,
    apply: Callable[[Config], None],
    first_config: asyncio.Event | None = None,
) -> None:
    """Call `apply` with the whole config now and after every deploy; runs until cancelled.
    While the control plane is unreachable the last config stays in force."""
    stub = cp_grpc.ControlPlaneStub(channel)
    async for message in follow_stream(
        lambda: stub.WatchConfig(cp.WatchConfigRequest()), what="config watch"
    ):
        try:
            apply(config_from_pb(message.config))
        except ValueError as exc:
            log.error("ignoring a config this version cannot read: %s", exc)
            continue
        if first_config is not None:
            first_config.set()


async def first_config(
    got_config: asyncio.Event, timeout_s: float, controlplane: str, what: str
) -> None:
    """Wait a bounded time for the first config, so a daemon opens its port with routes and
    classes in place; an unreachable control plane only delays the start by `timeout_s`."""
    try:
        await asyncio.wait_for(got_config.wait(), timeout_s)
    except TimeoutError:
        log.warning("no config from %s yet; serving without %s until it comes", controlplane, what)
