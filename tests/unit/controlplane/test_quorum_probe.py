"""The quorum probe is shared: concurrent heartbeats wait for one probe, and its verdict answers
for a second (docs/architecture.md, "Fencing": the fence's margin covers a verdict that old)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.store.quorum import quorum_probe


class Check:
    def __init__(self, verdicts: list[bool], delay_s: float = 0.05) -> None:
        self.verdicts = verdicts
        self.delay_s = delay_s
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return self.verdicts[self.calls - 1]


async def test_concurrent_callers_share_one_probe() -> None:
    check = Check([True])
    probe = quorum_probe([], None, check=check)
    assert await asyncio.gather(*(probe() for _ in range(20))) == [True] * 20
    assert check.calls == 1


async def test_a_verdict_answers_for_fresh_s_then_a_new_probe_runs() -> None:
    now = [100.0]
    check = Check([True, False], delay_s=0)
    probe = quorum_probe([], None, check=check, fresh_s=1.0, clock=lambda: now[0])
    assert await probe() is True
    now[0] += 0.9
    assert await probe() is True and check.calls == 1
    now[0] += 0.2
    assert await probe() is False and check.calls == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_probe_for_others() -> None:
    check = Check([True], delay_s=0.1)
    probe = quorum_probe([], None, check=check)
    impatient: asyncio.Future[bool] = asyncio.ensure_future(probe())
    patient: asyncio.Future[bool] = asyncio.ensure_future(probe())
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert await patient is True
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_a_failed_probe_is_not_remembered() -> None:
    calls = 0

    async def failing() -> bool:
        nonlocal calls
        calls += 1
        raise OSError("unreachable")

    probe = quorum_probe([], None, check=failing)
    for _ in range(2):
        with pytest.raises(OSError):
            await probe()
    assert calls == 2
