"""Metered use per class and UTC day, kept under usage/<class>/<day>: node heartbeats add their
agents' reports (each batch once, see `UsageLedger.add`), GetUsage and `portside usage` read them.

Kept without a lease: it is what users are billed for. The view does not load these keys.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from controlplane import records
from controlplane.store import Store
from portside.errors import InvalidArgument, StoreError
from portside.usage import Usage

log = logging.getLogger(__name__)

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
MAX_ATTEMPTS = 50  # compare-and-swap rounds before a write gives up (replicas add at once)


def usage_prefix(class_name: str = "") -> str:
    return f"{records.USAGE}{class_name}/" if class_name else records.USAGE


def usage_key(class_name: str, day: str) -> str:
    return f"{records.USAGE}{class_name}/{day}"


def parse_day(day: str, what: str = "since") -> str:
    """`day` if it is a valid YYYY-MM-DD date; InvalidArgument otherwise."""
    try:
        if not _DAY.fullmatch(day):
            raise ValueError
        datetime.date.fromisoformat(day)
    except ValueError:
        raise InvalidArgument(f"{what}: {day!r} is not a date (YYYY-MM-DD)") from None
    return day


@dataclass(frozen=True)
class ClassDay:
    """The record under usage/<class>/<day>: totals, and per report source (an agent process)
    the last batch sequence added, so that a batch sent again is not added twice."""

    class_name: str
    day: str
    use: Usage
    applied: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, class_name: str, day: str) -> ClassDay:
        return cls(class_name, day, Usage(class_name, day))

    def encode(self) -> bytes:
        u = self.use
        return json.dumps(
            {
                "running_ms": u.running_ms,
                "vcpu_seconds": u.vcpu_seconds,
                "memory_gib_seconds": u.memory_gib_seconds,
                "disk_gb_seconds": u.disk_gb_seconds,
                "cpu_seconds_used": u.cpu_seconds_used,
                "egress_bytes": u.egress_bytes,
                "applied": dict(self.applied),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, class_name: str, day: str, data: bytes) -> ClassDay:
        body = json.loads(data)
        use = Usage(
            class_name=class_name,
            day=day,
            running_ms=int(body.get("running_ms", 0)),
            vcpu_seconds=float(body.get("vcpu_seconds", 0.0)),
            memory_gib_seconds=float(body.get("memory_gib_seconds", 0.0)),
            disk_gb_seconds=float(body.get("disk_gb_seconds", 0.0)),
            cpu_seconds_used=float(body.get("cpu_seconds_used", 0.0)),
            egress_bytes=int(body.get("egress_bytes", 0)),
        )
        return cls(class_name, day, use, dict(body.get("applied", {})))


def add_batch(current: ClassDay, use: Usage, source: str, sequence: int) -> ClassDay | None:
    """`current` with `use` added, or None when this key already has that batch (a resend of
    a batch whose reply was lost). An empty source (an agent without batch numbers): added."""
    if source and sequence > 0:
        if current.applied.get(source, 0) >= sequence:
            return None
        applied = {**current.applied, source: sequence}
        return replace(current, use=current.use + use, applied=applied)
    return replace(current, use=current.use + use)


class UsageLedger:
    """Adds batches into the store with compare-and-swap, reads them back."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, source: str, sequence: int, reports: Iterable[Usage]) -> int:
        """Add one heartbeat message's batch: summed per class and day, then each key once
        (read, add, write if unchanged since read; again on a conflict). Returns how many keys
        it changed. A report with a malformed class or day is left out, with a log line."""
        sums: dict[tuple[str, str], Usage] = {}
        for r in reports:
            if not r.class_name or "/" in r.class_name or not _DAY.fullmatch(r.day):
                log.warning(
                    "usage report of %r for %r on %r is malformed; left out",
                    r.instance_id,
                    r.class_name,
                    r.day,
                )
                continue
            key = (r.class_name, r.day)
            sums[key] = sums.get(key, Usage(r.class_name, r.day)) + r
        changed = 0
        for (class_name, day), use in sorted(sums.items()):
            if await self._add_one(class_name, day, use, source, sequence):
                changed += 1
        return changed

    async def _add_one(
        self, class_name: str, day: str, use: Usage, source: str, sequence: int
    ) -> bool:
        key = usage_key(class_name, day)
        for _ in range(MAX_ATTEMPTS):
            kv = await self.store.get(key)
            current = (
                ClassDay.decode(class_name, day, kv.value)
                if kv is not None
                else ClassDay.empty(class_name, day)
            )
            updated = add_batch(current, use, source, sequence)
            if updated is None:
                return False
            if await self.store.compare_and_swap(
                key, kv.mod_revision if kv else 0, updated.encode()
            ):
                return True
        raise StoreError(
            f"usage of {class_name} on {day}: {MAX_ATTEMPTS} conflicting writes "
            "in a row; the agent sends it again"
        )

    async def read(self, class_name: str = "", since: str = "") -> list[ClassDay]:
        """Every class's (or one class's) days from `since` (inclusive), by class then day."""
        if since:
            parse_day(since)
        kvs, _ = await self.store.range(usage_prefix(class_name))
        out = []
        for kv in kvs:
            cls, _, day = kv.key[len(records.USAGE) :].partition("/")
            if since and day < since:
                continue
            out.append(ClassDay.decode(cls, day, kv.value))
        return out


__all__ = [
    "ClassDay",
    "UsageLedger",
    "add_batch",
    "parse_day",
    "usage_key",
    "usage_prefix",
]
