"""Rollouts' I/O (issue 12): starting, controlling and rolling back a class's rollout in the store,
the leader's loop that runs the planner (controlplane.rollouts) every second, and each replica's
book of the replacements its nodes' heartbeat replies carry.

The replace set goes through the store (in the rollout record) because a node's heartbeat stream
may be on any replica, not the leader's: every replica follows the records on its view's watch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from controlplane import records
from controlplane.events import EventLog
from controlplane.metrics import (
    ROLLOUT_CONTROLS,
    ROLLOUT_PAUSES,
    ROLLOUT_REPLACEMENTS,
    ROLLOUT_ROLLBACKS,
    ROLLOUT_SECONDS,
    ROLLOUT_STEPS,
    ROLLOUTS_ENDED,
    ROLLOUTS_MOVING,
    ROLLOUTS_STARTED,
)
from controlplane.rollouts import (
    ABORTED,
    GRADUAL,
    PAUSED,
    ROLLBACK,
    ROLLED_BACK,
    ROLLING,
    ROLLOUTS,
    Plan,
    RolloutInstance,
    RolloutPolicy,
    RolloutRecord,
    control,
    from_versions,
    plan_rollout,
    rollout_key,
    steps_for,
)
from controlplane.store import KeyValue, Store, WatchEvent
from controlplane.versions import VERSIONED_FIELDS, history
from controlplane.view import ClusterView
from portside.errors import FailedPrecondition, NotFound, StoreError
from portside.events import Event, EventKind
from portside.spec import ContainerClass
from portside.states import InstanceState

log = logging.getLogger(__name__)

TICK_S = 1.0
VIEW_WAIT_S = 5.0  # how long a tick waits for the view to catch up with the records it read
_CAS_TRIES = 20


class PoolReplacer(Protocol):
    """What the loop asks of the pool manager (controlplane.pools.PoolManager): replace the
    listed old-version members of a pool class by surge, one at a time."""

    async def replace_members(self, cls: ContainerClass, old_ids: tuple[str, ...]) -> None: ...


def class_instances(view: ClusterView, class_name: str) -> list[RolloutInstance]:
    """The class's placed instances as their nodes' last heartbeats reported them (the data
    ListInstances shows): not reported yet, placed with version 0; node gone, stopped."""
    out = []
    for rec in view.instances.values():
        if rec.class_name != class_name:
            continue
        status = view.status_of(rec) if rec.node_id in view.nodes else None
        if status is not None:
            state, version, in_flight = status.state, status.info.version, status.info.in_flight
        else:
            gone = rec.node_id not in view.nodes
            state = InstanceState.STOPPED if gone else InstanceState.PLACED
            version, in_flight = 0, 0
        out.append(
            RolloutInstance(
                instance_id=rec.instance_id,
                name=rec.name,
                node_id=rec.node_id,
                version=version,
                state=state,
                in_flight=in_flight,
                pool=rec.pool,
                draining=rec.draining,
            )
        )
    return sorted(out, key=lambda i: i.name)


async def read_rollout(store: Store, class_name: str) -> tuple[RolloutRecord, int] | None:
    """The class's latest rollout and its mod revision (for compare-and-swap); None: never."""
    kv = await store.get(rollout_key(class_name))
    if kv is None:
        return None
    return RolloutRecord.decode(kv.value), kv.mod_revision


def note_ended(record: RolloutRecord, outcome: str, now: float) -> None:
    ROLLOUTS_ENDED.labels(outcome).inc()
    ROLLOUT_SECONDS.labels(outcome).observe(max(0.0, now - record.started_at))
    log.info(
        "rollout of %s to version %d ended: %s%s",
        record.class_name,
        record.to_version,
        outcome,
        f" ({record.reason})" if record.reason else "",
    )


async def start_rollout(
    store: Store,
    view: ClusterView,
    cls: ContainerClass,
    mode: str,
    *,
    previous_wake_min_version: int,
    steps: tuple[int, ...] = (),
    reason: str = "",
    now: float | None = None,
) -> RolloutRecord:
    """Write a new rollout of `cls` to its version, superseding the class's rollout in progress
    (the new one starts from whatever versions the instances run). `steps`: the mode's own
    (steps_for) unless given."""
    now = time.time() if now is None else now
    record = RolloutRecord(
        class_name=cls.name,
        to_version=cls.version,
        from_versions=from_versions(class_instances(view, cls.name), cls.version),
        mode=mode,
        steps=steps or steps_for(cls, mode),
        state=ROLLING,
        reason=reason,
        started_at=now,
        step_started_at=now,
        previous_wake_min_version=previous_wake_min_version,
    )
    for _ in range(_CAS_TRIES):
        current = await read_rollout(store, cls.name)
        revision = current[1] if current is not None else 0
        if await store.compare_and_swap(rollout_key(cls.name), revision, record.encode()):
            if current is not None and current[0].in_progress:
                superseded = replace(current[0], reason=f"superseded by version {cls.version}")
                note_ended(superseded, "superseded", now)
            ROLLOUTS_STARTED.labels(mode).inc()
            log.info(
                "rollout of %s to version %d started (%s, steps %s, from versions %s)%s",
                cls.name,
                cls.version,
                mode,
                list(record.steps),
                list(record.from_versions) or "none awake",
                f": {reason}" if reason else "",
            )
            return record
    raise StoreError(f"class {cls.name}: could not write its rollout (contended)")


async def end_in_progress(store: Store, class_name: str, reason: str) -> RolloutRecord | None:
    """End the class's rollout in progress, if any, as aborted with `reason` (a deploy with
    rollout none made a newer version: nothing moves to the old target any more)."""
    for _ in range(_CAS_TRIES):
        current = await read_rollout(store, class_name)
        if current is None or not current[0].in_progress:
            return None
        ended = replace(current[0], state=ABORTED, reason=reason, replace=())
        if await store.compare_and_swap(rollout_key(class_name), current[1], ended.encode()):
            note_ended(ended, "superseded", time.time())
            return ended
    raise StoreError(f"class {class_name}: could not end its rollout (contended)")


async def control_rollout(
    store: Store, class_name: str, action: str, now: float | None = None
) -> RolloutRecord:
    """Pause, resume or abort the class's rollout (compare-and-swap, so the leader's loop and
    other replicas' calls never overwrite one another). An abort puts the class's
    wake_min_version back as it was before the rollout: every instance stays on what it runs,
    sleeping ones included. NotFound: never had one; FailedPrecondition: the action does not
    apply to its state."""
    for _ in range(_CAS_TRIES):
        now = time.time() if now is None else now
        current = await read_rollout(store, class_name)
        if current is None:
            raise NotFound(f"class {class_name!r} has had no rollout")
        record, revision = current
        try:
            changed = control(record, action, now)
        except ValueError as exc:
            ROLLOUT_CONTROLS.labels(action, "not_applicable").inc()
            raise FailedPrecondition(str(exc)) from None
        if not await store.compare_and_swap(rollout_key(class_name), revision, changed.encode()):
            continue
        ROLLOUT_CONTROLS.labels(action, "ok").inc()
        log.info("rollout of %s to version %d: %s by a user", class_name, record.to_version, action)
        if action == "pause":
            ROLLOUT_PAUSES.labels("manual").inc()
        if action == "abort":
            note_ended(changed, "aborted", now)
            await _restore_wake_floor(store, changed)
        return changed
    raise StoreError(f"class {class_name}: could not change its rollout (contended)")


async def _restore_wake_floor(store: Store, record: RolloutRecord) -> None:
    """The class's wake_min_version as before the aborted rollout, if the class is still at the
    rollout's version (a later deploy's own value stands)."""
    key = records.class_key(record.class_name)
    for _ in range(_CAS_TRIES):
        kv = await store.get(key)
        if kv is None:
            return
        cls = records.decode_class(kv.value)
        if cls.version != record.to_version or cls.wake_min_version != record.to_version:
            return
        restored = replace(cls, wake_min_version=record.previous_wake_min_version)
        if await store.compare_and_swap(key, kv.mod_revision, records.encode_class(restored)):
            return
    raise StoreError(f"class {record.class_name}: could not restore its wake_min_version")


async def roll_back(
    store: Store,
    view: ClusterView,
    class_name: str,
    version: int = 0,
    *,
    gradual: bool = False,
    reason: str = "",
    now: float | None = None,
) -> RolloutRecord:
    """Make `version` (0: the newest kept one before the class's current version) the class's
    version again — its versioned fields (image, entrypoint, env, ...) written back over the
    class record, which keeps its runtime policy — with wake_min_version = it, and start a
    rollout of mode "rollback" to it (one step unless `gradual`). NotFound: no such class or
    version; FailedPrecondition: the class is at that version already."""
    key = records.class_key(class_name)
    for _ in range(_CAS_TRIES):
        kv = await store.get(key)
        if kv is None:
            raise NotFound(f"no class {class_name!r}")
        current = records.decode_class(kv.value)
        kept = await history(store, class_name)
        if version == 0:
            older = [v for v in kept if v.number < current.version]
            if not older:
                raise NotFound(
                    f"class {class_name} has no kept version before its current one "
                    f"({current.version})"
                )
            target = older[-1]
        else:
            found = [v for v in kept if v.number == version]
            if not found:
                numbers = ", ".join(str(v.number) for v in kept) or "none"
                raise NotFound(f"class {class_name} has no version {version} (kept: {numbers})")
            target = found[0]
        if target.number == current.version:
            raise FailedPrecondition(f"class {class_name} is at version {target.number} already")
        fields = {name: getattr(target.spec, name) for name in VERSIONED_FIELDS}
        restored = replace(current, **fields, version=target.number, wake_min_version=target.number)
        if await store.compare_and_swap(key, kv.mod_revision, records.encode_class(restored)):
            break
    else:
        raise StoreError(f"class {class_name}: could not write its rollback (contended)")
    log.info(
        "class %s rolled back from version %d to %d%s",
        class_name,
        current.version,
        target.number,
        f": {reason}" if reason else "",
    )
    return await start_rollout(
        store,
        view,
        restored,
        ROLLBACK,
        previous_wake_min_version=current.wake_min_version,
        steps=steps_for(restored, GRADUAL) if gradual else (),
        reason=reason or f"rollback from version {current.version}",
        now=now,
    )


@dataclass
class RolloutBook:
    """This replica's copy of the rollout records, for heartbeat replies: loaded after the
    view, then fed by the view's watch (a listener). Per key, only a newer revision applies:
    the watch replays from the view's loaded revision, which may be older than this load."""

    store: Store
    view: ClusterView
    moving: dict[str, RolloutRecord] = field(default_factory=dict)  # class -> record
    _revisions: dict[str, int] = field(default_factory=dict)

    async def load(self) -> None:
        """Call after view.load() and before view.follow()."""
        kvs, _ = await self.store.range(ROLLOUTS)
        for kv in kvs:
            self._put(kv)
        self.view.listeners.append(self.apply)

    def apply(self, event: WatchEvent) -> None:
        """One watch event (after the view applied it). Never raises: it runs in the watch."""
        kv = event.kv
        if not kv.key.startswith(ROLLOUTS):
            return
        name = kv.key[len(ROLLOUTS) :]
        if kv.mod_revision <= self._revisions.get(name, 0):
            return
        if event.type == "delete":
            self._revisions[name] = kv.mod_revision
            self.moving.pop(name, None)
            return
        self._put(kv)

    def _put(self, kv: KeyValue) -> None:
        name = kv.key[len(ROLLOUTS) :]
        self._revisions[name] = kv.mod_revision
        try:
            record = RolloutRecord.decode(kv.value)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("skipping unreadable rollout record %s: %s", kv.key, exc)
            return
        if record.moving and record.replace:
            self.moving[name] = record
        else:
            self.moving.pop(name, None)

    def replace_for(self, node_id: str) -> list[str]:
        """The named instances of `node_id` that rollouts replace now: listed by a moving
        rollout whose version is still its class's, and not on that version already (the view
        may be a moment ahead of the record). Pool members are the pool manager's (surge)."""
        out = []
        for name, record in self.moving.items():
            cls = self.view.classes.get(name)
            if cls is None or cls.version != record.to_version:
                continue
            for iid in record.replace:
                rec = self.view.by_id.get(iid)
                if rec is None or rec.pool or rec.node_id != node_id:
                    continue
                status = self.view.status_of(rec)
                if status is not None and status.info.version == record.to_version:
                    continue
                out.append(iid)
        return sorted(out)


class RolloutLoop:
    """On the leader only, every second: each moving rollout's snapshot, its plan, the record
    written back (compare-and-swap: a user's pause or abort in between wins, and the plan is
    made again next tick), automatic rollbacks, and pool replacements handed to the pool
    manager."""

    def __init__(
        self,
        store: Store,
        view: ClusterView,
        is_leader: Callable[[], bool],
        *,
        pools: PoolReplacer | None = None,
        events: EventLog | None = None,
        tick_s: float = TICK_S,
    ) -> None:
        self.store = store
        self.view = view
        self.is_leader = is_leader
        self.pools = pools
        self.events = events
        self.tick_s = tick_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self.is_leader():
                ROLLOUTS_MOVING.set(0)  # the leader's to tell
                continue
            try:
                await self.tick()
            except StoreError as exc:
                log.warning("rollout tick failed: %s", exc)

    async def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        kvs, _ = await self.store.range(ROLLOUTS)
        # The view must be as new as the records: a deploy writes the class before its rollout,
        # and a view behind it would take the rollout for one its class has moved past. (The
        # newest record's revision, not the range's: the watch delivers only keys' changes.)
        revision = max((kv.mod_revision for kv in kvs), default=0)
        try:
            async with asyncio.timeout(VIEW_WAIT_S):
                await self.view.caught_up(revision)
        except TimeoutError as exc:
            raise StoreError(
                f"the view did not reach revision {revision} within {VIEW_WAIT_S:g}s"
            ) from exc
        moving = 0
        for kv in kvs:
            try:
                record = RolloutRecord.decode(kv.value)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("skipping unreadable rollout record %s: %s", kv.key, exc)
                continue
            if record.moving:
                moving += 1
                await self._drive(record, kv.mod_revision, now)
        ROLLOUTS_MOVING.set(moving)

    async def _drive(self, record: RolloutRecord, revision: int, now: float) -> None:
        key = rollout_key(record.class_name)
        cls = self.view.classes.get(record.class_name)
        if cls is None or cls.version != record.to_version:
            why = (
                f"class {record.class_name} was removed"
                if cls is None
                else f"superseded: class {record.class_name} is at version {cls.version}"
            )
            ended = replace(record, state=ABORTED, reason=why, replace=())
            if await self.store.compare_and_swap(key, revision, ended.encode()):
                note_ended(ended, "superseded", now)
            return
        plan = plan_rollout(
            record, RolloutPolicy.of(cls), class_instances(self.view, cls.name), now
        )
        if plan.record != record:
            if not await self.store.compare_and_swap(key, revision, plan.record.encode()):
                return  # a user's call or another writer got there first: planned again next tick
        for iid in plan.asked:
            rec = self.view.by_id.get(iid)
            kind = "pool" if rec is not None and rec.pool else "named"
            ROLLOUT_REPLACEMENTS.labels(cls.name, kind).inc()
            log.info("rollout of %s to version %d: replacing %s", cls.name, cls.version, iid)
        if plan.steps_done:
            ROLLOUT_STEPS.labels(cls.name).inc(plan.steps_done)
        await self._settle(cls, plan, now)
        if self.pools is not None and cls.pool:
            await self.pools.replace_members(cls, plan.record.replace)

    async def _settle(self, cls: ContainerClass, plan: Plan, now: float) -> None:
        """Logs, metrics and the automatic rollback for what the plan decided."""
        record, outcome, cause = plan.record, plan.outcome, plan.cause
        if outcome == "step":
            log.info(
                "rollout of %s to version %d: step %d of %d (%d%%) begins",
                cls.name,
                record.to_version,
                record.step + 1,
                len(record.steps),
                record.percentage,
            )
        elif outcome == "reached":
            log.info(
                "rollout of %s to version %d: step %d has %d of %d instances on it",
                cls.name,
                record.to_version,
                record.step + 1,
                record.updated,
                record.instances,
            )
        elif outcome == "done":
            note_ended(record, record.state, now)
        elif outcome == "paused":
            ROLLOUT_PAUSES.labels(cause).inc()
            log.warning("rollout of %s paused: %s", cls.name, record.reason)
        elif outcome == "rollback":
            ROLLOUT_ROLLBACKS.labels(cause).inc()
            log.warning("rollout of %s rolls back: %s", cls.name, record.reason)
            note_ended(record, ROLLED_BACK, now)
            await self._say_rolled_back(cls.name, record, plan.rollback_to, now)
            try:
                await roll_back(
                    self.store,
                    self.view,
                    cls.name,
                    plan.rollback_to,
                    reason=(
                        f"automatic rollback from version {record.to_version} to "
                        f"{plan.rollback_to}: {record.reason}"
                    ),
                    now=now,
                )
            except (NotFound, FailedPrecondition) as exc:
                await self._cannot_roll_back(record, str(exc))

    async def _say_rolled_back(
        self, class_name: str, record: RolloutRecord, back_to: int, now: float
    ) -> None:
        """An event for each instance that ran the failed version: users watching the class
        (`portside events`) hear why their instances moved back."""
        if self.events is None:
            return
        why = f"version {record.to_version} rolled back to {back_to}: {record.reason}"
        for inst in class_instances(self.view, class_name):
            if inst.version == record.to_version:
                await self.events.record(
                    Event(
                        EventKind.ROLLED_BACK,
                        now,
                        class_name,
                        inst.name,
                        inst.instance_id,
                        inst.node_id,
                        reason=why,
                    )
                )

    async def _cannot_roll_back(self, record: RolloutRecord, why: str) -> None:
        """The rollback's version is gone (or the class moved): the rollout pauses instead,
        saying both why it stopped and why it could not roll back."""
        log.error("rollout of %s cannot roll back: %s", record.class_name, why)
        current = await read_rollout(self.store, record.class_name)
        if current is None or current[0].started_at != record.started_at:
            return
        paused = replace(
            current[0], state=PAUSED, reason=f"{record.reason}; cannot roll back: {why}"
        )
        await self.store.compare_and_swap(
            rollout_key(record.class_name), current[1], paused.encode()
        )
