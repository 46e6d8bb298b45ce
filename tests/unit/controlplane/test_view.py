"""Capacity accounting in the cluster view: awake instances and fresh placements use a node,
paused ones its memory, sleeping ones nothing. Pure logic: events are applied by hand, no store."""

from __future__ import annotations

from typing import Any, cast

from controlplane import records
from controlplane.records import InstanceRecord
from controlplane.store import KeyValue, WatchEvent
from controlplane.view import PENDING_S, ClusterView
from portside.spec import Node
from tests.support import reported

NODE = Node(
    id="n1",
    data_address="127.0.0.1:1",
    api_address="127.0.0.1:2",
    region="fra",
    latitude=50.0,
    longitude=8.6,
    vcpu=2.0,
    memory_mib=4096,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(view: ClusterView, key: str, value: bytes) -> None:
    view._apply(WatchEvent("put", KeyValue(key, value, 1, 1)))


def place(
    view: ClusterView, name: str, cls: str = "C", vcpu: float = 0.5, at: float | None = None
) -> InstanceRecord:
    rec = InstanceRecord(
        class_name=cls,
        name=name,
        instance_id="id-" + name,
        node_id="n1",
        vcpu=vcpu,
        memory_mib=512,
        placed_at=view.clock() if at is None else at,
    )
    put(view, records.instance_key(cls, rec.instance_id), rec.encode())
    return rec


def report(view: ClusterView, *awake: str) -> None:
    stats = {iid: reported(iid, "healthy") for iid in awake}
    put(view, records.node_key("n1"), records.encode_node(NODE, stats))


def make_view() -> tuple[ClusterView, Clock]:
    clock = Clock()
    view = ClusterView(store=cast(Any, None), clock=clock)
    report(view)
    return view, clock


def test_a_fresh_placement_counts_until_reported() -> None:
    view, _ = make_view()
    place(view, "a")
    assert view.use_of("n1").used.vcpu == 0.5
    assert view.instances_of("C") == 1


def test_awake_counts_and_asleep_does_not() -> None:
    view, _ = make_view()
    place(view, "a")
    place(view, "b")
    report(view, "id-a", "id-b")
    assert view.use_of("n1").used.vcpu == 1.0 and view.use_of("n1").instances == 2
    report(view, "id-b")  # a slept
    assert view.use_of("n1").used.vcpu == 0.5
    assert view.instances_of("C") == 1
    report(view)  # both slept
    assert view.use_of("n1").used.vcpu == 0.0 and view.instances_of("C") == 0


def test_a_paused_instance_holds_its_memory_not_its_cpu() -> None:
    view, _ = make_view()
    place(view, "a")
    place(view, "b")
    stats = {"id-a": reported("id-a", "paused"), "id-b": reported("id-b", "healthy")}
    put(view, records.node_key("n1"), records.encode_node(NODE, stats))
    use = view.use_of("n1")
    assert (use.used.vcpu, use.used.memory_mib, use.instances) == (0.5, 1024, 1)
    assert view.instances_of("C") == 1  # max_instances counts awake ones only
    report(view)  # a's pause_max passed: asleep, it holds nothing
    assert view.use_of("n1").used.memory_mib == 0


def test_a_placement_never_reported_stops_counting_after_the_pending_window() -> None:
    view, clock = make_view()
    place(view, "a")
    clock.now += PENDING_S + 1
    assert view.use_of("n1").used.vcpu == 0.0


def test_an_old_placement_loaded_at_start_is_not_pending() -> None:
    view, clock = make_view()
    place(view, "a", at=clock.now - 3600)
    assert view.use_of("n1").used.vcpu == 0.0


def test_counts_are_per_class() -> None:
    view, _ = make_view()
    place(view, "a", cls="C")
    place(view, "b", cls="D")
    report(view, "id-a", "id-b")
    assert view.instances_of("C") == 1 and view.instances_of("D") == 1
    assert view.placed_by_class() == {"C": 1, "D": 1}


def test_a_dead_node_uses_nothing() -> None:
    view, _ = make_view()
    place(view, "a")
    report(view, "id-a")
    view._apply(WatchEvent("delete", KeyValue(records.node_key("n1"), b"", 1, 2)))
    assert "n1" not in view.nodes
    assert view.instances_of("C") == 0
