"""Issue 10, restarts and engine faults, on the real engine: a container that crashes at start is
retried with backoff (Docker is not asked meanwhile); the data plane drains (no new connections,
requests in flight finish, WebSockets close 1001 at the end of the grace); and the instance manager
outlives its engine going away and coming back, through a relay of the engine's socket that the
test cuts and restores (the shared dockerd itself is never restarted here: see
tests/e2e/test_engine_restart.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import docker
import pytest
from aiohttp import WSCloseCode, WSMsgType
from prometheus_client import REGISTRY

from nodeagent.instances import InstanceManager, Timing
from nodeagent.proxy import DataPlane
from nodeagent.runtime import DockerRuntime
from portside.events import Event
from portside.net import free_port
from portside.spec import ContainerClass, instance_id
from portside.states import InstanceState
from tests.images.build import ECHO_IMAGE
from tests.support import eventually

pytestmark = pytest.mark.integration

ECHO = ContainerClass("echo", ECHO_IMAGE, sleep_after_s=60.0, boot_timeout_s=10.0)
CRASH = dataclasses.replace(ECHO, name="crash", entrypoint=("/bin/sh", "-c", "exit 3"))
CLASSES = {c.name: c for c in (ECHO, CRASH)}


def to(cls: str, name: str) -> dict[str, str]:
    return {"Portside-Class": cls, "Portside-Instance": name}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def starts_of(client: docker.DockerClient, container_id: str, since: float) -> int:
    """How many times the engine started `container_id` since unix time `since`."""
    events = client.api.events(
        since=since,
        until=time.time(),
        filters={"container": container_id, "event": "start"},
        decode=True,
    )
    return sum(1 for _ in events)


@dataclasses.dataclass
class Plane:
    url: str
    address: str
    plane: DataPlane
    manager: InstanceManager


@contextlib.asynccontextmanager
async def serving(runtime: DockerRuntime, **timing: float) -> AsyncIterator[Plane]:
    manager = InstanceManager(runtime, CLASSES.get, timing=Timing(**timing))
    await manager.adopt()
    loop = asyncio.create_task(manager.run())
    address = f"127.0.0.1:{free_port()}"
    plane = DataPlane(manager, CLASSES.get)
    await plane.listen(address)
    try:
        yield Plane(f"http://{address}", address, plane, manager)
    finally:
        await plane.close()
        loop.cancel()
        await manager.close()


# -- crash-loop backoff -------------------------------------------------------------------------


async def test_a_crash_loop_backs_off_without_asking_docker(
    node_id: str, echo_image: str, docker_client: docker.DockerClient
) -> None:
    runtime = DockerRuntime(node_id)
    began = time.time()
    restarts_before = metric("portside_agent_crash_restarts_total", **{"class": "crash"})
    try:
        async with serving(runtime) as p, aiohttp.ClientSession() as s:
            iid = instance_id("crash", "cy")
            waits: list[float] = []
            for crash in (1, 2, 3):
                async with s.get(f"{p.url}/x", headers=to("crash", "cy")) as r:
                    assert (r.status, r.headers["Portside-Error"]) == (502, "container-exited")
                    text = await r.text()
                    assert "exited with code 3 before its port 8080 answered; next try in" in text
                info = p.manager.info(iid)
                assert (info.state, info.exit_code, info.restarts) == (
                    InstanceState.STOPPED_WITH_CODE,
                    3,
                    crash,
                )
                waits.append(info.backoff_until - time.time())
                gauge = metric(
                    "portside_agent_crash_backoff_seconds", **{"class": "crash"}, instance_name="cy"
                )
                assert gauge == 2.0 ** (crash - 1)
                snap = p.manager.get(iid)
                assert snap is not None and snap.container_id is not None
                container_id = snap.container_id
                starts = starts_of(docker_client, container_id, began)
                # During the backoff: answered at once, naming the code and the next try,
                # and the engine starts nothing.
                for _ in range(5):
                    asked = time.monotonic()
                    async with s.get(f"{p.url}/x", headers=to("crash", "cy")) as r:
                        assert r.status == 502 and r.headers["Portside-Error"] == "container-exited"
                        assert "exited with code 3 at start; next try in" in await r.text()
                    assert time.monotonic() - asked < 0.25
                assert starts_of(docker_client, container_id, began) == starts == crash
                await eventually(
                    lambda: not p.manager.info(iid).backoff_until,
                    within=2.0 ** (crash - 1) + 1,
                    what="the backoff passed",
                )
            # 1 s, then 2, then 4 (each measured just after its crash).
            assert [round(w) for w in waits] == [1, 2, 4], waits
            restarts = metric("portside_agent_crash_restarts_total", **{"class": "crash"})
            assert restarts - restarts_before == 2  # the second and third boots
    finally:
        await runtime.close()


# -- drain ----------------------------------------------------------------------------------------


async def test_a_drain_refuses_new_connections_and_lets_requests_in_flight_finish(
    node_id: str, echo_image: str, docker_client: docker.DockerClient
) -> None:
    runtime = DockerRuntime(node_id)
    finished_before = metric("portside_agent_drained_requests_total", outcome="finished")
    cut_before = metric("portside_agent_drained_requests_total", outcome="cut")
    try:
        async with serving(runtime) as p, aiohttp.ClientSession() as s:
            async with s.get(f"{p.url}/s/whoami", headers=to("echo", "dee")) as r:
                assert r.status == 200
                container = (await r.text()).split()[0]

            async def slow(seconds: float) -> tuple[int, str]:
                async with s.get(f"{p.url}/s/slow?{seconds:g}", headers=to("echo", "dee")) as r:
                    return r.status, await r.text()

            finishing = asyncio.create_task(slow(1.5))
            too_slow = asyncio.create_task(slow(30))
            ws = await s.ws_connect(f"{p.url}/chat/ws", headers=to("echo", "dee"))
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "hi"
            iid = instance_id("echo", "dee")
            await eventually(lambda: p.manager.info(iid).in_flight == 3, what="3 in flight")

            drained_at = time.monotonic()
            drain = asyncio.create_task(p.plane.drain(3.0))
            await asyncio.sleep(0.2)
            host, port = p.address.rsplit(":", 1)
            with pytest.raises(ConnectionRefusedError):  # edges go elsewhere at once
                socket.create_connection((host, int(port)), timeout=1)
            assert await finishing == (200, "slept 1.5")  # in flight: it finishes
            closed = await ws.receive(timeout=10)  # at the end of the grace: going away
            assert closed.type is WSMsgType.CLOSE and closed.data == WSCloseCode.GOING_AWAY
            with pytest.raises(aiohttp.ClientError):
                await too_slow  # cut at the end of the grace
            assert await drain == (1, 2)
            assert 3.0 <= time.monotonic() - drained_at < 6.0
            assert metric("portside_agent_drained_requests_total", outcome="finished") == (
                finished_before + 1
            )
            assert metric("portside_agent_drained_requests_total", outcome="cut") == cut_before + 2
            # The container keeps running for the next agent, and nothing holds it any more.
            assert docker_client.containers.get(container).status == "running"
            await eventually(lambda: p.manager.info(iid).in_flight == 0, what="released")
    finally:
        await runtime.close()


# -- the engine going away and coming back --------------------------------------------------------


class SocketRelay:
    """A Unix socket that relays to the engine's: `cut()` drops every connection and the socket
    (as a stopped dockerd does), `restore()` listens again."""

    def __init__(self, path: Path, engine: str = "/var/run/docker.sock") -> None:
        self.path, self.engine = path, engine
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_unix_server(self._relay, path=str(self.path))

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.engine)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        # Cancelled only when the loop ends with connections open (a test's teardown).
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


@pytest.fixture
def relay_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "docker.sock"


@pytest.mark.parametrize("live_restore", [False, True], ids=["engine-stops-them", "live-restore"])
async def test_the_manager_reconnects_and_takes_its_containers_again(
    live_restore: bool,
    node_id: str,
    echo_image: str,
    docker_client: docker.DockerClient,
    relay_path: Path,
) -> None:
    relay = SocketRelay(relay_path)
    await relay.restore()
    # A version given: the client asks none (a blocking call, and the relay runs on this loop).
    client = docker.DockerClient(base_url=f"unix://{relay_path}", version="1.41")
    runtime = DockerRuntime(node_id, client)
    events: list[Event] = []
    manager = InstanceManager(
        runtime,
        CLASSES.get,
        timing=Timing(reconcile=0.3, engine_retry_first=0.05, engine_retry_most=0.5),
        on_event=events.append,
    )
    reconnects = metric("portside_agent_engine_reconnects_total")
    loop = asyncio.create_task(manager.run())
    iid = instance_id("echo", "rey")
    try:
        await manager.adopt()
        hold = await manager.acquire(ECHO, "rey")
        hold.served()
        container_id = hold.container_id
        assert container_id is not None
        hold.release()
        await asyncio.sleep(0.3)  # the event stream is open (nothing to wait on: a margin)

        await relay.cut()  # the engine goes away
        await eventually(lambda: metric("portside_agent_engine_up") == 0, what="engine lost")
        if not live_restore:  # without live-restore, a restarting engine stops its containers
            docker_client.api.stop(container_id, timeout=1)
        await asyncio.sleep(1.0)  # away for a while: pings fail, the reconcile loop waits
        assert manager.info(iid).state is InstanceState.HEALTHY  # nothing is known meanwhile
        await relay.restore()

        expected = InstanceState.HEALTHY if live_restore else InstanceState.STOPPED
        await eventually(lambda: metric("portside_agent_engine_up") == 1, within=5, what="back")
        assert manager.info(iid).state is expected
        assert metric("portside_agent_engine_reconnects_total") == reconnects + 1
        info = manager.info(iid)
        assert info.restarts == 0 and info.backoff_until == 0.0  # not a crash
        if not live_restore:
            assert [e.kind for e in events][-1] == "exited"
            assert "engine restarted" in events[-1].reason
        # It serves again, the same container, woken if the engine had stopped it.
        began = time.time() - 1
        async with manager.use(ECHO, "rey") as upstream:
            reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
            writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await reader.read()
            writer.close()
        assert container_id.startswith(answer.split(b"\r\n\r\n", 1)[1].split()[0].decode())
        assert starts_of(docker_client, container_id, began) == (0 if live_restore else 1)
        # Events are followed again: a death is noticed without a request.
        docker_client.api.kill(container_id)
        await eventually(
            lambda: manager.info(iid).state is InstanceState.STOPPED_WITH_CODE,
            within=3,
            what="the death noticed",
        )
    finally:
        loop.cancel()
        await manager.close()
        await runtime.close()
        client.close()
        await relay.cut()
