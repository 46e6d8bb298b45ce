"""Snapshots' pure choices: which records retention retires, which snapshot a re-placed instance
starts from, what a Start may restore, what names and pushes are allowed, and that garbage
collection keeps every image a snapshot record names. No store."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, cast

import pytest

from controlplane.imagegc import FRESH_PUSH_S, SNAPSHOT, GcSnapshot, decide_keep
from controlplane.records import ImageRecord
from controlplane.snapshots import (
    BEYOND_KEEP,
    EXPIRED,
    SnapshotRetention,
    Stored,
    check_agent_push,
    check_name,
    check_restorable,
    decode,
    encode,
    find,
    latest_restorable,
    newest_first,
    snapshot_id,
    to_retire,
)
from portside.build import snapshot_reference
from portside.client import Snapshot
from portside.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from portside.spec import ContainerClass

NOW = 1_000_000.0
IMAGE = "sha256:" + "a" * 64
OTHER_IMAGE = "sha256:" + "b" * 64
CLS = ContainerClass(name="Box", image="portside/box:aaaaaaaaaaaa", image_digest=IMAGE)


def digest_of(n: int) -> str:
    return f"sha256:{n:012x}{'f' * 52}"


def snap(
    n: int,
    *,
    instance: str = "one",
    trigger: str = "sleep",
    created: float = NOW - 100,
    expires: float = NOW + 100,
    image: str = IMAGE,
    name: str = "",
) -> Snapshot:
    digest = digest_of(n)
    return Snapshot(
        id=snapshot_id(digest),
        name=name or snapshot_id(digest),
        class_name="Box",
        instance_name=instance,
        digest=digest,
        reference=snapshot_reference("Box", digest),
        image_digest=image,
        created_at=created,
        expires_at=expires,
        trigger=trigger,
    )


@dataclass(frozen=True)
class RetireCase:
    name: str
    snapshots: list[Snapshot]
    keep: dict[str, int]
    retired: list[tuple[int, str]]  # (n, why), in order


def ids(*pairs: tuple[int, str]) -> list[tuple[str, str]]:
    return [(snapshot_id(digest_of(n)), why) for n, why in pairs]


RETIRE = [
    RetireCase("nothing to do", [snap(1), snap(2, created=NOW - 50)], {"Box": 5}, []),
    RetireCase(
        "expired ones go, whatever their trigger",
        [snap(1, expires=NOW - 1), snap(2, trigger="create", expires=NOW), snap(3)],
        {"Box": 5},
        [(1, EXPIRED), (2, EXPIRED)],
    ),
    RetireCase(
        "an instance's sleep snapshots beyond the newest keep go, oldest ones",
        [snap(n, created=NOW - 100 + n) for n in range(1, 5)],
        {"Box": 2},
        [(2, BEYOND_KEEP), (1, BEYOND_KEEP)],
    ),
    RetireCase(
        "created snapshots never count against keep",
        [
            snap(1, created=NOW - 90, trigger="create"),
            snap(2, created=NOW - 80),
            snap(3, created=NOW - 70, trigger="create"),
        ],
        {"Box": 1},
        [],
    ),
    RetireCase(
        "keep is per instance",
        [snap(1, instance="a"), snap(2, instance="b"), snap(3, instance="a", created=NOW - 10)],
        {"Box": 1},
        [(1, BEYOND_KEEP)],
    ),
    RetireCase(
        "an expired snapshot does not take a kept place",
        [snap(1, created=NOW - 10, expires=NOW - 1), snap(2, created=NOW - 20)],
        {"Box": 1},
        [(1, EXPIRED)],
    ),
    RetireCase(
        "a class no longer deployed keeps them until they expire",
        [snap(1), snap(2, created=NOW - 10)],
        {},
        [],
    ),
]


@pytest.mark.parametrize("case", RETIRE, ids=[c.name for c in RETIRE])
def test_retention_retires(case: RetireCase) -> None:
    retired = to_retire(case.snapshots, case.keep, NOW)
    assert [(s.id, why) for s, why in retired] == ids(*case.retired)


def test_a_replaced_instance_starts_from_its_newest_snapshot_on_the_class_s_image() -> None:
    snapshots = [
        snap(1, created=NOW - 30),
        snap(2, created=NOW - 20, trigger="create"),
        snap(3, created=NOW - 10, image=OTHER_IMAGE),  # newer, but of the image before
        snap(4, created=NOW - 5, instance="two"),  # another instance's
    ]
    found = latest_restorable(snapshots, CLS, "one")
    assert found is not None and found.id == snapshots[1].id
    assert latest_restorable(snapshots, CLS, "three") is None
    assert latest_restorable(snapshots[2:3], CLS, "one") is None


def test_a_start_restores_only_a_snapshot_taken_on_the_class_s_image() -> None:
    check_restorable(snap(1), CLS)
    check_restorable(snap(1, instance="another"), CLS)  # a fork: allowed
    with pytest.raises(FailedPrecondition, match="tied to their image version") as exc:
        check_restorable(snap(2, image=OTHER_IMAGE), CLS)
    assert OTHER_IMAGE in str(exc.value) and IMAGE in str(exc.value)
    with pytest.raises(FailedPrecondition, match="of class Box, not Web"):
        check_restorable(snap(1), replace(CLS, name="Web"))


def test_a_class_without_a_built_image_is_matched_by_its_reference() -> None:
    registry = ContainerClass(name="Box", image="registry.example/box:1")
    check_restorable(snap(1, image="registry.example/box:1"), registry)
    with pytest.raises(FailedPrecondition):
        check_restorable(snap(1), registry)


def test_find_by_id_first_then_by_name() -> None:
    a, b = snap(1, name="before-upgrade"), snap(2)
    assert find([a, b], a.id) == a
    assert find([a, b], "before-upgrade") == a
    assert find([a, b], b.id) == b
    assert find([a, b], "nothing") is None
    # A name never shadows an id: names of 12 hex digits are refused (check_name).
    assert find([replace(a, name=b.id), b], b.id) == b


def test_newest_first() -> None:
    old, new = snap(1, created=NOW - 10), snap(2, created=NOW - 1)
    assert newest_first([old, new]) == [new, old]


@pytest.mark.parametrize("name", ["", "before-upgrade", "v1.2_ok", "a" * 63])
def test_names_allowed(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["0123456789ab", "-x", "has space", "a" * 64, "ü"])
def test_names_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a snapshot name"):
        check_name(name)


def test_agents_push_snapshots_only() -> None:
    check_agent_push("agent/n1", snapshot_reference("Box", IMAGE))
    for reference in ("portside/box:aaaaaaaaaaaa", ""):
        with pytest.raises(PermissionDenied, match="may push snapshots only"):
            check_agent_push("agent/n1", reference)


def test_records_round_trip() -> None:
    s = snap(7, name="kept", trigger="create")
    assert decode(encode(s)) == s


def test_garbage_collection_keeps_every_image_a_snapshot_names() -> None:
    old = NOW - 2 * FRESH_PUSH_S
    images = {
        d: ImageRecord(d, snapshot_reference("Box", d), 100, old, ("r1",))
        for d in (snap(1).digest, snap(2).digest)
    }
    decision = decide_keep(
        GcSnapshot(
            now=NOW,
            images=images,
            class_images={},
            keep_versions=1,
            snapshots=frozenset({snap(1).digest}),
        )
    )
    assert decision.keep == {snap(1).digest: SNAPSHOT}
    assert decision.drop == (snap(2).digest,)


class FaultyBook:
    """A snapshot book whose first read fails with a fault of the code, not of the store."""

    def __init__(self) -> None:
        self.reads = 0

    async def read(self, class_name: str = "") -> list[Stored]:
        self.reads += 1
        if self.reads == 1:
            raise RuntimeError("a bug")
        return []

    async def retire(self, stored: list[Stored], keep: dict[str, int]) -> int:
        return 0


async def test_retention_survives_a_round_that_fails() -> None:
    book = FaultyBook()
    retention = SnapshotRetention(cast(Any, book), dict, lambda: True, every_s=0.0)
    loop = asyncio.create_task(retention.run())
    try:
        for _ in range(100):
            if book.reads >= 2:
                break
            await asyncio.sleep(0.01)
        assert book.reads >= 2 and not loop.done()
    finally:
        loop.cancel()
