"""Issue 4 end to end: the lifecycle API (start, stop, signal, exec, logs, destroy, state, renew,
events, state values, listing, error statuses) through the control plane's gRPC API, on real
processes started from the CLI, a real etcd and real containers."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import docker
import grpc
import pytest

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from tests.e2e.harness import Cluster
from tests.support import eventually

pytestmark = pytest.mark.e2e

# Says what it started with, records the signals it gets, and serves the echo endpoints; on
# SIGTERM it says so and exits 7, so a graceful stop is visible in its logs and exit code.
TRAPPING = (
    "mkdir -p /tmp; "  # FROM scratch: the image has no /tmp
    'echo "started with GREETING=$GREETING"; '
    "trap 'echo got USR1 >> /tmp/signals; echo got USR1' USR1; "
    "trap 'echo got TERM; exit 7' TERM; "
    'nc -ll -p "${PORT:-8080}" -e /app/serve & '
    "while true; do wait; done"
)


def config(image: str, sleep_after: str = "10m", extra: str = "") -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "{sleep_after}"
{extra}
"""


def ref(name: str, class_name: str = "Echo") -> pb.InstanceRef:
    return pb.InstanceRef(class_name=class_name, name=name)


@asynccontextmanager
async def controlplane(cluster: Cluster) -> AsyncIterator[Any]:
    async with cluster.channel() as channel:
        yield cp_grpc.ControlPlaneStub(channel)


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a call that must fail."""
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError(f"expected an error, got {result}")


async def run_exec(
    stub: Any,
    instance: pb.InstanceRef,
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    working_dir: str = "",
    stdin: bytes | None = None,
) -> tuple[bytes, bytes, int]:
    call = stub.Exec()
    await call.write(
        pb.ExecRequest(
            start=pb.ExecStart(
                instance=instance,
                command=command,
                env=env or {},
                working_dir=working_dir,
                stdin=stdin is not None,
            )
        )
    )
    if stdin is not None:
        for i in range(0, len(stdin), 16 * 1024):
            await call.write(pb.ExecRequest(stdin=stdin[i : i + 16 * 1024]))
        await call.write(pb.ExecRequest(stdin_close=True))
    out, err, code = b"", b"", None
    while True:
        reply = await asyncio.wait_for(call.read(), 30)
        if reply is grpc.aio.EOF:
            break
        kind = reply.WhichOneof("message")
        if kind == "stdout":
            out += reply.stdout
        elif kind == "stderr":
            err += reply.stderr
        elif kind == "exit_code":
            code = reply.exit_code
    assert code is not None, "exec ended without an exit code"
    return out, err, code


async def logs_of(stub: Any, instance: pb.InstanceRef) -> str:
    text = b""
    async for reply in stub.Logs(pb.LogsRequest(instance=instance)):
        text += reply.stdout + reply.stderr
    return text.decode(errors="replace")


class Watcher:
    """Collects a WatchEvents stream in the background. Watch from `after` a revision known to
    precede what is waited for (`Cluster.store_revision()`), so no event can come before the
    watch opens."""

    def __init__(self, stub: Any, class_name: str = "", name: str = "", after: int = 0) -> None:
        self.events: list[pb.Event] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.call = stub.WatchEvents(
            cp.WatchEventsRequest(class_name=class_name, name=name, after_revision=after)
        )
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.call:
                self.events.append(event)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def kinds(self, name: str) -> list[str]:
        return [e.kind for e in self.events if e.name == name]

    async def wait_for(self, kind: str, name: str, within: float = 20.0, **fields: Any) -> pb.Event:
        """The first `kind` event of `name` (with `fields`) once it has arrived."""

        def arrived() -> pb.Event:
            for e in self.events:
                if (
                    e.kind == kind
                    and e.name == name
                    and all(getattr(e, k) == v for k, v in fields.items())
                ):
                    return e
            if self.error is not None:
                pytest.fail(f"the watch failed: {self.error}")  # at once: no event will come
            raise AssertionError(
                f"no {kind} event for {name} ({fields}); got "
                f"{[(e.kind, e.name, e.revision) for e in self.events]}"
            )

        return await eventually(arrived, within=within, every=0.1)

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


def containers_of(
    client: docker.DockerClient, name: str, cluster: Cluster
) -> list[docker.models.containers.Container]:
    found = client.containers.list(all=True, filters={"label": f"portside.instance={name}"})
    return [c for c in found if c.labels["portside.node"].startswith(cluster.tag + "-")]


def etcdctl(cluster: Cluster, *args: str) -> str:
    endpoint = cluster.store_url.removeprefix("etcd://")
    out = subprocess.run(
        ["etcdctl", "--endpoints", endpoint, *args], capture_output=True, text=True, check=True
    )
    return out.stdout


async def test_every_verb_on_a_real_container(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    agent = cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    box = ref("box")
    async with controlplane(cluster) as stub:
        watch = Watcher(stub, "Echo", "box", after=cluster.store_revision())
        started = await stub.Start(
            cp.StartRequest(
                instance=box, entrypoint=["/bin/sh", "-c", TRAPPING], env={"GREETING": "hi"}
            )
        )
        node_id = agent.name.removeprefix("agent-")
        assert started.info.state in ("running", "healthy"), started
        assert (started.info.node_id, started.info.region) == (node_id, "fra")
        (container,) = containers_of(docker_client, "box", cluster)
        assert container.status == "running"

        # Exec: streamed output, exit code, env, working dir, and stdin through gzip.
        out, err, code = await run_exec(stub, box, ["sh", "-c", "echo out; echo err >&2; exit 5"])
        assert (out, err, code) == (b"out\n", b"err\n", 5)
        out, _, code = await run_exec(
            stub, box, ["sh", "-c", 'echo "$FOO"; pwd'], env={"FOO": "bar"}, working_dir="/app"
        )
        assert (out, code) == (b"bar\n/app\n", 0)
        data = os.urandom(100_000) + b"x" * 100_000
        out, _, code = await run_exec(stub, box, ["gzip", "-c"], stdin=data)
        assert code == 0 and gzip.decompress(out) == data

        # Signal: the container's trap records it.
        await stub.Signal(cp.SignalRequest(instance=box, signal=signal.SIGUSR1))

        async def got_usr1() -> bool:
            out, _, _ = await run_exec(stub, box, ["cat", "/tmp/signals"])
            return b"got USR1" in out

        await eventually(got_usr1, within=10, every=0.2, what="the trap recorded USR1")
        text = await logs_of(stub, box)
        assert "started with GREETING=hi" in text and "got USR1" in text, text

        # Logs --follow: a line written later arrives on the open stream.
        follow = stub.Logs(pb.LogsRequest(instance=box, follow=True, tail=1))
        await stub.Signal(cp.SignalRequest(instance=box, signal=signal.SIGUSR1))
        seen = b""
        while b"got USR1" not in seen:
            reply = await asyncio.wait_for(follow.read(), 10)
            assert reply is not grpc.aio.EOF
            seen += reply.stdout
        follow.cancel()

        state = (await stub.GetState(cp.GetStateRequest(instance=box))).info
        assert state.state in ("running", "healthy") and state.node_id == node_id, state
        assert state.region == "fra" and state.instance_id == started.info.instance_id
        await stub.RenewActivity(cp.RenewActivityRequest(instance=box))

        listed = (await stub.ListInstances(cp.ListInstancesRequest(class_name="Echo"))).instances
        assert [(i.name, i.node_id, i.region) for i in listed] == [("box", node_id, "fra")]
        assert listed[0].state in ("running", "healthy")
        none = await stub.ListInstances(cp.ListInstancesRequest(node_id="elsewhere"))
        assert list(none.instances) == []
        classes = (await stub.ListClasses(cp.ListClassesRequest())).classes
        assert [c.name for c in classes] == ["Echo"] and classes[0].image == test_image

        # Stop: SIGTERM, which the trap answers with exit 7, well within the grace.
        began = time.monotonic()
        stopped = await stub.Stop(cp.StopRequest(instance=box, grace_seconds=5))
        assert time.monotonic() - began < 4
        assert stopped.info.state in ("stopped", "stopped_with_code"), stopped
        container.reload()
        assert container.status != "running"
        assert "got TERM" in await logs_of(stub, box)
        exited = await watch.wait_for("exited", "box")
        assert exited.exit_code == 7 and exited.node_id == node_id

        # Not running: exec, signal and renew say so.
        code, text = await status_of(run_exec(stub, box, ["true"]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, text
        code, text = await status_of(stub.Signal(cp.SignalRequest(instance=box, signal=10)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, text
        code, text = await status_of(stub.RenewActivity(cp.RenewActivityRequest(instance=box)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, text

        await stub.PutStateValue(cp.PutStateValueRequest(instance=box, key="k", value=b"v"))
        await stub.Destroy(cp.DestroyRequest(instance=box))
        assert containers_of(docker_client, "box", cluster) == []
        code, text = await status_of(stub.GetState(cp.GetStateRequest(instance=box)))
        assert code == grpc.StatusCode.NOT_FOUND, text
        code, _ = await status_of(
            stub.GetStateValue(cp.GetStateValueRequest(instance=box, key="k"))
        )
        assert code == grpc.StatusCode.NOT_FOUND  # destroy forgets the state values too
        code, text = await status_of(stub.Destroy(cp.DestroyRequest(instance=box)))
        assert code == grpc.StatusCode.NOT_FOUND, text

        await watch.wait_for("removed", "box")
        kinds = watch.kinds("box")
        for kind in ("placed", "starting", "ready", "exited", "removed"):
            assert kind in kinds, kinds
        assert kinds.index("placed") < kinds.index("starting") < kinds.index("ready")
        assert kinds.index("exited") < kinds.index("removed")
        revisions = [e.revision for e in watch.events]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
        watch.close()


async def test_stop_kills_after_the_grace_period(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    stubborn = ref("stubborn")
    async with controlplane(cluster) as stub:
        ignores_term = "trap '' TERM; " + TRAPPING.replace(
            "trap 'echo got TERM; exit 7' TERM; ", ""
        )
        await stub.Start(
            cp.StartRequest(instance=stubborn, entrypoint=["/bin/sh", "-c", ignores_term])
        )
        began = time.monotonic()
        await stub.Stop(cp.StopRequest(instance=stubborn, grace_seconds=1.5))
        took = time.monotonic() - began
        assert 1.3 <= took < 6, f"stop took {took:.1f}s with a 1.5s grace"
        (container,) = containers_of(docker_client, "stubborn", cluster)
        container.reload()
        assert container.status != "running"
        assert container.attrs["State"]["ExitCode"] == 137  # SIGKILL after the grace


async def test_sleep_exit_and_renew_events_and_state_across_a_sleep(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane()
    cluster.deploy(
        config(
            test_image,
            sleep_after="2s",
            extra=f"""
[[containers]]
class_name = "Job"
image = "{test_image}"
instance_type = "lite"
entrypoint = ["/bin/sh", "-c", "sleep 1; exit 3"]
""",
        )
    )
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    async with controlplane(cluster) as stub:
        watch = Watcher(stub, after=cluster.store_revision())
        napper = ref("napper")
        await stub.Start(cp.StartRequest(instance=napper))
        await stub.PutStateValue(
            cp.PutStateValueRequest(instance=napper, key="progress/step", value=b"\x00\x01 42")
        )
        # Renewing every second keeps it awake past its 2 s sleep_after: time must pass here.
        for _ in range(4):
            await asyncio.sleep(1)
            await stub.RenewActivity(cp.RenewActivityRequest(instance=napper))
        state = (await stub.GetState(cp.GetStateRequest(instance=napper))).info
        assert state.state in ("running", "healthy"), state
        assert "slept" not in watch.kinds("napper")
        await watch.wait_for("slept", "napper", within=10)
        kinds = watch.kinds("napper")
        assert kinds.index("activity-expired") < kinds.index("slept"), kinds

        async def napper_sleeping() -> bool:
            info = (await stub.GetState(cp.GetStateRequest(instance=napper))).info
            return bool(info.state == "sleeping")

        await eventually(napper_sleeping, within=10, every=0.2, what="napper's state is sleeping")
        value = await stub.GetStateValue(
            cp.GetStateValueRequest(instance=napper, key="progress/step")
        )
        assert value.value == b"\x00\x01 42"
        listed = await stub.ListInstances(cp.ListInstancesRequest(state="sleeping"))
        assert [i.name for i in listed.instances] == ["napper"]

        # A job that exits by itself: exited with its code, and GetState says so.
        job = ref("build-1", "Job")
        await stub.Start(cp.StartRequest(instance=job, no_wait=True))
        exited = await watch.wait_for("exited", "build-1")
        assert exited.exit_code == 3 and exited.class_name == "Job"
        state = (await stub.GetState(cp.GetStateRequest(instance=job))).info
        assert state.state == "stopped_with_code" and state.exit_code == 3, state
        # Starting it without no_wait: it exits while starting, which is ABORTED.
        code, text = await status_of(stub.Start(cp.StartRequest(instance=job)))
        assert code == grpc.StatusCode.ABORTED and "3" in text, text
        failed = await watch.wait_for("failed", "build-1")
        assert "3" in failed.reason, failed.reason
        watch.close()


async def test_a_watch_resumes_after_a_controlplane_restart(
    cluster: Cluster, test_image: str
) -> None:
    cp_proc = cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    async with controlplane(cluster) as stub:
        watch = Watcher(stub, "Echo", after=cluster.store_revision())
        await stub.Start(cp.StartRequest(instance=ref("first")))
        last = (await watch.wait_for("ready", "first")).revision
        seen_before = [e.revision for e in watch.events]
        watch.close()
    cluster.stop(cp_proc)
    cluster.restart(cp_proc)
    cluster.wait_for_nodes(1)
    async with controlplane(cluster) as stub:
        # While no one watches: another instance starts and the first stops.
        await stub.Start(cp.StartRequest(instance=ref("second")))
        await stub.Stop(cp.StopRequest(instance=ref("first")))
        resumed = Watcher(stub, "Echo", after=last)
        await resumed.wait_for("placed", "second")
        await resumed.wait_for("ready", "second")
        await resumed.wait_for("exited", "first")
        assert all(e.revision > last for e in resumed.events)
        assert not set(seen_before) & {e.revision for e in resumed.events}
        resumed.close()

        # History that the store compacted away is OUT_OF_RANGE, with a message that says so.
        etcdctl(cluster, "compact", str(cluster.store_revision()))
        gone = stub.WatchEvents(cp.WatchEventsRequest(after_revision=last))
        code, text = await status_of(gone.read())
        assert code == grpc.StatusCode.OUT_OF_RANGE and "no longer" in text, text


async def test_state_values_follow_an_instance_to_another_node(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane("--node-ttl", "2")
    cluster.deploy(config(test_image))
    fra = cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("ams", "127.0.0.3")
    cluster.wait_for_nodes(2)
    mover = ref("mover")
    async with controlplane(cluster) as stub:
        watch = Watcher(stub, "Echo", "mover", after=cluster.store_revision())
        first = (await stub.Start(cp.StartRequest(instance=mover, location_hint="fra"))).info
        assert first.region == "fra", first
        await stub.PutStateValue(cp.PutStateValueRequest(instance=mover, key="k", value=b"v1"))

        # The fra agent dies without leaving: its lease (2 s) expires.
        cluster.stop(fra, signal.SIGKILL)

        async def one_node() -> bool:
            nodes = (await stub.ListNodes(cp.ListNodesRequest())).nodes
            return len(nodes) == 1

        await eventually(one_node, within=10, every=0.2, what="the fra node's lease expired")
        state = (await stub.GetState(cp.GetStateRequest(instance=mover))).info
        assert state.state == "stopped" and state.node_id == first.node_id, state
        code, text = await status_of(run_exec(stub, mover, ["true"]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "gone" in text, text

        moved = (await stub.Start(cp.StartRequest(instance=mover, location_hint="fra"))).info
        assert moved.region == "ams" and moved.node_id != first.node_id, moved
        value = await stub.GetStateValue(cp.GetStateValueRequest(instance=mover, key="k"))
        assert value.value == b"v1"
        placed = [e for e in watch.events if e.kind == "placed"]
        await watch.wait_for("placed", "mover", node_id=moved.node_id)
        assert placed[0].node_id == first.node_id
        watch.close()


async def test_error_statuses(cluster: Cluster, test_image: str) -> None:
    cluster.start_controlplane()
    cluster.deploy(
        config(
            test_image,
            extra=f"""
[[containers]]
class_name = "Big"
image = "{test_image}"
instance_type = "standard-2"
""",
        )
    )
    cluster.start_agent("fra", "127.0.0.1", "--vcpu", "1.5", "--memory-mib", "16384")
    cluster.wait_for_nodes(1)
    async with controlplane(cluster) as stub:
        code, text = await status_of(stub.Start(cp.StartRequest(instance=ref("x", "Nope"))))
        assert code == grpc.StatusCode.NOT_FOUND and "Nope" in text, text
        code, text = await status_of(
            stub.PutStateValue(cp.PutStateValueRequest(instance=ref("x", "Nope"), key="k"))
        )
        assert code == grpc.StatusCode.NOT_FOUND, text
        code, text = await status_of(stub.GetState(cp.GetStateRequest(instance=ref("never"))))
        assert code == grpc.StatusCode.NOT_FOUND and "never placed" in text, text

        # standard-2 is 1 vCPU, the node offers 1.5: one fits, a second does not.
        await stub.Start(cp.StartRequest(instance=ref("one", "Big")))
        code, text = await status_of(stub.Start(cp.StartRequest(instance=ref("two", "Big"))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in text, text

        await stub.Start(cp.StartRequest(instance=ref("idle")))
        await stub.Stop(cp.StopRequest(instance=ref("idle")))
        code, text = await status_of(run_exec(stub, ref("idle"), ["true"]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, text

        for call, field in [
            (stub.PutStateValue(cp.PutStateValueRequest(instance=ref("a"), key="bad key")), "key"),
            (
                stub.PutStateValue(
                    cp.PutStateValueRequest(instance=ref("a"), key="k", value=b"x" * 65537)
                ),
                "value",
            ),
            (stub.GetStateValue(cp.GetStateValueRequest(instance=ref("a"), key="")), "key"),
            (stub.Start(cp.StartRequest(instance=ref(""))), "instance.name"),
            (
                stub.Start(cp.StartRequest(instance=ref("a"), location_hint="atlantis")),
                "location_hint",
            ),
            (run_exec(stub, ref("one", "Big"), []), "start.command"),
            (stub.WatchEvents(cp.WatchEventsRequest(name="a")).read(), "class_name"),
        ]:
            code, text = await status_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith(field), text


async def test_pool_members_are_addressed_by_their_names(cluster: Cluster, test_image: str) -> None:
    cluster.start_controlplane()
    cluster.deploy(
        f"""
[[containers]]
class_name = "Pool"
image = "{test_image}"
instance_type = "lite"

[containers.autoscaling]
minimum_instances = 1
maximum_instances = 1
"""
    )
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    async with controlplane(cluster) as stub:

        async def running_member() -> str:
            listed = await stub.ListInstances(cp.ListInstancesRequest(class_name="Pool"))
            running = [i.name for i in listed.instances if i.state in ("running", "healthy")]
            return running[0] if running else ""

        name: str = await eventually(
            running_member, within=20, every=0.2, what="the pool's minimum instance runs"
        )
        member = ref(name, "Pool")
        state = (await stub.GetState(cp.GetStateRequest(instance=member))).info
        assert state.pool and state.state in ("running", "healthy"), state
        assert (await run_exec(stub, member, ["echo", "pooled"]))[0] == b"pooled\n"
        await stub.Start(cp.StartRequest(instance=member))  # already running: a no-op
        code, text = await status_of(stub.Start(cp.StartRequest(instance=ref("nope", "Pool"))))
        assert code == grpc.StatusCode.NOT_FOUND and "autoscaler" in text, text


async def test_health_checking_and_reflection(cluster: Cluster, test_image: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    cluster.start_controlplane()
    async with cluster.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "portside.v1.ControlPlane"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in reflection.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            assert "portside.v1.ControlPlane" in names and "grpc.health.v1.Health" in names
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="portside.v1.ControlPlane"
        )
        async for reply in reflection.ServerReflectionInfo(iter([request])):
            assert reply.file_descriptor_response.file_descriptor_proto
