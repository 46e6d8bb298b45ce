"""The SDK's use of the gRPC API against a scripted control plane on loopback: the streams
(exec with stdin, a watch that resumes from its last revision after the server goes away),
error translation, and the synchronous client. The real server is in tests/e2e/test_sdk.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

import portside
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.errors import FailedPrecondition, NodeUnreachable, NotFound
from portside.rpc import grpc_errors


class ScriptedControlPlane(cp_grpc.ControlPlaneServicer):
    def __init__(self, first_revision: int = 1, break_after: int = 0) -> None:
        self.watch_requests: list[int] = []
        self.first_revision = first_revision
        self.break_after = break_after  # abort a watch with UNAVAILABLE after N events
        self.stdin_seen: list[bytes] = []

    @grpc_errors
    async def Start(self, request: cp.StartRequest, context: Any) -> cp.StartResponse:
        if request.instance.class_name == "Nope":
            raise NotFound("unknown class 'Nope'")
        return cp.StartResponse(
            info=pb.InstanceInfo(
                class_name=request.instance.class_name,
                name=request.instance.name,
                state="healthy" if not request.no_wait else "starting",
                node_id="n1",
                region=request.location_hint or "fra",
            )
        )

    @grpc_errors
    async def Stop(self, request: cp.StopRequest, context: Any) -> cp.StopResponse:
        raise NodeUnreachable("the agent of node n1 is unreachable")

    @grpc_errors
    async def Signal(self, request: cp.SignalRequest, context: Any) -> cp.SignalResponse:
        raise FailedPrecondition("Echo/a is not running")

    @grpc_errors
    async def GetStateValue(
        self, request: cp.GetStateValueRequest, context: Any
    ) -> cp.GetStateValueResponse:
        if request.key != "k":
            raise NotFound(f"no state value {request.key!r}")
        return cp.GetStateValueResponse(value=b"v")

    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Any
    ) -> AsyncIterator[pb.ExecResponse]:
        first = await request_iterator.__anext__()
        start = first.start
        stdin = b""
        if start.stdin:
            async for m in request_iterator:
                if m.WhichOneof("message") == "stdin_close":
                    break
                stdin += m.stdin
        self.stdin_seen.append(stdin)
        yield pb.ExecResponse(stdout=" ".join(start.command).encode() + b"\n")
        yield pb.ExecResponse(stderr=f"env={dict(start.env)} dir={start.working_dir}".encode())
        yield pb.ExecResponse(stdout=stdin)
        yield pb.ExecResponse(exit_code=3)

    async def ListClasses(
        self, request: cp.ListClassesRequest, context: Any
    ) -> cp.ListClassesResponse:
        await asyncio.sleep(5)  # longer than the client's deadline
        return cp.ListClassesResponse()

    async def WatchEvents(
        self, request: cp.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.Event]:
        self.watch_requests.append(request.after_revision)
        revision = max(request.after_revision + 1, self.first_revision)
        sent = 0
        while True:
            yield pb.Event(
                revision=revision, kind="ready", class_name=request.class_name, name=request.name
            )
            revision += 1
            sent += 1
            if self.break_after and sent >= self.break_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "store watch ended")
            await asyncio.sleep(0.01)  # paced like a live watch, not a flood


async def serve(servicer: ScriptedControlPlane, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(servicer, server)
    port = net.add_grpc_port(server, f"127.0.0.1:{port or net.free_port()}")
    await server.start()
    return server, port


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedControlPlane, str]]:
    servicer = ScriptedControlPlane(break_after=2)
    server, port = await serve(servicer)
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_start_and_errors_are_translated(scripted: tuple[ScriptedControlPlane, str]) -> None:
    _, address = scripted
    async with portside.connect(address) as ps:
        info = await ps.container("Echo", "a").start(hint="sin")
        assert (info.name, info.state, info.region) == ("a", "healthy", "sin")
        assert (await ps.container("Echo", "a").start(wait=False)).state == "starting"
        with pytest.raises(portside.NotFound, match="unknown class 'Nope'"):
            await ps.container("Nope", "a").start()
        with pytest.raises(portside.FailedPrecondition, match="not running"):
            await ps.container("Echo", "a").signal(15)
        # The control plane answered: its reason, not "control plane unreachable".
        with pytest.raises(portside.NodeUnreachable) as unavailable:
            await ps.container("Echo", "a").stop()
        assert str(unavailable.value) == "the agent of node n1 is unreachable"
        box = ps.container("Echo", "a")
        assert await box.get_state_value("k") == b"v"
        with pytest.raises(portside.NotFound):
            await box.get_state_value("missing")


async def test_a_slow_answer_is_a_timeout_not_a_boot_timeout(
    scripted: tuple[ScriptedControlPlane, str],
) -> None:
    _, address = scripted
    async with portside.connect(address, timeout=0.5) as ps:
        with pytest.raises(portside.Timeout) as caught:
            await ps.classes()
    assert not isinstance(caught.value, portside.BootTimeout)
    assert f"control plane {address} did not answer in time" in str(caught.value)


async def test_an_unreachable_controlplane_is_named() -> None:
    address = f"127.0.0.1:{net.free_port()}"
    async with portside.connect(address) as ps:
        with pytest.raises(portside.Unavailable, match=f"control plane {address} is unreachable"):
            await ps.nodes()


async def test_exec_streams_stdin_and_collects_output(
    scripted: tuple[ScriptedControlPlane, str],
) -> None:
    servicer, address = scripted
    async with portside.connect(address) as ps:
        box = ps.container("Echo", "a")
        result = await box.exec(["cat", "-"], env={"A": "1"}, workdir="/tmp", stdin=b"x" * 70000)
        assert result.exit_code == 3 and not result.ok
        assert result.stdout == b"cat -\n" + b"x" * 70000
        assert result.stderr == b"env={'A': '1'} dir=/tmp"

        async def pieces() -> AsyncIterator[bytes]:
            for p in (b"a", b"b", b"c"):
                yield p

        chunks = [c async for c in box.exec_stream(["cat"], stdin=pieces())]
        assert chunks[-1] == portside.ExecChunk("exit", exit_code=3)
        assert [c.stream for c in chunks[:-1]] == ["stdout", "stderr", "stdout"]
        assert servicer.stdin_seen[-1] == b"abc"
        assert (await box.exec(["true"])).stdout == b"true\n"
        assert servicer.stdin_seen[-1] == b""


async def test_watch_resumes_from_the_last_revision(
    scripted: tuple[ScriptedControlPlane, str],
) -> None:
    servicer, address = scripted
    async with portside.connect(address) as ps:
        seen = []
        async for event in ps.container("Echo", "a").events():
            seen.append(event.revision)
            if len(seen) == 5:
                break
    assert seen == [1, 2, 3, 4, 5]  # nothing lost, nothing twice across two broken watches
    assert servicer.watch_requests == [0, 2, 4]


async def test_watch_resumes_after_the_server_restarts() -> None:
    servicer = ScriptedControlPlane()
    server, port = await serve(servicer)
    seen: list[int] = []
    async with portside.connect(f"127.0.0.1:{port}") as ps:
        events = ps.events("Echo", after_revision=10, resume_for=20)
        async for event in events:
            seen.append(event.revision)
            if len(seen) == 3:
                await server.stop(0)
                # Time must pass: the server stays away a while, as in a restart, and the watch
                # must outlast the gap.
                await asyncio.sleep(0.3)
                servicer = ScriptedControlPlane()
                server, _ = await serve(servicer, port)
            if len(seen) == 5:
                break
    await server.stop(0)
    assert seen == [11, 12, 13, 14, 15]
    assert servicer.watch_requests == [13]


async def test_a_watch_gives_up_when_the_server_stays_away() -> None:
    servicer = ScriptedControlPlane(break_after=1)
    server, port = await serve(servicer)
    async with portside.connect(f"127.0.0.1:{port}") as ps:
        with pytest.raises(portside.Unavailable, match="lost for 1s"):
            async for event in ps.events(resume_for=1):
                if event.revision == 1:
                    await server.stop(0)


@pytest.fixture
def scripted_thread() -> Iterator[str]:
    """The scripted server on its own loop in a thread, for the synchronous client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(
        serve(ScriptedControlPlane(break_after=2)), loop
    ).result(timeout=10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


def test_sync_client_has_the_same_shape(scripted_thread: str) -> None:
    with portside.connect_sync(scripted_thread) as ps:
        box = ps.container("Echo", "a")
        assert box.start().state == "healthy"
        result = box.exec(["cat"], stdin=iter([b"from ", b"a generator"]))
        assert result.stdout.endswith(b"from a generator") and result.exit_code == 3
        with pytest.raises(portside.NotFound):
            box.get_state_value("missing")
        revisions = []
        for event in box.events():
            revisions.append(event.revision)
            if len(revisions) == 3:
                break
        assert revisions == [1, 2, 3]
        chunks = list(box.exec_stream(["echo"]))
        assert chunks[-1].exit_code == 3
