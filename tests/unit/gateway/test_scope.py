"""A gateway exchange's scope: what its handler, and the tasks it spawns, open through the
bindings ends with it (portside/gateway/scope.py)."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from portside.errors import GatewayError
from portside.gateway import GatewayRuntime, Request, Response, relay, scope
from portside.gateway.env import InstanceStub, env_of_config
from portside.proxy import ClientGone
from portside.spec import Config, ContainerClass, Gateway
from tests.unit.gateway.test_runtime import ERRORS, Lifecycle, Limiter, errors


class Opened:
    """An upstream response as a Router opens it: registered with the exchange."""

    def __init__(self) -> None:
        self.released = 0
        scope.opened(self)

    def release(self) -> None:
        self.released += 1


class Router:
    """Opens an `Opened` per fetch; a fetch of "slow" waits until it is cancelled."""

    def __init__(self) -> None:
        self.opened: list[Opened] = []
        self.calls: list[str | None] = []
        self.slow_started = asyncio.Event()
        self.slow_cancelled = asyncio.Event()

    async def fetch(
        self, class_name: str, name: str | None, request: Request, location_hint: str
    ) -> Response:
        self.calls.append(name)
        if name == "slow":
            self.slow_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.slow_cancelled.set()
                raise
        self.opened.append(Opened())
        return Response(f"{name}")


CONFIG = Config(classes=(ContainerClass("Box", "img"),))


def runtime(source: str) -> tuple[GatewayRuntime, Router]:
    router = Router()
    rt = GatewayRuntime(router, Lifecycle(), Limiter(), {}, errors=ERRORS)
    rt.load(replace(CONFIG, gateway=Gateway(module="gateway.py", source=textwrap.dedent(source))))
    return rt, router


SPAWNS = """
import asyncio
from portside.gateway import Response

tasks = []

async def fetch(request, env):
    box = env.BOX.get(request.path.strip("/"))
    tasks.append(asyncio.create_task(box.fetch("/")))
    first = await asyncio.gather(env.BOX.get("a").fetch("/"), env.BOX.get("b").fetch("/"))
    return Response(" ".join([await r.text() for r in first]))
"""


async def test_what_the_handler_and_its_awaited_tasks_open_is_released_at_the_end() -> None:
    rt, router = runtime(SPAWNS)
    with scope.exchange():
        response = await rt.fetch(Request("/c"))
        assert await response.text() == "a b"
        await asyncio.sleep(0)  # the spawned task's call completes within the exchange
        assert [o.released for o in router.opened] == [0, 0, 0]
    assert sorted(router.calls, key=str) == ["a", "b", "c"]
    assert [o.released for o in router.opened] == [1, 1, 1]


async def test_a_spawned_task_in_a_stub_call_at_the_end_is_cancelled() -> None:
    rt, router = runtime(SPAWNS)
    with scope.exchange():
        await rt.fetch(Request("/slow"))
        await router.slow_started.wait()
    await asyncio.wait_for(router.slow_cancelled.wait(), 5)
    # Nothing the slow call would have opened stays behind, and the rest was released.
    assert len(router.opened) == 2 and all(o.released == 1 for o in router.opened)


async def test_a_stub_call_after_the_end_raises_and_reaches_nothing() -> None:
    router, lifecycle = Router(), Lifecycle()
    env = env_of_config(CONFIG, router, lifecycle, Limiter(), {})
    later = asyncio.Event()

    async def after() -> list[BaseException | None]:
        await later.wait()
        stub: InstanceStub = env.BOX.get("late")
        return await asyncio.gather(stub.state(), stub.fetch("/"), return_exceptions=True)

    with scope.exchange():
        spawned = asyncio.create_task(after())
    later.set()
    failures = await spawned
    assert [type(f) for f in failures] == [GatewayError, GatewayError]
    assert all("has ended" in str(f) for f in failures)
    assert lifecycle.calls == [] and router.calls == []


async def test_a_response_opened_after_the_end_is_released_at_once() -> None:
    ended: list[asyncio.Task[Opened]] = []
    gate = asyncio.Event()

    async def opens_late() -> Opened:
        await gate.wait()
        return Opened()

    with scope.exchange():
        ended.append(asyncio.create_task(opens_late()))
    gate.set()
    with pytest.raises(GatewayError, match="has ended"):
        await ended[0]


async def test_a_client_gone_midway_is_no_gateway_error_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class GoneBody:
        def __aiter__(self) -> GoneBody:
            return self

        async def __anext__(self) -> bytes:
            raise ClientGone("the client closed its connection during the request body")

    rt, _ = runtime(
        """
        async def fetch(request, env):
            await request.read()
        """
    )
    before = errors("gateway-error")
    with caplog.at_level(logging.DEBUG), pytest.raises(ClientGone):
        await rt.fetch(Request("/", method="POST", body=GoneBody()))
    assert errors("gateway-error") == before
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]


class Upstream:
    """An upstream response whose body sends one chunk, then nothing until it is released."""

    status = 200
    fields: list[tuple[str, str]] = []

    def __init__(self) -> None:
        self.released = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.Event().wait()

    def release(self) -> None:
        self.released += 1


async def test_a_spawned_task_reading_a_stub_body_at_the_end_is_cancelled() -> None:
    upstream = Upstream()
    read: list[bytes] = []
    reading = asyncio.Event()

    async def reader(response: Response) -> None:
        async for chunk in response.body:
            read.append(chunk)
            reading.set()

    with scope.exchange():
        response = relay.response_of(upstream)  # type: ignore[arg-type]
        spawned = asyncio.create_task(reader(response))
        await asyncio.wait_for(reading.wait(), 5)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(spawned, 5)
    assert read == [b"first"] and upstream.released == 1
