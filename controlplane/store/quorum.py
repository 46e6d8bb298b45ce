"""Whether an etcd cluster provably has no quorum: the proof a control plane needs before it tells
an agent whose lease it could not refresh that it may keep serving (docs/architecture.md,
"Fencing").

A lease expires only by a leader's decision, and a newly elected leader gives every lease a
full TTL again. So if, at the moment of asking, more members than a quorum can spare are either
down (their port refuses connections: no process listens) or without a leader, no leader can be
expiring leases now, and none elected later can expire a lease before a full TTL from then.
A member that does not answer in time proves nothing: it may be cut off from us but not from
the others, which may have a leader — then the agent's fence closes on time, as it must.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from aetcd import rpc

log = logging.getLogger(__name__)

PROBE_S = 1.0  # how long one member may take to answer Status


async def member_out_of_quorum(
    host: str, port: int, credentials: grpc.ChannelCredentials | None, timeout_s: float
) -> tuple[bool | None, int]:
    """(True: the member is down (refused) or has no leader; False: it has a leader; None:
    it did not answer, so unknown) and the number of members it knows (0: unknown)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials)
    try:
        reply = await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=timeout_s)
        members = await rpc.ClusterStub(channel).MemberList(
            rpc.MemberListRequest(linearizable=False), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        detail = (exc.details() or "").lower()
        if exc.code() is grpc.StatusCode.UNAVAILABLE and "refused" in detail:
            return True, 0
        if "no leader" in detail:
            return True, 0
        return None, 0
    finally:
        await channel.close()
    return reply.leader == 0, len(members.members)


async def quorum_lost(
    endpoints: list[tuple[str, int]],
    credentials: grpc.ChannelCredentials | None = None,
    timeout_s: float = PROBE_S,
) -> bool:
    """True only when the members that are down or leaderless outnumber what a quorum of the
    cluster can spare. The cluster's size is the larger of the endpoints given and the member
    list a member knows, so a URL naming only some members proves nothing about the others."""
    answers = await asyncio.gather(
        *(member_out_of_quorum(h, p, credentials, timeout_s) for h, p in endpoints)
    )
    size = max([len(endpoints), *(n for _, n in answers)])
    out = sum(1 for verdict, _ in answers if verdict is True)
    spare = size - (size // 2 + 1)
    lost = out > spare
    log.info(
        "etcd quorum probe: %d of %d members down or leaderless (%d did not answer): %s",
        out,
        size,
        sum(1 for verdict, _ in answers if verdict is None),
        "no quorum" if lost else "cannot prove there is no quorum",
    )
    return lost


#: How long one probe's verdict answers every caller. While the store fails, every agent's
#: heartbeat asks (each opening a channel to every member); shared, they cost one probe a second.
#: A verdict this old is still sound: a leader elected since gave every lease a full TTL, and the
#: agent serves on for only 0.7 of one from its heartbeat's send — the 0.3 TTL left (3 s with the
#: defaults) covers it.
VERDICT_FRESH_S = 1.0


def quorum_probe(
    endpoints: list[tuple[str, int]],
    credentials: grpc.ChannelCredentials | None,
    *,
    fresh_s: float = VERDICT_FRESH_S,
    check: Callable[[], Awaitable[bool]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], Awaitable[bool]]:
    """`quorum_lost` for these endpoints, one probe at a time: callers meanwhile share it, and
    its verdict answers for `fresh_s` after it ends. (`check` replaces the probe in tests.)"""
    run = check or (lambda: quorum_lost(endpoints, credentials))
    verdict: tuple[float, bool] | None = None  # when it was reached, and what it was
    running: asyncio.Task[bool] | None = None

    def reached(task: asyncio.Task[bool]) -> None:
        nonlocal verdict, running
        running = None
        if not task.cancelled() and task.exception() is None:
            verdict = (clock(), task.result())

    async def probe() -> bool:
        nonlocal running
        if verdict is not None and clock() - verdict[0] < fresh_s:
            return verdict[1]
        if running is None:
            running = asyncio.ensure_future(run())
            running.add_done_callback(reached)
        # Shielded: one caller giving up must not cancel the probe the others wait for.
        return await asyncio.shield(running)

    return probe
