"""The scope of one gateway exchange (a client's request and its answer, or a container's
outbound request): what its handler opened through the bindings is released at its end, read
or not, and the tasks the handler spawned cannot go on holding instances for a request that
is over.

    with scope.exchange():                      # the host, around a handler and its answer
        ...
    return await scope.stub_call(router.fetch(...))   # a binding, around each stub call
    scope.opened(body)                                # a Router, for what it opened upstream

A stub call (a stub's method, or a read of a stub response's body) made in the handler's own
task is bounded by the handler's deadline. One made in a task the handler spawned
(`asyncio.create_task`, `gather`) carries the exchange in its context: still in flight when the
exchange ends, it is cancelled; made after the end, it raises GatewayError; a response it opened
after the end is released at once. Outside an exchange (a test, a host that runs none) stub
calls go as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

from portside.errors import GatewayError

T = TypeVar("T")


class Releasable(Protocol):
    """What an exchange releases at its end: an upstream response or WebSocket it opened."""

    def release(self) -> None: ...


class _Exchange:
    __slots__ = ("calls", "ended", "opened", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task  # the handler's own task
        self.opened: list[Releasable] = []
        self.calls: set[asyncio.Task[Any]] = set()  # spawned tasks in a stub call now
        self.ended = False

    def end(self) -> None:
        self.ended = True
        for task in list(self.calls):
            task.cancel()
        for item in self.opened:
            item.release()


_CURRENT: ContextVar[_Exchange | None] = ContextVar("portside_gateway_exchange", default=None)


@contextlib.contextmanager
def exchange() -> Iterator[None]:
    """One gateway exchange: at its end, stub calls still in flight in tasks its handler spawned
    are cancelled and every upstream response and WebSocket it opened is released."""
    current = _Exchange(asyncio.current_task())
    token = _CURRENT.set(current)
    try:
        yield
    finally:
        _CURRENT.reset(token)
        current.end()


def _ended() -> GatewayError:
    return GatewayError(
        "the gateway request this call belongs to has ended; a task a handler spawns must"
        " finish its stub calls before the handler's answer does"
    )


async def stub_call(call: Awaitable[T]) -> T:
    """Await a binding's call (`call`, not yet started: a stub's method, or the next chunk of a
    stub response's body) within the current exchange's rules."""
    current = _CURRENT.get()
    if current is None:
        return await call
    if current.ended:
        if isinstance(call, Coroutine):
            call.close()
        raise _ended()
    task = asyncio.current_task()
    if task is None or task is current.task:
        return await call
    current.calls.add(task)
    try:
        return await call
    finally:
        current.calls.discard(task)


def opened(item: Releasable) -> None:
    """`item` was opened in the current exchange: it is released at the exchange's end (at once,
    raising GatewayError, if the exchange has ended already)."""
    current = _CURRENT.get()
    if current is None:
        return
    if current.ended:
        item.release()
        raise _ended()
    current.opened.append(item)


__all__ = ["Releasable", "exchange", "opened", "stub_call"]
