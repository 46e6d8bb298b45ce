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
from portside.spec import Config

log = logging.getLogger(__name__)


class Backoff:
    """Exponential reconnect delays, reset after a success."""

    def __init__(self, first: float = 0.1, most: float = 3.0) -> None:
        self.first, self.most, self.next = first, most, first

    def reset(self) -> None:
        self.next = self.first

    async def wait(self) -> None:
        await asyncio.sleep(self.next)
        self.next = min(self.most, self.next * 2)


async def follow_config(
    channel: grpc.aio.Channel,
    apply: Callable[[Config], None],
    first_config: asyncio.Event | None = None,
) -> None:
    """Call `apply` with the whole config now and after every deploy; runs until cancelled.
    While the control plane is unreachable the last config stays in force."""
    stub = cp_grpc.ControlPlaneStub(channel)
    backoff = Backoff()
    while True:
        try:
            async for message in stub.WatchConfig(cp.WatchConfigRequest()):
                backoff.reset()
                try:
                    apply(config_from_pb(message.config))
                except ValueError as exc:
                    log.error("ignoring a config this version cannot read: %s", exc)
                    continue
                if first_config is not None:
                    first_config.set()
        except grpc.aio.AioRpcError as exc:
            log.warning("config watch interrupted (%s); reconnecting", exc.code().name)
        await backoff.wait()


async def first_config(
    got_config: asyncio.Event, timeout_s: float, controlplane: str, what: str
) -> None:
    """Wait a bounded time for the first config, so a daemon opens its port with routes and
    classes in place; an unreachable control plane only delays the start by `timeout_s`."""
    try:
        await asyncio.wait_for(got_config.wait(), timeout_s)
    except TimeoutError:
        log.warning("no config from %s yet; serving without %s until it comes", controlplane, what)
