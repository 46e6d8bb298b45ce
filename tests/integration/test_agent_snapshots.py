"""Snapshots on the real engine, through the agent's pieces: a running container's writable layer
is committed, made into a clean image (the base image's config: never the container's env) and
pushed over gRPC into a real image store (controlplane/images.py), which verifies it and keeps only
the new layer; a node that lacks it pulls only that layer and makes a container from it, on a
Start and after a re-placement; snapshot_on_sleep takes one after a sleep that changed the layer.

The control plane's side (its records, RecordSnapshot's checks) is the end-to-end test's
(tests/e2e/test_snapshots.py); here a small servicer records what the agent sends."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import tarfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest

from controlplane.images import ImageStore
from nodeagent.images import ControlPlaneImages, ImageKeeper
from nodeagent.instances import InstanceManager, Timing
from nodeagent.runtime import DockerRuntime
from nodeagent.snapshots import COMMIT_REPOSITORY, Snapshots
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.build import image_reference, snapshot_reference
from portside.convert import snapshot_from_pb, snapshot_to_pb
from portside.errors import Unavailable
from portside.events import Event, EventKind
from portside.rpc import grpc_errors
from portside.snapshots import Snapshot
from portside.spec import INSTANCE_TYPES, ContainerClass, instance_id
from tests.support import eventually

pytestmark = pytest.mark.integration

CHUNK = 256 * 1024


class ControlPlane(cp_grpc.ControlPlaneServicer):
    """PushImage and PullImage over a real image store; RecordSnapshot and LatestSnapshot
    recorded and answered from memory."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self.pushes: list[tuple[str, int, int]] = []  # digest, bytes received, bytes stored
        self.pulls: list[tuple[str, int]] = []  # digest, bytes sent
        self.recorded: list[tuple[Snapshot, str]] = []
        self.latest: dict[str, Snapshot] = {}  # by instance name

    @grpc_errors
    async def PushImage(
        self, request_iterator: AsyncIterator[cp.PushImageRequest], context: Any
    ) -> cp.PushImageResponse:
        messages = aiter(request_iterator)
        first = await anext(messages)
        received = len(first.data)

        async def archive() -> AsyncIterator[bytes]:
            nonlocal received
            yield first.data
            async for message in messages:
                received += len(message.data)
                yield message.data

        ingested = await self.store.ingest(first.digest, first.reference, archive())
        self.pushes.append((first.digest, received, ingested.stored_bytes))
        return cp.PushImageResponse(
            digest=first.digest,
            size_bytes=ingested.image.size_bytes,
            stored_bytes=ingested.stored_bytes,
        )

    @grpc_errors
    async def PullImage(
        self, request: cp.PullImageRequest, context: Any
    ) -> AsyncIterator[cp.PullImageResponse]:
        image = await self.store.stored(request.digest)
        assert image is not None, f"the store lacks {request.digest}"
        sent = 0
        async for chunk in self.store.export(image, request.have_chain_ids):
            sent += len(chunk)
            yield cp.PullImageResponse(data=chunk)
        self.pulls.append((request.digest, sent))

    @grpc_errors
    async def RecordSnapshot(
        self, request: cp.RecordSnapshotRequest, context: Any
    ) -> cp.RecordSnapshotResponse:
        taken = snapshot_from_pb(request.snapshot)
        sid = taken.digest.removeprefix("sha256:")[:12]
        recorded = dataclasses.replace(taken, id=sid, name=taken.name or sid)
        self.recorded.append((recorded, request.instance_id))
        return cp.RecordSnapshotResponse(snapshot=snapshot_to_pb(recorded))

    @grpc_errors
    async def LatestSnapshot(
        self, request: cp.LatestSnapshotRequest, context: Any
    ) -> cp.LatestSnapshotResponse:
        found = self.latest.get(request.instance.name)
        if found is None:
            return cp.LatestSnapshotResponse(found=False)
        return cp.LatestSnapshotResponse(found=True, snapshot=snapshot_to_pb(found))


@dataclass
class Node:
    """One agent's pieces on the test's engine, with a control plane of the test's own."""

    cls: ContainerClass
    classes: dict[str, ContainerClass]  # as the control plane's config has them
    control: ControlPlane
    manager: InstanceManager
    events: list[Event]
    client: docker.DockerClient

    def exec(self, name: str, script: str) -> str:
        """Run `script` with sh in the instance's container; its stdout."""
        container = self.client.containers.get(self.container_of(name))
        code, output = container.exec_run(["sh", "-c", script])
        assert code == 0, output
        return str(output.decode()).strip()

    def container_of(self, name: str) -> str:
        snap = self.manager.get(instance_id(self.cls.name, name))
        assert snap is not None and snap.container_id is not None
        return snap.container_id


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:10]


@contextlib.asynccontextmanager
async def control_plane(
    store_dir: Path, client: docker.DockerClient, image: str, reference: str
) -> AsyncIterator[tuple[ControlPlane, grpc.aio.Channel]]:
    """An image store under `store_dir` that holds `image` as `reference` (as `portside deploy`
    leaves it), served on loopback: the servicer, and a channel to it."""
    store = ImageStore(store_dir)
    store.prepare()

    async def saved() -> AsyncIterator[bytes]:
        for piece in client.api.get_image(image, CHUNK):
            yield piece

    await store.ingest(image, reference, saved())
    control = ControlPlane(store)
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(control, server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    channel = net.grpc_channel(address)
    try:
        yield control, channel
    finally:
        await channel.close()
        await server.stop(0)


@pytest.fixture
async def node(
    docker_client: docker.DockerClient, echo_image: str, node_id: str, uid: str, tmp_path: Path
) -> AsyncIterator[Node]:
    """A class on the echo image (held by the image store, as `portside deploy` leaves it), an
    agent's instance manager with its image keeper and snapshots over gRPC."""
    name = f"snap-{uid}"
    reference = image_reference(name, echo_image)
    repository, _, tag = reference.rpartition(":")
    docker_client.api.tag(echo_image, repository, tag)
    cls = ContainerClass(
        name,
        reference,
        image_digest=echo_image,
        instance_type=INSTANCE_TYPES["lite"],
        env={"API_KEY": f"s3cret-{uid}"},
        boot_timeout_s=20.0,
        sleep_after_s=3600.0,
        version=3,
    )
    classes = {cls.name: cls}
    events: list[Event] = []
    try:
        async with control_plane(tmp_path / "images", docker_client, echo_image, reference) as (
            control,
            channel,
        ):
            runtime = DockerRuntime(node_id)
            keeper = ImageKeeper(
                runtime, ControlPlaneImages(channel), lambda: [cls], node_id=node_id
            )
            manager = InstanceManager(
                runtime,
                classes.get,
                timing=Timing(reconcile=3600),
                on_event=events.append,
                node_id=node_id,
                images=keeper,
                snapshots=Snapshots(runtime, channel, node_id=node_id),
            )
            try:
                yield Node(cls, classes, control, manager, events, docker_client)
            finally:
                await manager.close()
                await keeper.close()
                await runtime.close()
    finally:
        for image in docker_client.images.list(f"portside/{name}.snapshot"):
            for container in docker_client.containers.list(
                all=True, filters={"ancestor": image.id}
            ):
                container.remove(force=True)
            docker_client.images.remove(image.id, force=True)
        docker_client.api.remove_image(reference)


def saved_config(client: docker.DockerClient, image_id: str) -> bytes:
    """The image's config as the engine keeps it (from its `docker save`)."""
    archive = tarfile.open(fileobj=io.BytesIO(b"".join(client.api.get_image(image_id))))
    member = archive.extractfile(image_id.removeprefix("sha256:") + ".json")
    assert member is not None
    return member.read()


async def test_a_snapshot_keeps_the_layer_and_none_of_the_containers_env(
    node: Node, uid: str, echo_image: str
) -> None:
    cls, client = node.cls, node.client
    iid = instance_id(cls.name, "a")
    await node.manager.start(cls, "a")
    written = node.exec("a", "head -c 300000 /dev/urandom > /blob && md5sum /blob")
    snap = await node.manager.take_snapshot(iid, "first")
    assert snap is not None and snap.name == "first"
    assert snap.reference == snapshot_reference(cls.name, snap.digest)
    assert snap.id == snap.digest[7:19] and snap.trigger == "create"
    assert (snap.class_name, snap.instance_name, snap.version) == (cls.name, "a", 3)
    assert snap.image_digest == echo_image
    assert 300_000 < snap.layer_bytes < 320_000
    [(recorded, recorded_iid)] = node.control.recorded
    assert recorded == snap and recorded_iid == iid

    # The image here and in the store: the base image's config, no trace of the container.
    inspected = client.api.inspect_image(snap.digest)
    base = client.api.inspect_image(echo_image)
    assert inspected["Config"]["Env"] == base["Config"]["Env"]
    assert inspected["Config"]["Cmd"] == base["Config"]["Cmd"]
    assert inspected["RootFS"]["Layers"][:-1] == base["RootFS"]["Layers"]
    assert snap.reference in inspected["RepoTags"]
    config = saved_config(client, snap.digest)
    assert b"s3cret" not in config and b"PORTSIDE_INSTANCE" not in config
    assert node.container_of("a")[:12].encode() not in config
    # Only the new layer travelled and was stored: the store had the class image's.
    [(digest, received, stored)] = node.control.pushes
    assert digest == snap.digest
    assert snap.layer_bytes <= received < snap.layer_bytes + 16_384
    assert snap.layer_bytes <= stored < snap.layer_bytes + 16_384
    # No commit is left behind: the engine has the snapshot image, and nothing dangling of it.
    assert client.images.list(COMMIT_REPOSITORY) == []
    dangling = client.api.images(filters={"dangling": True}, quiet=True)
    assert not any(
        client.api.inspect_image(d)["RootFS"]["Layers"] == inspected["RootFS"]["Layers"]
        for d in dangling
        if d != snap.digest
    )
    [taken] = [e for e in node.events if e.kind is EventKind.SNAPSHOT_TAKEN]
    assert taken.reason.startswith(f"{snap.id} (")

    # A node that lacks it pulls only its layer, and a Start makes a container from it there.
    client.images.remove(snap.digest, force=True)
    node.control.pulls.clear()
    await node.manager.start(cls, "b", snapshot=snap)
    assert node.exec("b", "md5sum /blob") == written
    [(pulled, sent)] = node.control.pulls
    assert pulled == snap.digest and sent < snap.layer_bytes + 16_384
    inspected = client.api.inspect_container(node.container_of("b"))
    assert inspected["Image"] == snap.digest
    labels = inspected["Config"]["Labels"]
    assert labels["portside.snapshot"] == snap.id
    assert labels["portside.class_image"] == echo_image
    assert labels["portside.version"] == "3" and labels["portside.instance"] == "b"
    # The class's env is given at the boot, as to any container.
    assert f"API_KEY=s3cret-{uid}" in inspected["Config"]["Env"]
    assert "PORTSIDE_INSTANCE=b" in inspected["Config"]["Env"]
    restored = [e for e in node.events if e.kind is EventKind.SNAPSHOT_RESTORED]
    assert [(e.name, e.reason) for e in restored] == [("b", f"{snap.id} (first)")]

    # A snapshot of a container made from a snapshot records the class image it stands on.
    node.exec("b", "echo more > /more")
    second = await node.manager.take_snapshot(instance_id(cls.name, "b"))
    assert second is not None and second.image_digest == echo_image
    assert second.name == second.id and second.layer_bytes < 16_384


async def test_a_first_container_after_a_replacement_starts_from_the_latest_snapshot(
    node: Node,
) -> None:
    cls = node.cls
    await node.manager.start(cls, "a")
    written = node.exec("a", "head -c 100000 /dev/urandom > /blob && md5sum /blob")
    snap = await node.manager.take_snapshot(instance_id(cls.name, "a"))
    assert snap is not None
    node.control.latest["c"] = snap  # "c" was placed anew: its node was lost
    hold = await node.manager.acquire(cls, "c")
    hold.release()
    assert node.exec("c", "md5sum /blob") == written
    restored = [e for e in node.events if e.kind is EventKind.SNAPSHOT_RESTORED]
    assert [e.reason for e in restored] == [
        f"{snap.id} ({snap.id}): placed anew after its node was lost"
    ]
    # An instance not placed anew starts fresh.
    await node.manager.start(cls, "d")
    with pytest.raises(AssertionError):
        node.exec("d", "test -e /blob")


async def test_snapshot_on_sleep_takes_one_when_the_layer_changed(node: Node) -> None:
    cls = dataclasses.replace(node.cls, snapshot_on_sleep=True, sleep_after_s=0.2)
    manager = node.manager
    iid = instance_id(cls.name, "s")
    node.classes[cls.name] = cls  # as a deploy changed it
    (await manager.acquire(cls, "s")).release()
    node.exec("s", "echo one > /state")
    await asyncio.sleep(cls.sleep_after_s)
    assert manager.sleep_idle() == [iid]
    await eventually(lambda: node.control.recorded, within=30)
    [(snap, _)] = node.control.recorded
    assert snap.trigger == "sleep" and snap.instance_name == "s"

    # Woken and asleep again with the layer unchanged: no second snapshot.
    (await manager.acquire(cls, "s")).release()
    await asyncio.sleep(cls.sleep_after_s)
    assert manager.sleep_idle() == [iid]
    await eventually(lambda: manager.info(iid).state.value == "sleeping")
    await asyncio.sleep(1.0)
    assert len(node.control.recorded) == 1


async def test_the_commit_a_crash_left_behind_is_removed_at_the_agent_s_start(
    node: Node, node_id: str, uid: str
) -> None:
    """A snapshot's commit carries the container's env: one that an agent stopped in the middle
    of a snapshot left in the engine goes when the next agent starts."""
    await node.manager.start(node.cls, "c")
    runtime = DockerRuntime(node_id)
    nowhere = net.grpc_channel(f"127.0.0.1:{net.free_port()}")  # the sweep asks it nothing
    container = node.container_of("c")
    left = await runtime.commit(container, f"{COMMIT_REPOSITORY}:{uid}00.{node_id}")
    # Another node's agent on the same engine may be in the middle of a snapshot.
    others = await runtime.commit(container, f"{COMMIT_REPOSITORY}:{uid}00.x{node_id}")
    try:
        assert f"API_KEY=s3cret-{uid}" in node.client.api.inspect_image(left)["Config"]["Env"]
        assert await Snapshots(runtime, nowhere, node_id=node_id).remove_leftover_commits() == 1
        assert await runtime.image_id(left) is None
        assert await runtime.image_id(others) is not None
        assert await runtime.image_id(node.cls.image) is not None  # the class image stays
    finally:
        await runtime.remove_image(others)
        await nowhere.close()
        await runtime.close()


async def test_a_first_container_is_not_made_when_the_control_plane_cannot_say(
    node: Node, node_id: str
) -> None:
    runtime = DockerRuntime(node_id)
    nowhere = net.grpc_channel(f"127.0.0.1:{net.free_port()}")  # nothing listens there
    manager = InstanceManager(
        runtime,
        {node.cls.name: node.cls}.get,
        node_id=node_id,
        snapshots=Snapshots(runtime, nowhere, node_id=node_id, deadline_s=1.0),
    )
    try:
        with pytest.raises(Unavailable) as caught:
            await manager.acquire(node.cls, "x")
        message = str(caught.value)
        assert message.startswith(
            f"cannot make the first container of {node.cls.name}/x on node {node_id}: the "
            "control plane could not say whether it starts from a snapshot ("
        )
        assert "\n" not in message
        assert await runtime.list() == []
    finally:
        await manager.close()
        await runtime.close()
        await nowhere.close()


async def test_a_control_plane_older_than_snapshots_has_none_to_give(
    node: Node, node_id: str
) -> None:
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(cp_grpc.ControlPlaneServicer(), server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    runtime = DockerRuntime(node_id)
    try:
        async with net.grpc_channel(address) as channel:
            assert await Snapshots(runtime, channel).latest(node.cls, "x") is None
    finally:
        await runtime.close()
        await server.stop(0)
