"""Scheduled HTTP calls (issue 13): the control plane's schedule loop asks the agent of an
instance's node to send one request to its container (NodeAgent.Call). The instance is held
like any request's while the call is in flight, so it never sleeps under it.
"""

from __future__ import annotations

import asyncio

import aiohttp

from nodeagent.instances import InstanceManager
from portside import headers
from portside.errors import NotRunning, UpstreamFailed, UpstreamTimeout
from portside.spec import ContainerClass, instance_id

BODY_MOST = 4096  # of the answer's body, what the call returns
CALL_TIMEOUT_S = 30.0  # when the request gives none
USER_AGENT = "portside-schedule/1"


async def call_instance(
    manager: InstanceManager,
    cls: ContainerClass,
    name: str,
    method: str,
    path: str,
    *,
    wake: bool,
    activity: bool,
    timeout_s: float,
) -> tuple[int, bytes]:
    """Send `method path` to the instance's container on the class's default_port, booting (or
    thawing) it first if `wake`, else NotRunning when it does not run. Without
    `activity` the call does not restart the sleep timer. Returns the status and the first
    BODY_MOST bytes of the body; UpstreamTimeout past `timeout_s`, UpstreamFailed for an
    exchange that failed."""
    if not wake:
        found = manager.get(instance_id(cls.name, name))
        if found is None or not found.state.running:
            state = found.state if found is not None else "not on this node"
            raise NotRunning(f"{cls.name}/{name} is {state}: not woken (no_wake)")
    # No await between that check and the acquire: the instance cannot begin to sleep between.
    try:
        async with asyncio.timeout(timeout_s):
            async with await manager.acquire(cls, name, activity=activity) as (host, port):
                return await _request(host, port, method, path, name)
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"{cls.name}/{name}: no answer to {method} {path} within {timeout_s:g}s"
        ) from exc


async def _request(host: str, port: int, method: str, path: str, name: str) -> tuple[int, bytes]:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sent = {headers.INSTANCE: name, "User-Agent": USER_AGENT}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, f"http://{authority}{path}", headers=sent) as resp:
                body = bytearray()
                while len(body) < BODY_MOST:
                    piece = await resp.content.read(BODY_MOST - len(body))
                    if not piece:
                        break
                    body += piece
                return resp.status, bytes(body)
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(f"{method} {path} to the container at {authority}: {exc}") from exc
