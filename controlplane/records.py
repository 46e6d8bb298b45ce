"""What the control plane keeps in the store: key layout and the JSON records under each key.

Keys live under /portside/: classes/<class>, routes/<n>, nodes/<node>, instances/<class>/<id>,
demand/<edge>, replicas/<replica>, leader, events/<class>/<id>/<ns>-<seq>, state/<class>/<id>/<key>,
usage/<class>/<day>, pki/ca, tokens/<id>, images/<hex digest>, nodeimages/<node>,
snapshots/<class>/<id>, schedules/<class>/<instance id>/<id>.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from google.protobuf import json_format

from portside.api.v1 import types_pb2
from portside.convert import (
    class_from_pb,
    class_to_pb,
    gateway_from_pb,
    gateway_to_pb,
    route_from_pb,
    route_to_pb,
)
from portside.events import Event, EventKind
from portside.instances import InstanceInfo, InstanceStatus
from portside.pki import CertificateAuthority
from portside.spec import ContainerClass, Gateway, Node, Route
from portside.states import InstanceState
from portside.tokens import Role, TokenRecord

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
# The cluster CA, certificate and private key (JSON), written once by `portside bootstrap`. Only
# control-plane replicas read it; nothing else ever gets the key.
CA = ROOT + "pki/ca"
TOKENS = ROOT + "tokens/"  # tokens/<id>: api and join tokens (their secrets' digests, never them)
# images/<hex>: an image in the cluster's image store and the replicas holding it (kept);
# nodeimages/<node>: the Portside images the node's engine has, under the node's lease.
IMAGES = ROOT + "images/"
NODE_IMAGES = ROOT + "nodeimages/"
# snapshots/<class>/<id>: a snapshot of a named instance (controlplane.snapshots); its image is
# in the image store like any other.
SNAPSHOTS = ROOT + "snapshots/"
# schedules/<class>/<instance id>/<schedule id>: a per-instance schedule and the claim of the tick
# being run (controlplane.schedules).
SCHEDULES = ROOT + "schedules/"
# Issue 14. gateway: the gateway module of the last deploy (absent: none). secrets/<name>: a
# gateway secret, encrypted (controlplane.secrets). ratelimits/<binding>/<period>/<edge>: an
# edge's count of a limiter's calls in one period. outbound/<class>/<name>: an instance's own
# outbound policy (SetOutbound).
GATEWAY = ROOT + "gateway"
SECRETS = ROOT + "secrets/"
RATE_LIMITS = ROOT + "ratelimits/"
OUTBOUND = ROOT + "outbound/"


def token_key(token_id: str) -> str:
    return TOKENS + token_id


def image_key(digest: str) -> str:
    return IMAGES + digest.removeprefix("sha256:")


def node_images_key(node_id: str) -> str:
    return NODE_IMAGES + node_id


def snapshots_prefix(class_name: str = "") -> str:
    """Every snapshot, or one class's (with its trailing slash)."""
    return f"{SNAPSHOTS}{class_name}/" if class_name else SNAPSHOTS


def snapshot_key(class_name: str, snapshot_id: str) -> str:
    return snapshots_prefix(class_name) + snapshot_id


def schedules_prefix(class_name: str = "", instance_id: str = "") -> str:
    """Every schedule, one class's or one instance's (with its trailing slash)."""
    if not class_name:
        return SCHEDULES
    if not instance_id:
        return f"{SCHEDULES}{class_name}/"
    return f"{SCHEDULES}{class_name}/{instance_id}/"


def schedule_key(class_name: str, instance_id: str, schedule_id: str) -> str:
    return schedules_prefix(class_name, instance_id) + schedule_id


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


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """A placed instance: which node it lives on and what its type takes there while awake.
    Pool instances are placed by the autoscaler; `draining` ones get no new requests and are
    removed once idle. `restore`: placed anew because its node was lost, so its first container
    starts from its latest snapshot (controlplane.snapshots).

    A replica holds one a placement (a million of them: bench/scale.py), hence slots, and the
    class and node names shared between records rather than a copy each."""

    class_name: str
    name: str
    instance_id: str
    node_id: str
    vcpu: float
    memory_mib: int
    placed_at: float
    pool: bool = False
    draining: bool = False
    restore: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> InstanceRecord:
        body = json.loads(data)
        body["class_name"] = sys.intern(body["class_name"])
        body["node_id"] = sys.intern(body["node_id"])
        return cls(**body)


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


def encode_gateway(g: Gateway) -> bytes:
    text: str = json_format.MessageToJson(gateway_to_pb(g), indent=None)
    return text.encode()


def decode_gateway(data: bytes) -> Gateway:
    return gateway_from_pb(json_format.Parse(data, types_pb2.Gateway()))


def encode_node(n: Node, statuses: Mapping[str, InstanceStatus] | None = None) -> bytes:
    """A node as it registered, and its instances as its last heartbeat reported them: the
    control plane accounts capacity by the awake ones and scales pools by their CPU."""
    body: dict[str, Any] = asdict(n)
    body["labels"] = dict(n.labels)
    instances = {iid: _encode_status(st) for iid, st in sorted((statuses or {}).items())}
    return json.dumps({"node": body, "instances": instances}, separators=(",", ":")).encode()


def decode_node(data: bytes) -> tuple[Node, dict[str, InstanceStatus]]:
    body = json.loads(data)
    node = Node(**body["node"])
    statuses = {
        iid: _decode_status(iid, node.id, st) for iid, st in body.get("instances", {}).items()
    }
    return node, statuses


def _encode_status(s: InstanceStatus) -> dict[str, Any]:
    i = s.info
    out: dict[str, Any] = {"class": i.class_name, "name": i.name, "state": i.state.value}
    if i.exit_code is not None:
        out["exit_code"] = i.exit_code
    out.update(since=i.since, pool=i.pool, in_flight=i.in_flight, memory_bytes=s.memory_bytes)
    if s.cpu_percent is not None:
        out["cpu_percent"] = s.cpu_percent
    if i.restarts:  # a crash loop: kept so that listings show it (`portside ps`)
        out.update(restarts=i.restarts, backoff_until=i.backoff_until)
    if i.version:
        out["version"] = i.version
    return out


def _decode_status(instance_id: str, node_id: str, body: Mapping[str, Any]) -> InstanceStatus:
    info = InstanceInfo(
        class_name=body["class"],
        name=body["name"],
        instance_id=instance_id,
        state=InstanceState(body["state"]),
        exit_code=body.get("exit_code"),
        node_id=node_id,
        since=body.get("since", 0.0),
        pool=body.get("pool", False),
        in_flight=body.get("in_flight", 0),
        restarts=body.get("restarts", 0),
        backoff_until=body.get("backoff_until", 0.0),
        version=body.get("version", 0),
    )
    return InstanceStatus(info, body.get("cpu_percent"), body.get("memory_bytes", 0))


# Events are stored as JSON, without their revision (the store's own mod revision is it).
def encode_event(e: Event) -> bytes:
    body = {k: v for k, v in asdict(e).items() if k != "revision"}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_event(data: bytes, revision: int) -> Event:
    body = json.loads(data)
    body["kind"] = EventKind(body["kind"])
    return Event(**body, revision=revision)


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
    """A control-plane replica, registered while it runs, so Prometheus can discover it and the
    other replicas can copy images from it (`address`: its gRPC --listen; "" from an older one)."""

    region: str
    metrics_address: str
    address: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Replica:
        body = json.loads(data)
        return cls(
            region=body["region"],
            metrics_address=body["metrics_address"],
            address=body.get("address", ""),
        )


def encode_ca(ca: CertificateAuthority) -> bytes:
    body = {"cert": ca.cert_pem.decode(), "key": ca.key_pem.decode()}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_ca(data: bytes) -> CertificateAuthority:
    body = json.loads(data)
    return CertificateAuthority(cert_pem=body["cert"].encode(), key_pem=body["key"].encode())


def encode_token(t: TokenRecord) -> bytes:
    body: dict[str, Any] = {
        "kind": t.kind,
        "name": t.name,
        "digest": t.digest,
        "created": t.created,
        "expires": t.expires,
    }
    if t.role is not None:
        body["role"] = t.role.value
    if t.classes:
        body["classes"] = list(t.classes)
    return json.dumps(body, separators=(",", ":")).encode()


def decode_token(token_id: str, data: bytes) -> TokenRecord:
    body = json.loads(data)
    kind = body["kind"]
    if kind not in ("join", "api"):
        raise ValueError(f"token kind {kind!r}")
    role = body.get("role")
    return TokenRecord(
        id=token_id,
        kind=kind,
        name=body["name"],
        digest=body["digest"],
        created=body["created"],
        role=Role(role) if role else None,
        classes=tuple(body.get("classes", ())),
        expires=body.get("expires", 0.0),
    )


@dataclass(frozen=True)
class Deployment:
    """A class deployed with an image: the revision of the class's record that did it (every
    replica sees the same one on its watch, so they agree) and when it was seen."""

    class_name: str
    revision: int
    at: float


@dataclass(frozen=True)
class ImageRecord:
    """An image in the cluster's image store: which control-plane replicas hold it whole (one
    key per image, updated with compare-and-swap by each replica that takes it in), and the
    classes it was deployed for, each one's latest deployment of it (what garbage collection
    keeps the last versions of: controlplane.imagegc)."""

    digest: str
    reference: str
    size_bytes: int
    pushed_at: float
    replicas: tuple[str, ...] = ()
    deployed: tuple[Deployment, ...] = ()  # one per class, sorted by class

    def deployment(self, class_name: str) -> Deployment | None:
        return next((d for d in self.deployed if d.class_name == class_name), None)

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "digest": self.digest,
            "reference": self.reference,
            "size_bytes": self.size_bytes,
            "pushed_at": self.pushed_at,
            "replicas": sorted(self.replicas),
        }
        if self.deployed:
            body["deployed"] = [
                {"class": d.class_name, "revision": d.revision, "at": d.at} for d in self.deployed
            ]
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> ImageRecord:
        body = json.loads(data)
        return cls(
            digest=body["digest"],
            reference=body["reference"],
            size_bytes=body["size_bytes"],
            pushed_at=body["pushed_at"],
            replicas=tuple(body.get("replicas", ())),
            deployed=tuple(
                Deployment(str(d["class"]), int(d["revision"]), float(d["at"]))
                for d in body.get("deployed", ())
            ),
        )


def encode_node_images(digests: frozenset[str]) -> bytes:
    return json.dumps(sorted(digests), separators=(",", ":")).encode()


def decode_node_images(data: bytes) -> frozenset[str]:
    body = json.loads(data)
    if not isinstance(body, list):
        raise ValueError("node images: expected a list of digests")
    return frozenset(str(d) for d in body)
