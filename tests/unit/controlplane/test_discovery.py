"""Prometheus service discovery: the http_sd document built from the cluster view, and the
addresses advertised for daemons that listen on every interface. Pure logic, no store."""

from __future__ import annotations

from typing import Any, cast

from controlplane import records
from controlplane.discovery import peer_host, reachable_address, targets
from controlplane.records import Demand, Replica
from controlplane.store import KeyValue, WatchEvent
from controlplane.view import ClusterView
from portside.spec import Node


def put(view: ClusterView, key: str, value: bytes) -> None:
    view._apply(WatchEvent("put", KeyValue(key, value, 1, 1)))


def delete(view: ClusterView, key: str) -> None:
    view._apply(WatchEvent("delete", KeyValue(key, b"", 1, 2)))


def make_view() -> ClusterView:
    view = ClusterView(store=cast(Any, None))
    node = Node(
        "n1", "127.0.1.2:7080", "127.0.1.2:7081", "fra", 50.0, 8.6, 2.0, 4096, {}, "127.0.1.2:7082"
    )
    put(view, records.node_key("n1"), records.encode_node(node, {}))
    old = Node("old-agent", "127.0.1.4:7080", "127.0.1.4:7081", "fra", 50.0, 8.6, 2.0, 4096)
    put(view, records.node_key("old-agent"), records.encode_node(old, {}))
    put(view, records.demand_key("e1"), Demand("sin", {}, 1.0, "127.0.1.3:8788").encode())
    put(view, records.demand_key("old-edge"), Demand("fra", {}, 1.0).encode())
    put(view, records.replica_key("cp1"), Replica("fra", "127.0.1.1:7071").encode())
    return view


def test_every_live_daemon_is_a_target_with_its_labels() -> None:
    assert targets(make_view()) == [
        {
            "targets": ["127.0.1.2:7082"],
            "labels": {"portside_role": "agent", "portside_region": "fra", "portside_node": "n1"},
        },
        {
            "targets": ["127.0.1.1:7071"],
            "labels": {
                "portside_role": "controlplane",
                "portside_region": "fra",
                "portside_node": "cp1",
            },
        },
        {
            "targets": ["127.0.1.3:8788"],
            "labels": {"portside_role": "edge", "portside_region": "sin", "portside_node": "e1"},
        },
    ]  # the edge and the agent that reported no metrics address (older ones) are left out


def test_lost_nodes_edges_and_replicas_leave_the_targets() -> None:
    view = make_view()
    delete(view, records.node_key("n1"))
    delete(view, records.node_key("old-agent"))
    delete(view, records.demand_key("e1"))
    delete(view, records.replica_key("cp1"))
    assert targets(view) == []


def test_demand_without_a_metrics_address_still_decodes() -> None:
    old = b'{"region":"fra","rps":{"C":1.0},"at":5.0}'
    assert Demand.decode(old).metrics_address == ""


def test_an_unspecified_host_is_replaced_by_where_the_daemon_was_seen() -> None:
    assert reachable_address("0.0.0.0:8788", "127.0.1.3") == "127.0.1.3:8788"
    assert reachable_address("[::]:8788", "fd00::3") == "[fd00::3]:8788"
    assert reachable_address("127.0.1.9:8788", "127.0.1.3") == "127.0.1.9:8788"
    assert reachable_address("0.0.0.0:8788", "") == ""
    assert reachable_address("", "127.0.1.3") == ""
    assert reachable_address("nonsense", "127.0.1.3") == ""


def test_peer_host_of_grpc_peers() -> None:
    assert peer_host("ipv4:127.0.1.2:5000") == "127.0.1.2"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/tmp/sock") == ""
