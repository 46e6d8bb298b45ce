"""What the control plane keeps in the store: key layout and the JSON records under each key.

Keys live under /portside/: classes/<class>, routes/<n>, nodes/<node>, instances/<class>/<id>,
demand/<edge>, replicas/<replica>, leader, events/<class>/<id>/<ns>-<seq>, state/<class>/<id>/<key>,
usage/<class>/<day>.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from google.protobuf import json_format

from portside.api.v1 import types_pb2
from portside.convert import class_from_pb, class_to_pb, route_from_pb, route_to_pb
from portside.spec import ContainerClass, Node, Route

ROOT = "/portside/"
CLASSES = ROOT + "classes/"
ROUTES = ROOT + "routes/"
NODES = ROOT + "nodes/"
INSTANCES = ROOT + "instances/"
DEMAND = ROOT + "demand/"
REPLICAS = ROOT + "replicas/"  # control-plane replicas, each under its own lease
LEADER = ROOT + "leader"
EVENTS = ROOT + "events/"  # lifecycle events, under a lease: they expire after about an hour
STATE = ROOT + "state/"  # users' per-instance values; opaque bytes, never decoded here
USAGE = ROOT + "usage/"  # metered use per class and UTC day (controlplane.usage), kept


def class_key(name: str) -> str:
    return CLASSES + name


def route_key(index: int) -> str:
    return f"{ROUTES}{index:06d}"


def node_key(node_id: str) -> str:
    return NODES + node_id


def instance_key(class_name: str, instance_id: str) -> str:
    return f"{INSTANCES}{class_name}/{instance_id}"


def demand_key(edge_id: str) -> str:
    return DEMAND + edge_id


def replica_key(replica_id: str) -> str:
    return REPLICAS + replica_id


def events_prefix(class_name: str = "", instance_id: str = "") -> str:
    """Every event, one class's (with its trailing slash, so `Echo` never matches `EchoX`), or
    one instance's."""
    if not class_name:
        return EVENTS
    if not instance_id:
        return f"{EVENTS}{class_name}/"
    return f"{EVENTS}{class_name}/{instance_id}/"


def event_key(class_name: str, instance_id: str, time_ns: int, seq: int) -> str:
    """Zero-padded, so an instance's events sort by time; `seq` tells apart two events of one
    nanosecond (and those of replicas whose clocks agree)."""
    return f"{events_prefix(class_name, instance_id)}{time_ns:020d}-{seq:06d}"


def state_prefix(class_name: str, instance_id: str) -> str:
    return f"{STATE}{class_name}/{instance_id}/"


def state_key(class_name: str, instance_id: str, key: str) -> str:
    return state_prefix(class_name, instance_id) + key


@dataclass(frozen=True)
class InstanceRecord:
    """A placed instance: which node it lives on and what its type takes there while awake.
    Pool instances are placed by the autoscaler; `draining` ones get no new requests and are
    removed once idle."""

    class_name: str
    name: str
    instance_id: str
    node_id: str
    vcpu: float
    memory_mib: int
    placed_at: float
    pool: bool = False
    draining: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> InstanceRecord:
        return cls(**json.loads(data))


# Classes and routes are stored as the protobuf JSON form: one schema for the wire and the store.
def encode_class(c: ContainerClass) -> bytes:
    text: str = json_format.MessageToJson(class_to_pb(c), indent=None)
    return text.encode()


def decode_class(data: bytes) -> ContainerClass:
    return class_from_pb(json_format.Parse(data, types_pb2.ContainerClass()))


def encode_route(r: Route) -> bytes:
    text: str = json_format.MessageToJson(route_to_pb(r), indent=None)
    return text.encode()


def decode_route(data: bytes) -> Route:
    return route_from_pb(json_format.Parse(data, types_pb2.Route()))


@dataclass(frozen=True)
class InstanceStat:
    """One instance as its node's last heartbeat reported it."""

    state: str  # stopped, booting, running, stopping
    cpu_percent: float | None = None  # of its instance type's vCPU; None: no sample yet
    memory_bytes: int = 0
    in_flight: int = 0
    pool: bool = False

    @property
    def awake(self) -> bool:
        return self.state != "stopped"


def encode_node(n: Node, stats: Mapping[str, InstanceStat] | None = None) -> bytes:
    """A node as it registered, and its instances as its last heartbeat reported them: the
    control plane accounts capacity by the awake ones and scales pools by their CPU."""
    body: dict[str, Any] = asdict(n)
    body["labels"] = dict(n.labels)
    instances = {iid: asdict(st) for iid, st in sorted((stats or {}).items())}
    return json.dumps({"node": body, "instances": instances}, separators=(",", ":")).encode()


def decode_node(data: bytes) -> tuple[Node, dict[str, InstanceStat]]:
    body = json.loads(data)
    stats = {iid: InstanceStat(**st) for iid, st in body.get("instances", {}).items()}
    return Node(**body["node"]), stats


@dataclass(frozen=True)
class Demand:
    """An edge's recent request rates by class, to place pool instances near them."""

    region: str
    requests_per_second: Mapping[str, float]
    at: float
    metrics_address: str = ""  # host:port of the edge's /metrics, for Prometheus discovery

    def encode(self) -> bytes:
        return json.dumps(
            {
                "region": self.region,
                "rps": dict(self.requests_per_second),
                "at": self.at,
                "metrics": self.metrics_address,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Demand:
        body = json.loads(data)
        return cls(
            region=body["region"],
            requests_per_second=body["rps"],
            at=body["at"],
            metrics_address=body.get("metrics", ""),
        )


@dataclass(frozen=True)
class Replica:
    """A control-plane replica, registered while it runs, so Prometheus can discover it."""

    region: str
    metrics_address: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Replica:
        body = json.loads(data)
        return cls(region=body["region"], metrics_address=body["metrics_address"])
