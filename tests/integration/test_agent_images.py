"""The agent gets images into the real engine: an archive streamed in chunks loads as its digest
(with the layers the engine has left out), a wrong one is refused and removed, a boot waits for
its image, the heartbeat reports images and prefetches what the control plane asks for over gRPC,
and a registry that cannot be reached fails clearly without showing its credentials."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import sys
import tarfile
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import docker
import docker.errors
import grpc
import pytest

from nodeagent.agent import Heartbeat
from nodeagent.images import ControlPlaneImages, ImageKeeper, RegistryAuth, chain_ids
from nodeagent.instances import InstanceManager
from nodeagent.pools import PoolKeeper, UsageSampler
from nodeagent.runtime import DockerRuntime
from nodeagent.runtime.protocol import RegistryCredential
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import ImageUnavailable, Unavailable
from portside.spec import INSTANCE_TYPES, ContainerClass, Node
from tests.support import eventually

pytestmark = pytest.mark.integration

_IMAGES = Path(__file__).resolve().parents[1] / "images"
CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Built:
    id: str
    tag: str
    archive: bytes  # `docker save` of the tag


class Images:
    """Builds images of this test's own (a unique label and file, so unique ids; their lower
    layers are the echo image's) and removes every one at the end."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.made: list[str] = []
        self.uid = uuid.uuid4().hex[:10]

    def build(self, name: str) -> Built:
        tag = f"portside-test/images-{self.uid}-{name}:1"
        with tempfile.TemporaryDirectory(prefix="portside-image-") as context:
            shutil.copytree(_IMAGES / "echo", context, dirs_exist_ok=True)
            busybox = shutil.which("busybox")
            assert busybox is not None, "busybox is not installed"
            shutil.copy2(Path(busybox).resolve(), Path(context) / "busybox")
            (Path(context) / "unique.txt").write_text(f"{self.uid}-{name}\n")
            with open(Path(context) / "Dockerfile", "a") as dockerfile:
                dockerfile.write(f"COPY unique.txt /unique.txt\nLABEL portside.test={tag}\n")
            image, _logs = self.client.images.build(path=context, tag=tag, rm=True, forcerm=True)
        self.made.append(image.id)
        archive = b"".join(self.client.api.get_image(tag))
        return Built(image.id, tag, archive)

    def remove(self, image_id: str) -> None:
        self.client.api.remove_image(image_id, force=True)

    def has(self, reference: str) -> str | None:
        try:
            return str(self.client.api.inspect_image(reference)["Id"])
        except docker.errors.ImageNotFound:
            return None

    def cleanup(self) -> None:
        for image_id in self.made:
            try:
                self.client.api.remove_image(image_id, force=True)
            except docker.errors.NotFound:
                pass


@pytest.fixture
def images(docker_client: docker.DockerClient, echo_image: str) -> Iterator[Images]:
    made = Images(docker_client)
    yield made
    made.cleanup()


@pytest.fixture
async def engine(node_id: str) -> AsyncIterator[DockerRuntime]:
    runtime = DockerRuntime(node_id)
    yield runtime
    await runtime.close()


def without_layers(archive: bytes, have_chain_ids: Sequence[str]) -> tuple[bytes, int]:
    """The archive less the layer files whose chain the engine has, as the control plane sends
    it; and how many it left out."""
    source = tarfile.open(fileobj=io.BytesIO(archive))
    manifest = json.loads(source.extractfile("manifest.json").read())  # type: ignore[union-attr]
    layers = manifest[0]["Layers"]
    diff_ids = [
        "sha256:" + hashlib.sha256(source.extractfile(path).read()).hexdigest()  # type: ignore[union-attr]
        for path in layers
    ]
    have = set(have_chain_ids)
    dropped = {
        path for path, chain in zip(layers, chain_ids(diff_ids), strict=True) if chain in have
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as target:
        for member in source.getmembers():
            if member.name not in dropped:
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
    return out.getvalue(), len(dropped)


class Source:
    """A control plane's image store: serves archives by digest in chunks, the layers the
    caller has left out."""

    def __init__(self) -> None:
        self.archives: dict[str, bytes] = {}
        self.calls: list[tuple[str, list[str]]] = []
        self.left_out = 0

    def archive_for(self, digest: str, have_chain_ids: Sequence[str]) -> bytes:
        self.calls.append((digest, list(have_chain_ids)))
        data, left_out = without_layers(self.archives[digest], have_chain_ids)
        self.left_out += left_out
        return data

    async def pull(self, digest: str, have_chain_ids: Sequence[str]) -> AsyncIterator[bytes]:
        data = self.archive_for(digest, have_chain_ids)
        for i in range(0, len(data), CHUNK):
            await asyncio.sleep(0)
            yield data[i : i + CHUNK]


def keeper_for(
    engine: DockerRuntime, source: Any, *classes: ContainerClass, **kwargs: Any
) -> ImageKeeper:
    return ImageKeeper(engine, source, lambda: classes, node_id=engine.node_id, **kwargs)


def built_class(built: Built, name: str) -> ContainerClass:
    return ContainerClass(
        name,
        f"portside/{name}:{built.id[7:19]}",
        image_digest=built.id,
        instance_type=INSTANCE_TYPES["lite"],
        boot_timeout_s=20.0,
    )


async def test_an_archive_streamed_in_chunks_loads_as_its_digest_and_is_named(
    images: Images, engine: DockerRuntime
) -> None:
    built = images.build("web")
    cls = built_class(built, f"web-{images.uid}")
    images.remove(built.id)
    assert images.has(built.id) is None
    source = Source()
    source.archives[built.id] = built.archive
    await keeper_for(engine, source, cls).ensure(cls)

    assert images.has(built.id) == built.id
    assert images.has(cls.image) == built.id
    # The chain ids sent are Docker's: the echo image's layers were left out, and loaded anyway.
    [(digest, have)] = source.calls
    assert digest == built.id and source.left_out >= 1
    layers = images.client.api.inspect_image(built.id)["RootFS"]["Layers"]
    assert chain_ids(layers)[-1] not in have and chain_ids(layers)[0] in have


async def test_an_archive_of_another_image_is_refused_and_removed(
    images: Images, engine: DockerRuntime
) -> None:
    wanted, other = images.build("wanted"), images.build("other")
    cls = built_class(wanted, f"wanted-{images.uid}")
    images.remove(wanted.id)
    images.remove(other.id)
    source = Source()
    source.archives[wanted.id] = other.archive  # tampered: the bytes of another image
    with pytest.raises(ImageUnavailable) as caught:
        await keeper_for(engine, source, cls).ensure(cls)
    assert str(caught.value) == (
        f"class {cls.name}: image {wanted.id} from the control plane did not load as its digest: "
        f"the engine loaded {other.tag} instead"
    )
    assert images.has(other.id) is None and images.has(other.tag) is None
    assert images.has(cls.image) is None and images.has(wanted.id) is None


class BreakingSource(Source):
    """Sends the first chunks of the archive, then fails (`error`) or hangs (None)."""

    def __init__(self, error: Exception | None) -> None:
        super().__init__()
        self.error = error
        self.sent = asyncio.Event()

    async def pull(self, digest: str, have_chain_ids: Sequence[str]) -> AsyncIterator[bytes]:
        data = self.archive_for(digest, [])
        yield data[:CHUNK]
        yield data[CHUNK : 2 * CHUNK]
        self.sent.set()
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()


async def test_a_stream_that_breaks_midway_loads_nothing_and_says_why(
    images: Images, engine: DockerRuntime
) -> None:
    built = images.build("broken")
    cls = built_class(built, f"broken-{images.uid}")
    images.remove(built.id)
    source = BreakingSource(Unavailable("the control plane is unreachable: connection reset"))
    source.archives[built.id] = built.archive
    assert len(built.archive) > 2 * CHUNK
    with pytest.raises(ImageUnavailable) as caught:
        await keeper_for(engine, source, cls).ensure(cls)
    assert str(caught.value) == (
        f"class {cls.name}: image {built.id} is not on node {engine.node_id} and could not be "
        "got from the control plane: the control plane is unreachable: connection reset"
    )
    assert images.has(built.id) is None and images.has(built.tag) is None
    # The engine is none the worse: the whole archive loads next time.
    good = Source()
    good.archives[built.id] = built.archive
    await keeper_for(engine, good, cls).ensure(cls)
    assert images.has(cls.image) == built.id


async def test_closing_the_keeper_cuts_a_load_in_progress(
    images: Images, engine: DockerRuntime
) -> None:
    built = images.build("hang")
    cls = built_class(built, f"hang-{images.uid}")
    images.remove(built.id)
    source = BreakingSource(None)
    source.archives[built.id] = built.archive
    keeper = keeper_for(engine, source, cls)
    boot = asyncio.create_task(keeper.ensure(cls))
    await asyncio.wait_for(source.sent.wait(), 10)
    assert keeper.pulling(cls) and not boot.done() and loading()
    await asyncio.wait_for(keeper.close(), 5)
    with pytest.raises(asyncio.CancelledError):
        await boot
    # The thread that fed the engine was handed the end: it returned, and nothing was loaded.
    await eventually(lambda: not loading(), within=5)
    assert await engine.image_id(built.id) is None


def loading() -> bool:
    """Whether a thread is inside DockerRuntime._load (uploading an archive to the engine)."""
    for frame in sys._current_frames().values():
        current: FrameType | None = frame
        while current is not None:
            if current.f_code.co_name == "_load" and "docker_engine" in current.f_code.co_filename:
                return True
            current = current.f_back
    return False


async def test_a_boot_waits_for_its_image_from_the_control_plane(
    images: Images, engine: DockerRuntime
) -> None:
    built = images.build("boot")
    cls = built_class(built, f"boot-{images.uid}")
    images.remove(built.id)
    source = Source()
    source.archives[built.id] = built.archive
    keeper = keeper_for(engine, source, cls)
    manager = InstanceManager(engine, {cls.name: cls}.get, images=keeper, node_id=engine.node_id)
    try:
        holds = await asyncio.gather(*(manager.acquire(cls, "a") for _ in range(3)))
        for hold in holds:
            hold.release()
        assert len(source.calls) == 1
        [container] = await engine.list()
        assert container.running and container.class_name == cls.name
        inspected = images.client.api.inspect_container(container.id)
        assert inspected["Image"] == built.id and inspected["Config"]["Image"] == cls.image
    finally:
        await manager.close()
        await keeper.close()


async def test_a_registry_that_cannot_be_reached_fails_clearly_without_credentials(
    engine: DockerRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    port = net.free_port()  # nothing listens there
    reference = f"127.0.0.1:{port}/portside-test/none:1"
    cls = ContainerClass("remote", reference)
    secret = f"pw-{uuid.uuid4().hex}"
    auth = RegistryAuth({f"127.0.0.1:{port}": RegistryCredential("ci", secret)})
    keeper = keeper_for(engine, Source(), cls, registry_auth=auth)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageUnavailable) as caught:
        await keeper.ensure(cls)
    message = str(caught.value)
    assert message.startswith(
        f"class remote: image {reference!r} is not on node {engine.node_id} and could not be "
        f"pulled: docker pull {reference}: "
    )
    assert f"127.0.0.1:{port}" in message.split("docker pull", 1)[1]
    assert "\n" not in message
    assert secret not in message and secret not in caplog.text
    assert "with the credentials configured for it" in caplog.text  # they were used


class ControlPlane(cp_grpc.ControlPlaneServicer):
    """Answers heartbeats with a prefetch list and serves PullImage from `source`."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.messages: list[cp.NodeHeartbeatRequest] = []
        self.prefetch: list[str] = []

    async def NodeHeartbeat(
        self, request_iterator: AsyncIterator[cp.NodeHeartbeatRequest], context: Any
    ) -> AsyncIterator[cp.NodeHeartbeatResponse]:
        async for message in request_iterator:
            self.messages.append(message)
            yield cp.NodeHeartbeatResponse(
                lease_ttl_seconds=30, lease_confirmed=True, prefetch_images=self.prefetch
            )

    async def PullImage(
        self, request: cp.PullImageRequest, context: Any
    ) -> AsyncIterator[cp.PullImageResponse]:
        if request.digest not in self.source.archives:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no image {request.digest}")
        data = self.source.archive_for(request.digest, request.have_chain_ids)
        for i in range(0, len(data), CHUNK):
            yield cp.PullImageResponse(data=data[i : i + CHUNK])


def reported(control: ControlPlane) -> list[set[str]]:
    return [set(m.images) for m in control.messages if m.images_changed]


async def test_the_heartbeat_reports_images_and_prefetches_over_grpc(
    images: Images, engine: DockerRuntime
) -> None:
    built = images.build("pre")
    cls = built_class(built, f"pre-{images.uid}")
    images.remove(built.id)
    source = Source()
    source.archives[built.id] = built.archive
    control = ControlPlane(source)
    server = net.grpc_server()
    cp_grpc.add_ControlPlaneServicer_to_server(control, server)
    address = f"127.0.0.1:{net.free_port()}"
    net.add_grpc_port(server, address)
    await server.start()
    channel = net.grpc_channel(address)
    manager = InstanceManager(engine, {cls.name: cls}.get, node_id=engine.node_id)
    changed = []
    keeper = keeper_for(
        engine, ControlPlaneImages(channel), cls, on_change=lambda: changed.append(1)
    )
    await keeper.refresh_quietly()
    node = Node(engine.node_id, "127.0.0.1:1", "127.0.0.1:2", "weur", 50.0, 8.0, 2.0, 1024)
    heartbeat = Heartbeat(
        channel,
        node,
        manager,
        UsageSampler(manager, engine),
        PoolKeeper(manager, {cls.name: cls}.get),
        images=keeper,
    )
    heartbeat.period = 0.1
    beat = asyncio.create_task(heartbeat.run())
    prefetcher = asyncio.create_task(keeper.run())
    try:
        await eventually(lambda: control.messages)
        first = control.messages[0]
        assert first.images_changed and built.id not in first.images
        assert sum(m.images_changed for m in control.messages) == 1, "sent once, until changed"
        control.prefetch = [built.id]
        await eventually(lambda: built.id in reported(control)[-1], within=30)
        assert images.has(cls.image) == built.id
        assert [c[0] for c in source.calls] == [built.id]

        # Removed behind the agent's back: the next look at the engine reports it gone.
        control.prefetch = []
        images.remove(built.id)
        await keeper.refresh()
        await eventually(lambda: built.id not in reported(control)[-1])
    finally:
        prefetcher.cancel()
        await heartbeat.leave(beat)
        await keeper.close()
        await channel.close()
        await server.stop(0)
        await manager.close()


def _removals(outcome: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("portside_agent_image_removals_total", {"outcome": outcome})
    return value or 0.0


async def test_images_the_cluster_no_longer_keeps_are_removed_unless_a_container_uses_them(
    images: Images, engine: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    built = {name: images.build(name) for name in ("kept", "unused", "used", "shared")}
    # Named as `portside deploy` names them (the agent removes only Portside images), and
    # only so: the test's own names are dropped. "shared": two classes built the same image.
    names = {name: [f"portside/gc-{images.uid}-{name}:1"] for name in built}
    names["shared"].append(f"portside/gc-{images.uid}-other:1")
    for name, b in built.items():
        for reference in names[name]:
            repository, _, tag = reference.rpartition(":")
            docker_client.api.tag(b.id, repository, tag)
        docker_client.api.remove_image(b.tag)  # an untag: the image has other names
    # Created, never started: Docker still counts it as using the image.
    container = docker_client.api.create_container(
        built["used"].id, command=["/bin/true"], labels={"portside.test": images.uid}
    )
    try:
        keeper = keeper_for(engine, Source())
        await keeper.refresh()
        assert {b.id for b in built.values()} <= keeper.reported()[0]
        before = {o: _removals(o) for o in ("removed", "in_use", "error")}
        # The engine is shared: every other Portside image on it is kept, only ours may go.
        ours = {built[n].id for n in ("unused", "used", "shared")}
        keeper.keep(keeper.reported()[0] - ours)
        assert keeper.removable() == sorted(ours)
        await keeper.remove_unkept()

        assert images.has(built["unused"].id) is None
        assert images.has(built["shared"].id) is None  # name by name, all of them
        assert images.has(built["used"].id) == built["used"].id  # never forced
        assert images.has(names["used"][0]) == built["used"].id  # and it keeps its name
        assert images.has(built["kept"].id) == built["kept"].id
        reported = keeper.reported()[0]  # reported again at once
        assert built["used"].id in reported and built["unused"].id not in reported
        counted = {o: _removals(o) - n for o, n in before.items()}
        assert counted == {"removed": 2, "in_use": 1, "error": 0}

        docker_client.api.remove_container(container["Id"], force=True)
        await keeper.remove_unkept()
        assert images.has(built["used"].id) is None
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(container["Id"], force=True)
