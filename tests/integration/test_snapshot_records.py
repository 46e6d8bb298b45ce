"""Snapshot records on a real store (etcd on loopback, SQLite in a file): what RecordSnapshot
accepts, names unique in a class even when two are recorded at once, LatestSnapshot only for an
instance placed anew after its node was lost (the placement marks it), restores refreshing the
expiry, and retention's deletes giving way to a refresh. No agent: the test plays its part."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import pytest

from controlplane import records
from controlplane.agents import AgentClients
from controlplane.events import EventLog
from controlplane.lifecycle import Lifecycle
from controlplane.placement import resolve_named
from controlplane.records import ImageRecord, InstanceRecord
from controlplane.snapshots import SnapshotBook, Snapshots, encode, snapshot_id
from controlplane.store import KeyValue, Store, open_store
from controlplane.view import ClusterView
from portside import geo
from portside.build import snapshot_reference
from portside.client import Snapshot
from portside.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from portside.spec import ContainerClass, Node, instance_id

pytestmark = pytest.mark.integration

IMAGE = "sha256:" + "c" * 64
RETENTION_S = 3600.0


@pytest.fixture(params=["etcd", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "etcd":
        return cast(str, request.getfixturevalue("etcd_url"))
    return f"sqlite://{tmp_path / 'state.db'}"


@dataclass
class World:
    """A class, a node, and a control plane's view and snapshot logic on a real store; names of
    this test's own (etcd is shared)."""

    store: Store
    view: ClusterView
    snapshots: Snapshots
    cls: ContainerClass
    node: str

    def taken(
        self, n: int, name: str = "", instance: str = "box", trigger: str = "create"
    ) -> Snapshot:
        """A snapshot as an agent sends it (the control plane sets id and times)."""
        digest = f"sha256:{n:012x}{'e' * 52}"
        return Snapshot(
            id="",
            name=name,
            class_name=self.cls.name,
            instance_name=instance,
            digest=digest,
            reference=snapshot_reference(self.cls.name, digest),
            image_digest=IMAGE,
            layer_bytes=1000 + n,
            trigger=trigger,
        )

    async def pushed(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot's image, held by a replica (as PushImage leaves it)."""
        record = ImageRecord(snapshot.digest, snapshot.reference, 5000, time.time(), ("r1",))
        await self.store.put(records.image_key(snapshot.digest), record.encode())
        return snapshot

    async def place(self, name: str, node: str, *, restore: bool = False) -> None:
        iid = instance_id(self.cls.name, name)
        record = InstanceRecord(
            self.cls.name, name, iid, node, 0.25, 256, time.time(), restore=restore
        )
        await self.store.put(records.instance_key(self.cls.name, iid), record.encode())

    async def placement(self, name: str) -> KeyValue:
        kv = await self.store.get(
            records.instance_key(self.cls.name, instance_id(self.cls.name, name))
        )
        assert kv is not None
        return kv


@pytest.fixture
async def w(store_url: str) -> AsyncIterator[World]:
    store = await open_store(store_url)
    suffix = uuid.uuid4().hex[:8]
    cls = ContainerClass(
        name="Snap" + suffix,
        image="portside/snap:cccccccccccc",
        image_digest=IMAGE,
        snapshot_retention_s=RETENTION_S,
        snapshot_keep=2,
    )
    node = Node("snode-" + suffix, "127.0.0.1:1", "127.0.0.1:2", "fra", 50.1, 8.7, 4.0, 4096)
    await store.put(records.class_key(cls.name), records.encode_class(cls))
    await store.put(records.node_key(node.id), records.encode_node(node))
    view = ClusterView(store)
    await view.load()
    lifecycle = Lifecycle(store, view, AgentClients(view), EventLog(store), default_region="fra")
    try:
        yield World(store, view, Snapshots(lifecycle), cls, node.id)
    finally:
        for key in (
            records.class_key(cls.name),
            records.node_key(node.id),
        ):
            await store.delete(key)
        for prefix in (records.snapshots_prefix(cls.name), records.instance_key(cls.name, "")):
            kvs, _ = await store.range(prefix)
            for kv in kvs:
                await store.delete(kv.key)
        for n in range(10):
            await store.delete(records.image_key(f"sha256:{n:012x}{'e' * 52}"))
        await store.close()


async def test_an_agent_records_a_snapshot_of_an_instance_placed_on_its_node(w: World) -> None:
    await w.place("box", w.node)
    taken = await w.pushed(w.taken(1, name="first"))
    before = time.time()
    recorded = await w.snapshots.record(taken, instance_id(w.cls.name, "box"), w.node)
    assert recorded.id == snapshot_id(taken.digest) and recorded.name == "first"
    assert before <= recorded.created_at <= time.time()
    assert recorded.expires_at == pytest.approx(recorded.created_at + RETENTION_S)
    assert await w.snapshots.listing(w.cls.name, "box") == [recorded]
    # Sent again (its answer was lost): the same record, not a second one.
    again = await w.snapshots.record(taken, instance_id(w.cls.name, "box"), w.node)
    assert again == recorded
    unnamed = await w.snapshots.record(
        await w.pushed(w.taken(2)), instance_id(w.cls.name, "box"), w.node
    )
    assert unnamed.name == unnamed.id


async def test_what_record_refuses(w: World) -> None:
    iid = instance_id(w.cls.name, "box")
    taken = await w.pushed(w.taken(1, name="first"))
    with pytest.raises(FailedPrecondition, match="not placed"):
        await w.snapshots.record(taken, iid, w.node)
    await w.place("box", "another-node")
    with pytest.raises(FailedPrecondition, match="placed on node another-node"):
        await w.snapshots.record(taken, iid, w.node)  # a stale copy never records
    await w.place("box", w.node)
    with pytest.raises(FailedPrecondition, match="push it first"):
        await w.snapshots.record(w.taken(3), iid, w.node)
    with pytest.raises(InvalidArgument, match="reference"):
        await w.snapshots.record(replace(taken, reference="portside/x.snapshot:0"), iid, w.node)
    with pytest.raises(InvalidArgument, match="instance_id"):
        await w.snapshots.record(taken, instance_id(w.cls.name, "other"), w.node)
    await w.snapshots.record(taken, iid, w.node)
    with pytest.raises(AlreadyExists, match="first"):
        await w.snapshots.record(await w.pushed(w.taken(4, name="first")), iid, w.node)
    assert [s.name for s in await w.snapshots.listing(w.cls.name, "")] == ["first"]


async def test_two_snapshots_of_one_name_recorded_at_once_leave_one(w: World) -> None:
    await w.place("box", w.node)
    iid = instance_id(w.cls.name, "box")
    taken = [await w.pushed(w.taken(n, name="twin")) for n in (1, 2)]
    results = await asyncio.gather(
        *(w.snapshots.record(t, iid, w.node) for t in taken), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "Snapshot"]
    (kept,) = await w.snapshots.listing(w.cls.name, "box")
    assert kept.name == "twin" and kept in results


async def test_sleep_snapshots_beyond_keep_are_retired(w: World) -> None:
    await w.place("box", w.node)
    iid = instance_id(w.cls.name, "box")
    made = await w.snapshots.record(await w.pushed(w.taken(1)), iid, w.node)
    for n in (2, 3, 4):
        await w.snapshots.record(await w.pushed(w.taken(n, trigger="sleep")), iid, w.node)
    listed = await w.snapshots.listing(w.cls.name, "box")
    # snapshot_keep = 2: the two newest sleep snapshots, and the created one.
    assert sorted(s.id for s in listed) == sorted(
        [made.id, *(snapshot_id(w.taken(n).digest) for n in (3, 4))]
    )


async def test_latest_only_for_an_instance_placed_anew_after_its_node_was_lost(w: World) -> None:
    near = geo.lookup("fra")
    # Placed on a node that is gone: the next resolve moves it and marks the record.
    await w.place("box", "lost-node")
    iid = instance_id(w.cls.name, "box")
    assert await w.snapshots.latest(w.cls.name, "box", None) is None  # not moved yet
    old = await w.pushed(w.taken(1, trigger="sleep"))
    newer = await w.pushed(w.taken(2, trigger="sleep"))
    other_image = await w.pushed(
        replace(w.taken(3, trigger="sleep"), image_digest="sha256:" + "d" * 64)
    )
    book = SnapshotBook(w.store)
    for taken, age in ((old, 30), (newer, 20), (other_image, 10)):
        snap = replace(taken, id=snapshot_id(taken.digest), name=snapshot_id(taken.digest))
        snap = replace(snap, created_at=time.time() - age, expires_at=time.time() + 60)
        await book.create(snap, await w.placement("box"))

    with pytest.raises(FailedPrecondition, match="placed on node lost-node"):
        await w.snapshots.latest(w.cls.name, "box", w.node)
    moved = await resolve_named(w.store, w.view, w.cls, "box", near)
    assert moved.placed and moved.record.restore and moved.node.id == w.node
    found = await w.snapshots.latest(w.cls.name, "box", w.node)
    assert found is not None and found.id == snapshot_id(newer.digest)  # not the other image's
    assert found.expires_at == pytest.approx(time.time() + RETENTION_S, abs=5)  # refreshed
    with pytest.raises(FailedPrecondition, match="stale"):
        await w.snapshots.latest(w.cls.name, "box", "another-node")

    # Destroyed and started again: placed without restore, so it starts fresh.
    await w.store.delete(records.instance_key(w.cls.name, iid))
    w.view.note_removed(records.instance_key(w.cls.name, iid))
    fresh = await resolve_named(w.store, w.view, w.cls, "box", near)
    assert fresh.placed and not fresh.record.restore
    assert await w.snapshots.latest(w.cls.name, "box", w.node) is None


async def test_a_snapshot_is_recorded_only_while_the_placement_checked_holds(w: World) -> None:
    """The old node's snapshot never lands after a move between the check and the write."""
    await w.place("box", w.node)
    checked = await w.placement("box")
    await w.place("box", "another-node")  # moved meanwhile
    book = SnapshotBook(w.store)
    taken = w.taken(1)
    snap = replace(taken, id=snapshot_id(taken.digest), name=snapshot_id(taken.digest))
    assert await book.create(snap, checked) is None
    assert await book.read(w.cls.name) == []
    assert await book.create(snap, await w.placement("box")) == snap


async def test_retention_gives_way_to_a_refresh(w: World) -> None:
    book = SnapshotBook(w.store)
    taken = w.taken(1)
    expired = replace(
        taken, id=snapshot_id(taken.digest), name="old", created_at=1.0, expires_at=2.0
    )
    await w.place("box", w.node)
    await book.create(expired, await w.placement("box"))
    (stale,) = await book.read(w.cls.name)
    await book.refresh(expired, RETENTION_S)  # a restore, after the round read the record
    assert await book.retire([stale], {w.cls.name: 2}) == 0
    (kept,) = await book.read(w.cls.name)
    assert kept.snapshot.expires_at > time.time()
    # Read again, it is not expired; once its time is up, the round deletes it.
    assert await book.retire(await book.read(w.cls.name), {}) == 0
    await w.store.put(
        records.snapshot_key(w.cls.name, expired.id),
        encode(expired),
    )
    assert await book.retire(await book.read(w.cls.name), {}) == 1
    assert await book.read(w.cls.name) == []
