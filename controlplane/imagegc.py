"""Garbage collection of images: which images the cluster keeps (a pure choice over a snapshot),
the leader's scheduled round that deletes the others' records, and each replica's sweep of the
blobs of deleted images that no kept image uses. Agents remove theirs (nodeagent.images).

Kept: every class's current image; for each class, the last N images it was deployed with (the
current one among them); every snapshot's image (controlplane.snapshots: a snapshot record is
what keeps it); any image pushed less than FRESH_PUSH_S ago (a deploy may be between its push
and its Deploy, a snapshot between its push and its record). Deployments are in the image
records (records.Deployment).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from controlplane import records
from controlplane.imagecatalog import ImageCatalog
from controlplane.images import ImageStore
from controlplane.leader import LeaderElection
from controlplane.metrics import (
    IMAGE_BLOBS_REMOVED,
    IMAGE_GC_DELETED,
    IMAGE_GC_KEPT,
    IMAGE_GC_RUNS,
    IMAGE_GC_SECONDS,
    IMAGE_REMOVED_BYTES,
    IMAGES_HELD,
)
from controlplane.records import ImageRecord
from controlplane.snapshots import snapshot_digests
from controlplane.store import Store
from controlplane.view import ClusterView
from portside.errors import PortsideError, StoreError

log = logging.getLogger(__name__)

FRESH_PUSH_S = 3600.0
SWEEP_RETRY_S = 5.0

# Why an image is kept, strongest first (an image kept for several reasons counts once).
CURRENT, RECENT, SNAPSHOT, FRESH = "current", "recent_version", "snapshot", "fresh_push"


@dataclass(frozen=True)
class GcSnapshot:
    """What the keep choice reads: plain values, no store, no clock."""

    now: float
    images: Mapping[str, ImageRecord]  # every image record, by digest
    class_images: Mapping[str, str]  # class -> its current image digest (classes that have one)
    keep_versions: int  # per class, how many of its latest images are kept
    fresh_s: float = FRESH_PUSH_S
    snapshots: frozenset[str] = frozenset()  # the images snapshot records name


@dataclass(frozen=True)
class KeepDecision:
    keep: Mapping[str, str]  # digest -> why (CURRENT, RECENT, SNAPSHOT, FRESH)
    drop: tuple[str, ...]  # sorted


def decide_keep(snapshot: GcSnapshot) -> KeepDecision:
    """Which image records to keep and which to delete. Only classes in the current config
    count: a deleted class's images go once they are no longer fresh."""
    keep: dict[str, str] = {}
    for digest in snapshot.class_images.values():
        keep[digest] = CURRENT
    for class_name in snapshot.class_images:
        versions = []
        for record in snapshot.images.values():
            deployment = record.deployment(class_name)
            if deployment is not None:
                versions.append((-deployment.revision, record.digest))
        for _, digest in sorted(versions)[: snapshot.keep_versions]:
            keep.setdefault(digest, RECENT)
    for digest in snapshot.snapshots:
        keep.setdefault(digest, SNAPSHOT)
    for record in snapshot.images.values():
        if snapshot.now - record.pushed_at < snapshot.fresh_s:
            keep.setdefault(record.digest, FRESH)
    drop = tuple(sorted(d for d in snapshot.images if d not in keep))
    return KeepDecision({d: why for d, why in keep.items() if d in snapshot.images}, drop)


class ImageCollector:
    """The leader's round, every `every_s`: decide, then delete each dropped image's record
    with compare-and-swap (decided again on the record as read, so a deployment recorded
    meanwhile keeps it). Every replica's sweeper then removes its blobs."""

    def __init__(
        self,
        store: Store,
        view: ClusterView,
        catalog: ImageCatalog,
        leader: LeaderElection,
        *,
        every_s: float,
        keep_versions: int,
        fresh_s: float = FRESH_PUSH_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.view, self.catalog, self.leader = store, view, catalog, leader
        self.every_s = every_s
        self.keep_versions = keep_versions
        self.fresh_s = fresh_s
        self.clock = clock

    def snapshot(
        self,
        images: Mapping[str, ImageRecord] | None = None,
        snapshots: frozenset[str] = frozenset(),
    ) -> GcSnapshot:
        return GcSnapshot(
            now=self.clock(),
            images=dict(self.catalog.images if images is None else images),
            class_images={
                n: c.image_digest for n, c in self.view.classes.items() if c.image_digest
            },
            keep_versions=self.keep_versions,
            fresh_s=self.fresh_s,
            snapshots=snapshots,
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            if not self.leader.is_leader or not self.catalog.loaded.is_set():
                continue
            started = time.perf_counter()
            try:
                await self.collect()
                IMAGE_GC_RUNS.labels("ok").inc()
            except StoreError as exc:
                IMAGE_GC_RUNS.labels("store_error").inc()
                log.warning("image garbage collection stopped: %s", exc)
            IMAGE_GC_SECONDS.observe(time.perf_counter() - started)

    async def collect(self) -> list[str]:
        """One round; the digests whose records it deleted."""
        snapshots = await snapshot_digests(self.store)
        decision = decide_keep(self.snapshot(snapshots=snapshots))
        for why in (CURRENT, RECENT, SNAPSHOT, FRESH):
            IMAGE_GC_KEPT.labels(why).set(sum(1 for w in decision.keep.values() if w == why))
        deleted = []
        for digest in decision.drop:
            key = records.image_key(digest)
            kv = await self.store.get(key)
            if kv is None:
                continue
            try:
                record = ImageRecord.decode(kv.value)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("skipping unreadable image record %s: %s", key, exc)
                continue
            # Decided again on the records as they are now: a deployment or a snapshot recorded
            # meanwhile keeps it.
            snapshots = await snapshot_digests(self.store)
            again = decide_keep(self.snapshot({**self.catalog.images, digest: record}, snapshots))
            if digest not in again.drop:
                continue
            if await self.store.compare_and_swap(key, kv.mod_revision, None):
                IMAGE_GC_DELETED.inc()
                deleted.append(digest)
                log.info(
                    "garbage-collected image %s (%s, %d bytes, pushed %.0fs ago): no class "
                    "uses it or deployed it among its last %d versions",
                    digest,
                    record.reference or "no reference",
                    record.size_bytes,
                    self.clock() - record.pushed_at,
                    self.keep_versions,
                )
        return deleted


class ImageSweeper:
    """Every replica: removes from its store the images whose records were deleted, and their
    blobs that no other image it holds uses."""

    def __init__(self, images: ImageStore, catalog: ImageCatalog) -> None:
        self.images, self.catalog = images, catalog

    async def run(self) -> None:
        while True:
            await self.catalog.dropped_changed.wait()
            self.catalog.dropped_changed.clear()
            await self.sweep()

    async def sweep(self) -> None:
        gone = sorted(self.catalog.dropped - set(self.catalog.images))
        self.catalog.dropped.clear()
        if not gone:
            return
        try:
            removed = await self.images.remove(gone)
        except (OSError, PortsideError) as exc:
            log.warning("could not remove garbage-collected images %s: %s", ", ".join(gone), exc)
            self.catalog.dropped.update(gone)
            await asyncio.sleep(SWEEP_RETRY_S)
            self.catalog.dropped_changed.set()
            return
        IMAGE_BLOBS_REMOVED.inc(removed.blobs)
        IMAGE_REMOVED_BYTES.inc(removed.bytes)
        if removed.images:
            IMAGES_HELD.set(len(await self.images.held()))
            log.info(
                "removed %d garbage-collected images from the image store: %d blobs, %d bytes",
                removed.images,
                removed.blobs,
                removed.bytes,
            )
