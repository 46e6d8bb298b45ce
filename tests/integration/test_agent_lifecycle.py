"""The node agent's lifecycle API against the real engine, over a real gRPC server on loopback:
start with overrides, stop with grace, signal, exec, logs, destroy, states, events, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import docker
import grpc
import pytest

from nodeagent.api import NodeAgentService
from nodeagent.instances import InstanceManager, Timing
from nodeagent.runtime import DockerRuntime
from portside import net
from portside.api.v1 import nodeagent_pb2 as na
from portside.api.v1 import nodeagent_pb2_grpc as na_grpc
from portside.api.v1 import types_pb2 as pb
from portside.convert import class_to_pb
from portside.events import Event, EventKind
from portside.spec import INSTANCE_TYPES, ContainerClass, instance_id
from portside.states import InstanceState
from tests.images.build import ECHO_IMAGE
from tests.support import eventually

pytestmark = pytest.mark.integration

ECHO = ContainerClass(
    "echo",
    ECHO_IMAGE,
    instance_type=INSTANCE_TYPES["lite"],
    sleep_after_s=60.0,
    boot_timeout_s=10.0,
    env={"GREETING": "hi"},
)
NAPPY = dataclasses.replace(ECHO, name="nappy", sleep_after_s=1.0)
LOOP = ["/bin/sh", "-c", "while :; do sleep 0.1; done"]
# "ready" only once the trap is set: a SIGTERM before it would end the shell with 143.
TRAP_TERM = [
    "/bin/sh",
    "-c",
    "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done",
]
TRAP_USR1 = [
    "/bin/sh",
    "-c",
    "trap 'echo usr1 > /signalled' USR1; echo ready; while :; do sleep 0.1; done",
]


@dataclasses.dataclass
class Agent:
    stub: na_grpc.NodeAgentStub
    manager: InstanceManager
    events: list[Event]
    docker: docker.DockerClient

    async def start(
        self,
        name: str,
        cls: ContainerClass = ECHO,
        entrypoint: list[str] | None = None,
        env: dict[str, str] | None = None,
        no_wait: bool = False,
    ) -> pb.InstanceInfo:
        spec: dict[str, Any] = {"class": class_to_pb(cls)}
        reply = await self.stub.Start(
            na.AgentStartRequest(
                **spec,
                name=name,
                entrypoint=entrypoint or [],
                env=env or {},
                no_wait=no_wait,
            )
        )
        info: pb.InstanceInfo = reply.info
        return info

    async def get(self, name: str, cls: ContainerClass = ECHO) -> pb.InstanceInfo:
        reply = await self.stub.GetInstance(
            na.AgentGetInstanceRequest(instance_id=instance_id(cls.name, name))
        )
        info: pb.InstanceInfo = reply.info
        return info

    async def exec(
        self, name: str, command: list[str], stdin: bytes | None = None, cls: ContainerClass = ECHO
    ) -> tuple[bytes, bytes, int | None]:
        async def requests() -> AsyncIterator[pb.ExecRequest]:
            yield pb.ExecRequest(
                start=pb.ExecStart(
                    instance=pb.InstanceRef(class_name=cls.name, name=name),
                    command=command,
                    stdin=stdin is not None,
                )
            )
            if stdin is not None:
                for i in range(0, len(stdin), 32_768):
                    yield pb.ExecRequest(stdin=stdin[i : i + 32_768])
                yield pb.ExecRequest(stdin_close=True)

        out, err, code = b"", b"", None
        async for reply in self.stub.Exec(requests()):
            assert code is None, "exit_code must be the last message"
            kind = reply.WhichOneof("message")
            if kind == "stdout":
                out += reply.stdout
            elif kind == "stderr":
                err += reply.stderr
            else:
                code = reply.exit_code
        return out, err, code

    def kinds(self, name: str, cls: ContainerClass = ECHO) -> list[str]:
        iid = instance_id(cls.name, name)
        return [e.kind for e in self.events if e.instance_id == iid]

    def container(self, name: str, cls: ContainerClass = ECHO) -> str | None:
        snap = self.manager.get(instance_id(cls.name, name))
        return snap.container_id if snap is not None else None

    def logged(self, name: str, text: bytes) -> bool:
        """Whether the container of `name` wrote `text` (to stdout or stderr) yet."""
        logs: bytes = self.docker.containers.get(self.container(name) or "").logs()
        return text in logs


@pytest.fixture
async def agent(
    node_id: str, echo_image: str, docker_client: docker.DockerClient
) -> AsyncIterator[Agent]:
    runtime = DockerRuntime(node_id)
    events: list[Event] = []
    # No reconcile loop: a container's own exit must be noticed through the engine's events.
    manager = InstanceManager(
        runtime,
        {c.name: c for c in (ECHO, NAPPY)}.get,
        on_event=events.append,
        node_id=node_id,
        timing=Timing(sleep_check=0.05, reconcile=3600, stop_grace=2),
    )
    await manager.adopt()
    loop = asyncio.create_task(manager.run())
    server = net.grpc_server()
    na_grpc.add_NodeAgentServicer_to_server(NodeAgentService(manager), server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    channel = net.grpc_channel(address)
    try:
        yield Agent(na_grpc.NodeAgentStub(channel), manager, events, docker_client)
    finally:
        await channel.close()
        await server.stop(0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await manager.close()
        await runtime.close()


async def test_start_with_entrypoint_and_env_then_other_overrides_make_it_again(
    agent: Agent,
) -> None:
    info = await agent.start("a", env={"MODE": "sandbox"})
    assert info.state == InstanceState.HEALTHY and info.instance_id == instance_id("echo", "a")
    out, _, code = await agent.exec("a", ["env"])
    assert code == 0 and b"MODE=sandbox\n" in out and b"GREETING=hi\n" in out
    first = agent.container("a")

    assert (await agent.start("a", env={"MODE": "sandbox"})).state == InstanceState.HEALTHY
    assert agent.container("a") == first, "same overrides: the same container"

    info = await agent.start("a", entrypoint=LOOP, env={"MODE": "batch"}, no_wait=True)
    assert info.state == InstanceState.RUNNING
    assert agent.container("a") != first
    with pytest.raises(docker.errors.NotFound):
        agent.docker.containers.get(first or "")
    out, _, _ = await agent.exec("a", ["env"])
    assert b"MODE=batch\n" in out
    assert agent.kinds("a") == ["starting", "ready", "starting"]


async def test_start_without_wait_returns_once_docker_started_it(agent: Agent) -> None:
    started = time.monotonic()
    info = await agent.start("job", entrypoint=LOOP, no_wait=True)
    assert info.state == InstanceState.RUNNING and time.monotonic() - started < 5
    info = await agent.start("web", no_wait=True)
    assert info.state in (InstanceState.RUNNING, InstanceState.HEALTHY)
    await eventually(lambda: agent.kinds("web") == ["starting", "ready"])
    assert (await agent.get("web")).state == InstanceState.HEALTHY
    # By now the job's port was probed as long as the web's took to answer, and more.
    assert (await agent.get("job")).state == InstanceState.RUNNING, "no port: never healthy"


async def test_start_of_a_crashing_entrypoint_is_aborted_with_its_code(agent: Agent) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.start("crash", entrypoint=["/bin/sh", "-c", "exit 3"])
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert "exited with code 3" in (caught.value.details() or "")
    info = await agent.get("crash")
    assert info.state == InstanceState.STOPPED_WITH_CODE
    assert info.HasField("exit_code") and info.exit_code == 3
    assert agent.kinds("crash") == ["starting", "exited", "failed"]
    exited = [e for e in agent.events if e.kind is EventKind.EXITED][0]
    assert exited.exit_code == 3 and exited.signal is None and exited.node_id


async def test_stop_sends_the_signal_and_waits_for_the_grace_period(agent: Agent) -> None:
    await agent.start("trap", entrypoint=TRAP_TERM, no_wait=True)
    await eventually(lambda: agent.logged("trap", b"ready"))
    reply = await agent.stub.Stop(
        na.AgentStopRequest(instance_id=instance_id("echo", "trap"), signal=15, grace_seconds=5)
    )
    assert reply.info.state == InstanceState.STOPPED and reply.info.exit_code == 7
    assert agent.docker.containers.get(agent.container("trap") or "").status == "exited", (
        "a stopped instance keeps its container"
    )
    logs = b""
    async for chunk in agent.stub.Logs(
        pb.LogsRequest(instance=pb.InstanceRef(class_name="echo", name="trap"))
    ):
        logs += chunk.stdout
    assert logs == b"ready\ngot TERM\n"
    exited = [e for e in agent.events if e.kind is EventKind.EXITED]
    assert [(e.exit_code, e.reason) for e in exited] == [(7, "stopped")]


async def test_stop_kills_after_the_grace_period(agent: Agent) -> None:
    await agent.start(
        "stubborn",
        entrypoint=["/bin/sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"],
        no_wait=True,
    )
    await eventually(lambda: agent.logged("stubborn", b"ready"))
    started = time.monotonic()
    reply = await agent.stub.Stop(
        na.AgentStopRequest(
            instance_id=instance_id("echo", "stubborn"), grace_seconds=0.5, signal=15
        )
    )
    assert 0.4 < time.monotonic() - started < 4
    assert reply.info.exit_code == 137
    assert [(e.exit_code, e.signal) for e in agent.events if e.kind is EventKind.EXITED] == [
        (137, 9)
    ]


async def test_signal_is_observed_by_the_container(agent: Agent) -> None:
    await agent.start("sig", entrypoint=TRAP_USR1, no_wait=True)
    await eventually(lambda: agent.logged("sig", b"ready"))  # its trap is set
    await agent.stub.Signal(
        na.AgentSignalRequest(instance_id=instance_id("echo", "sig"), signal=10)
    )

    async def signalled() -> bool:
        out, _, code = await agent.exec("sig", ["cat", "/signalled"])
        return (out, code) == (b"usr1\n", 0)

    seen: bool = await eventually(signalled)  # annotated: mypy cannot infer it from a coroutine
    assert seen
    assert (await agent.get("sig")).state == InstanceState.RUNNING


async def test_exec_streams_output_exit_code_and_stdin(agent: Agent) -> None:
    await agent.start("x")
    out, err, code = await agent.exec("x", ["/bin/sh", "-c", "echo out; echo err >&2; exit 4"])
    assert (out, err, code) == (b"out\n", b"err\n", 4)

    data = os.urandom(200_000) + b"a" * 300_000
    packed, err, code = await agent.exec("x", ["gzip", "-c"], stdin=data)
    assert code == 0 and not err
    assert gzip.decompress(packed) == data
    out, _, code = await agent.exec("x", ["/bin/sh", "-c", "gunzip -c | wc -c"], stdin=packed)
    assert (out.strip(), code) == (str(len(data)).encode(), 0)

    out, err, code = await agent.exec("x", ["/no/such/command"])
    assert code != 0


async def test_logs_follow_streams_until_the_container_stops(agent: Agent) -> None:
    await agent.start(
        "talker",
        entrypoint=[
            "/bin/sh",
            "-c",
            "for i in 1 2 3; do echo line$i; echo oops$i >&2; sleep 0.3; done",
        ],
        no_wait=True,
    )
    out, err = b"", b""
    started = time.monotonic()
    async for chunk in agent.stub.Logs(
        pb.LogsRequest(instance=pb.InstanceRef(class_name="echo", name="talker"), follow=True)
    ):
        out += chunk.stdout
        err += chunk.stderr
    assert out == b"line1\nline2\nline3\n" and err == b"oops1\noops2\noops3\n"
    assert time.monotonic() - started > 0.4, "it followed the running container"
    tail = b""
    async for chunk in agent.stub.Logs(
        pb.LogsRequest(instance=pb.InstanceRef(class_name="echo", name="talker"), tail=1)
    ):
        tail += chunk.stdout + chunk.stderr
    assert tail in (b"line3\n", b"oops3\n")


async def test_destroy_removes_the_container_and_forgets_the_instance(agent: Agent) -> None:
    await agent.start("gone")
    container = agent.container("gone")
    await agent.stub.Destroy(na.AgentDestroyRequest(instance_id=instance_id("echo", "gone")))
    with pytest.raises(docker.errors.NotFound):
        agent.docker.containers.get(container or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.get("gone")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert agent.kinds("gone") == ["starting", "ready", "removed"]


async def test_states_renewal_and_events_of_a_boot_sleep_exit_cycle(agent: Agent) -> None:
    before = time.time()
    info = await agent.start("cycle", cls=NAPPY)
    assert info.state == InstanceState.HEALTHY and before <= info.since <= time.time()
    iid = instance_id("nappy", "cycle")
    for _ in range(4):  # 1.6 s of renewals outlast sleep_after (1 s)
        await asyncio.sleep(0.4)
        await agent.stub.RenewActivity(na.AgentRenewActivityRequest(instance_id=iid))
    assert (await agent.get("cycle", NAPPY)).state == InstanceState.HEALTHY

    await eventually(lambda: agent.kinds("cycle", NAPPY)[-1:] == ["slept"], within=5)
    assert agent.manager.info(iid).state is InstanceState.SLEEPING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.stub.RenewActivity(na.AgentRenewActivityRequest(instance_id=iid))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await agent.start("cycle", cls=NAPPY)
    # The container exits by itself (TERM to docker-init: code 143); the engine's die event,
    # not a request or the reconcile loop, makes the agent notice.
    await agent.stub.Signal(na.AgentSignalRequest(instance_id=iid, signal=15))
    await eventually(lambda: agent.kinds("cycle", NAPPY)[-1:] == ["exited"], within=3)
    info = await agent.get("cycle", NAPPY)
    assert info.state == InstanceState.STOPPED_WITH_CODE and info.exit_code == 143
    assert agent.kinds("cycle", NAPPY) == [
        "starting",
        "ready",
        "activity-expired",
        "slept",
        "starting",
        "ready",
        "exited",
    ]
    exited = [e for e in agent.events if e.kind is EventKind.EXITED][-1]
    assert (exited.exit_code, exited.signal) == (143, 15)
    times = [e.time for e in agent.events if e.instance_id == iid]
    assert times == sorted(times)


async def test_exec_signal_renew_into_a_stopped_instance_fail_precondition(agent: Agent) -> None:
    await agent.start("idle")
    await agent.stub.Stop(na.AgentStopRequest(instance_id=instance_id("echo", "idle")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.exec("idle", ["true"])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stopped" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agent.stub.Signal(
            na.AgentSignalRequest(instance_id=instance_id("echo", "idle"), signal=1)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_unknown_instances_are_not_found(agent: Agent) -> None:
    iid = instance_id("echo", "nobody")
    calls = [
        agent.stub.GetInstance(na.AgentGetInstanceRequest(instance_id=iid)),
        agent.stub.Stop(na.AgentStopRequest(instance_id=iid)),
        agent.stub.Signal(na.AgentSignalRequest(instance_id=iid, signal=15)),
        agent.stub.Destroy(na.AgentDestroyRequest(instance_id=iid)),
        agent.stub.RenewActivity(na.AgentRenewActivityRequest(instance_id=iid)),
        agent.exec("nobody", ["true"]),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in agent.stub.Logs(
            pb.LogsRequest(instance=pb.InstanceRef(class_name="echo", name="nobody"))
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
