"""Health checks for real: the HTTP check against servers on loopback (pass, 404, 5xx, silence,
refusal, a cut connection, not HTTP), then the node agent with the real engine — a container whose
check starts failing turns running (event unhealthy) after N checks and still gets its requests,
healthy again once it passes; a check that times out counts as a failure; checks never keep an
instance awake."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from nodeagent.health import USER_AGENT, CheckResult, http_check
from nodeagent.instances import InstanceManager, Timing
from nodeagent.proxy import DataPlane
from nodeagent.runtime import DockerRuntime
from portside.events import Event, EventKind
from portside.net import free_port
from portside.spec import ContainerClass, instance_id
from portside.states import InstanceState
from tests.images.build import ECHO_IMAGE
from tests.support import eventually

pytestmark = pytest.mark.integration

S = InstanceState
K = EventKind

# The echo image's busybox httpd with three CGI scripts made at start: /cgi-bin/ping answers 500
# while /tmp/sick exists, /cgi-bin/sick and /cgi-bin/well make and remove it, /cgi-bin/whoami
# names the container. busybox httpd passes a CGI's own status line through.
SICKABLE_SCRIPT = r"""
mkdir -p /w/cgi-bin
cat > /w/cgi-bin/ping <<'END'
#!/bin/sh
if [ -f /tmp/sick ]; then
  printf 'HTTP/1.0 500 Sick\r\nContent-Type: text/plain\r\n\r\nsick\n'
else
  printf 'Content-Type: text/plain\r\n\r\nwell\n'
fi
END
cat > /w/cgi-bin/sick <<'END'
#!/bin/sh
mkdir -p /tmp && touch /tmp/sick
printf 'Content-Type: text/plain\r\n\r\n%s sick\n' "$(hostname)"
END
cat > /w/cgi-bin/well <<'END'
#!/bin/sh
rm -f /tmp/sick
printf 'Content-Type: text/plain\r\n\r\n%s well\n' "$(hostname)"
END
cp /www/cgi-bin/whoami /w/cgi-bin/whoami
chmod +x /w/cgi-bin/*
exec httpd -f -p "${PORT:-8080}" -h /w
"""
SICKABLE_ENTRYPOINT = ("/bin/sh", "-c", SICKABLE_SCRIPT)

SICKABLE = ContainerClass(
    "sickable",
    ECHO_IMAGE,
    entrypoint=SICKABLE_ENTRYPOINT,
    sleep_after_s=60.0,
    boot_timeout_s=10.0,
    ping_endpoint="/cgi-bin/ping",
    health_check_interval_s=0.3,
    health_check_failures=3,
    health_check_timeout_s=0.25,
)
# The echo image's /slow?5 answers after 5 s: a check with a 1 s timeout never gets it.
SLOW = ContainerClass(
    "slowping",
    ECHO_IMAGE,
    sleep_after_s=60.0,
    boot_timeout_s=10.0,
    ping_endpoint="/slow?5",
    health_check_interval_s=1.5,
    health_check_failures=2,
    health_check_timeout_s=1.0,
)
# Checked four times a second, asleep after 1.5 s without a request all the same.
SLEEPY = dataclasses.replace(
    SICKABLE, name="sleepy", sleep_after_s=1.5, health_check_interval_s=0.25
)
CLASSES = {c.name: c for c in (SICKABLE, SLOW, SLEEPY)}


# -- the check against loopback servers -------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclasses.dataclass
class Server:
    port: int
    received: list[bytes]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Server:
        received: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                received.append(await reader.readuntil(b"\r\n\r\n"))
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return Server(server.sockets[0].getsockname()[1], received)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def answering(raw: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return handler


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", CheckResult(True, 200)),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", CheckResult(True, 404)),
        (b"HTTP/1.0 302 Found\r\nLocation: /login\r\n\r\n", CheckResult(True, 302)),
        (b"HTTP/1.1 503 Busy\r\n\r\n", CheckResult(False, 503, "answered 503")),
        (
            b"SSH-2.0-OpenSSH_9.2\r\n",
            CheckResult(False, reason="answered something that is not HTTP"),
        ),
        (b"", CheckResult(False, reason="closed the connection without answering")),
    ],
)
async def test_an_answer_is_judged_by_its_status(
    serve: Callable[[Handler], Awaitable[Server]], answer: bytes, expected: CheckResult
) -> None:
    server = await serve(answering(answer))
    assert await http_check("127.0.0.1", server.port, "/ping", 2.0) == expected
    request = server.received[0].decode()
    assert request.startswith("GET /ping HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in request
    assert f"User-Agent: {USER_AGENT}\r\n" in request
    assert USER_AGENT == "portside-health/1"


async def test_silence_fails_within_the_timeout(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await serve(silent)
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await http_check("127.0.0.1", server.port, "/ping", 0.3)
    assert result == CheckResult(False, reason="no answer within 0.3s")
    assert loop.time() - began < 1.0


async def test_a_refused_connection_fails() -> None:
    port = free_port()  # nothing listens there
    result = await http_check("127.0.0.1", port, "/ping", 1.0)
    assert result == CheckResult(False, reason=f"connection to port {port} refused")


async def test_a_reset_connection_fails(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()  # an RST, not a FIN

    server = await serve(reset)
    result = await http_check("127.0.0.1", server.port, "/ping", 1.0)
    assert not result.passed
    assert result.reason in ("connection reset", "closed the connection without answering")


# -- the agent with the real engine -----------------------------------------------------------


@dataclasses.dataclass
class Agent:
    url: str
    manager: InstanceManager
    session: aiohttp.ClientSession
    events: list[Event]

    def state(self, cls: ContainerClass, name: str) -> InstanceState | None:
        snap = self.manager.get(instance_id(cls.name, name))
        return snap.state if snap is not None else None

    def kinds(self, cls: ContainerClass, name: str) -> list[str]:
        iid = instance_id(cls.name, name)
        return [e.kind for e in self.events if e.instance_id == iid]

    async def get(self, cls: ContainerClass, name: str, path: str) -> tuple[int, str]:
        headers = {"Portside-Class": cls.name, "Portside-Instance": name}
        async with self.session.get(f"{self.url}{path}", headers=headers) as r:
            return r.status, await r.text()


@pytest.fixture
async def agent(node_id: str, echo_image: str) -> AsyncIterator[Agent]:
    runtime = DockerRuntime(node_id)
    events: list[Event] = []
    manager = InstanceManager(
        runtime,
        CLASSES.get,
        on_event=events.append,
        node_id=node_id,
        timing=Timing(sleep_check=0.05, reconcile=0.5, stop_grace=1, health_tick=0.05),
    )
    await manager.adopt()
    loop = asyncio.create_task(manager.run())
    address = f"127.0.0.1:{free_port()}"
    plane = DataPlane(manager, CLASSES.get)
    await plane.listen(address)
    session = aiohttp.ClientSession()
    try:
        yield Agent(f"http://{address}", manager, session, events)
    finally:
        await session.close()
        await plane.close()
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await manager.close()
        await runtime.close()


async def test_a_failing_check_makes_it_running_until_one_passes(agent: Agent) -> None:
    status, body = await agent.get(SICKABLE, "a", "/cgi-bin/whoami")
    assert status == 200
    host = body.split()[0]
    assert agent.state(SICKABLE, "a") is S.HEALTHY
    # Checks pass meanwhile: healthy stays healthy.
    await asyncio.sleep(1.0)
    assert agent.state(SICKABLE, "a") is S.HEALTHY and agent.kinds(SICKABLE, "a") == [
        "starting",
        "ready",
    ]

    assert await agent.get(SICKABLE, "a", "/cgi-bin/sick") == (200, f"{host} sick\n")
    await eventually(lambda: agent.state(SICKABLE, "a") is S.RUNNING, within=5)
    unhealthy = [e for e in agent.events if e.kind is K.UNHEALTHY]
    assert len(unhealthy) == 1
    assert unhealthy[0].reason == "3 health checks in a row failed; the last: answered 500"

    # A named instance has no other copy: it still gets its requests, from the same container.
    assert await agent.get(SICKABLE, "a", "/cgi-bin/whoami") == (200, f"{host} a\n")
    assert agent.state(SICKABLE, "a") is S.RUNNING

    assert await agent.get(SICKABLE, "a", "/cgi-bin/well") == (200, f"{host} well\n")
    await eventually(lambda: agent.state(SICKABLE, "a") is S.HEALTHY, within=3)
    assert agent.kinds(SICKABLE, "a") == ["starting", "ready", "unhealthy", "healthy"]


async def test_a_check_that_times_out_fails(agent: Agent) -> None:
    assert (await agent.get(SLOW, "a", "/whoami"))[0] == 200
    assert agent.state(SLOW, "a") is S.HEALTHY
    # Two checks, 1.5 s apart, each giving up after 1 s.
    await eventually(lambda: agent.state(SLOW, "a") is S.RUNNING, within=8)
    unhealthy = [e for e in agent.events if e.kind is K.UNHEALTHY]
    assert unhealthy[0].reason == "2 health checks in a row failed; the last: no answer within 1s"


async def test_checks_do_not_keep_an_instance_awake(agent: Agent) -> None:
    assert (await agent.get(SLEEPY, "a", "/cgi-bin/whoami"))[0] == 200
    await eventually(lambda: agent.state(SLEEPY, "a") is S.SLEEPING, within=6)
    assert agent.kinds(SLEEPY, "a") == ["starting", "ready", "activity-expired", "slept"]
    # Asleep, it stays asleep: no check wakes it.
    await asyncio.sleep(1.0)
    assert agent.state(SLEEPY, "a") is S.SLEEPING
