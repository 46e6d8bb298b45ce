"""Per-instance schedules' I/O (issue 13): their records in the store (create, list, delete, and
the deletion of an instance's schedules when it is destroyed), and the leader's loop that claims
each due tick (controlplane.schedules) and runs it: an HTTP request through the instance's agent
(NodeAgent.Call) or a command through Exec, its result recorded in the record and as a
schedule-ran event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from controlplane import records
from controlplane.events import EventLog
from controlplane.metrics import SCHEDULE_LAG_SECONDS, SCHEDULE_RUN_SECONDS, SCHEDULE_RUNS
from controlplane.records import SCHEDULES, schedule_key, schedules_prefix
from controlplane.schedules import (
    RUN_TIMEOUT_S,
    SKIPPED_DELETED,
    SKIPPED_SLEEPING,
    Claim,
    Due,
    Later,
    Lost,
    ScheduleRecord,
    call_result,
    claimed,
    decide,
    finished,
    log_action,
    lost_result,
    outcome,
)
from controlplane.store import KeyValue, Store, WatchEvent
from controlplane.view import ClusterView
from portside.api.v1 import nodeagent_pb2 as na
from portside.api.v1 import types_pb2 as pb
from portside.client import Schedule
from portside.convert import class_to_pb
from portside.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    NotRunning,
    PortsideError,
    StoreError,
    one_line,
)
from portside.events import Event, EventKind
from portside.spec import Node, instance_id

if TYPE_CHECKING:
    from controlplane.lifecycle import Lifecycle, Located

log = logging.getLogger(__name__)

POLL_S = 1.0  # the longest the leader's loop sleeps (a change to a schedule wakes it at once)
COALESCE_S = 0.005
_CAS_TRIES = 20


def _key(s: Schedule) -> str:
    return schedule_key(s.class_name, instance_id(s.class_name, s.name), s.id)


def _decode(kv: KeyValue) -> ScheduleRecord | None:
    try:
        return ScheduleRecord.decode(kv.value)
    except (ValueError, TypeError, KeyError) as exc:
        log.error("skipping unreadable schedule record %s: %s", kv.key, exc)
        return None


async def create_schedule(store: Store, s: Schedule) -> Schedule:
    """Store a checked schedule (controlplane.schedules.check_request); AlreadyExists if its
    instance has a schedule of that id."""
    if not await store.compare_and_swap(_key(s), 0, ScheduleRecord(s).encode()):
        raise AlreadyExists(
            f"id: {s.class_name}/{s.name} has a schedule {s.id!r} already (delete it first, or "
            "give another id)"
        )
    log.info("schedule %s of %s/%s: %s", s.id, s.class_name, s.name, log_action(s))
    return s


async def list_schedules(store: Store, class_name: str = "", name: str = "") -> list[Schedule]:
    """Every schedule, one class's or one instance's, by class, instance and id."""
    if name and not class_name:
        raise InvalidArgument("class_name: required when name is given")
    iid = instance_id(class_name, name) if name else ""
    kvs, _ = await store.range(schedules_prefix(class_name, iid))
    found = [r.schedule for r in map(_decode, kvs) if r is not None]
    return sorted(found, key=lambda s: (s.class_name, s.name, s.id))


async def delete_schedule(store: Store, class_name: str, name: str, schedule_id: str) -> Schedule:
    """Forget a schedule (a run in flight finishes; its result is an event only). NotFound only
    when there is no such key: a record the leader rewrites meanwhile (a claim, a result) is
    read again; an unreadable one is deleted too."""
    key = schedule_key(class_name, instance_id(class_name, name), schedule_id)
    for _ in range(_CAS_TRIES):
        kv = await store.get(key)
        if kv is None:
            raise NotFound(f"{class_name}/{name} has no schedule {schedule_id!r}")
        if await store.compare_and_swap(key, kv.mod_revision, None):
            log.info("schedule %s of %s/%s deleted", schedule_id, class_name, name)
            record = _decode(kv)
            return (
                record.schedule if record is not None else Schedule(schedule_id, class_name, name)
            )
    raise StoreError(f"schedule record {key}: {_CAS_TRIES} conflicting writes; try again")


async def delete_instance_schedules(store: Store, class_name: str, iid: str) -> int:
    """Delete every schedule of a destroyed instance; how many there were."""
    return await _delete_all(store, schedules_prefix(class_name, iid))


async def delete_class_schedules(store: Store, class_name: str) -> int:
    """Delete every schedule of a class a deploy removed; how many there were."""
    return await _delete_all(store, schedules_prefix(class_name))


async def _delete_all(store: Store, prefix: str) -> int:
    kvs, _ = await store.range(prefix)
    for kv in kvs:
        await store.delete(kv.key)
    return len(kvs)


class ScheduleLoop:
    """On the leader only: every due tick claimed (compare-and-swap) and run in a task of its
    own, at most one run of a schedule in flight. Every replica keeps a copy of the records,
    loaded after the view and then fed by its watch, so a tick reads no store; a copy behind
    the store only makes a compare-and-swap fail, and the watch's next event wakes the loop to
    decide again. It sleeps until the soonest due tick, at most POLL_S."""

    def __init__(
        self,
        store: Store,
        view: ClusterView,
        lifecycle: Lifecycle,
        events: EventLog,
        *,
        is_leader: Callable[[], bool],
        replica_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.view, self.lifecycle, self.events = store, view, lifecycle, events
        self.is_leader = is_leader
        self.replica_id = replica_id
        self.clock = clock
        # key -> the record and the mod revision it was read at (of a delete: the record None)
        self._book: dict[str, tuple[ScheduleRecord | None, int]] = {}
        self._changed = asyncio.Event()
        # This replica's runs in flight, by key and claim: a schedule deleted and made again
        # under its id while its run is in flight has a run of its own.
        self._running: set[tuple[str, Claim]] = set()

    async def load(self) -> None:
        """Call after view.load() and before view.follow()."""
        kvs, _ = await self.store.range(SCHEDULES)
        for kv in kvs:
            self._book[kv.key] = (_decode(kv), kv.mod_revision)
        self.view.listeners.append(self.apply)

    def apply(self, event: WatchEvent) -> None:
        """One watch event (after the view applied it). Per key, only a newer revision applies:
        the watch replays from the view's loaded revision, which may be older than `load`'s."""
        kv = event.kv
        if not kv.key.startswith(SCHEDULES):
            return
        known = self._book.get(kv.key)
        if known is not None and kv.mod_revision <= known[1]:
            return
        record = _decode(kv) if event.type == "put" else None
        self._book[kv.key] = (record, kv.mod_revision)
        self._changed.set()

    async def run(self) -> None:
        # The runs are this loop's tasks: they end with it (a run cut short is reported lost by
        # the next leader).
        async with asyncio.TaskGroup() as runs:
            while True:
                wait = POLL_S
                # Cleared before the tick: a change that arrives during its awaits wakes the next.
                self._changed.clear()
                if self.is_leader():
                    try:
                        wait = await self.tick(runs)
                    except StoreError as exc:
                        log.warning("schedule tick failed: %s", exc)
                    except Exception:
                        # A fault of this code must not end the loop (nor, with it, the replica).
                        log.exception("schedule tick failed")
                try:
                    async with asyncio.timeout(max(wait, 0.001)):
                        await self._changed.wait()
                    # Woken by a change: let a burst of them (claims, results) arrive first.
                    await asyncio.sleep(COALESCE_S)
                except TimeoutError:
                    pass

    async def tick(self, runs: asyncio.TaskGroup) -> float:
        """Claim and start every due tick, record lost claims; seconds until the next due. A
        schedule whose class is gone is left alone (the deploy that removed it deletes it)."""
        now = self.clock()
        wait = POLL_S
        for key, (record, revision) in list(self._book.items()):
            if record is None:
                if self.view.revision >= revision:  # no older event can come any more
                    del self._book[key]
                continue
            if record.schedule.class_name not in self.view.classes:
                continue
            try:
                wait = min(wait, await self._tick_one(runs, key, record, revision, now))
            except StoreError:
                raise  # the store is down: this round ends
            except Exception:
                log.exception("schedule %s: skipped this round", key)
        return wait

    async def _tick_one(
        self, runs: asyncio.TaskGroup, key: str, record: ScheduleRecord, revision: int, now: float
    ) -> float:
        """One schedule's part of a tick; seconds until it is due (POLL_S: nothing to wait)."""
        decision = decide(record, now, claimer_alive=self._alive(key, record.claim))
        if isinstance(decision, Later):
            return decision.at - now
        if isinstance(decision, Lost):
            await self._record_lost(key, revision, record, decision.claim, now)
        elif isinstance(decision, Due):
            timeout_s = self._timeout(record.schedule)
            mine = claimed(record, now=now, replica=self.replica_id, timeout_s=timeout_s)
            # Another replica's claim, or a delete, in between: the swap fails, nothing runs.
            if await self.store.compare_and_swap(key, revision, mine.encode()):
                assert mine.claim is not None
                known = self._book.get(key)
                # The watch brings the claim's own revision; it may have brought it (or a
                # delete after it) during the swap's await already: never go back from that.
                if known is None or known[1] <= revision:
                    self._book[key] = (mine, revision)
                self._running.add((key, mine.claim))
                runs.create_task(self._run(key, mine.schedule, mine.claim, timeout_s))
        return POLL_S

    def _alive(self, key: str, claim: Claim | None) -> bool:
        """Whether a claim's run may still be in flight: this replica's own only while its task
        runs (a claim of its previous process is not), another's while it is registered."""
        if claim is None:
            return True
        if claim.replica == self.replica_id:
            return (key, claim) in self._running
        return claim.replica in self.view.replicas

    def _timeout(self, s: Schedule) -> float:
        cls = self.view.classes.get(s.class_name)
        return RUN_TIMEOUT_S + (cls.boot_timeout_s if cls is not None and not s.no_wake else 0.0)

    async def _run(self, key: str, s: Schedule, claim: Claim, timeout_s: float) -> None:
        try:
            SCHEDULE_LAG_SECONDS.observe(max(0.0, claim.started - claim.tick))
            started = time.perf_counter()
            node_id = ""
            try:
                async with asyncio.timeout(timeout_s):
                    result, node_id = await self._execute(s, timeout_s)
            except TimeoutError:
                result = f"failed: no result within {timeout_s:g}s"
            except PortsideError as exc:
                result = "failed: " + one_line(str(exc))
            except Exception as exc:
                log.exception("scheduled run %s of %s/%s failed", s.id, s.class_name, s.name)
                result = "failed: " + one_line(f"{type(exc).__name__}: {exc}")
            SCHEDULE_RUN_SECONDS.observe(time.perf_counter() - started)
            await self._record(s, claim, result, node_id)
        except Exception:
            # A fault of this code must not end the loop's task group, and with it the replica:
            # the claim stays, and is reported lost.
            log.exception("scheduled run %s of %s/%s: no result", s.id, s.class_name, s.name)
        finally:
            self._running.discard((key, claim))

    async def _execute(self, s: Schedule, timeout_s: float) -> tuple[str, str]:
        """One run: its result and the node it ran on ("" if none)."""
        where = await self._locate(s)
        if where is not None and where.node is not None:
            return await self._on(s, where.node, timeout_s)
        if s.no_wake:
            return SKIPPED_SLEEPING, ""
        # Never placed, or its node is gone: placed and booted as Start does, unless the
        # schedule went meanwhile (its instance destroyed: never bring that back).
        if await self.store.get(_key(s)) is None:
            return SKIPPED_DELETED, ""
        instance_key = records.instance_key(s.class_name, instance_id(s.class_name, s.name))
        before = await self.store.get(instance_key)
        node: Node | None = None
        try:
            await self.lifecycle.start(s.class_name, s.name)
            where = await self.lifecycle.locate(s.class_name, s.name)
            node = where.node
            if node is None:
                return f"failed: its node {where.record.node_id} is gone", ""
            return await self._on(s, node, timeout_s)
        finally:
            await self._unless_destroyed(s, instance_key, before, node)

    async def _unless_destroyed(
        self, s: Schedule, instance_key: str, before: KeyValue | None, node: Node | None
    ) -> None:
        """After a run that placed its instance: when its schedule went meanwhile and so did the
        placement the run began with (a Destroy while the run placed it anew), destroy what the
        run placed, so that a destroyed instance does not come back. A schedule merely deleted
        leaves the instance alone: its placement is the one the run began with."""
        if await self.store.get(_key(s)) is not None:
            return
        after = await self.store.get(instance_key)
        if after is None and node is None:
            return  # nothing placed, or nothing booted of what was
        if (
            after is not None
            and before is not None
            and after.create_revision == before.create_revision
        ):
            return
        log.warning(
            "schedule %s of %s/%s went while its run placed the instance anew: removing what "
            "the run placed",
            s.id,
            s.class_name,
            s.name,
        )
        if after is not None:
            with contextlib.suppress(NotFound):
                await self.lifecycle.destroy(s.class_name, s.name)
        elif node is not None:  # the Destroy forgot the placement: the container is left
            with contextlib.suppress(NotFound):
                await self.lifecycle.agents.call(
                    node,
                    f"destroy {s.class_name}/{s.name} (placed by a schedule after its destroy)",
                    lambda stub: stub.Destroy,
                    na.AgentDestroyRequest(instance_id=instance_id(s.class_name, s.name)),
                    RUN_TIMEOUT_S,
                )

    async def _on(self, s: Schedule, node: Node, timeout_s: float) -> tuple[str, str]:
        """The run on the instance's node: its result and the node's id."""
        try:
            if s.path:
                return await self._call(s, node, timeout_s), node.id
            return await self._exec(s), node.id
        except NotRunning:
            if s.no_wake:  # the agent's answer for an instance that does not run, untouched
                return SKIPPED_SLEEPING, node.id
            raise

    async def _locate(self, s: Schedule) -> Located | None:
        try:
            return await self.lifecycle.locate(s.class_name, s.name)
        except NotFound:
            self.lifecycle.class_named(s.class_name)  # an unknown class is a failure
            return None

    async def _call(self, s: Schedule, node: Node, timeout_s: float) -> str:
        request = na.AgentCallRequest(
            name=s.name,
            method=s.method or "GET",
            path=s.path,
            no_wake=s.no_wake,
            no_activity=s.no_activity,
            timeout_seconds=timeout_s,
        )
        getattr(request, "class").CopyFrom(class_to_pb(self.lifecycle.class_named(s.class_name)))
        reply = await self.lifecycle.agents.call(
            node,
            f"scheduled call {s.id} to {s.class_name}/{s.name}",
            lambda stub: stub.Call,
            request,
            timeout_s,
        )
        return call_result(reply.status, reply.body)

    async def _exec(self, s: Schedule) -> str:
        start = pb.ExecStart(
            instance=pb.InstanceRef(class_name=s.class_name, name=s.name),
            command=list(s.command),
            wake=not s.no_wake,
            activity=not s.no_activity,
        )

        async def requests() -> AsyncIterator[pb.ExecRequest]:
            yield pb.ExecRequest(start=start)

        exit_code: int | None = None
        async for reply in self.lifecycle.exec(requests()):
            if reply.WhichOneof("message") == "exit_code":
                exit_code = reply.exit_code
        if exit_code is None:
            return "failed: the command ended without an exit code"
        return f"exit {exit_code}"

    async def _record(self, s: Schedule, claim: Claim, result: str, node_id: str) -> None:
        """The run's result in the schedule's record (while the claim is still this run's) and
        as an event."""
        SCHEDULE_RUNS.labels(outcome(result)).inc()
        key = _key(s)
        try:
            for _ in range(_CAS_TRIES):
                kv = await self.store.get(key)
                record = _decode(kv) if kv is not None else None
                # Deleted meanwhile, or taken for lost after its deadline: the event tells it.
                if kv is None or record is None or record.claim != claim:
                    break
                ran = finished(record, claim, result, self.clock())
                if await self.store.compare_and_swap(key, kv.mod_revision, ran.encode()):
                    break
        except StoreError as exc:
            log.warning("could not record the run of schedule %s of %s: %s", s.id, s.name, exc)
        await self._event(s, result, node_id)

    async def _record_lost(
        self, key: str, revision: int, record: ScheduleRecord, claim: Claim, now: float
    ) -> None:
        result = lost_result(claim)
        ended = finished(record, claim, result, now)
        if await self.store.compare_and_swap(key, revision, ended.encode()):
            SCHEDULE_RUNS.labels("lost").inc()
            s = record.schedule
            log.warning("schedule %s of %s/%s: %s", s.id, s.class_name, s.name, result)
            await self._event(record.schedule, result, "")

    async def _event(self, s: Schedule, result: str, node_id: str) -> None:
        await self.events.record(
            Event(
                kind=EventKind.SCHEDULE_RAN,
                time=self.clock(),
                class_name=s.class_name,
                name=s.name,
                instance_id=instance_id(s.class_name, s.name),
                node_id=node_id,
                reason=f"{s.id}: {result}",
            )
        )
