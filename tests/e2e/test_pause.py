"""Issue 13 §1 end to end: pause mode (sleep_mode "pause") on real processes started from the
CLI, a real etcd and a real Docker engine. An idle instance is frozen (docker inspect says
Paused), the next request is served by the same process with its memory kept, a request in
flight is never paused, and after pause_max it is stopped and asleep like a "stop" sleep."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import docker
import grpc
import pytest

from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import types_pb2 as pb
from tests.e2e.harness import Cluster
from tests.e2e.test_lifecycle import Watcher, containers_of, controlplane, status_of
from tests.support import eventually

pytestmark = pytest.mark.e2e

# The echo image's server, after it wrote a token of its own into memory (/dev/shm is a tmpfs:
# a stop empties it) and made GET /state read it: the same token after a wake proves the same
# process with its memory kept; a new one, a new process.
REMEMBERING = (
    "mkdir -p /data && ln -sf /dev/shm/memory /data/state && "
    "cat /proc/sys/kernel/random/uuid > /dev/shm/memory && "
    'exec nc -ll -p "${PORT:-8080}" -e /app/serve'
)


def config(image: str) -> str:
    return f"""
[[containers]]
class_name = "Frozen"
image = "{image}"
default_port = 8080
instance_type = "lite"
entrypoint = {json.dumps(["/bin/sh", "-c", REMEMBERING])}
sleep_after = "1s"
sleep_mode = "pause"
pause_max = "4s"

[[routes]]
path = "/"
class_name = "Frozen"
instance = "header:X-Session-Id"
"""


async def get(http: aiohttp.ClientSession, edge: str, path: str) -> str:
    async with http.get(f"http://{edge}{path}", headers={"X-Session-Id": "s1"}) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        return text


async def state_of(stub: Any) -> str:
    info = (await stub.GetState(cp.GetStateRequest(instance=BOX))).info
    return str(info.state)


BOX = pb.InstanceRef(class_name="Frozen", name="s1")


async def test_pause_thaw_in_flight_and_pause_max(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra").address
    cluster.wait_for_nodes(1)

    def inspected() -> dict[str, Any]:
        (container,) = containers_of(docker_client, "s1", cluster)
        container.reload()
        state: dict[str, Any] = container.attrs["State"]
        return state

    async with controlplane(cluster) as stub, aiohttp.ClientSession() as http:
        watch = Watcher(stub, "Frozen", "s1", after=cluster.store_revision())
        token = await get(http, edge, "/state")
        pid = inspected()["Pid"]

        # Idle for sleep_after: frozen, not stopped; its memory counts against the node, its CPU
        # does not.
        paused = await watch.wait_for("paused", "s1")
        assert paused.reason == "idle for 1s"
        await eventually(lambda: inspected()["Paused"], what="docker inspect says Paused")
        assert await state_of(stub) == "paused"
        listed = (await stub.ListInstances(cp.ListInstancesRequest(class_name="Frozen"))).instances
        assert [i.state for i in listed] == ["paused"]
        (node,) = (await stub.ListNodes(cp.ListNodesRequest())).nodes
        assert (node.used_vcpu, node.used_memory_mib, node.instances) == (0.0, 256, 0)
        # No exec into a frozen container unless asked to wake it.
        code, text = await status_of(exec_true(stub))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "is paused" in text, text

        # The next request thaws it: the same process, its memory kept.
        assert await get(http, edge, "/state") == token
        resumed = await watch.wait_for("resumed", "s1")
        assert resumed.reason == "a request"
        assert inspected()["Pid"] == pid and not inspected()["Paused"]
        assert watch.kinds("s1").count("starting") == 1  # its one boot

        # A request in flight longer than sleep_after is never paused under it.
        slow = asyncio.create_task(get(http, edge, "/slow?3"))
        await asyncio.sleep(2.5)
        assert not inspected()["Paused"] and await state_of(stub) == "healthy"
        assert await slow == "slept 3"
        assert watch.kinds("s1").count("paused") == 1

        # Paused again, then stopped after pause_max: asleep, as a "stop" sleep would be; the
        # next wake is a boot of a new process, its memory gone.
        await eventually(lambda: watch.kinds("s1").count("paused") == 2, within=10)
        slept = await watch.wait_for("slept", "s1", within=15)
        expired = [e for e in watch.events if e.kind == "activity-expired"]
        assert [e.reason for e in expired] == ["paused for 4s"]
        assert slept.revision > expired[0].revision
        assert await state_of(stub) == "sleeping"
        assert inspected()["Status"] == "exited"
        assert await get(http, edge, "/state") != token
        assert inspected()["Pid"] != pid
        watch.close()


async def exec_true(stub: Any) -> Any:
    """An exec without wake into the instance; its first reply (or its error)."""
    call = stub.Exec()
    await call.write(pb.ExecRequest(start=pb.ExecStart(instance=BOX, command=["true"])))
    await call.done_writing()
    return await call.read()
