"""What tests share: `eventually` (async) and `eventually_sync` poll a condition until it holds,
instead of sleeping a fixed time and hoping the system got there; `reported` builds an instance
as a heartbeat reports it."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from portside.instances import InstanceInfo, InstanceStatus
from portside.states import InstanceState

T = TypeVar("T")


@overload
async def eventually(
    check: Callable[[], Awaitable[T]], *, within: float = ..., every: float = ..., what: str = ...
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T], *, within: float = ..., every: float = ..., what: str = ...
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    within: float = 10.0,
    every: float = 0.05,
    what: str = "",
) -> Any:
    """The first truthy result of `check()` (awaited when it returns an awaitable). An
    AssertionError from `check` counts as "not yet"; after `within` seconds the last one is
    raised, or an AssertionError naming `what`."""
    deadline = time.monotonic() + within
    while True:
        failure: AssertionError | None = None
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except AssertionError as exc:
            failure = exc
        if time.monotonic() >= deadline:
            if failure is not None:
                raise failure
            raise AssertionError(f"{what or 'condition'}: not within {within:g}s")
        await asyncio.sleep(every)


def eventually_sync(
    check: Callable[[], T], *, within: float = 10.0, every: float = 0.1, what: str = ""
) -> T:
    """`eventually` for code that must not run an event loop (subprocess-driven tests)."""
    deadline = time.monotonic() + within
    while True:
        failure: AssertionError | None = None
        try:
            result = check()
            if result:
                return result
        except AssertionError as exc:
            failure = exc
        if time.monotonic() >= deadline:
            if failure is not None:
                raise failure
            raise AssertionError(f"{what or 'condition'}: not within {within:g}s")
        time.sleep(every)


def reported(
    instance_id: str,
    state: InstanceState | str,
    *,
    cpu_percent: float | None = None,
    pool: bool = False,
    in_flight: int = 0,
    class_name: str = "C",
) -> InstanceStatus:
    """An instance as an agent's heartbeat reports it, for unit tests of the control plane."""
    info = InstanceInfo(
        class_name=class_name,
        name=instance_id.removeprefix("id-"),
        instance_id=instance_id,
        state=InstanceState(state),
        pool=pool,
        in_flight=in_flight,
    )
    return InstanceStatus(info, cpu_percent=cpu_percent)
