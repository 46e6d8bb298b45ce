"""The gRPC glue every part shares: the status decorator of every handler (server side), and
following a server stream that reconnects by itself (client side).

Errors cross a call as the table in `portside.errors` says: a handler's PortsideError becomes its
gRPC code, its one-line reason and its kind in trailing metadata; `errors.from_rpc` turns that
back into the same class on the caller's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc

from portside.errors import PortsideError, Unavailable, error_kind, from_rpc, rpc_metadata

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M")


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: PortsideError) -> None:
    """End the call with `exc`'s code, reason and kind (raises, as `context.abort` does)."""
    await context.abort(error_kind(exc).grpc_code, str(exc), trailing_metadata=rpc_metadata(exc))


def grpc_errors(handler: F) -> F:
    """Decorate a servicer method (unary, or streaming replies as an async generator or a method
    returning one) so that a PortsideError it raises ends the call with its code, reason and
    kind. Other exceptions are left to gRPC (an INTERNAL status, logged by the server)."""
    if inspect.isasyncgenfunction(handler) or not inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def streaming(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncGenerator[Any, None]:
            try:
                # aclosing: when the client goes, the handler's own cleanup (cancelling a relayed
                # call, say) runs now, not whenever the generator is collected.
                async with contextlib.aclosing(handler(self, request, context)) as replies:
                    async for reply in replies:
                        yield reply
            except PortsideError as exc:
                await abort_with(context, exc)

        return cast(F, streaming)

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await handler(self, request, context)
        except PortsideError as exc:
            await abort_with(context, exc)
            raise  # unreachable: abort raises

    return cast(F, unary)


class Backoff:
    """Exponential reconnect delays, reset after a success."""

    def __init__(self, first: float = 0.1, most: float = 3.0) -> None:
        self.first, self.most, self.next = first, most, first

    def reset(self) -> None:
        self.next = self.first

    async def wait(self) -> None:
        await asyncio.sleep(self.next)
        self.next = min(self.most, self.next * 2)


async def follow_stream(
    open_stream: Callable[[], AsyncIterable[M]],
    *,
    what: str,
    backoff: Backoff | None = None,
    fatal: Callable[[grpc.aio.AioRpcError], bool] = lambda _exc: False,
    unreachable: str = "",
    give_up_after: float | None = None,
    on_break: Callable[[], None] | None = None,
    done: Callable[[], bool] = lambda: False,
) -> AsyncGenerator[M, None]:
    """The messages of a server stream, opened again with backoff whenever it breaks or ends,
    for as long as the caller iterates (or until `done()` says so after a stream ended).

    `open_stream` makes a new call each time (a closure can resume from the last message seen).
    A status for which `fatal` is true is raised as a Portside error (naming `unreachable` if
    the transport failed); after `give_up_after` seconds without a message, Unavailable is.
    `on_break` runs whenever a stream ends, however it ended.
    """
    backoff = backoff or Backoff()
    loop = asyncio.get_running_loop()
    broken_since: float | None = None
    while True:
        call = open_stream()
        reason = "the stream ended"
        try:
            async for message in call:
                backoff.reset()
                broken_since = None
                yield message
        except grpc.aio.AioRpcError as exc:
            if fatal(exc):
                raise from_rpc(exc, unreachable) from exc
            reason = f"{exc.code().name}: {(exc.details() or '').strip()}"
        finally:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
            if on_break is not None:
                on_break()
        if done():
            return
        now = loop.time()
        broken_since = now if broken_since is None else broken_since
        if give_up_after is not None and now - broken_since >= give_up_after:
            raise Unavailable(f"{what} lost for {give_up_after:g}s: {reason}")
        log.warning("%s interrupted (%s); reconnecting", what, reason)
        await backoff.wait()


async def call_unary(call: Awaitable[M], unreachable: str) -> M:
    """Await a unary call, translating its failure with `errors.from_rpc`."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc, unreachable) from exc


__all__ = ["Backoff", "abort_with", "call_unary", "follow_stream", "grpc_errors"]
