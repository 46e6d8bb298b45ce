"""The schedule loop's bookkeeping over an in-memory store (controlplane.scheduleloop): deletes
that race the leader's writes, claims whose revision the watch brought first, wake-ups during a
tick, removed classes, runs that fail in odd ways, no_wake's skips and a destroy under a run that
placed its instance. tests/e2e/test_schedules.py runs the real thing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from controlplane import records
from controlplane.scheduleloop import (
    POLL_S,
    ScheduleLoop,
    create_schedule,
    delete_schedule,
)
from controlplane.schedules import Claim, ScheduleRecord, check_request
from controlplane.store import KeyValue, Store, WatchEvent
from portside.client import Schedule
from portside.errors import AlreadyExists, FailedPrecondition, NotFound, NotRunning
from portside.spec import ContainerClass, Node, instance_id

NOW = 1_000.0
ECHO = ContainerClass("Echo", "echo:latest", boot_timeout_s=1.0)
NODE = cast(Node, dataclasses.make_dataclass("N", [("id", str)])("n1"))


class MemoryStore:
    """The store calls the loop makes, with etcd's revisions; `on_swap` runs inside a swap's
    await, as another writer (or the watch) would."""

    def __init__(self) -> None:
        self.kvs: dict[str, KeyValue] = {}
        self.revision = 0
        self.on_swap: Callable[[str], None] | None = None

    def write(self, key: str, value: bytes | None) -> int:
        self.revision += 1
        if value is None:
            self.kvs.pop(key, None)
        else:
            old = self.kvs.get(key)
            created = old.create_revision if old is not None else self.revision
            self.kvs[key] = KeyValue(key, value, created, self.revision)
        return self.revision

    async def get(self, key: str) -> KeyValue | None:
        return self.kvs.get(key)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        return sorted((kv for k, kv in self.kvs.items() if k.startswith(prefix)), key=str), 0

    async def delete(self, key: str) -> bool:
        existed = key in self.kvs
        self.write(key, None)
        return existed

    async def compare_and_swap(self, key: str, mod_revision: int, value: bytes | None) -> bool:
        if self.on_swap is not None:
            self.on_swap(key)
        kv = self.kvs.get(key)
        if (kv.mod_revision if kv is not None else 0) != mod_revision:
            return False
        self.write(key, value)
        return True


@dataclass
class FakeView:
    classes: dict[str, ContainerClass] = field(default_factory=lambda: {ECHO.name: ECHO})
    replicas: dict[str, object] = field(default_factory=dict)
    revision: int = 0
    listeners: list[Callable[[WatchEvent], None]] = field(default_factory=list)


@dataclass
class Located:
    node: Node | None
    record: Any = None


class FakeLifecycle:
    """Where the instance is, and what a run does there: `answer` is called for each run."""

    def __init__(self, store: MemoryStore, answer: Callable[[], Any]) -> None:
        self.store, self.answer = store, answer
        self.placed_on: Node | None = NODE
        self.destroyed = 0
        self.agents = self
        self.calls: list[str] = []

    async def locate(self, class_name: str, name: str) -> Located:
        if self.placed_on is None:
            raise NotFound("never placed")
        return Located(self.placed_on)

    def class_named(self, name: str) -> ContainerClass:
        return ECHO

    async def start(self, class_name: str, name: str) -> None:
        self.store.write(records.instance_key(class_name, instance_id(class_name, name)), b"{}")
        self.placed_on = NODE

    async def destroy(self, class_name: str, name: str) -> None:
        self.destroyed += 1

    async def call(self, node: Node, what: str, rpc: object, request: Any, t: float) -> Any:
        self.calls.append(what)
        if what.startswith("destroy "):
            return None
        reply = self.answer()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def exec(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        raise self.answer()
        yield  # an async generator, as Lifecycle.exec is


class Events:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def record(self, event: Any) -> None:
        self.reasons.append(event.reason)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""


def make_loop(store: MemoryStore, answer: Callable[[], Any] = Reply) -> ScheduleLoop:
    return ScheduleLoop(
        cast(Store, store),
        cast(Any, FakeView()),
        cast(Any, FakeLifecycle(store, answer)),
        cast(Any, Events()),
        is_leader=lambda: True,
        replica_id="r1",
        clock=lambda: NOW,
    )


def health(**fields: Any) -> Schedule:
    asked = Schedule(id="h", class_name="Echo", name="s1", every_s=0.5, path="/_health")
    return check_request(dataclasses.replace(asked, **fields), now=NOW - 1, generated_id="gen")


async def stored(store: MemoryStore, s: Schedule) -> str:
    await create_schedule(cast(Store, store), s)
    return records.schedule_key(s.class_name, instance_id(s.class_name, s.name), s.id)


async def loaded(store: MemoryStore, s: Schedule, answer: Callable[[], Any] = Reply) -> Any:
    key = await stored(store, s)
    loop = make_loop(store, answer)
    await loop.load()
    return loop, key


async def test_a_taken_id_already_exists() -> None:
    store = MemoryStore()
    await stored(store, health())
    with pytest.raises(AlreadyExists):
        await create_schedule(cast(Store, store), health())


async def test_delete_reads_again_when_the_leader_wrote_meanwhile() -> None:
    """A 0.5 s schedule is written twice a tick: the delete's swap may lose to a claim."""
    store = MemoryStore()
    key = await stored(store, health())
    raced = 0

    def leader_writes(k: str) -> None:
        nonlocal raced
        if raced < 3:
            raced += 1
            store.write(k, store.kvs[k].value)

    store.on_swap = leader_writes
    gone = await delete_schedule(cast(Store, store), "Echo", "s1", "h")
    assert gone.id == "h" and key not in store.kvs and raced == 3
    with pytest.raises(NotFound):  # absent: only then
        await delete_schedule(cast(Store, store), "Echo", "s1", "h")


async def test_an_unreadable_record_is_deleted_too() -> None:
    store = MemoryStore()
    key = await stored(store, health())
    store.write(key, b"[]")
    assert (await delete_schedule(cast(Store, store), "Echo", "s1", "h")).id == "h"
    assert key not in store.kvs


async def test_an_unreadable_record_does_not_stop_the_watch() -> None:
    store = MemoryStore()
    loop, key = await loaded(store, health())
    loop.apply(WatchEvent("put", KeyValue(key, b'"a string"', 1, store.revision + 1)))
    assert loop._book[key][0] is None


async def test_a_claim_never_takes_the_book_back_past_what_the_watch_brought() -> None:
    """The watch may apply the claim's own write (or a later one) during the swap's await; the
    book must keep that, or the next swap uses a stale revision and the schedule sticks."""
    store = MemoryStore()
    loop, key = await loaded(store, health())
    real_swap = store.compare_and_swap

    async def swap_then_watch(key: str, mod_revision: int, value: bytes | None) -> bool:
        ok = await real_swap(key, mod_revision, value)
        loop.apply(WatchEvent("put", store.kvs[key]))  # the watch, before the swap's await ends
        return ok

    store.compare_and_swap = swap_then_watch  # type: ignore[method-assign]
    async with asyncio.TaskGroup() as runs:
        await loop.tick(runs)
        assert loop._book[key][1] == store.kvs[key].mod_revision  # before the run starts


async def test_a_wake_during_a_tick_is_not_lost() -> None:
    """A change that arrives during tick's awaits must wake the next round at once, not after
    POLL_S."""
    loop = make_loop(MemoryStore())
    rounds: list[float] = []

    async def tick(runs: asyncio.TaskGroup) -> float:
        rounds.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0)
        if len(rounds) == 1:
            loop._changed.set()  # a claim's watch event, say
        return POLL_S

    loop.tick = tick  # type: ignore[method-assign]
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(POLL_S / 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(rounds) >= 2, rounds


async def test_a_removed_class_is_not_claimed() -> None:
    store = MemoryStore()
    loop, key = await loaded(store, health(class_name="Gone"))
    before = store.kvs[key]
    async with asyncio.TaskGroup() as runs:
        await loop.tick(runs)
    assert store.kvs[key] == before  # no claim, no result, no event
    assert loop.events.reasons == []


async def test_a_fault_in_one_schedule_does_not_stop_the_others() -> None:
    store = MemoryStore()
    loop, bad = await loaded(store, health(id="bad"))
    good = await stored(store, health(id="good"))
    await loop.load()
    record, revision = loop._book[bad]
    loop._book[bad] = (dataclasses.replace(record, claim=cast(Claim, "garbage")), revision)
    async with asyncio.TaskGroup() as runs:
        await loop.tick(runs)
    done = ScheduleRecord.decode(store.kvs[good].value)
    assert done.schedule.runs == 1 and done.schedule.last_result == "200"


async def test_a_run_whose_result_cannot_be_recorded_does_not_end_the_loop() -> None:
    store = MemoryStore()
    loop, key = await loaded(store, health())

    async def broken(event: Any) -> None:
        raise RuntimeError("an event log fault")

    loop.events.record = broken
    async with asyncio.TaskGroup() as runs:  # would raise an ExceptionGroup
        await loop.tick(runs)
    assert loop._running == set()


async def test_a_run_in_flight_is_known_by_its_claim_not_only_its_key() -> None:
    """Deleted and made again under its id while its run is in flight: the first run's end
    must not make the second's claim look lost."""
    store = MemoryStore()
    loop, key = await loaded(store, health())
    first = Claim(NOW, "r1", NOW, NOW + 40)
    second = Claim(NOW + 1, "r1", NOW + 1, NOW + 41)
    loop._running |= {(key, first), (key, second)}
    release = asyncio.Event()

    async def execute(s: Schedule, timeout_s: float) -> tuple[str, str]:
        await release.wait()
        return "200", "n1"

    loop._execute = execute
    run = asyncio.create_task(loop._run(key, health(), first, 1.0))
    release.set()
    await run
    assert loop._alive(key, second) and not loop._alive(key, first)


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (NotRunning("Echo/s1 is sleeping: not woken (no_wake)"), "skipped: sleeping"),
        (FailedPrecondition("the exec session ended"), "failed: the exec session ended"),
        (Reply(503, b"draining\n"), "503 draining"),
    ],
)
async def test_no_wake_skips_only_an_instance_that_does_not_run(answer: Any, result: str) -> None:
    for s in (health(no_wake=True), health(no_wake=True, path="", command=("true",))):
        store = MemoryStore()
        loop, key = await loaded(store, s, answer=lambda: answer)
        if isinstance(answer, Reply) and s.command:
            continue  # an HTTP answer only
        async with asyncio.TaskGroup() as runs:
            await loop.tick(runs)
        assert ScheduleRecord.decode(store.kvs[key].value).schedule.last_result == result


async def test_a_destroy_under_a_run_that_placed_the_instance_removes_it_again() -> None:
    store = MemoryStore()
    destroyed_meanwhile = Reply()

    def answer() -> Reply:
        store.write(key, None)  # Destroy deleted the schedules, then the placement
        iid_key = records.instance_key("Echo", instance_id("Echo", "s1"))
        store.write(iid_key, None)
        store.write(iid_key, b"{}")  # ... and the run's Start placed it anew
        return destroyed_meanwhile

    loop, key = await loaded(store, health(), answer=answer)
    loop.lifecycle.placed_on = None  # its node is gone: the run places it
    store.write(records.instance_key("Echo", instance_id("Echo", "s1")), b"{}")
    async with asyncio.TaskGroup() as runs:
        await loop.tick(runs)
    assert loop.lifecycle.destroyed == 1


async def test_a_destroy_that_forgot_what_a_run_placed_has_its_container_removed() -> None:
    store = MemoryStore()

    def answer() -> Reply:
        store.write(key, None)  # Destroy deleted the schedules, then the run's placement
        store.write(records.instance_key("Echo", instance_id("Echo", "s1")), None)
        return Reply()

    loop, key = await loaded(store, health(), answer=answer)
    loop.lifecycle.placed_on = None
    async with asyncio.TaskGroup() as runs:
        await loop.tick(runs)
    assert loop.lifecycle.destroyed == 0  # no placement left to destroy: its container is
    assert loop.lifecycle.calls[-1].startswith("destroy Echo/s1")


async def test_a_schedule_deleted_under_a_run_leaves_its_instance() -> None:
    store = MemoryStore()

    def answer() -> Reply:
        store.write(key, None)  # `portside schedule rm` while the run placed it
        return Reply()

    loop, key = await loaded(store, health(), answer=answer)
    loop.lifecycle.placed_on = None
    store.write(records.instance_key("Echo", instance_id("Echo", "s1")), b"{}")
    async with asyncio.TaskGroup() as runs:
        await loop.tick(runs)
    assert loop.lifecycle.destroyed == 0
