"""Class versions (issue 12): every deploy that changes what a class's containers are made from
makes the class's next version, kept in the store so that rollouts and rollbacks can name one.

Keys: /portside/versions/<class>/<number, 12 digits> → the version's JSON record (kept). A
version is what `version_of` reads from a class: its image (reference and digest), entrypoint,
env, instance type, port and internet access. Runtime policy — sleep_after, limits on instance
counts, autoscaling, boot timeout, health checks — changes in place, without a new version.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import json_format

from controlplane.records import ROOT
from controlplane.store import Store
from portside.api.v1 import types_pb2
from portside.convert import class_from_pb, class_to_pb
from portside.errors import StoreError
from portside.spec import ContainerClass

VERSIONS = ROOT + "versions/"
# Fields of ContainerClass that make a container what it is: a change to one is a new version.
VERSIONED_FIELDS = (
    "image",
    "image_digest",
    "entrypoint",
    "env",
    "instance_type",
    "default_port",
    "enable_internet",
)
_CREATE_TRIES = 20


def versions_prefix(class_name: str) -> str:
    return f"{VERSIONS}{class_name}/"


def version_key(class_name: str, number: int) -> str:
    return f"{versions_prefix(class_name)}{number:012d}"


@dataclass(frozen=True)
class Version:
    """One version of a class: the spec it was deployed with, when, and what changed."""

    number: int
    spec: ContainerClass
    created_at: float
    changes: tuple[str, ...]  # fields that differ from the version before ("new": the first)

    def encode(self) -> bytes:
        spec = json.loads(json_format.MessageToJson(class_to_pb(self.spec), indent=None))
        record = {
            "number": self.number,
            "spec": spec,
            "created_at": self.created_at,
            "changes": list(self.changes),
        }
        return json.dumps(record, separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes) -> Version:
        record = json.loads(data)
        spec = class_from_pb(json_format.ParseDict(record["spec"], types_pb2.ContainerClass()))
        return Version(
            number=int(record["number"]),
            spec=spec,
            created_at=float(record["created_at"]),
            changes=tuple(record["changes"]),
        )


def changed_fields(old: ContainerClass, new: ContainerClass) -> tuple[str, ...]:
    """The versioned fields in which `new` differs from `old` (env compared as a mapping)."""
    changed = []
    for name in VERSIONED_FIELDS:
        a, b = getattr(old, name), getattr(new, name)
        if name == "env":
            a, b = dict(a), dict(b)
        if a != b:
            changed.append(name)
    return tuple(changed)


def next_version(
    latest: Version | None, cls: ContainerClass, now: float
) -> tuple[ContainerClass, Version | None]:
    """`cls` with its version number set, and the new Version to record (None: `cls` is the
    latest version still, with new runtime policy at most)."""
    if latest is not None:
        changes = changed_fields(latest.spec, cls)
        if not changes:
            return dataclasses.replace(cls, version=latest.number), None
        number = latest.number + 1
    else:
        changes, number = ("new",), 1
    versioned = dataclasses.replace(cls, version=number)
    return versioned, Version(number, versioned, now, changes)


async def history(store: Store, class_name: str) -> list[Version]:
    """Every kept version of the class, oldest first."""
    kvs, _ = await store.range(versions_prefix(class_name))
    return [Version.decode(kv.value) for kv in kvs]


async def version_class(
    store: Store, cls: ContainerClass, now: float | None = None
) -> tuple[ContainerClass, Version | None]:
    """Record the class's next version if `cls` changes what its containers are made from;
    return `cls` with its version number, and the version made (None if none was). Replicas
    deploying at once agree: a version number is created only if absent, else read again."""
    for _ in range(_CREATE_TRIES):
        kvs, _ = await store.range(versions_prefix(cls.name))
        latest = Version.decode(kvs[-1].value) if kvs else None
        versioned, made = next_version(latest, cls, time.time() if now is None else now)
        if made is None:
            return versioned, None
        if await store.compare_and_swap(version_key(cls.name, made.number), 0, made.encode()):
            return versioned, made
    raise StoreError(f"class {cls.name}: could not record its next version (contended)")


def newest_first(versions: Sequence[Version]) -> list[Version]:
    return sorted(versions, key=lambda v: v.number, reverse=True)
