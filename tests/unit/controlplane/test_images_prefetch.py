"""Which images a node pre-fetches (a pure choice over a snapshot, table-driven), and how the
image catalog keeps that snapshot from watch events. No store: events are applied by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from controlplane import records
from controlplane.imagecatalog import (
    FRESH_DEPLOY_S,
    RECENT_RUN_S,
    ImageCatalog,
    PrefetchSnapshot,
    _with_replica,
    images_to_prefetch,
)
from controlplane.images import StoredImage
from controlplane.records import ImageRecord, InstanceRecord
from controlplane.service import not_held
from controlplane.store import KeyValue, WatchEvent
from controlplane.view import ClusterView
from portside.errors import NotFound, Unavailable
from portside.spec import ContainerClass, Node
from tests.support import reported

NOW = 1_000_000.0
A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@dataclass(frozen=True)
class Case:
    name: str
    want: list[str]
    deployed_at: dict[str, float] = field(default_factory=dict)
    last_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    held: frozenset[str] = frozenset({A, B})
    region: str = "fra"


CASES = [
    Case("never ran, deployed long ago: nothing", [], deployed_at={"Web": NOW - 86400}),
    Case("just deployed: everywhere", [A], deployed_at={"Web": NOW - 60}),
    Case("deployed at the edge of the window", [A], deployed_at={"Web": NOW - FRESH_DEPLOY_S}),
    Case("deployed just past the window", [], deployed_at={"Web": NOW - FRESH_DEPLOY_S - 1}),
    Case("ran here an hour ago", [A], last_seen={("Web", "fra"): NOW - 3600}),
    Case("ran here a day and a second ago", [], last_seen={("Web", "fra"): NOW - RECENT_RUN_S - 1}),
    Case("ran only in another region", [], last_seen={("Web", "iad"): NOW - 60}),
    Case(
        "both classes, sorted",
        [A, B],
        deployed_at={"Api": NOW},
        last_seen={("Web", "fra"): NOW - 10},
    ),
    Case("an image no replica holds is left out", [], deployed_at={"Web": NOW}, held=frozenset()),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_prefetch_choice(case: Case) -> None:
    snapshot = PrefetchSnapshot(
        now=NOW,
        class_images={"Web": A, "Api": B},
        deployed_at=case.deployed_at,
        last_seen=case.last_seen,
        held=case.held,
    )
    assert images_to_prefetch(snapshot, case.region) == case.want


def test_two_classes_of_one_image_give_it_once() -> None:
    snapshot = PrefetchSnapshot(NOW, {"X": A, "Y": A}, {"X": NOW, "Y": NOW}, {}, frozenset({A}))
    assert images_to_prefetch(snapshot, "fra") == [A]


# --- the catalog, fed as the view's watch feeds it ---

FRA = Node("n1", "127.0.0.1:1", "127.0.0.1:2", "FRA", 50.0, 8.6, 2.0, 4096)
IAD = Node("n2", "127.0.0.1:3", "127.0.0.1:4", "iad", 38.9, -77.4, 2.0, 4096)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def event(key: str, value: bytes, kind: str = "put") -> WatchEvent:
    return WatchEvent("put" if kind == "put" else "delete", KeyValue(key, value, 1, 1))


def feed(view: ClusterView, catalog: ImageCatalog, key: str, value: bytes) -> None:
    """As ClusterView.follow does: the view applies the event, then its listeners see it."""
    e = event(key, value)
    view._apply(e)
    catalog.apply(e)


def web(digest: str) -> ContainerClass:
    return ContainerClass(name="Web", image="portside/web:" + digest[7:19], image_digest=digest)


def make_catalog() -> tuple[ClusterView, ImageCatalog, Clock]:
    clock = Clock()
    view = ClusterView(store=cast(Any, None), clock=clock)
    catalog = ImageCatalog(store=cast(Any, None), view=view, replica_id="r1", clock=clock)
    for node in (FRA, IAD):
        feed(view, catalog, records.node_key(node.id), records.encode_node(node))
    held = ImageRecord(A, "portside/web:a", 100, NOW - 7200, ("r1",))
    feed(view, catalog, records.image_key(A), held.encode())
    return view, catalog, clock


def test_a_deploy_spreads_for_ten_minutes_then_only_where_it_ran() -> None:
    view, catalog, clock = make_catalog()
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(A)))
    assert catalog.prefetch_for("iad") == [A] and catalog.prefetch_for("fra") == [A]

    # An instance runs on the fra node (its region registered in upper case).
    rec = InstanceRecord("Web", "w1", "id-w1", "n1", 0.5, 256, placed_at=clock.now)
    feed(view, catalog, records.instance_key("Web", "id-w1"), rec.encode())
    status = {"id-w1": reported("id-w1", "healthy", class_name="Web")}
    feed(view, catalog, records.node_key("n1"), records.encode_node(FRA, status))

    clock.now += FRESH_DEPLOY_S + 1
    assert catalog.prefetch_for("fra") == [A]
    assert catalog.prefetch_for("iad") == []
    clock.now += RECENT_RUN_S
    assert catalog.prefetch_for("fra") == []


def test_a_redeploy_of_the_same_image_is_not_fresh_but_a_new_image_is() -> None:
    view, catalog, clock = make_catalog()
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(A)))
    clock.now += FRESH_DEPLOY_S + 1
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(A)))
    assert catalog.prefetch_for("iad") == []
    feed(view, catalog, records.image_key(B), ImageRecord(B, "", 1, NOW, ("r2",)).encode())
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(B)))
    assert catalog.prefetch_for("iad") == [B]


def test_listing_joins_records_classes_and_node_reports() -> None:
    view, catalog, _ = make_catalog()
    feed(view, catalog, records.class_key("Web"), records.encode_class(web(B)))  # not pushed
    feed(view, catalog, records.node_images_key("n2"), records.encode_node_images(frozenset({A})))
    feed(view, catalog, records.node_images_key("n1"), records.encode_node_images(frozenset({A})))
    listed = {i.digest: i for i in catalog.listing()}
    assert listed[A].nodes == ("n1", "n2") and listed[A].replicas == ("r1",)
    assert listed[A].classes == () and listed[A].size_bytes == 100
    assert listed[B].classes == ("Web",) and listed[B].replicas == ()
    assert listed[B].reference == "portside/web:" + B[7:19]
    # The node's key goes with its lease: the report goes with it.
    e = event(records.node_images_key("n2"), b"", "delete")
    catalog.apply(e)
    assert {i.digest: i for i in catalog.listing()}[A].nodes == ("n1",)


def test_an_unreadable_record_is_skipped_not_raised() -> None:
    view, catalog, _ = make_catalog()
    feed(view, catalog, records.image_key(B), b"not json")
    assert B not in catalog.images and A in catalog.images


def test_a_pull_of_an_image_held_elsewhere_names_the_holder() -> None:
    view, catalog, _ = make_catalog()
    feed(view, catalog, records.image_key(B), ImageRecord(B, "", 1, NOW, ("r2", "r3")).encode())
    elsewhere = not_held(B, catalog)
    assert isinstance(elsewhere, Unavailable)
    assert "not in replica r1's image store; replica r2, r3 holds it" in str(elsewhere)
    # The record names this replica, but its folder lost the image: nobody can serve it.
    nowhere = not_held(A, catalog)
    assert isinstance(nowhere, NotFound) and "in no replica's image store" in str(nowhere)


def test_replicas_join_and_leave_an_image_record() -> None:
    image = StoredImage(A, "portside/web:a", (B,), (90,), 10, NOW)
    first = _with_replica(None, image, "r2", holding=True)
    assert first == ImageRecord(A, "portside/web:a", 100, NOW, ("r2",))
    both = _with_replica(first, image, "r1", holding=True)
    assert both is not None and both.replicas == ("r1", "r2") and both.pushed_at == NOW
    assert _with_replica(both, image, "r1", holding=True) == both
    left = _with_replica(both, None, "r2", holding=False)
    assert left is not None and left.replicas == ("r1",)
    assert _with_replica(None, None, "r1", holding=False) is None
