"""The node agent's Docker runtime and instance manager against the real engine: labels, limits,
private networks, one boot per instance, crash, timeout and image errors, sleep, wake, adoption,
and stopping every container when the agent shuts down."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator

import aiohttp
import docker
import pytest

from nodeagent.instances import InstanceManager, Timing, Upstream
from nodeagent.runtime import (
    NETWORK_EGRESS,
    NETWORK_INTERNAL,
    ContainerInfo,
    DockerRuntime,
    container_name,
)
from nodeagent.runtime.labels import LABEL_CLASS, LABEL_INSTANCE, LABEL_INSTANCE_ID, LABEL_NODE
from portside.errors import (
    BootTimeout,
    ContainerExited,
    FailedPrecondition,
    ImageUnavailable,
    NotFound,
)
from portside.spec import INSTANCE_TYPES, ContainerClass, instance_id
from portside.states import InstanceState
from tests.images.build import ECHO_IMAGE
from tests.support import eventually

pytestmark = pytest.mark.integration

ECHO = ContainerClass(
    "echo",
    ECHO_IMAGE,
    instance_type=INSTANCE_TYPES["lite"],
    sleep_after_s=2.0,
    boot_timeout_s=10.0,
    env={"GREETING": "hi"},
)
CRASH = dataclasses.replace(ECHO, name="crash", entrypoint=("/bin/sh", "-c", "exit 3"))
SILENT = dataclasses.replace(
    ECHO, name="silent", entrypoint=("/bin/sleep", "3600"), boot_timeout_s=1.5
)
OPEN = dataclasses.replace(ECHO, name="open", enable_internet=True)
CLASSES = {c.name: c for c in (ECHO, CRASH, SILENT, OPEN)}


@pytest.fixture
async def runtime(node_id: str, echo_image: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(node_id)
    yield rt
    await rt.close()


@pytest.fixture
async def manager(runtime: DockerRuntime) -> AsyncIterator[InstanceManager]:
    mgr = InstanceManager(runtime, CLASSES.get)
    await mgr.adopt()
    loop = asyncio.create_task(mgr.run())
    yield mgr
    loop.cancel()
    await mgr.close()


async def get(upstream: Upstream, path: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{upstream.host}:{upstream.port}{path}") as response,
    ):
        assert response.status == 200, await response.text()
        return await response.text()


async def get_soon(upstream: Upstream, path: str) -> str:
    """`get`, once the container's port answers."""

    async def attempt() -> str:
        try:
            return await get(upstream, path)
        except aiohttp.ClientConnectionError:
            return ""  # not yet

    return await eventually(attempt, every=0.02)


def exec_in(docker_client: docker.DockerClient, container_id: str, *cmd: str) -> str:
    result = docker_client.containers.get(container_id).exec_run(list(cmd))
    output: bytes = result.output
    return output.decode()


# -- runtime ------------------------------------------------------------------------------------


async def test_container_has_labels_limits_and_a_private_network(
    runtime: DockerRuntime, node_id: str, docker_client: docker.DockerClient
) -> None:
    container_id = await runtime.create(ECHO, "alice")
    info = await runtime.start(container_id)
    assert info.running and info.ip is not None and info.port == 8080
    iid = instance_id("echo", "alice")
    assert info.name == container_name(node_id, iid) == f"portside-{node_id}-{iid[:16]}"
    assert (info.class_name, info.instance_name, info.instance_id) == ("echo", "alice", iid)

    attrs = docker_client.api.inspect_container(container_id)
    labels = attrs["Config"]["Labels"]
    assert {labels[k] for k in (LABEL_CLASS, LABEL_INSTANCE, LABEL_INSTANCE_ID, LABEL_NODE)} == {
        "echo",
        "alice",
        iid,
        node_id,
    }
    host = attrs["HostConfig"]
    assert host["NanoCpus"] == 62_500_000  # lite: 1/16 vCPU
    assert host["Memory"] == host["MemorySwap"] == 256 * 1024 * 1024
    assert host["Privileged"] is False and host["Init"] is True
    assert host["PidsLimit"] == 1024 and "no-new-privileges" in host["SecurityOpt"]
    assert host["PortBindings"] in (None, {})  # nothing published on the host
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    assert env["PORTSIDE_INSTANCE"] == "alice" and env["PORTSIDE_INSTANCE_ID"] == iid
    assert env["PORTSIDE_CLASS"] == "echo" and env["PORT"] == "8080" and env["GREETING"] == "hi"

    # No internet: the only network is Portside's internal one, checked from the network's
    # settings and the host's firewall, never by sending traffic out.
    assert list(attrs["NetworkSettings"]["Networks"]) == [NETWORK_INTERNAL]
    assert attrs["HostConfig"]["NetworkMode"] == runtime_network_id(docker_client, NETWORK_INTERNAL)
    assert_no_egress(docker_client, NETWORK_INTERNAL)

    # The agent, on the host, reaches the container at its IP on that network.
    whoami = await get_soon(Upstream(info.ip, 8080), "/session/whoami")
    assert whoami.split() == [attrs["Config"]["Hostname"], "alice"]

    await runtime.stop(container_id, 5)
    stopped = await runtime.inspect(container_id)
    assert stopped.status == "exited" and stopped.exit_code == 143 and stopped.ip is None
    assert stopped.started_at is not None and stopped.finished_at is not None
    assert stopped.finished_at >= stopped.started_at
    listed = await runtime.list()
    assert [(c.id, c.status, c.exit_code) for c in listed] == [(container_id, "exited", 143)]
    await runtime.remove(container_id)
    await runtime.remove(container_id)  # removing twice is fine
    assert await runtime.list() == []


async def test_internet_class_joins_the_egress_bridge(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    container_id = await runtime.create(OPEN, "bob")
    await runtime.start(container_id)
    attrs = docker_client.api.inspect_container(container_id)
    assert list(attrs["NetworkSettings"]["Networks"]) == [NETWORK_EGRESS]
    assert docker_client.networks.get(NETWORK_EGRESS).attrs["Internal"] is False
    assert "default via" in exec_in(docker_client, container_id, "ip", "route")
    subnet = docker_client.networks.get(NETWORK_EGRESS).attrs["IPAM"]["Config"][0]["Subnet"]
    assert f"-s {subnet} " in iptables("-t", "nat", "-S", "POSTROUTING")  # masqueraded out


def runtime_network_id(docker_client: docker.DockerClient, name: str) -> str:
    network_id: str = docker_client.networks.get(name).id
    return network_id


def iptables(*args: str) -> str:
    return subprocess.run(["iptables", *args], check=True, capture_output=True, text=True).stdout


def assert_no_egress(docker_client: docker.DockerClient, name: str) -> None:
    """An internal network: Docker drops whatever leaves its subnet and masquerades nothing.
    (Containers still get a default route to the host's bridge address; the drop is there.)"""
    network = docker_client.networks.get(name)
    assert network.attrs["Internal"] is True
    subnet = network.attrs["IPAM"]["Config"][0]["Subnet"]
    bridge = f"br-{network.id[:12]}"
    isolation = iptables("-S", "DOCKER-ISOLATION-STAGE-1")
    assert f"-A DOCKER-ISOLATION-STAGE-1 ! -d {subnet} -i {bridge} -j DROP" in isolation
    assert f"-s {subnet} " not in iptables("-t", "nat", "-S", "POSTROUTING")


async def test_entrypoint_override_and_exit_code(runtime: DockerRuntime) -> None:
    container_id = await runtime.create(CRASH, "carol")
    await runtime.start(container_id)

    async def exited() -> ContainerInfo:
        info = await runtime.inspect(container_id)
        assert not info.running
        return info

    info: ContainerInfo = await eventually(exited)
    assert info.status == "exited" and info.exit_code == 3


async def test_networks_are_made_once_by_racing_agents(
    node_id: str, docker_client: docker.DockerClient
) -> None:
    internal, egress = f"{node_id}-int", f"{node_id}-egr"
    agents = [
        DockerRuntime(f"{node_id}-{i}", internal_network=internal, egress_network=egress)
        for i in range(3)
    ]
    try:
        await asyncio.gather(*(agent.ensure_networks() for agent in agents))
        await agents[0].ensure_networks()  # and again, once they exist
        for name, is_internal in ((internal, True), (egress, False)):
            found = [n for n in docker_client.networks.list(names=[name]) if n.name == name]
            assert len(found) == 1 and found[0].attrs["Internal"] is is_internal
            assert found[0].attrs["Labels"] == {"portside.managed": "true"}
            assert found[0].attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    finally:
        for agent in agents:
            await agent.close()
        for name in (internal, egress):
            for network in docker_client.networks.list(names=[name]):
                if network.name == name:
                    network.remove()


async def test_unpause_on_kept_alive_connections_and_its_failures(runtime: DockerRuntime) -> None:
    container_id = await runtime.create(ECHO, "erin")
    await runtime.start(container_id)
    for _ in range(3):  # again and again on the connection the first unpause opened
        await runtime.pause(container_id)
        assert (await runtime.inspect(container_id)).paused
        await runtime.unpause(container_id)
        info = await runtime.inspect(container_id)
        assert info.running and not info.paused
    with pytest.raises(FailedPrecondition, match="is not paused"):
        await runtime.unpause(container_id)
    await runtime.remove(container_id, force=True)
    with pytest.raises(NotFound):
        await runtime.unpause(container_id)


async def test_create_twice_reuses_the_container(runtime: DockerRuntime) -> None:
    # A create whose answer was lost leaves a container of that name: the retry must find it.
    first = await runtime.create(ECHO, "dave")
    assert await runtime.create(ECHO, "dave") == first


# -- instance manager ---------------------------------------------------------------------------


async def test_concurrent_requests_boot_one_container(
    manager: InstanceManager, runtime: DockerRuntime
) -> None:
    started = time.monotonic()
    leases = await asyncio.gather(*(manager.acquire(ECHO, "erin") for _ in range(50)))
    boot_s = time.monotonic() - started
    containers = await runtime.list()
    assert len(containers) == 1 and containers[0].running
    assert {lease.upstream for lease in leases} == {leases[0].upstream}
    hostname, name = (await get(leases[0].upstream, "/s/whoami")).split()
    assert containers[0].id.startswith(hostname) and name == "erin"
    for lease in leases:
        lease.release()
    assert boot_s < 5


async def test_crash_during_boot_is_container_exited_with_its_code(
    manager: InstanceManager,
) -> None:
    with pytest.raises(ContainerExited) as caught:
        await manager.acquire(CRASH, "fay")
    assert caught.value.exit_code == 3
    assert str(caught.value) == (
        "container for crash/fay exited with code 3 before its port 8080 answered; next try in 1s"
    )


async def test_silent_port_is_boot_timeout_within_the_deadline(
    manager: InstanceManager, runtime: DockerRuntime
) -> None:
    started = time.monotonic()
    with pytest.raises(BootTimeout, match=r"port 8080 did not answer within 1\.5s"):
        await manager.acquire(SILENT, "gus")
    assert 1.5 <= time.monotonic() - started < 2.0
    # The container is stopped after a timeout (docker-init passes SIGTERM on to sleep).
    iid = instance_id("silent", "gus")
    await eventually(lambda: _state(manager, iid) is InstanceState.STOPPED, within=6)
    assert [c.status for c in await runtime.list()] == ["exited"]


def _state(manager: InstanceManager, iid: str) -> InstanceState | None:
    snap = manager.get(iid)
    return snap.state if snap is not None else None


async def test_sleeps_after_idle_but_never_during_a_request_and_wakes_with_its_state(
    manager: InstanceManager, runtime: DockerRuntime
) -> None:
    iid = instance_id("echo", "hal")
    async with manager.use(ECHO, "hal") as upstream:
        assert await get(upstream, "/s/state?write=kept%21") == "wrote kept!"
        # A request longer than sleep_after (2 s) holds the instance awake throughout.
        slow = asyncio.create_task(get(upstream, "/s/slow?3"))
        while not slow.done():  # a watch over the whole request, not a wait for a change
            assert _state(manager, iid) is InstanceState.HEALTHY
            await asyncio.sleep(0.1)
        assert await slow == "slept 3"
    released = time.monotonic()
    await eventually(lambda: _state(manager, iid) is InstanceState.SLEEPING, within=3.5)
    assert time.monotonic() - released <= 3.0
    [container] = await runtime.list()
    assert container.status == "exited"

    async with manager.use(ECHO, "hal") as upstream:
        assert await get(upstream, "/s/state") == "kept!"
    [woken] = await runtime.list()
    assert woken.id == container.id and woken.running


async def test_container_that_exits_while_running_is_noticed_and_booted_again(
    runtime: DockerRuntime,
) -> None:
    manager = InstanceManager(runtime, CLASSES.get, timing=Timing(reconcile=0.2))
    loop = asyncio.create_task(manager.run())
    try:
        iid = instance_id("echo", "ida")
        hold = await manager.acquire(ECHO, "ida")
        async with hold as upstream:
            assert "ida" in await get(upstream, "/s/whoami")
            hold.served()  # as the data plane marks it: it served, so it is no crash loop
            with pytest.raises(aiohttp.ClientError):
                await get(upstream, "/s/exit")
        await eventually(lambda: _state(manager, iid) is InstanceState.STOPPED_WITH_CODE, within=2)
        snap = manager.get(iid)
        assert snap is not None and snap.exit_code == 143
        async with manager.use(ECHO, "ida") as upstream:
            assert "ida" in await get(upstream, "/s/whoami")
    finally:
        loop.cancel()
        await manager.close()


async def test_new_manager_adopts_running_and_stopped_containers(runtime: DockerRuntime) -> None:
    first = InstanceManager(runtime, CLASSES.get)
    await first.adopt()
    async with first.use(ECHO, "jo") as upstream:
        jo_host = (await get(upstream, "/whoami")).split()[0]
    async with first.use(ECHO, "kim") as upstream:
        await get(upstream, "/state?write=before")
    kim = first.get(instance_id("echo", "kim"))
    assert kim is not None and kim.container_id is not None
    await runtime.stop(kim.container_id, 5)
    await first.close()  # the agent goes away; its containers stay as they are

    second = InstanceManager(runtime, CLASSES.get)
    adopted = {s.name: s for s in await second.adopt()}
    assert {n: s.state for n, s in adopted.items()} == {
        "jo": InstanceState.HEALTHY,
        "kim": InstanceState.STOPPED,
    }
    async with second.use(ECHO, "jo") as upstream:
        assert (await get(upstream, "/whoami")).split()[0] == jo_host
    async with second.use(ECHO, "kim") as upstream:
        assert await get(upstream, "/state") == "before"
    assert len(await runtime.list()) == 2
    await second.close()


# -- errors of the image and stopping on exit ----------------------------------------------------


@pytest.mark.parametrize(
    ("image", "says"),
    [
        ("./container/Dockerfile", "is not an image reference"),
        ("portside-test/no-such-image:1", "is not on node"),
    ],
)
async def test_an_image_the_node_cannot_run_is_image_unavailable(
    manager: InstanceManager, node_id: str, image: str, says: str
) -> None:
    cls = dataclasses.replace(ECHO, name="web", image=image)
    for attempt in (manager.acquire(cls, "a"), manager.start(cls, "b")):
        with pytest.raises(ImageUnavailable) as caught:
            await attempt
        message = str(caught.value)
        assert says in message and repr(image) in message and node_id in message
        assert "unreachable" not in message


async def test_stop_all_stops_every_container_and_the_next_agent_wakes_them(
    runtime: DockerRuntime,
) -> None:
    first = InstanceManager(runtime, CLASSES.get, timing=Timing(stop_grace=2))
    await first.adopt()
    async with first.use(ECHO, "kay") as upstream:
        await get(upstream, "/state?write=kept")
    async with first.use(ECHO, "lee") as upstream:
        lee_host = (await get(upstream, "/whoami")).split()[0]
    started = time.monotonic()
    assert await first.stop_all() == []
    assert time.monotonic() - started < 3, "stopped in parallel, each within its grace"
    assert {i.name: i.state for i in first.infos()} == {
        "kay": InstanceState.STOPPED,
        "lee": InstanceState.STOPPED,
    }
    assert [c.status for c in await runtime.list()] == ["exited", "exited"]
    await first.close()

    second = InstanceManager(runtime, CLASSES.get)
    adopted = await second.adopt()
    assert {s.name: s.state for s in adopted} == {
        "kay": InstanceState.STOPPED,
        "lee": InstanceState.STOPPED,
    }
    async with second.use(ECHO, "kay") as upstream:
        assert await get(upstream, "/state") == "kept"  # its writable layer was kept
    async with second.use(ECHO, "lee") as upstream:
        assert (await get(upstream, "/whoami")).split()[0] == lee_host
    assert len(await runtime.list()) == 2
    await second.close()
