"""Which images garbage collection keeps (a pure choice over a snapshot, table-driven), how
deployments get into image records, and the keep list agents are told. No store: watch events
are applied by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from controlplane import records
from controlplane.imagecatalog import ImageCatalog, with_deployment
from controlplane.imagegc import (
    CURRENT,
    FRESH,
    FRESH_PUSH_S,
    RECENT,
    GcSnapshot,
    decide_keep,
)
from controlplane.records import Deployment, ImageRecord
from controlplane.store import KeyValue, WatchEvent
from controlplane.view import ClusterView
from portside.spec import ContainerClass

NOW = 1_000_000.0
OLD = NOW - 2 * FRESH_PUSH_S


def d(n: int) -> str:
    return f"sha256:{n:064x}"


def image(n: int, pushed_at: float = OLD, **deployed: int) -> ImageRecord:
    """Image n, deployed for each class at the given class-record revision."""
    return ImageRecord(
        d(n),
        f"portside/x:{n}",
        100,
        pushed_at,
        ("r1",),
        tuple(Deployment(c, rev, OLD) for c, rev in sorted(deployed.items())),
    )


@dataclass(frozen=True)
class Case:
    name: str
    images: list[ImageRecord]
    class_images: dict[str, str]
    keep: dict[str, str]
    keep_versions: int = 3
    drop: list[str] = field(default_factory=list)


CASES = [
    Case("no images: nothing to do", [], {"Web": d(1)}, {}),
    Case(
        "a class's current image is kept even if never recorded as deployed",
        [image(1), image(2)],
        {"Web": d(1)},
        {d(1): CURRENT},
        drop=[d(2)],
    ),
    Case(
        "the last N deployments of a class, the current one among them",
        [image(1, Web=10), image(2, Web=20), image(3, Web=30), image(4, Web=40)],
        {"Web": d(4)},
        {d(4): CURRENT, d(3): RECENT, d(2): RECENT},
        drop=[d(1)],
    ),
    Case(
        "N = 1 keeps only the current image",
        [image(1, Web=10), image(2, Web=20)],
        {"Web": d(2)},
        {d(2): CURRENT},
        keep_versions=1,
        drop=[d(1)],
    ),
    Case(
        "a rollback to an old image counts by its latest deployment",
        [image(1, Web=50), image(2, Web=20), image(3, Web=30), image(4, Web=40)],
        {"Web": d(1)},
        {d(1): CURRENT, d(4): RECENT, d(3): RECENT},
        drop=[d(2)],
    ),
    Case(
        "versions are counted per class",
        [image(1, Web=10, Api=11), image(2, Web=20), image(3, Api=30), image(4, Api=40)],
        {"Web": d(2), "Api": d(4)},
        {d(2): CURRENT, d(4): CURRENT, d(1): RECENT, d(3): RECENT},
        keep_versions=2,
    ),
    Case(
        "a deleted class's images go",
        [image(1, Gone=10), image(2, Web=20)],
        {"Web": d(2)},
        {d(2): CURRENT},
        drop=[d(1)],
    ),
    Case(
        "an image pushed within the hour is kept (its Deploy may be on its way)",
        [image(1, pushed_at=NOW - FRESH_PUSH_S + 1), image(2, pushed_at=NOW - FRESH_PUSH_S)],
        {},
        {d(1): FRESH},
        drop=[d(2)],
    ),
    Case(
        "a class naming an image with no record keeps nothing extra",
        [image(2)],
        {"Web": d(1)},
        {},
        drop=[d(2)],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_keep_choice(case: Case) -> None:
    snapshot = GcSnapshot(
        now=NOW,
        images={r.digest: r for r in case.images},
        class_images=case.class_images,
        keep_versions=case.keep_versions,
    )
    decision = decide_keep(snapshot)
    assert dict(decision.keep) == case.keep
    assert list(decision.drop) == case.drop


def test_a_deployment_replaces_only_an_older_one_of_its_class() -> None:
    first = with_deployment(image(1), Deployment("Web", 10, 1.0))
    assert first is not None and first.deployment("Web") == Deployment("Web", 10, 1.0)
    assert with_deployment(first, Deployment("Web", 10, 2.0)) is None  # seen by another replica
    assert with_deployment(first, Deployment("Web", 9, 2.0)) is None
    both = with_deployment(first, Deployment("Api", 12, 3.0))
    assert both is not None and [x.class_name for x in both.deployed] == ["Api", "Web"]
    later = with_deployment(both, Deployment("Web", 15, 4.0))
    assert later is not None and later.deployment("Web") == Deployment("Web", 15, 4.0)
    assert with_deployment(None, Deployment("Web", 1, 1.0)) is None  # no record: nothing kept


def test_image_records_round_trip_with_and_without_deployments() -> None:
    rec = image(1, Web=3, Api=4)
    assert ImageRecord.decode(rec.encode()) == rec
    old_form = b'{"digest":"%s","reference":"","size_bytes":1,"pushed_at":2.0}' % d(1).encode()
    assert ImageRecord.decode(old_form) == ImageRecord(d(1), "", 1, 2.0)


def test_replica_records_read_without_an_address() -> None:
    assert records.Replica.decode(b'{"region":"fra","metrics_address":"h:1"}').address == ""
    rec = records.Replica("fra", "h:1", "h:7070")
    assert records.Replica.decode(rec.encode()) == rec


# --- the catalog: deployments seen on the watch, and the keep list ---


def web(digest: str) -> ContainerClass:
    return ContainerClass(name="Web", image="portside/web:" + digest[7:19], image_digest=digest)


def feed(view: ClusterView, catalog: ImageCatalog, key: str, value: bytes, rev: int) -> None:
    event = WatchEvent("put", KeyValue(key, value, rev, rev))
    view._apply(event)
    catalog.apply(event)


def test_a_changed_image_digest_is_noted_with_its_revision_once() -> None:
    view = ClusterView(store=cast(Any, None), clock=lambda: NOW)
    catalog = ImageCatalog(store=cast(Any, None), view=view, replica_id="r1", clock=lambda: NOW)
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(d(1))), 5)
    assert catalog._deploy_notes == {"Web": (d(1), 5)}
    catalog._deploy_notes.clear()
    # A deploy that writes the class again unchanged is no new version of it.
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(d(1))), 6)
    assert catalog._deploy_notes == {}
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(d(2))), 7)
    assert catalog._deploy_notes == {"Web": (d(2), 7)}


def test_the_keep_list_is_withheld_until_loaded_then_names_records_and_current_images() -> None:
    view = ClusterView(store=cast(Any, None), clock=lambda: NOW)
    catalog = ImageCatalog(store=cast(Any, None), view=view, replica_id="r1", clock=lambda: NOW)
    assert catalog.keep_images() is None  # never an empty list by mistake
    catalog.loaded.set()
    assert catalog.keep_images() == []  # loaded, and truly no images
    feed(view, catalog, records.image_key(d(2)), image(2).encode(), 3)
    # The class's image has no record (lost): still kept, so no agent removes its only copy.
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(d(1))), 4)
    assert catalog.keep_images() == [d(1), d(2)]


def test_a_deleted_record_is_handed_to_the_sweeper_unless_pushed_again() -> None:
    view = ClusterView(store=cast(Any, None), clock=lambda: NOW)
    catalog = ImageCatalog(store=cast(Any, None), view=view, replica_id="r1", clock=lambda: NOW)
    key = records.image_key(d(1))
    feed(view, catalog, key, image(1).encode(), 3)
    catalog.apply(WatchEvent("delete", KeyValue(key, b"", 3, 4)))
    assert catalog.dropped == {d(1)} and catalog.dropped_changed.is_set()
    assert d(1) not in catalog.images
    feed(view, catalog, key, image(1).encode(), 5)
    assert catalog.dropped == set()
