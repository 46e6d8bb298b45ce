"""Snapshots of named instances' filesystems, the agent's side (issue 13; docs/architecture.md,
"Snapshots"): a container's writable layer made into an image on top of the image it was made
from, kept in the cluster's image store and recorded with the control plane; and the snapshot a
container is made from.

    Snapshots.take(source, ...)   commit the container, read its new layer out, make a clean image
                                  of it (the base image's config, never the container's env), load
                                  it here, push it to the image store, record it (RecordSnapshot)
    Snapshots.latest(cls, name)   before a named instance's first container on this node: the
                                  snapshot it starts from (LatestSnapshot), if it was placed anew
    restore_class(cls, snapshot)  the class as its container is made from the snapshot's image

The instance manager (nodeagent/instances.py) decides when: it holds the container while it is
committed (a boot waits), takes a snapshot after a sleep when its class asks, and makes the
container from a snapshot on a Start that names one or after a re-placement.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import grpc

from nodeagent import metrics
from nodeagent.images import DIGEST
from nodeagent.runtime.protocol import ContainerInfo, FromSnapshot, ImageParts, SnapshotEngine
from portside.api.v1 import controlplane_pb2 as cp
from portside.api.v1 import controlplane_pb2_grpc as cp_grpc
from portside.api.v1 import types_pb2 as pb
from portside.build import PUSH_BASE_TIMEOUT_S, human_size, snapshot_reference
from portside.convert import snapshot_from_pb, snapshot_to_pb
from portside.errors import EngineError, InvalidArgument, PortsideError, Unavailable, from_rpc
from portside.imagepush import push_image
from portside.snapshots import SLEEP, TRIGGERS, Snapshot
from portside.spec import ContainerClass

log = logging.getLogger(__name__)

# A snapshot's commit is named in this repository while it lives (moments), tagged <12 hex>.<node>
# (agents of several nodes may share an engine): the agent removes at its start what a crash left.
COMMIT_REPOSITORY: Final = "portside/snapshot-commit"
_TAG_NODE_CHARS = 115  # a tag has at most 128

# The fields of a commit's image config a snapshot keeps. The rest is the container's (its
# config and container_config carry its env, secrets included; container is its id), and the
# snapshot's run settings are its base image's instead.
_KEPT_FIELDS: Final = (
    "architecture",
    "os",
    "os.version",
    "os.features",
    "variant",
    "created",
    "rootfs",
    "history",
)
_TAR_BLOCK = 512
_READ_CHUNK = 1024 * 1024
# Reads and pushes at once on a node (a sleep of many instances must not read every layer at
# once); a commit never waits for them, so a wake never does either.
TRANSFERS = 2


# -- pure parts ---------------------------------------------------------------------------------


def snapshot_config(
    committed: Mapping[str, Any], settings: Mapping[str, Any], created_by: str
) -> bytes:
    """The image config of a snapshot, from the engine's config of the commit: its layers,
    platform and history, with its base image's run `settings` (Env, Cmd, ...) as its `config`
    and the commit's history entry (which names the container's command) saying `created_by`.
    Nothing of the container's own config is kept: its env holds the class's and the Start's
    variables, secrets among them, and they are the class's to give at each boot."""
    config = {k: committed[k] for k in _KEPT_FIELDS if k in committed}
    config["config"] = dict(settings)
    history = [dict(h) for h in committed.get("history") or ()]
    if history:
        # The commit's entry: when, and whether it added a layer; not what the container ran.
        last = {k: v for k, v in history[-1].items() if k in ("created", "empty_layer")}
        history[-1] = {**last, "created_by": created_by}
        config["history"] = history
    return json.dumps(config, separators=(",", ":"), sort_keys=True).encode()


def digest_of(config: bytes) -> str:
    """An image's id: the sha256 of its config."""
    return "sha256:" + hashlib.sha256(config).hexdigest()


def new_layers(diff_ids: Sequence[str], base: Sequence[str]) -> tuple[str, ...]:
    """The layers a commit added on top of its container's image (none: the container changed
    nothing). EngineError when the commit does not stand on that image."""
    if tuple(diff_ids[: len(base)]) != tuple(base):
        raise EngineError(
            f"the commit's layers ({len(diff_ids)}) do not begin with its image's ({len(base)})"
        )
    return tuple(diff_ids[len(base) :])


def tar_header(name: str, size: int) -> bytes:
    """A tar member's header (ustar, mode 0644, time 0: the same archive every time)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def tar_padding(size: int) -> bytes:
    return b"\0" * (-size % _TAR_BLOCK)


def layer_name(diff_id: str) -> str:
    return diff_id.removeprefix("sha256:") + "/layer.tar"


def manifest(config: bytes, reference: str, diff_ids: Sequence[str]) -> bytes:
    """The manifest.json of an archive `docker load` and the image store read."""
    entry = {
        "Config": digest_of(config).removeprefix("sha256:") + ".json",
        "RepoTags": [reference],
        "Layers": [layer_name(d) for d in diff_ids],
    }
    return json.dumps([entry]).encode()


async def snapshot_archive(
    config: bytes, reference: str, diff_ids: Sequence[str], layers: Mapping[str, Path]
) -> AsyncIterator[bytes]:
    """The image as an archive `docker load` reads: manifest.json, its config, and the layers
    among `diff_ids` that `layers` has a file of (the reader has the others: the engine takes
    them from its own, the image store from its blobs)."""
    for name, data in (
        ("manifest.json", manifest(config, reference, diff_ids)),
        (digest_of(config).removeprefix("sha256:") + ".json", config),
    ):
        yield tar_header(name, len(data)) + data + tar_padding(len(data))
    for diff_id in dict.fromkeys(diff_ids):
        path = layers.get(diff_id)
        if path is None:
            continue
        size = path.stat().st_size
        yield tar_header(layer_name(diff_id), size)
        with path.open("rb") as f:
            while piece := await asyncio.to_thread(f.read, _READ_CHUNK):
                yield piece
        yield tar_padding(size)
    yield b"\0" * (2 * _TAR_BLOCK)


def restore_class(cls: ContainerClass, snapshot: Snapshot) -> ContainerClass:
    """`cls` as the image supply gets its container's image: the snapshot's, by its digest."""
    return dataclasses.replace(cls, image=snapshot.reference, image_digest=snapshot.digest)


def from_snapshot(snapshot: Snapshot) -> FromSnapshot:
    return FromSnapshot(snapshot.id, snapshot.reference, snapshot.image_digest)


# -- the agent's snapshots ----------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What to snapshot: an instance's container, and what the snapshot records of it.
    `class_image` is the class's image (digest, or reference), for a container whose labels do
    not say what it stands on (made before snapshots were)."""

    container_id: str
    class_name: str
    instance_name: str
    instance_id: str
    version: int
    class_image: str


@dataclass(frozen=True)
class Taken:
    """A snapshot taken (`snapshot` None: a sleep's, skipped: the commit added no layer, or its
    top layer is the last snapshot's), and the top layer of the container's commit."""

    snapshot: Snapshot | None
    top_layer: str


class SnapshotService(Protocol):
    """What the instance manager needs of snapshots (`Snapshots`; a fake in unit tests)."""

    async def latest(self, cls: ContainerClass, name: str) -> Snapshot | None: ...

    async def take(
        self,
        source: Source,
        name: str,
        trigger: str,
        *,
        committed: Callable[[], None],
        unchanged: str = "",
    ) -> Taken: ...


class Snapshots:
    """Takes snapshots of this node's containers and asks the control plane, over the agent's
    channel (mutual TLS, agent role), for the snapshot a container starts from."""

    def __init__(
        self,
        engine: SnapshotEngine,
        channel: grpc.aio.Channel,
        *,
        node_id: str = "",
        deadline_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._stub = cp_grpc.ControlPlaneStub(channel)
        self._node = f"node {node_id}" if node_id else "this node"
        self._commit_node = (node_id or "node")[:_TAG_NODE_CHARS]
        self._deadline_s = deadline_s
        self._clock = clock
        self._transfers = asyncio.Semaphore(TRANSFERS)

    async def latest(self, cls: ContainerClass, name: str) -> Snapshot | None:
        """The snapshot the first container of `cls`/`name` on this node is made from: found
        only when the instance was placed anew after its node was lost (the control plane
        decides). Unavailable when the control plane cannot be asked: making the container
        without the instance's state would lose it."""
        ref = pb.InstanceRef(class_name=cls.name, name=name)
        try:
            # wait_for_ready: a channel still reconnecting (the control plane restarted a moment
            # ago, and placed the instance since) gets its deadline to connect.
            reply = await self._stub.LatestSnapshot(
                cp.LatestSnapshotRequest(instance=ref),
                timeout=self._deadline_s,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # a control plane older than snapshots has none to give
            reason = from_rpc(exc, "the control plane")
            raise Unavailable(
                f"cannot make the first container of {cls.name}/{name} on {self._node}: the "
                f"control plane could not say whether it starts from a snapshot ({reason})"
            ) from exc
        return snapshot_from_pb(reply.snapshot) if reply.found else None

    async def take(
        self,
        source: Source,
        name: str,
        trigger: str,
        *,
        committed: Callable[[], None],
        unchanged: str = "",
    ) -> Taken:
        """Commit `source`'s container (a running one is frozen meanwhile), call `committed`
        (the container may start again from then on), and make, load, push and record the
        snapshot. A sleep's (`trigger` SLEEP) is skipped when the container changed nothing
        on its image, or its top layer is `unchanged` (the last snapshot's). Raises
        PortsideError (and OSError: the temporary folder's disk)."""
        if trigger not in TRIGGERS:
            raise InvalidArgument(f"trigger: {trigger!r} is not one of {', '.join(TRIGGERS)}")
        started = self._clock()
        outcome = "failed"
        try:
            try:
                info = await self._engine.inspect(source.container_id)
                reference = f"{COMMIT_REPOSITORY}:{uuid.uuid4().hex[:12]}.{self._commit_node}"
                commit_id = await self._engine.commit(source.container_id, reference)
            finally:
                committed()
            metrics.SNAPSHOT_SECONDS.labels(source.class_name, "commit").observe(
                self._clock() - started
            )
            try:
                async with self._transfers:
                    taken = await self._publish(source, info, commit_id, name, trigger, unchanged)
            finally:
                await self._remove_commit(commit_id)
            outcome = "unchanged" if taken.snapshot is None else "taken"
        finally:
            metrics.SNAPSHOTS.labels(source.class_name, trigger, outcome).inc()
        if taken.snapshot is not None:
            metrics.SNAPSHOT_SECONDS.labels(source.class_name, "total").observe(
                self._clock() - started
            )
            metrics.SNAPSHOT_LAYER_BYTES.labels(source.class_name).inc(taken.snapshot.layer_bytes)
            log.info(
                "snapshot %s of %s/%s (%s): %s of writable layer in %.0f ms",
                taken.snapshot.id,
                source.class_name,
                source.instance_name,
                trigger,
                human_size(taken.snapshot.layer_bytes),
                (self._clock() - started) * 1000,
            )
        return taken

    async def _remove_commit(self, commit_id: str) -> None:
        """The commit's config is the container's, env and all: it is never kept."""
        try:
            await self._engine.remove_image(commit_id)
        except PortsideError as exc:
            log.warning("could not remove the commit %s of a snapshot: %s", commit_id, exc)

    async def remove_leftover_commits(self) -> int:
        """At the agent's start: remove the commits this node's snapshots left behind when the
        agent (or the node) stopped in the middle of one (named in COMMIT_REPOSITORY), so that
        no container's env outlives its snapshot in an image config; how many went."""
        ours = f"{COMMIT_REPOSITORY}:"
        try:
            leftovers = [
                image.id
                for image in await self._engine.images()
                if any(
                    tag.startswith(ours) and tag[len(ours) :].partition(".")[2] == self._commit_node
                    for tag in image.tags
                )
            ]
            for image_id in leftovers:
                await self._engine.remove_image(image_id)
        except PortsideError as exc:
            log.warning("could not remove the commits snapshots left behind: %s", exc)
            return 0
        if leftovers:
            log.info("removed %d commits that unfinished snapshots left behind", len(leftovers))
        return len(leftovers)

    async def _publish(
        self,
        source: Source,
        container: ContainerInfo,
        commit_id: str,
        name: str,
        trigger: str,
        unchanged: str,
    ) -> Taken:
        """The steps of `take` after the commit: the snapshot image made, loaded here, pushed
        and recorded."""
        base = await self._engine.image_layers(container.image_id)
        diff_ids = await self._engine.image_layers(commit_id)
        added = new_layers(diff_ids, base)
        top = diff_ids[-1] if diff_ids else ""
        if trigger == SLEEP and (not added or top == unchanged):
            return Taken(None, top)
        class_image = container.class_image or source.class_image
        # The store holds the layers of an image `portside deploy` pushed, and of a snapshot
        # (this container's image, if it was made from one): then only the new layer travels.
        # A registry image's are sent too, once per snapshot.
        held = bool(DIGEST.fullmatch(class_image) or container.snapshot_id)
        settings = await self._engine.image_settings(container.image_id)
        with tempfile.TemporaryDirectory(prefix="portside-snapshot-") as tmp:
            wanted = added if held else diff_ids
            parts = await self._engine.read_image(commit_id, wanted, Path(tmp))
            config = snapshot_config(
                json.loads(parts.config), settings, f"portside snapshot ({trigger})"
            )
            digest = digest_of(config)
            reference = snapshot_reference(source.class_name, digest)
            # Here first (every layer is the engine's already): a restore on this node pulls
            # nothing.
            await self._engine.load_image(snapshot_archive(config, reference, diff_ids, {}))
            if await self._engine.image_id(digest) != digest:
                raise EngineError(f"snapshot image {digest} did not load into the engine")
            try:
                await self._push(digest, reference, config, diff_ids, parts)
            except InvalidArgument:
                if not held:
                    raise
                # The store lacks the base's layers after all (a replica that has not copied
                # the class image yet): every layer goes.
                parts = await self._engine.read_image(commit_id, diff_ids, Path(tmp))
                await self._push(digest, reference, config, diff_ids, parts)
            layer_bytes = sum(parts.layers[d].stat().st_size for d in added)
        taken = Snapshot(
            id="",
            name=name,
            class_name=source.class_name,
            instance_name=source.instance_name,
            digest=digest,
            reference=reference,
            image_digest=class_image,
            version=source.version,
            layer_bytes=layer_bytes,
            trigger=trigger,
        )
        return Taken(await self._record(taken, source.instance_id), top)

    async def _push(
        self,
        digest: str,
        reference: str,
        config: bytes,
        diff_ids: Sequence[str],
        parts: ImageParts,
    ) -> None:
        size = len(config) + sum(p.stat().st_size for p in parts.layers.values())
        archive = snapshot_archive(config, reference, diff_ids, parts.layers)
        try:
            await push_image(
                self._stub,
                digest,
                reference,
                archive,
                deadline_s=PUSH_BASE_TIMEOUT_S + size / 1_000_000,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, "the control plane") from exc

    async def _record(self, taken: Snapshot, iid: str) -> Snapshot:
        request = cp.RecordSnapshotRequest(snapshot=snapshot_to_pb(taken), instance_id=iid)
        try:
            reply = await self._stub.RecordSnapshot(
                request, timeout=self._deadline_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, "the control plane") from exc
        return snapshot_from_pb(reply.snapshot)
