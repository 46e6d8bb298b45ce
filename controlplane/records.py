"""What the control plane keeps in the store: key layout and the JSON records under each key.

Keys live under /portside/: classes/<class>, routes/<n>, nodes/<node>, instances/<class>/<id>.
"""

from __future__ import annotations

import json
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


def class_key(name: str) -> str:
    return CLASSES + name


def route_key(index: int) -> str:
    return f"{ROUTES}{index:06d}"


def node_key(node_id: str) -> str:
    return NODES + node_id


def instance_key(class_name: str, instance_id: str) -> str:
    return f"{INSTANCES}{class_name}/{instance_id}"


@dataclass(frozen=True)
class InstanceRecord:
    """A placed named instance: which node it lives on and what it reserves there."""

    class_name: str
    name: str
    instance_id: str
    node_id: str
    vcpu: float
    memory_mib: int
    placed_at: float

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


def encode_node(n: Node, awake: frozenset[str] = frozenset()) -> bytes:
    """A node as it registered, and the ids of its instances that are awake (booting, running
    or stopping) as its last heartbeat said: the control plane accounts capacity by them."""
    body: dict[str, Any] = asdict(n)
    body["labels"] = dict(n.labels)
    return json.dumps({"node": body, "awake": sorted(awake)}, separators=(",", ":")).encode()


def decode_node(data: bytes) -> tuple[Node, frozenset[str]]:
    body = json.loads(data)
    return Node(**body["node"]), frozenset(body.get("awake", ()))
