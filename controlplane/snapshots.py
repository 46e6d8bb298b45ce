"""Snapshots of named instances (issue 13; docs/architecture.md "Snapshots"): their records in
the store, the control plane's part of each snapshot call, and the leader's retention round.

A snapshot is an image in the cluster's image store — the class image's layers plus the
container's writable layer, committed and pushed by the instance's agent — and a record
(snapshots/<class>/<id>) that says whose it is, which image it was taken on and until when it is
kept. Which records go (expired, or beyond a class's snapshot_keep sleep snapshots of one
instance) is a pure choice over the records; garbage collection keeps every image a record names
(controlplane.imagegc).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from controlplane import records
from controlplane.images import check_digest
from controlplane.lifecycle import Lifecycle
from controlplane.metrics import (
    SNAPSHOT_RETENTION_RUNS,
    SNAPSHOTS_RECORDED,
    SNAPSHOTS_RESTORED,
    SNAPSHOTS_RETIRED,
)
from controlplane.records import ImageRecord, InstanceRecord
from controlplane.store import KeyValue, Store
from portside.api.v1 import nodeagent_pb2 as na
from portside.build import snapshot_reference
from portside.convert import snapshot_from_pb
from portside.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StoreError,
)
from portside.snapshots import CREATE, SLEEP, SNAPSHOT_TIMEOUT_S, TRIGGERS, Snapshot
from portside.spec import ContainerClass, instance_id

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 60.0  # how often the leader deletes the records whose time is up
EXPIRED, BEYOND_KEEP = "expired", "beyond_keep"  # why a record is retired
_CAS_TRIES = 5
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ID = re.compile(r"[0-9a-f]{12}")
# What an agent may push: a snapshot, named as snapshot_reference() names it.
_SNAPSHOT_REFERENCE = re.compile(r"portside/[a-z0-9._-]+\.snapshot:[0-9a-f]{12}")


def snapshot_id(digest: str) -> str:
    """A snapshot's id: the first 12 hex of its image's digest (as its reference's tag)."""
    return digest.removeprefix("sha256:")[:12]


def check_agent_push(agent: str, reference: str) -> None:
    """An agent pushes the snapshots it takes, nothing else: PermissionDenied unless
    `reference` names a snapshot image."""
    if _SNAPSHOT_REFERENCE.fullmatch(reference) is None:
        raise PermissionDenied(
            f"{agent} may push snapshots only (portside/<class>.snapshot:<id>), not "
            f"{reference or 'an image without a reference'}"
        )


def check_name(name: str) -> str:
    """A snapshot name a user gives (empty: its id). 12 hex digits are refused: a snapshot is
    looked up by id or name, and such a name could be another snapshot's id."""
    if name and (not _NAME.fullmatch(name) or _ID.fullmatch(name)):
        raise InvalidArgument(
            f"name: {name!r} is not a snapshot name: letters, digits, '.', '_' and '-', "
            "at most 63, starting with a letter or digit, and not 12 hex digits (an id's form)"
        )
    return name


def encode(s: Snapshot) -> bytes:
    return json.dumps(asdict(s), separators=(",", ":")).encode()


def decode(data: bytes) -> Snapshot:
    return Snapshot(**json.loads(data))


# --- pure choices ---------------------------------------------------------------------------


def newest_first(snapshots: Iterable[Snapshot]) -> list[Snapshot]:
    return sorted(snapshots, key=lambda s: (-s.created_at, s.id))


def find(snapshots: Iterable[Snapshot], reference: str) -> Snapshot | None:
    """The snapshot whose id is `reference`, else the one of that name."""
    listed = list(snapshots)
    return next((s for s in listed if s.id == reference), None) or next(
        (s for s in listed if s.name == reference), None
    )


def latest_restorable(
    snapshots: Iterable[Snapshot], cls: ContainerClass, instance_name: str
) -> Snapshot | None:
    """The newest snapshot of the instance taken on the image its class runs now."""
    image = cls.run_image
    mine = [s for s in snapshots if s.instance_name == instance_name and s.image_digest == image]
    return next(iter(newest_first(mine)), None)


def check_restorable(snapshot: Snapshot, cls: ContainerClass) -> None:
    """FailedPrecondition unless `snapshot` can be restored into `cls` as it is now."""
    if snapshot.class_name != cls.name:
        raise FailedPrecondition(
            f"snapshot {snapshot.id} is of class {snapshot.class_name}, not {cls.name}"
        )
    if snapshot.image_digest != cls.run_image:
        raise FailedPrecondition(
            f"snapshot {snapshot.name} ({snapshot.id}) was taken on image "
            f"{snapshot.image_digest}, the class now runs {cls.run_image}: snapshots are "
            "tied to their image version (deploy that image again to restore it)"
        )


def to_retire(
    snapshots: Iterable[Snapshot], keep: Mapping[str, int], now: float
) -> list[tuple[Snapshot, str]]:
    """The snapshots whose time is up (EXPIRED), and of each instance's sleep snapshots those
    beyond the newest `keep[class]` (BEYOND_KEEP; a class not in `keep` keeps them all until
    they expire). Newest first within each reason."""
    out: list[tuple[Snapshot, str]] = []
    live: dict[tuple[str, str], list[Snapshot]] = {}
    for s in newest_first(snapshots):
        if s.expires_at <= now:
            out.append((s, EXPIRED))
        elif s.trigger == SLEEP:
            live.setdefault((s.class_name, s.instance_name), []).append(s)
    for (class_name, _), sleeps in sorted(live.items()):
        if class_name in keep:
            out.extend((s, BEYOND_KEEP) for s in sleeps[keep[class_name] :])
    return out


def _check_name_free(stored: Iterable[Stored], class_name: str, name: str) -> None:
    if any(s.snapshot.name == name for s in stored):
        raise _name_taken(class_name, name)


def _name_taken(class_name: str, name: str) -> AlreadyExists:
    return AlreadyExists(f"class {class_name} has a snapshot named {name!r} already")


# --- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """A snapshot record as read, with the revisions a conditional write needs."""

    snapshot: Snapshot
    mod_revision: int
    create_revision: int

    @classmethod
    def of(cls, kv: KeyValue) -> Stored:
        return cls(decode(kv.value), kv.mod_revision, kv.create_revision)


class SnapshotBook:
    """Snapshot records in the store. Every write is conditional: a retention round and a
    restore that refreshes a record meanwhile never undo each other."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def read(self, class_name: str = "") -> list[Stored]:
        """One class's records, or every class's (unreadable ones are skipped loudly)."""
        kvs, _ = await self.store.range(records.snapshots_prefix(class_name))
        out = []
        for kv in kvs:
            try:
                out.append(Stored.of(kv))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("skipping unreadable snapshot record %s: %s", kv.key, exc)
        return out

    async def find(self, class_name: str, reference: str) -> Stored:
        """The class's snapshot of that id or name; NotFound if none."""
        if not reference:
            raise InvalidArgument("snapshot: required (a snapshot's id or name)")
        stored = await self.read(class_name)
        found = find((s.snapshot for s in stored), reference)
        if found is None:
            raise NotFound(
                f"class {class_name} has no snapshot {reference!r} "
                f"(`portside snapshot list {class_name}` lists them)"
            )
        return next(s for s in stored if s.snapshot.id == found.id)

    async def check_name_free(self, class_name: str, name: str) -> None:
        if name:
            _check_name_free(await self.read(class_name), class_name, name)

    async def create(self, snapshot: Snapshot, placement: KeyValue) -> Snapshot | None:
        """Write a new record, only while the instance's record is still `placement` (as read:
        one transaction, so a move meanwhile never lets the old node's snapshot in); None if it
        changed. The record of the same image if it exists (an agent that sends its record
        again). AlreadyExists if the class has another snapshot of its name: of two written at
        once, the later one is deleted again."""
        key = records.snapshot_key(snapshot.class_name, snapshot.id)
        stored = await self.read(snapshot.class_name)
        same = next((s.snapshot for s in stored if s.snapshot.id == snapshot.id), None)
        if same is None:
            _check_name_free(stored, snapshot.class_name, snapshot.name)
            unchanged = (placement.key, placement.mod_revision)
            if await self.store.compare_and_swap(key, 0, encode(snapshot), unchanged=unchanged):
                await self._yield_to_older_namesake(snapshot)
                return snapshot
            kv = await self.store.get(key)  # recorded meanwhile, or the placement changed
            if kv is None:
                return None
            same = decode(kv.value)
        if same.digest == snapshot.digest:
            return same
        raise AlreadyExists(f"snapshot id {snapshot.id} names another image already")

    async def _yield_to_older_namesake(self, snapshot: Snapshot) -> None:
        """Delete the record just written if an older one of its name was written meanwhile."""
        stored = await self.read(snapshot.class_name)
        ours = next((s for s in stored if s.snapshot.id == snapshot.id), None)
        if ours is not None and any(
            s.snapshot.name == snapshot.name and s.create_revision < ours.create_revision
            for s in stored
        ):
            await self.delete(ours)
            raise _name_taken(snapshot.class_name, snapshot.name)

    async def delete(self, stored: Stored) -> bool:
        """Delete the record as read; False if it changed (or went) meanwhile."""
        key = records.snapshot_key(stored.snapshot.class_name, stored.snapshot.id)
        return await self.store.compare_and_swap(key, stored.mod_revision, None)

    async def refresh(self, snapshot: Snapshot, retention_s: float) -> Snapshot:
        """A restore: the record kept `retention_s` from now (a record gone meanwhile stays
        gone; the restore goes on with the image it has)."""
        key = records.snapshot_key(snapshot.class_name, snapshot.id)
        for _ in range(_CAS_TRIES):
            kv = await self.store.get(key)
            if kv is None:
                return snapshot
            refreshed = replace(decode(kv.value), expires_at=self.clock() + retention_s)
            if await self.store.compare_and_swap(key, kv.mod_revision, encode(refreshed)):
                return refreshed
        raise StoreError(f"snapshot record {key}: {_CAS_TRIES} conflicting writes; try again")

    async def retire(self, stored: Sequence[Stored], keep: Mapping[str, int]) -> int:
        """Delete the records `to_retire` chooses among `stored`; how many went."""
        by_id = {s.snapshot.id: s for s in stored}
        retired = 0
        for snapshot, why in to_retire((s.snapshot for s in stored), keep, self.clock()):
            if await self.delete(by_id[snapshot.id]):
                retired += 1
                SNAPSHOTS_RETIRED.labels(why).inc()
                log.info(
                    "retired snapshot %s (%s) of %s/%s: %s",
                    snapshot.id,
                    snapshot.name,
                    snapshot.class_name,
                    snapshot.instance_name,
                    "expired" if why == EXPIRED else "beyond the class's snapshot_keep",
                )
        return retired


async def snapshot_digests(store: Store) -> frozenset[str]:
    """The images every snapshot record names: garbage collection keeps them."""
    return frozenset(s.snapshot.digest for s in await SnapshotBook(store).read())


# --- the RPCs' logic ------------------------------------------------------------------------


class Snapshots:
    """What the snapshot RPCs do: CreateSnapshot through the instance's agent, the agents'
    RecordSnapshot and LatestSnapshot, listing, deleting, and resolving a Start's snapshot."""

    def __init__(self, lifecycle: Lifecycle, clock: Callable[[], float] = time.time) -> None:
        self.lifecycle = lifecycle
        self.clock = clock

    @property
    def store(self) -> Store:
        return self.lifecycle.store

    @property
    def book(self) -> SnapshotBook:
        return SnapshotBook(self.lifecycle.store, self.clock)

    async def create(self, class_name: str, name: str, snapshot_name: str) -> Snapshot:
        """Ask the instance's agent to snapshot it now; the snapshot it recorded."""
        where = await self.lifecycle.locate(class_name, name)
        if where.node is None:
            raise FailedPrecondition(
                f"cannot snapshot {where.label}: its node {where.record.node_id} is gone (its "
                "filesystem went with it); its latest snapshot is what it starts from next"
            )
        await self.book.check_name_free(where.cls.name, check_name(snapshot_name))
        try:
            reply = await self.lifecycle.agents.call(
                where.node,
                f"snapshot {where.label}",
                lambda s: s.Snapshot,
                na.AgentSnapshotRequest(
                    instance_id=where.record.instance_id, name=snapshot_name, trigger=CREATE
                ),
                SNAPSHOT_TIMEOUT_S,
            )
        except NotFound as exc:  # placed, never booted there
            raise FailedPrecondition(
                f"cannot snapshot {where.label}: it has no container yet (start it first)"
            ) from exc
        return snapshot_from_pb(reply.snapshot)

    async def record(self, taken: Snapshot, iid: str, caller_node: str | None) -> Snapshot:
        """Record a snapshot an agent took and pushed: only from the node the instance is
        placed on (`caller_node` None: --insecure, no certificate says which node calls)."""
        cls = self.lifecycle.class_named(taken.class_name)
        if taken.trigger not in TRIGGERS:
            raise InvalidArgument(f"snapshot.trigger: {taken.trigger!r} is not one of {TRIGGERS}")
        digest = check_digest(taken.digest, "snapshot.digest")
        if iid != instance_id(cls.name, taken.instance_name):
            raise InvalidArgument(
                f"instance_id: {iid!r} is not the id of {cls.name}/{taken.instance_name}"
            )
        reference = snapshot_reference(cls.name, digest)
        if taken.reference != reference:
            raise InvalidArgument(f"snapshot.reference: {taken.reference!r}, not {reference!r}")
        kv = await self.store.get(records.image_key(digest))
        if kv is None or not ImageRecord.decode(kv.value).replicas:
            raise FailedPrecondition(
                f"snapshot image {digest} is in no replica's image store: push it first"
            )
        new_id = snapshot_id(digest)
        now = self.clock()
        snapshot = replace(
            taken,
            id=new_id,
            name=check_name(taken.name) or new_id,
            created_at=now,
            expires_at=now + cls.snapshot_retention_s,
        )
        for _ in range(_CAS_TRIES):
            # Checked again on every try: the write fails only if the placement changed.
            placement = await self._placement(
                cls, taken.instance_name, caller_node, "record a snapshot of"
            )
            recorded = await self.book.create(snapshot, placement)
            if recorded is not None:
                break
        else:
            raise StoreError(f"{cls.name}/{taken.instance_name}: {_CAS_TRIES} conflicting writes")
        snapshot = recorded
        SNAPSHOTS_RECORDED.labels(snapshot.trigger).inc()
        log.info(
            "snapshot %s (%s) of %s/%s recorded: %d bytes of writable layer, on image %s",
            snapshot.id,
            snapshot.name,
            cls.name,
            snapshot.instance_name,
            snapshot.layer_bytes,
            snapshot.image_digest,
        )
        if snapshot.trigger == SLEEP:
            mine = [
                s
                for s in await self.book.read(cls.name)
                if s.snapshot.instance_name == snapshot.instance_name
            ]
            await self.book.retire(mine, {cls.name: cls.snapshot_keep})
        return snapshot

    async def latest(self, class_name: str, name: str, caller_node: str | None) -> Snapshot | None:
        """The snapshot a named instance's first container on its node starts from: only if
        it was placed anew after its node was lost, the newest taken on the class's image."""
        cls = self.lifecycle.class_named(class_name)
        placement = await self._placement(cls, name, caller_node, "restore")
        if not InstanceRecord.decode(placement.value).restore:
            return None
        stored = await self.book.read(cls.name)
        found = latest_restorable((s.snapshot for s in stored), cls, name)
        if found is None:
            return None
        SNAPSHOTS_RESTORED.labels("replaced").inc()
        log.info("%s/%s was placed anew: it starts from snapshot %s", cls.name, name, found.id)
        return await self.book.refresh(found, cls.snapshot_retention_s)

    async def for_start(self, cls: ContainerClass, reference: str) -> Snapshot:
        """The snapshot a Start names, if it can be restored into the class now."""
        snapshot = (await self.book.find(cls.name, reference)).snapshot
        check_restorable(snapshot, cls)
        return snapshot

    async def restored(self, cls: ContainerClass, snapshot: Snapshot) -> None:
        """A Start restored `snapshot`: it is kept the class's retention from now."""
        SNAPSHOTS_RESTORED.labels("start").inc()
        await self.book.refresh(snapshot, cls.snapshot_retention_s)

    async def listing(self, class_name: str, instance_name: str) -> list[Snapshot]:
        if instance_name and not class_name:
            raise InvalidArgument("class_name: required when instance_name is given")
        stored = await self.book.read(class_name)
        return newest_first(
            s.snapshot
            for s in stored
            if not instance_name or s.snapshot.instance_name == instance_name
        )

    async def delete(self, class_name: str, reference: str) -> Snapshot:
        if not class_name:
            raise InvalidArgument("class_name: required")
        stored = await self.book.find(class_name, reference)
        if not await self.book.delete(stored):
            raise FailedPrecondition(
                f"snapshot {stored.snapshot.id} changed while it was deleted; try again"
            )
        log.info("deleted snapshot %s (%s)", stored.snapshot.id, stored.snapshot.name)
        return stored.snapshot

    async def _placement(
        self, cls: ContainerClass, name: str, caller_node: str | None, verb: str
    ) -> KeyValue:
        """The instance's record as the store has it now (not this replica's view, which may
        lag a move); FailedPrecondition unless it is placed on `caller_node`."""
        kv = await self.store.get(records.instance_key(cls.name, instance_id(cls.name, name)))
        if kv is None:
            raise FailedPrecondition(f"cannot {verb} {cls.name}/{name}: it is not placed")
        placed = InstanceRecord.decode(kv.value)
        if caller_node is not None and placed.node_id != caller_node:
            raise FailedPrecondition(
                f"cannot {verb} {cls.name}/{name} from node {caller_node}: it is placed on "
                f"node {placed.node_id} (this node's copy is stale)"
            )
        return kv


class SnapshotRetention:
    """The leader's round, every `every_s`: delete the snapshot records whose time is up and
    those beyond their class's snapshot_keep. The image store frees their layers at its next
    garbage collection."""

    def __init__(
        self,
        book: SnapshotBook,
        classes: Callable[[], Mapping[str, ContainerClass]],
        is_leader: Callable[[], bool],
        every_s: float = RETENTION_EVERY_S,
    ) -> None:
        self.book, self.classes, self.is_leader, self.every_s = book, classes, is_leader, every_s

    async def run(self) -> None:
        """Forever: a round that fails is logged and counted, and the next one runs."""
        while True:
            await asyncio.sleep(self.every_s)
            if not self.is_leader():
                continue
            try:
                await self.round()
                SNAPSHOT_RETENTION_RUNS.labels("ok").inc()
            except StoreError as exc:
                SNAPSHOT_RETENTION_RUNS.labels("store_error").inc()
                log.warning("snapshot retention round failed: %s", exc)
            except Exception:
                # A fault of this code must not end the loop's task group, and with it the replica.
                SNAPSHOT_RETENTION_RUNS.labels("error").inc()
                log.exception("snapshot retention round failed")

    async def round(self) -> int:
        keep = {name: c.snapshot_keep for name, c in self.classes().items()}
        return await self.book.retire(await self.book.read(), keep)
