"""Per-instance schedules on real processes (issue 13): `schedule_every` runs about every
interval and keeps its instance awake, a one-off and an exec schedule run once, `no_wake` skips a
sleeping instance without waking it, the default wakes it, `no_activity` lets it sleep; the CLI's
`schedule add|list|rm`; an id taken is ALREADY_EXISTS; a destroy deletes an instance's schedules,
and a deploy that removes a class deletes its schedules; and with two control planes a leader's
death neither stops the ticks nor runs one twice."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

import portside
from portside.events import Event
from tests.e2e.harness import PORTSIDE, Cluster
from tests.support import eventually

pytestmark = pytest.mark.e2e


def config(image: str, sleep_after: str) -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "{sleep_after}"
"""


@contextmanager
def watching(ps: portside.Portside, after: int) -> Iterator[list[Event]]:
    """The class's events from store revision `after` on, appended as they come."""
    seen: list[Event] = []

    async def follow() -> None:
        async for event in ps.events("Echo", after_revision=after):
            seen.append(event)

    task = asyncio.get_running_loop().create_task(follow())
    try:
        yield seen
    finally:
        task.cancel()


def ran(seen: list[Event], name: str, schedule_id: str) -> list[Event]:
    return [
        e
        for e in seen
        if e.kind == "schedule-ran" and e.name == name and e.reason.startswith(schedule_id + ": ")
    ]


def results(seen: list[Event], name: str, schedule_id: str) -> list[str]:
    return [e.reason.split(": ", 1)[1] for e in ran(seen, name, schedule_id)]


def ran_once(seen: list[Event], name: str, schedule_id: str, result: str) -> bool:
    """Whether the schedule ran once, with `result` (an AssertionError says how it ran)."""
    got = results(seen, name, schedule_id)
    assert got == [result], got
    return True


async def state_is(box: portside.Container, state: str) -> bool:
    return (await box.state()).state == state


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    verb, action, *rest = args
    return subprocess.run(
        [*PORTSIDE, verb, action, "--controlplane", cluster.controlplane_address, *rest],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_schedules_run_wake_skip_and_let_sleep(cluster: Cluster, test_image: str) -> None:
    controlplane = cluster.start_controlplane()
    echo = config(test_image, sleep_after="1s")
    cluster.deploy(echo + echo.replace('"Echo"', '"Gone"'))
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    async with portside.connect(cluster.controlplane_address) as ps:
        a, b, c = (ps.container("Echo", n) for n in "abc")
        with watching(ps, cluster.store_revision()) as seen:
            await a.start()
            await b.start()

            # Every 0.5 s, as activity: `a` stays awake three times its sleep_after. A one-off
            # HTTP request and a one-off command run once, beside it.
            tick = await a.schedule_every(0.5, "/tick", id="tick")
            assert (tick.id, tick.every_s, tick.action, tick.done) == (
                "tick",
                0.5,
                "GET /tick",
                False,
            )
            await a.schedule(0.3, "/once", method="post", id="once")
            with pytest.raises(portside.AlreadyExists):
                await a.schedule(30, "/again", id="once")
            soon = datetime.now(UTC) + timedelta(seconds=0.3)
            await a.schedule(soon, command=["mkdir", "-p", "/tmp/x"], id="mkdir")
            await asyncio.sleep(3.2)  # time must pass: the runs are counted over it
            ticks = results(seen, "a", "tick")
            assert 4 <= len(ticks) <= 7 and set(ticks) == {"200"}, ticks
            await eventually(lambda: ran_once(seen, "a", "once", "200"))
            await eventually(lambda: ran_once(seen, "a", "mkdir", "exit 0"))
            assert (await a.exec(["test", "-d", "/tmp/x"])).ok
            assert await state_is(a, "healthy")
            listed = {s.id: s for s in await a.schedules()}
            assert sorted(listed) == ["mkdir", "once", "tick"]
            once = listed["once"]
            assert (once.done, once.runs, once.last_result, once.action) == (
                True,
                1,
                "200",
                "POST /once",
            )
            assert listed["tick"].runs >= len(ticks) and listed["tick"].last_result == "200"
            await a.delete_schedule("tick")
            with pytest.raises(portside.NotFound):
                await a.delete_schedule("tick")

            # no_wake: the sleeping `b` is skipped, never woken.
            await eventually(lambda: state_is(b, "sleeping"), within=10, what="b asleep")
            await b.schedule_every(0.3, "/nw", no_wake=True, id="nw")
            await eventually(lambda: len(ran(seen, "b", "nw")) >= 3, within=5, what="3 skips")
            assert set(results(seen, "b", "nw")) == {"skipped: sleeping"}
            assert await state_is(b, "sleeping")
            await b.delete_schedule("nw")
            # The default wakes it.
            woken_after = time.time()
            await b.schedule(0.1, "/wake", id="wake")
            await eventually(lambda: ran_once(seen, "b", "wake", "200"), within=20)
            assert any(
                e.kind == "ready" and e.name == "b" and e.time > woken_after for e in seen
            ), seen

            # no_activity: `c` sleeps after its sleep_after although the runs go on meanwhile.
            await c.start()
            await c.schedule_every(0.3, "/na", no_activity=True, no_wake=True, id="na")
            await eventually(lambda: state_is(c, "sleeping"), within=10, what="c asleep")
            await eventually(lambda: "skipped: sleeping" in results(seen, "c", "na"), within=5)
            assert "200" in results(seen, "c", "na")

            # The CLI.
            added = cli(cluster, "schedule", "add", "Echo", "a", "--every", "1s", "--path", "/x")
            assert added.returncode == 0 and ": GET /x" in added.stdout, added.stderr
            exec_added = cli(
                cluster, "schedule", "add", "Echo", "a", "--at", "+0.2s", "--id", "cli",
                "--", "mkdir", "-p", "/tmp/y",
            )  # fmt: skip
            assert exec_added.stdout.strip() == "scheduled cli in Echo/a: exec mkdir -p /tmp/y"
            bad = cli(cluster, "schedule", "add", "Echo", "a", "--every", "50ms", "--path", "/x")
            assert bad.returncode == 1 and "every_seconds: 0.05 is below 0.1" in bad.stderr
            await eventually(lambda: ran_once(seen, "a", "cli", "exit 0"))
            listing = json.loads(cli(cluster, "schedule", "list", "Echo", "a", "--json").stdout)
            every_x = next(s for s in listing if s["path"] == "/x")
            assert {s["id"] for s in listing} == {"once", "mkdir", "cli", every_x["id"]}
            table = cli(cluster, "schedule", "list", "Echo").stdout
            assert "every 1s" in table and "exec mkdir -p /tmp/y" in table
            removed = cli(cluster, "schedule", "rm", "Echo", "a", every_x["id"])
            assert removed.stdout.strip() == f"deleted schedule {every_x['id']} of Echo/a"

            # A destroy takes the instance's schedules with it.
            await c.destroy()
            assert await c.schedules() == []
            assert {s.name for s in await ps.schedules("Echo")} == {"a", "b"}

            # A deploy that removes a class deletes its schedules: they could only fail now.
            await ps.container("Gone", "g").schedule_every(60, "/g", no_wake=True, id="g")
            cluster.deploy(echo)
            assert await ps.schedules("Gone") == []

    metrics_address = controlplane.option("--metrics-listen")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{metrics_address}/metrics") as resp:
            text = await resp.text()
    for line in (
        'portside_controlplane_schedule_runs_total{result="ok"}',
        'portside_controlplane_schedule_runs_total{result="skipped"}',
        "portside_controlplane_schedule_lag_seconds_count",
        "portside_controlplane_schedule_run_seconds_count",
    ):
        assert line in text, line


async def test_ticks_run_once_each_across_a_leader_change(
    cluster: Cluster, test_image: str
) -> None:
    first = cluster.start_controlplane()
    second = cluster.start_controlplane()
    cluster.controlplane_address = f"{first.address},{second.address}"
    cluster.deploy(config(test_image, sleep_after="10m"))
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    async with portside.connect(cluster.controlplane_address) as ps:
        box = ps.container("Echo", "x")
        with watching(ps, cluster.store_revision()) as seen:
            await box.start()
            await box.schedule_every(0.5, "/tick", id="tick")
            # A one-off that answers after 4 s: in flight on the leader when it dies.
            await box.schedule(0.2, "/slow?4", id="slow")
            await eventually(lambda: len(ran(seen, "x", "tick")) >= 4, within=10)
            assert results(seen, "x", "slow") == []
            leads = [p for p in (first, second) if "is the leader" in p.log_text()]
            assert len(leads) == 1, [p.log_text()[-2000:] for p in (first, second)]
            cluster.stop(leads[0], signal.SIGKILL)
            killed_at = time.time()
            # The other replica leads within the leader lease (5 s) and runs the next ticks.
            await eventually(
                lambda: len([e for e in ran(seen, "x", "tick") if e.time > killed_at]) >= 4,
                within=30,
                what="ticks on the new leader",
            )
            # Its claimer gone (its registration expires within 10 s), the slow run is reported
            # lost, not run again.
            await eventually(lambda: results(seen, "x", "slow") != [], within=20, what="lost")
            (slow,) = results(seen, "x", "slow")
            assert slow.startswith("lost: replica ") and "stopped before recording" in slow, slow
            await box.delete_schedule("tick")
            runs = ran(seen, "x", "tick")
            await asyncio.sleep(1)  # time must pass: nothing more of the slow one may come
            assert len(ran(seen, "x", "slow")) == 1
    outcomes = [r.reason.split(": ", 1)[1] for r in runs]
    # A tick the dead leader had in flight is reported lost, never run again.
    assert all(o == "200" or o.startswith("lost: ") for o in outcomes), outcomes
    answered = sorted(e.time for e in runs if e.reason == "tick: 200")
    gaps = [later - earlier for earlier, later in zip(answered, answered[1:], strict=False)]
    # One tick run twice would answer twice within milliseconds; ticks are 0.5 s apart.
    assert min(gaps) > 0.25, gaps
    # The handover took about the leader lease (5 s); if a tick was in flight at the kill, the
    # dead replica's registration (10 s).
    assert max(gaps) < 15, gaps
