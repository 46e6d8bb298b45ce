"""The cluster page's JSON: nodes alive and lost with their instances' states, pool CPU as the
autoscaler reads it, the newest events first. Pure logic: the view is filled by hand, no store."""

from __future__ import annotations

from typing import Any, cast

from controlplane import records
from controlplane.records import Demand, InstanceRecord
from controlplane.store import KeyValue, Store, WatchEvent
from controlplane.ui import LOST_NODE_KEPT_S, ClusterPage, RecentEvents, cluster_snapshot
from controlplane.view import ClusterView
from portside.events import Event, EventKind
from portside.spec import INSTANCE_TYPES, Autoscaling, ContainerClass, Node
from tests.support import reported


def node(node_id: str, region: str = "fra", lat: float = 50.1, lon: float = 8.7) -> Node:
    return Node(node_id, "127.0.0.1:1", "127.0.0.1:2", region, lat, lon, 4.0, 8192)


def rec(
    name: str, node_id: str, cls: str = "Echo", pool: bool = False, draining: bool = False
) -> InstanceRecord:
    return InstanceRecord(cls, name, "id-" + name, node_id, 0.25, 1024, 100.0, pool, draining)


POOL = ContainerClass(
    "Gif",
    "gif:1",
    instance_type=INSTANCE_TYPES["basic"],
    autoscaling=Autoscaling(minimum_instances=1, maximum_instances=5, cpu_target=60),
)
ECHO = ContainerClass("Echo", "echo:1")


def event(kind: str, at: float, name: str = "a") -> Event:
    return Event(EventKind(kind), at, "Echo", name, "id-" + name, "n1")


def snapshot(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        nodes={}, lost={}, instances=[], statuses={}, classes={}, demand={}, events=[], now=1.0
    )
    args.update(kw)
    return cluster_snapshot(**args)


def test_nodes_list_their_instances_with_the_states_their_heartbeat_reported() -> None:
    out = snapshot(
        nodes={"n1": node("n1")},
        instances=[rec("b", "n1"), rec("a", "n1"), rec("c", "n1")],
        statuses={
            "n1": {
                "id-a": reported("id-a", "starting"),
                "id-b": reported("id-b", "sleeping"),
                "id-x": reported("id-x", "healthy"),
            }
        },
        classes={"Echo": ECHO},
    )
    [n1] = out["nodes"]
    assert (n1["id"], n1["alive"], n1["region"], n1["city"]) == ("n1", True, "fra", "Frankfurt")
    states = [(i["name"], i["state"], i["awake"], i["reported"]) for i in n1["instances"]]
    # As the heartbeat said (the same words as ListInstances); not reported yet: placed.
    assert states == [
        ("a", "starting", True, True),
        ("b", "sleeping", False, True),
        ("c", "placed", False, False),
    ]
    assert (n1["used_vcpu"], n1["used_memory_mib"]) == (0.25, 1024)
    assert n1["unplaced_awake"] == 1  # id-x runs there without a record
    assert out["summary"]["awake"] == 1


def test_lost_nodes_follow_the_live_ones_and_keep_their_instances() -> None:
    out = snapshot(
        nodes={"n2": node("n2", "sin")},
        lost={"n1": node("n1")},
        instances=[rec("a", "n1"), rec("b", "gone")],
        statuses={"n1": {"id-a": reported("id-a", "healthy")}},  # stale: its node is lost
    )
    assert [(n["id"], n["alive"]) for n in out["nodes"]] == [
        ("n2", True),
        ("gone", False),
        ("n1", False),
    ]
    gone = out["nodes"][1]
    assert gone["latitude"] is None and gone["instances"][0]["name"] == "b"
    assert out["nodes"][2]["instances"][0]["state"] == "stopped"
    assert (out["summary"]["nodes_alive"], out["summary"]["nodes_lost"]) == (1, 2)


def test_pool_cpu_is_the_mean_of_ready_members_not_draining() -> None:
    out = snapshot(
        nodes={"n1": node("n1")},
        instances=[
            rec("g1", "n1", "Gif", pool=True),
            rec("g2", "n1", "Gif", pool=True),
            rec("g3", "n1", "Gif", pool=True, draining=True),
            rec("g4", "n1", "Gif", pool=True),
            rec("g5", "lost", "Gif", pool=True),
        ],
        statuses={
            "n1": {
                "id-g1": reported("id-g1", "healthy", cpu_percent=80.0, pool=True),
                "id-g2": reported("id-g2", "healthy", cpu_percent=40.0, pool=True),
                "id-g3": reported("id-g3", "healthy", cpu_percent=0.0, pool=True),
                "id-g4": reported("id-g4", "starting", cpu_percent=5.0, pool=True),
            }
        },
        classes={"Gif": POOL, "Echo": ECHO},
    )
    [pool] = out["pools"]
    assert (pool["class_name"], pool["cpu_target"], pool["cpu_percent"]) == ("Gif", 60, 60.0)
    assert (pool["minimum_instances"], pool["maximum_instances"]) == (1, 5)
    assert [(m["name"], m["ready"], m["cpu_percent"]) for m in pool["members"]] == [
        ("g1", True, 80.0),
        ("g2", True, 40.0),
        ("g3", True, 0.0),
        ("g4", False, None),
    ]


def test_a_pool_without_samples_has_no_cpu() -> None:
    out = snapshot(classes={"Gif": POOL})
    assert out["pools"][0]["cpu_percent"] is None and out["pools"][0]["members"] == []


def test_edges_are_placed_at_their_region() -> None:
    out = snapshot(demand={"e1": Demand("sin", {"A": 1.5, "B": 2.0}, 0.0)})
    [edge] = out["edges"]
    assert edge["region"] == "sin" and edge["requests_per_second"] == 3.5
    assert edge["latitude"] is not None


def test_recent_events_keep_the_newest_in_time_order() -> None:
    recent = RecentEvents(cast(Store, None), size=3)
    for at in (5.0, 1.0, 4.0, 2.0, 6.0, 3.0):
        recent.add(event("ready", at))
    assert [e.time for e in recent.latest()] == [6.0, 5.0, 4.0]
    out = snapshot(events=recent.latest())
    assert [e["time"] for e in out["events"]] == [6.0, 5.0, 4.0]
    assert out["events"][0]["kind"] == "ready"


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_node_that_left_the_view_is_shown_lost_then_forgotten() -> None:
    view = ClusterView(cast(Store, None))
    key = records.node_key("n1")
    view._apply(WatchEvent("put", KeyValue(key, records.encode_node(node("n1")), 1, 1)))
    clock = Clock()
    page = ClusterPage(view, cast(Store, None), clock=clock)
    assert page.snapshot()["nodes"][0]["alive"] is True
    view._apply(WatchEvent("delete", KeyValue(key, b"", 1, 2)))
    clock.now += 10
    lost = page.snapshot()["nodes"]
    assert [(n["id"], n["alive"], n["region"]) for n in lost] == [("n1", False, "fra")]
    clock.now += LOST_NODE_KEPT_S
    assert page.snapshot()["nodes"] == []


def test_the_page_and_its_files_are_packaged() -> None:
    page = ClusterPage(ClusterView(cast(Store, None)), cast(Store, None))
    assert b"/ui/cluster.js" in page._page_html
    assert b"WORLD_LAND" in page._files["world.js"]
    assert {r.path for r in page.routes()} == {"/", "/ui", "/ui/{name}", "/api/cluster", "/login"}
