"""What the cluster knows of its images, kept current from the store watch: the replicas that
hold each one, the classes it was deployed for, the nodes whose engines have it, where each class
ran lately; and which images a node should pre-fetch, chosen by a pure function over a snapshot.

"Where a class ran lately" is memory of this replica's (the watch's node reports and
placements since it started, and the placements still in the store): a replica that restarts
forgets runs whose instances are gone. Good enough for a hint; the agent pulls on demand anyway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from controlplane import records
from controlplane.images import StoredImage
from controlplane.records import Deployment, ImageRecord
from controlplane.store import Store, WatchEvent
from controlplane.view import ClusterView
from portside import geo
from portside.errors import InvalidArgument, StoreError

log = logging.getLogger(__name__)

RECENT_RUN_S = 24 * 3600.0  # a class that ran in a region this recently is pre-fetched there
FRESH_DEPLOY_S = 600.0  # a class deployed this recently is pre-fetched everywhere
_CAS_TRIES = 20
NOTE_RETRY_S = 2.0  # a deployment note the store refused is written again after this


@dataclass(frozen=True)
class PrefetchSnapshot:
    """What the pre-fetch choice reads: plain values, no store, no clock."""

    now: float
    class_images: Mapping[str, str]  # class -> its image digest (classes that have one)
    deployed_at: Mapping[str, float]  # class -> when its current image was deployed
    last_seen: Mapping[tuple[str, str], float]  # (class, region) -> it last ran or was placed
    held: frozenset[str]  # digests some replica holds (the others cannot be pulled)


def images_to_prefetch(snapshot: PrefetchSnapshot, region: str) -> list[str]:
    """The digests a node in `region` should have: those of classes that ran in the region in
    the last RECENT_RUN_S, and of classes deployed in the last FRESH_DEPLOY_S (a new version
    spreads to every node at once). Only images a replica holds; sorted."""
    wanted = set()
    for class_name, digest in snapshot.class_images.items():
        if digest not in snapshot.held:
            continue
        deployed = snapshot.deployed_at.get(class_name, -math.inf)
        seen = snapshot.last_seen.get((class_name, region), -math.inf)
        if snapshot.now - deployed <= FRESH_DEPLOY_S or snapshot.now - seen <= RECENT_RUN_S:
            wanted.add(digest)
    return sorted(wanted)


@dataclass(frozen=True)
class ImageListing:
    """One line of `portside images`."""

    digest: str
    reference: str
    size_bytes: int
    classes: tuple[str, ...]
    replicas: tuple[str, ...]
    nodes: tuple[str, ...]
    pushed_at: float


def region_code(region: str) -> str:
    try:
        return geo.lookup(region).code
    except InvalidArgument:
        return region.strip().lower()


@dataclass
class ImageCatalog:
    """Image records and node reports as the store has them (loaded, then fed by the view's
    watch), and this replica's memory of where classes ran."""

    store: Store
    view: ClusterView
    replica_id: str
    clock: Callable[[], float] = time.time
    images: dict[str, ImageRecord] = field(default_factory=dict)  # digest -> record
    node_images: dict[str, frozenset[str]] = field(default_factory=dict)  # node -> digests
    last_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    deployed_at: dict[str, float] = field(default_factory=dict)
    # Set once the records are read: keep_images() may be told to agents, copies start.
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when an image record or a replica changes (the replica copier looks again), and
    # the digests whose records were deleted since the sweeper last took them.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: set[str] = field(default_factory=set)
    dropped_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _class_digest: dict[str, str] = field(default_factory=dict)
    # Deployments seen on the watch, not yet in their image's record: class -> (digest, rev).
    _deploy_notes: dict[str, tuple[str, int]] = field(default_factory=dict)
    _notes_waiting: asyncio.Event = field(default_factory=asyncio.Event)

    async def load(self) -> None:
        """Read the records, seed the memory from the view, and follow the view's watch (call
        after view.load() and before view.follow(): the watch replays what changed since).
        Classes whose image record lacks their latest deployment (it happened while no replica
        ran, or before records had them) are noted for `record_deployments`."""
        for prefix in (records.IMAGES, records.NODE_IMAGES):
            kvs, _ = await self.store.range(prefix)
            for kv in kvs:
                self.apply(WatchEvent("put", kv))
        class_kvs, _ = await self.store.range(records.CLASSES)
        revisions = {kv.key[len(records.CLASSES) :]: kv.mod_revision for kv in class_kvs}
        for name, cls in self.view.classes.items():
            if cls.image_digest:
                self._class_digest[name] = cls.image_digest
                known = self.images.get(cls.image_digest)
                if known is not None:
                    self.deployed_at[name] = known.pushed_at  # the best guess after a restart
                    noted = known.deployment(name)
                    revision = revisions.get(name, 0)
                    if noted is None or noted.revision < revision:
                        self._note(name, cls.image_digest, revision)
        for rec in self.view.instances.values():
            self._note_placed(rec)
        for node_id in self.view.statuses:
            self._note_awake(node_id)
        self.view.listeners.append(self.apply)
        self.loaded.set()
        self.changed.set()

    def apply(self, event: WatchEvent) -> None:
        """One watch event (after the view applied it). Never raises: it runs in the watch."""
        key, deleted = event.kv.key, event.type == "delete"
        try:
            if key.startswith(records.IMAGES):
                digest = "sha256:" + key[len(records.IMAGES) :]
                if deleted:
                    self.images.pop(digest, None)
                    self.dropped.add(digest)
                    self.dropped_changed.set()
                else:
                    self.images[digest] = ImageRecord.decode(event.kv.value)
                    self.dropped.discard(digest)  # pushed again before the sweeper ran
                self.changed.set()
            elif key.startswith(records.NODE_IMAGES):
                node_id = key[len(records.NODE_IMAGES) :]
                if deleted:
                    self.node_images.pop(node_id, None)
                else:
                    self.node_images[node_id] = records.decode_node_images(event.kv.value)
            elif key.startswith(records.REPLICAS):
                self.changed.set()  # a holder to copy from may have come (or gone)
            elif deleted:
                return
            elif key.startswith(records.NODES):
                self._note_awake(key[len(records.NODES) :])
            elif key.startswith(records.INSTANCES):
                placed = self.view.instances.get(key)
                if placed is not None:
                    self._note_placed(placed)
            elif key.startswith(records.CLASSES):
                self._note_deployed(key[len(records.CLASSES) :], event.kv.mod_revision)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("skipping unreadable image record %s: %s", key, exc)

    def _note_deployed(self, class_name: str, revision: int) -> None:
        cls = self.view.classes.get(class_name)
        digest = cls.image_digest if cls is not None else ""
        if digest and digest != self._class_digest.get(class_name):
            self.deployed_at[class_name] = self.clock()
            self._note(class_name, digest, revision)
        self._class_digest[class_name] = digest

    def _note(self, class_name: str, digest: str, revision: int) -> None:
        self._deploy_notes[class_name] = (digest, revision)
        self._notes_waiting.set()

    async def record_deployments(self) -> None:
        """Until cancelled: write each deployment seen on the watch into its image's record
        (every replica tries; the first wins, the others find it there). Store failures are
        tried again; a note is dropped once written or once its image has no record."""
        while True:
            await self._notes_waiting.wait()
            self._notes_waiting.clear()
            notes, self._deploy_notes = self._deploy_notes, {}
            for class_name, (digest, revision) in notes.items():
                try:
                    deployment = Deployment(class_name, revision, self.clock())
                    await self._update_with(
                        digest, functools.partial(with_deployment, deployment=deployment)
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("image record of %s is unreadable: %s", digest, exc)
                except StoreError as exc:
                    log.warning(
                        "could not record that class %s was deployed with image %s: %s",
                        class_name,
                        digest,
                        exc,
                    )
                    self._deploy_notes.setdefault(class_name, (digest, revision))
            if self._deploy_notes:
                await asyncio.sleep(NOTE_RETRY_S)
                self._notes_waiting.set()

    def keep_images(self) -> list[str] | None:
        """The images agents may keep (those with a record, and every class's current one, in
        case its record was lost: an agent must never remove the only copy); None until the
        records are loaded, so that no agent takes "none yet" for "none kept"."""
        if not self.loaded.is_set():
            return None
        current = {c.image_digest for c in self.view.classes.values() if c.image_digest}
        return sorted(set(self.images) | current)

    def _note_placed(self, rec: records.InstanceRecord) -> None:
        node = self.view.nodes.get(rec.node_id)
        if node is not None:
            self._seen(rec.class_name, node.region, rec.placed_at)

    def _note_awake(self, node_id: str) -> None:
        node = self.view.nodes.get(node_id)
        if node is None:
            return
        now = self.clock()
        for status in self.view.statuses.get(node_id, {}).values():
            if status.state.awake:
                self._seen(status.info.class_name, node.region, now)

    def _seen(self, class_name: str, region: str, at: float) -> None:
        where = (class_name, region_code(region))
        if at > self.last_seen.get(where, -math.inf):
            self.last_seen[where] = at

    def snapshot(self) -> PrefetchSnapshot:
        return PrefetchSnapshot(
            now=self.clock(),
            class_images={
                name: c.image_digest for name, c in self.view.classes.items() if c.image_digest
            },
            deployed_at=dict(self.deployed_at),
            last_seen=dict(self.last_seen),
            held=frozenset(d for d, r in self.images.items() if r.replicas),
        )

    def prefetch_for(self, region: str) -> list[str]:
        return images_to_prefetch(self.snapshot(), region_code(region))

    def holders(self, digest: str) -> tuple[str, ...]:
        record = self.images.get(digest)
        return record.replicas if record is not None else ()

    def listing(self) -> list[ImageListing]:
        """Every image the cluster knows: those in the store, and those a class names that no
        replica holds (size 0, no replicas: a class that cannot boot where it is missing)."""
        classes: dict[str, list[str]] = {}
        references: dict[str, str] = {}
        for cls in self.view.config().classes:
            if cls.image_digest:
                classes.setdefault(cls.image_digest, []).append(cls.name)
                references.setdefault(cls.image_digest, cls.image)
        nodes: dict[str, list[str]] = {}
        for node_id in sorted(self.node_images):
            for digest in self.node_images[node_id]:
                nodes.setdefault(digest, []).append(node_id)
        out = []
        for digest in sorted(set(self.images) | set(classes)):
            record = self.images.get(digest)
            out.append(
                ImageListing(
                    digest=digest,
                    reference=record.reference if record else references.get(digest, ""),
                    size_bytes=record.size_bytes if record else 0,
                    classes=tuple(sorted(classes.get(digest, ()))),
                    replicas=tuple(sorted(record.replicas)) if record else (),
                    nodes=tuple(nodes.get(digest, ())),
                    pushed_at=record.pushed_at if record else 0.0,
                )
            )
        return out

    async def note_held(self, image: StoredImage, *, create: bool = True) -> ImageRecord | None:
        """Record that this replica holds `image` whole (compare-and-swap: replicas taking in
        the same image at once both end up in its record). With create=False (a copy from
        another replica), only into a record that exists: None if it was deleted meanwhile."""
        if create:
            return await self._update_with(
                image.digest, lambda old: _with_replica(old, image, self.replica_id, True)
            )
        return await self._update_with(
            image.digest,
            lambda old: _with_replica(old, image, self.replica_id, True) if old else None,
        )

    async def note_lost(self, digest: str) -> None:
        """Record that this replica no longer holds `digest` (its image folder lost it)."""
        await self._update_with(
            digest, lambda old: _with_replica(old, None, self.replica_id, False)
        )

    async def sync_replica(self, held: Iterable[StoredImage]) -> None:
        """Make the records say exactly which images this replica holds (at start: its image
        folder may have been replaced, or the store restored from elsewhere)."""
        held_digests = set()
        for image in held:
            held_digests.add(image.digest)
            if self.replica_id not in self.holders(image.digest):
                await self.note_held(image)
        for digest, record in list(self.images.items()):
            if self.replica_id in record.replicas and digest not in held_digests:
                log.warning("image %s is no longer in this replica's image folder", digest)
                await self.note_lost(digest)

    async def _update_with(
        self, digest: str, change: Callable[[ImageRecord | None], ImageRecord | None]
    ) -> ImageRecord | None:
        """Write `change(record)` over the record (compare-and-swap, read again on a conflict);
        None from `change`: leave it. The record as it is after, None if there is none."""
        key = records.image_key(digest)
        for _ in range(_CAS_TRIES):
            kv = await self.store.get(key)
            old = ImageRecord.decode(kv.value) if kv is not None else None
            new = change(old)
            if new is None or new == old:
                return old
            if await self.store.compare_and_swap(
                key, kv.mod_revision if kv is not None else 0, new.encode()
            ):
                self.images[digest] = new  # at once, as view.note_placed: the watch follows
                return new
        raise StoreError(f"image record {key}: {_CAS_TRIES} conflicting writes; try again")

    async def report_node(self, node_id: str, digests: frozenset[str], lease: int) -> None:
        """The images node `node_id`'s engine has, under the node's lease (gone with it)."""
        await self.store.put(
            records.node_images_key(node_id), records.encode_node_images(digests), lease
        )


def with_deployment(old: ImageRecord | None, deployment: Deployment) -> ImageRecord | None:
    """The record with `deployment` as its class's latest; None (leave it) if there is no
    record (an image no replica holds cannot be kept) or it has this deployment or a later."""
    if old is None:
        return None
    noted = old.deployment(deployment.class_name)
    if noted is not None and noted.revision >= deployment.revision:
        return None
    others = [d for d in old.deployed if d.class_name != deployment.class_name]
    return replace(old, deployed=tuple(sorted([*others, deployment], key=lambda d: d.class_name)))


def _with_replica(
    old: ImageRecord | None, image: StoredImage | None, replica_id: str, holding: bool
) -> ImageRecord | None:
    """The record after this replica took in `image` (holding) or lost it; None: no record."""
    if not holding:
        if old is None:
            return None
        return replace(old, replicas=tuple(r for r in old.replicas if r != replica_id))
    assert image is not None
    if old is None:
        return ImageRecord(
            image.digest, image.reference, image.size_bytes, image.stored_at, (replica_id,)
        )
    replicas = old.replicas if replica_id in old.replicas else (*old.replicas, replica_id)
    return replace(
        old,
        reference=old.reference or image.reference,
        size_bytes=image.size_bytes,
        replicas=tuple(sorted(replicas)),
    )
