"""The control plane's image store against the real Docker engine: `docker save` archives go in
verified and deduplicated, and come out as archives `docker load` takes, leaving out the layers
the engine has. Then the same through a running control plane's RPCs (SQLite store)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import grpc
import pytest
from prometheus_client import REGISTRY

from controlplane.images import ImageStore, Removed, chain_ids
from controlplane.main import ControlPlaneOptions, default_image_dir, run
from portside import net
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.errors import InvalidArgument
from tests.images.build import _busybox
from tests.support import eventually

PIECE = 100_000  # not a multiple of 512: members straddle pieces


@dataclass(frozen=True)
class Built:
    tag: str
    digest: str
    archive: bytes  # as `docker save` wrote it

    @property
    def reference(self) -> str:
        """The name `portside deploy` would give it, the only kind the store takes."""
        repository = self.tag.partition(":")[0].replace("portside-test/", "portside/")
        return f"{repository}:{self.digest[7:19]}"


@dataclass(frozen=True)
class Images:
    base: Built
    app: Built  # base's layer and one more


def _build(client: docker.DockerClient, context: Path, dockerfile: str, tag: str) -> Built:
    (context / "Dockerfile").write_text(dockerfile)
    image, _ = client.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
    archive = b"".join(client.images.get(tag).save(named=True))
    return Built(tag, str(image.id), archive)


@pytest.fixture
def images(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[Images]:
    """Two images FROM scratch with Debian's static busybox; app adds a file unique to this
    test run, so it is new to the engine and to the store."""
    unique = uuid.uuid4().hex[:12]
    context = tmp_path / "context"
    context.mkdir()
    (context / "busybox").write_bytes(_busybox().read_bytes())
    (context / "hello.txt").write_text(f"hello {unique}\n")
    base_tag = f"portside-test/imgbase:{unique}"
    app_tag = f"portside-test/imgapp:{unique}"
    made: list[Built] = []
    try:
        made.append(
            _build(docker_client, context, "FROM scratch\nCOPY busybox /bin/busybox\n", base_tag)
        )
        made.append(
            _build(docker_client, context, f"FROM {base_tag}\nCOPY hello.txt /hello.txt\n", app_tag)
        )
        yield Images(made[0], made[1])
    finally:
        for built in reversed(made):
            for name in (built.reference, built.tag):
                with contextlib.suppress(docker.errors.ImageNotFound):
                    docker_client.images.remove(name, force=True)


async def pieces(data: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(data), PIECE):
        yield data[at : at + PIECE]


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def diff_ids(built: Built) -> list[str]:
    files = members(built.archive)
    config = json.loads(files[built.digest.removeprefix("sha256:") + ".json"])
    return [str(d) for d in config["rootfs"]["diff_ids"]]


async def test_push_dedupes_shared_layers_and_export_loads_without_them(
    images: Images, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "images")
    store.prepare()
    base_layers, app_layers = diff_ids(images.base), diff_ids(images.app)
    assert len(base_layers) == 1 and app_layers[:1] == base_layers and len(app_layers) == 2

    base = await store.ingest(
        images.base.digest, images.base.reference, pieces(images.base.archive)
    )
    assert base.stored_bytes == base.image.size_bytes > 1_000_000  # busybox: all of it new
    app = await store.ingest(images.app.digest, images.app.reference, pieces(images.app.archive))
    # Only the app's config and its own layer were stored: the busybox layer was there.
    assert app.image.diff_ids == tuple(app_layers)
    assert app.stored_bytes == app.image.config_size + app.image.layer_sizes[1]
    assert app.stored_bytes < 100_000 < app.image.size_bytes
    blobs = sorted(p.name for p in (tmp_path / "images" / "blobs" / "sha256").iterdir())
    expected = {d.removeprefix("sha256:") for d in [*app_layers, images.base.digest]}
    assert set(blobs) == expected | {images.app.digest.removeprefix("sha256:")}
    assert await store.stored(images.app.digest) == app.image

    # The engine loses the app image but keeps the base: the export leaves the base layer out.
    docker_client.images.remove(images.app.tag, force=True)
    have = chain_ids(base_layers)
    out = [chunk async for chunk in store.export(app.image, have)]
    assert all(len(c) <= 2 * 256 * 1024 for c in out)
    exported = b"".join(out)
    names = members(exported)
    assert f"{base_layers[0][7:]}/layer.tar" not in names
    assert f"{app_layers[1][7:]}/layer.tar" in names
    assert len(exported) < 100_000

    loaded = await asyncio.to_thread(docker_client.images.load, exported)
    assert [i.id for i in loaded] == [images.app.digest]
    assert docker_client.images.get(images.app.reference).id == images.app.digest


async def test_a_changed_byte_in_a_layer_is_refused_and_nothing_is_kept(
    images: Images, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "images")
    store.prepare()
    top = diff_ids(images.app)[1]
    # Find the top layer's data in the archive and change one byte of it.
    with tarfile.open(fileobj=io.BytesIO(images.app.archive)) as tar:
        member = next(
            m
            for m in tar
            if m.isfile() and m.name.endswith("layer.tar") and m.size < 100_000 and m.size > 0
        )
    assert hashlib.sha256(members(images.app.archive)[member.name]).hexdigest() == top[7:]
    tampered = bytearray(images.app.archive)
    tampered[member.offset_data + member.size // 2] ^= 0x01
    with pytest.raises(InvalidArgument) as caught:
        await store.ingest(images.app.digest, images.app.reference, pieces(bytes(tampered)))
    message = str(caught.value)
    assert f"layer 2 of 2 ({member.name}) has sha256" in message
    assert f"rootfs.diff_ids[1] is {top}" in message
    assert await store.stored(images.app.digest) is None
    assert list((tmp_path / "images" / "blobs" / "sha256").iterdir()) == []
    assert list((tmp_path / "images" / "tmp").iterdir()) == []


async def test_a_copy_leaves_out_the_layers_the_receiver_holds_and_takes_them_from_its_blobs(
    images: Images, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    holder, receiver = ImageStore(tmp_path / "holder"), ImageStore(tmp_path / "receiver")
    for store in (holder, receiver):
        store.prepare()
    await holder.ingest(images.base.digest, images.base.reference, pieces(images.base.archive))
    app = await holder.ingest(images.app.digest, images.app.reference, pieces(images.app.archive))
    await receiver.ingest(images.base.digest, images.base.reference, pieces(images.base.archive))

    # As ReplicaCopier does: the receiver sends its chains, the holder leaves those layers out.
    have = await receiver.chain_ids()
    assert have == chain_ids(diff_ids(images.base))
    exported = b"".join([c async for c in holder.export(app.image, have)])
    assert f"{diff_ids(images.base)[0][7:]}/layer.tar" not in members(exported)
    copied = await receiver.ingest(images.app.digest, images.app.reference, pieces(exported))
    assert copied.image.diff_ids == app.image.diff_ids
    assert copied.image.layer_sizes == app.image.layer_sizes  # the held layer's, from its blob
    assert copied.stored_bytes == app.image.config_size + app.image.layer_sizes[1]
    assert await receiver.stored(images.app.digest) == copied.image

    # What the receiver now gives out loads whole into an engine that has neither image.
    docker_client.images.remove(images.app.tag, force=True)
    docker_client.images.remove(images.base.tag, force=True)
    whole = b"".join([c async for c in receiver.export(copied.image)])
    loaded = await asyncio.to_thread(docker_client.images.load, whole)
    assert [i.id for i in loaded] == [images.app.digest]

    # A store that does not hold the left-out layer refuses the archive, naming it.
    empty = ImageStore(tmp_path / "empty")
    empty.prepare()
    with pytest.raises(InvalidArgument, match="names layer 1 .*absent"):
        await empty.ingest(images.app.digest, images.app.reference, pieces(exported))
    assert await empty.stored(images.app.digest) is None


async def test_removing_an_image_keeps_the_blobs_another_image_uses(
    images: Images, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "images")
    store.prepare()
    base = await store.ingest(
        images.base.digest, images.base.reference, pieces(images.base.archive)
    )
    app = await store.ingest(images.app.digest, images.app.reference, pieces(images.app.archive))
    blobs = tmp_path / "images" / "blobs" / "sha256"

    removed = await store.remove([images.app.digest])
    assert (removed.images, removed.blobs) == (1, 2)  # its config and its own layer
    assert removed.bytes == app.image.config_size + app.image.layer_sizes[1]
    assert await store.stored(images.app.digest) is None
    assert await store.stored(images.base.digest) == base.image  # the shared layer stayed
    assert await store.remove([images.app.digest]) == Removed(0, 0, 0)  # gone already

    removed = await store.remove([images.base.digest])
    assert (removed.images, removed.blobs, removed.bytes) == (1, 2, base.image.size_bytes)
    assert list(blobs.iterdir()) == [] and await store.held() == []


async def test_garbage_collection_deletes_records_and_the_blobs_no_kept_image_uses(
    images: Images, tmp_path: Path
) -> None:
    from typing import Any, cast

    from controlplane import records
    from controlplane.imagecatalog import ImageCatalog
    from controlplane.imagegc import FRESH_PUSH_S, ImageCollector, ImageSweeper
    from controlplane.store import open_store
    from controlplane.view import ClusterView
    from portside.spec import ContainerClass

    store = await open_store(f"sqlite://{tmp_path / 'state.db'}")
    view = ClusterView(store)
    image_store = ImageStore(tmp_path / "images")
    image_store.prepare()
    follow: asyncio.Task[None] | None = None
    try:
        await view.load()
        catalog = ImageCatalog(store, view, "r1")
        await catalog.load()
        follow = asyncio.create_task(view.follow())
        notes = asyncio.create_task(catalog.record_deployments())
        for built in (images.base, images.app):
            ingested = await image_store.ingest(
                built.digest, built.reference, pieces(built.archive)
            )
            await catalog.note_held(ingested.image)
        web = ContainerClass("Web", images.app.tag, image_digest=images.app.digest)
        await store.put(records.class_key("Web"), records.encode_class(web))

        def deployed() -> bool:
            record = catalog.images.get(images.app.digest)
            return record is not None and record.deployment("Web") is not None

        await eventually(deployed, what="the deployment in the image record")
        leader = cast(Any, type("Leader", (), {"is_leader": True})())
        collector = ImageCollector(
            store, view, catalog, leader, every_s=1, keep_versions=1, clock=lambda: later
        )
        later = time.time() + 10
        assert await collector.collect() == []  # both pushed within the hour
        later = time.time() + FRESH_PUSH_S + 10
        assert await collector.collect() == [images.base.digest]  # no class uses it
        assert await store.get(records.image_key(images.base.digest)) is None
        await eventually(lambda: catalog.dropped == {images.base.digest}, what="the delete")
        await ImageSweeper(image_store, catalog).sweep()
        assert await image_store.stored(images.base.digest) is None
        # The base layer stays: the app, still kept, is made of it.
        assert await image_store.stored(images.app.digest) is not None
        assert catalog.keep_images() == [images.app.digest]
        notes.cancel()
    finally:
        if follow is not None:
            follow.cancel()
        await store.close()


async def test_a_pull_from_a_replica_that_lacks_the_image_copies_it_first_then_serves_it(
    images: Images, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """Two replicas in this process over one SQLite store, each with its own image folder and
    gRPC server (plaintext, as --insecure); no background copier runs, so the pull makes it."""
    from typing import Any, cast

    from controlplane import records
    from controlplane.events import EventLog
    from controlplane.imagecatalog import ImageCatalog
    from controlplane.imagecopy import ReplicaCopier
    from controlplane.service import ControlPlaneService
    from controlplane.store import open_store
    from controlplane.view import ClusterView

    store = await open_store(f"sqlite://{tmp_path / 'state.db'}")
    view = ClusterView(store)
    await view.load()
    follow = asyncio.create_task(view.follow())
    servers: list[grpc.aio.Server] = []
    copier: ReplicaCopier | None = None

    async def replica(name: str, copier_of: Any = None) -> tuple[str, ImageStore, ImageCatalog]:
        folder = ImageStore(tmp_path / name)
        folder.prepare()
        catalog = ImageCatalog(store, view, name)
        await catalog.load()
        service = ControlPlaneService(
            store,
            view,
            node_ttl_s=10,
            default_region="fra",
            lifecycle=cast(Any, None),
            events=EventLog(store),
            images=folder,
            image_catalog=catalog,
            image_copier=copier_of(folder, catalog) if copier_of else None,
        )
        server = net.grpc_server()
        cp_grpc.add_ControlPlaneServicer_to_server(service, server)
        address = f"127.0.0.1:{net.free_port()}"
        net.add_grpc_port(server, address)
        await server.start()
        servers.append(server)
        await store.put(records.replica_key(name), records.Replica("fra", "", address).encode())
        return address, folder, catalog

    def make_copier(folder: ImageStore, catalog: ImageCatalog) -> ReplicaCopier:
        nonlocal copier
        copier = ReplicaCopier(folder, catalog, view, region="fra", tls=None)
        return copier

    try:
        _, holder, holder_catalog = await replica("r1")
        address, receiver, receiver_catalog = await replica("r2", make_copier)
        for built in (images.base, images.app):
            ingested = await holder.ingest(built.digest, built.reference, pieces(built.archive))
            await holder_catalog.note_held(ingested.image)
        # The receiver has the base already: the copy leaves its layer out.
        base = await receiver.ingest(
            images.base.digest, images.base.reference, pieces(images.base.archive)
        )
        await receiver_catalog.note_held(base.image)
        await eventually(
            lambda: "r1" in view.replicas and images.app.digest in receiver_catalog.images,
            what="the receiver seeing the holder and the image",
        )
        copied_before = _metric("portside_controlplane_image_copied_bytes_total", {})

        docker_client.images.remove(images.app.tag, force=True)
        async with net.grpc_channel(address) as channel:
            stub = cp_grpc.ControlPlaneStub(channel)
            request = cp.PullImageRequest(
                digest=images.app.digest, have_chain_ids=chain_ids(diff_ids(images.base))
            )
            data = b"".join([m.data async for m in stub.PullImage(request, timeout=30)])
        loaded = await asyncio.to_thread(docker_client.images.load, data)
        assert [i.id for i in loaded] == [images.app.digest]

        copied = await receiver.stored(images.app.digest)
        assert copied is not None and copied.diff_ids == tuple(diff_ids(images.app))
        copied_bytes = _metric("portside_controlplane_image_copied_bytes_total", {})
        assert copied_bytes - copied_before == copied.config_size + copied.layer_sizes[1]
        record = await store.get(records.image_key(images.app.digest))
        assert record is not None
        assert records.ImageRecord.decode(record.value).replicas == ("r1", "r2")
    finally:
        if copier is not None:
            await copier.close()
        for server in servers:
            await server.stop(0)
        follow.cancel()
        await store.close()


def test_the_default_image_dir_sits_beside_a_sqlite_store() -> None:
    assert default_image_dir("sqlite:///var/lib/portside/state.db") == Path(
        "/var/lib/portside/images"
    )
    assert default_image_dir("etcd://127.0.0.1:2379").parts[-2:] == ("portside", "images")


async def _push(stub: cp_grpc.ControlPlaneStub, built: Built) -> cp.PushImageResponse:
    async def requests() -> AsyncIterator[cp.PushImageRequest]:
        yield cp.PushImageRequest(digest=built.digest, reference=built.reference)
        async for piece in pieces(built.archive):
            yield cp.PushImageRequest(data=piece)

    response: cp.PushImageResponse = await stub.PushImage(requests(), timeout=30)
    return response


async def test_the_rpcs_push_stat_pull_list_and_heartbeat_reports(
    images: Images, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{net.free_port()}"
    opts = ControlPlaneOptions(
        listen=address,
        store_url=f"sqlite://{tmp_path / 'state.db'}",
        metrics_listen=f"127.0.0.1:{net.free_port()}",
        replica_id="r1",
        insecure=True,
    )
    before = {name: _metric(name, labels) for name, labels in COUNTED}
    stop = asyncio.Event()
    task = asyncio.create_task(run(opts, stop))
    try:
        async with net.grpc_channel(address) as channel:
            stub = cp_grpc.ControlPlaneStub(channel)

            async def serving() -> bool:
                assert not task.done(), task
                try:
                    await stub.ListImages(cp.ListImagesRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False  # not listening yet
                return True

            await eventually(serving, within=15, what="the control plane serving")
            stat = await stub.StatImages(
                cp.StatImagesRequest(digests=[images.base.digest, images.app.digest])
            )
            assert list(stat.held) == []
            first = await _push(stub, images.base)
            assert first.stored_bytes == first.size_bytes > 0
            again = await _push(stub, images.base)  # held: drained, nothing stored
            assert (again.stored_bytes, again.size_bytes) == (0, first.size_bytes)
            app = await _push(stub, images.app)
            assert 0 < app.stored_bytes < 100_000
            stat = await stub.StatImages(
                cp.StatImagesRequest(digests=[images.base.digest, images.app.digest])
            )
            assert list(stat.held) == [images.base.digest, images.app.digest]
            assert (tmp_path / "images" / "images").is_dir()  # the default, beside state.db

            # An agent reports the images its engine has; the listing shows them per node.
            heartbeat = stub.NodeHeartbeat(_heartbeats([images.base.digest]), timeout=30)
            reply = await heartbeat.read()
            assert reply.lease_confirmed

            async def listed() -> dict[str, cp.ImageInfo]:
                found = await stub.ListImages(cp.ListImagesRequest(), timeout=5)
                by_digest = {i.digest: i for i in found.images}
                assert list(by_digest[images.base.digest].nodes) == ["node-img"]
                return by_digest

            by_digest = await eventually(listed, what="the node's images listed")
            assert list(by_digest[images.app.digest].replicas) == ["r1"]
            # The catalog has loaded: every reply may carry the keep list, and the first does.
            keeping = stub.NodeHeartbeat(_heartbeats([], "node-keep"), timeout=30)
            keep_reply = await keeping.read()
            assert keep_reply.HasField("keep_images")
            assert list(keep_reply.keep_images.digests) == sorted(
                [images.base.digest, images.app.digest]
            )
            keeping.cancel()
            assert by_digest[images.app.digest].reference == images.app.reference
            assert by_digest[images.app.digest].size_bytes == app.size_bytes
            heartbeat.cancel()

            # Pull what the engine lacks: the app, without the base's layer.
            docker_client.images.remove(images.app.tag, force=True)
            request = cp.PullImageRequest(
                digest=images.app.digest, have_chain_ids=chain_ids(diff_ids(images.base))
            )
            data = b"".join([m.data async for m in stub.PullImage(request, timeout=30)])
            loaded = await asyncio.to_thread(docker_client.images.load, data)
            assert [i.id for i in loaded] == [images.app.digest]

            missing = "sha256:" + "0" * 64
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.PullImage(cp.PullImageRequest(digest=missing), timeout=5):
                    pass
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
            assert "in no replica's image store" in (caught.value.details() or "")

            tampered = bytearray(images.base.archive)
            tampered[len(tampered) // 2] ^= 0x01
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _push(stub, Built("portside-test/x:1", "sha256:" + "1" * 64, bytes(tampered)))
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT

            counted = {n: _metric(n, labels) - before[n] for n, labels in COUNTED}
            assert counted == {
                "portside_controlplane_image_pushes_total/stored": 2,
                "portside_controlplane_image_pushes_total/held": 1,
                "portside_controlplane_image_pushes_total/refused": 1,
                "portside_controlplane_image_pulls_total/served": 1,
                "portside_controlplane_image_pulls_total/not_found": 1,
                "portside_controlplane_image_stored_bytes_total/": first.stored_bytes
                + app.stored_bytes,
                "portside_controlplane_image_sent_bytes_total/": len(data),
            }
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


COUNTED = [
    ("portside_controlplane_image_pushes_total/stored", {"outcome": "stored"}),
    ("portside_controlplane_image_pushes_total/held", {"outcome": "held"}),
    ("portside_controlplane_image_pushes_total/refused", {"outcome": "refused"}),
    ("portside_controlplane_image_pulls_total/served", {"outcome": "served"}),
    ("portside_controlplane_image_pulls_total/not_found", {"outcome": "not_found"}),
    ("portside_controlplane_image_stored_bytes_total/", {}),
    ("portside_controlplane_image_sent_bytes_total/", {}),
]


def _metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name.partition("/")[0], labels) or 0.0


async def _heartbeats(
    digests: list[str], node_id: str = "node-img"
) -> AsyncIterator[cp.NodeHeartbeatRequest]:
    from portside.api.v1 import types_pb2 as pb

    node = pb.Node(
        id=node_id,
        data_address="127.0.0.1:1",
        api_address="127.0.0.1:2",
        region="fra",
        vcpu=1,
        memory_mib=512,
    )
    yield cp.NodeHeartbeatRequest(node=node, images=digests, images_changed=True)
    await asyncio.sleep(3600)


async def test_an_archive_naming_a_member_twice_is_refused_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    """The second member of a name could differ from the first, which is what was verified: the
    store would keep other bytes under the layer's digest, for every image that shares it."""
    layer, junk = b"honest layer" * 1000, b"junk" * 1000
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = [{"Config": "config.json", "RepoTags": [], "Layers": ["L/layer.tar"]}]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (
            ("L/layer.tar", layer),
            ("L/layer.tar", junk),
            ("config.json", config),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    store = ImageStore(tmp_path / "images")
    store.prepare()
    with pytest.raises(InvalidArgument, match="L/layer.tar twice"):
        await store.ingest(digest, "", pieces(out.getvalue()))
    assert await store.stored(digest) is None
    assert not list((tmp_path / "images" / "blobs" / "sha256").iterdir())
