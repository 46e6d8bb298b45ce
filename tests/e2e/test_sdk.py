"""The SDK (`portside.connect`, `portside.connect_sync`) against a real cluster: every
container verb, exec with streamed output and stdin, signals the container sees, events (and a
watch that resumes after the control plane restarts), state values, listing, fetch through the
edge, and the errors users get."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from functools import partial

import pytest

import portside
from tests.e2e.harness import Cluster
from tests.support import eventually

pytestmark = pytest.mark.e2e

# Records the signals it gets, serves the echo endpoints, and exits 7 on SIGTERM.
TRAPPING = [
    "/bin/sh",
    "-c",
    'mkdir -p /tmp; echo "started with GREETING=$GREETING"; '
    "trap 'echo got HUP >> /tmp/signals' HUP; "
    "trap 'echo got TERM; exit 7' TERM; "
    'nc -ll -p "${PORT:-8080}" -e /app/serve & '
    "while true; do wait; done",
]


async def signals_recorded(box: portside.Container, expected: bytes) -> bool:
    """Whether TRAPPING has recorded just `expected` of the signals it got."""
    got = await box.exec(["cat", "/tmp/signals"])
    assert got.stdout == expected, got.stdout
    return True


def config(image: str) -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "10m"
env = {{ FROM_CLASS = "yes" }}

[[routes]]
path = "/sdk"
class_name = "Echo"
instance = "header:Portside-Instance"

[[routes]]
path = "/session"
class_name = "Echo"
instance = "header:X-Session-Id"
"""


@pytest.fixture
def edge(cluster: Cluster, test_image: str) -> str:
    """A cluster of one control plane, one agent in fra and one edge; returns the edge URL."""
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    proc = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    return f"http://{proc.address}"


async def test_start_exec_fetch_state_stop_destroy(cluster: Cluster, edge: str) -> None:
    async with portside.connect(cluster.controlplane_address, edge=edge) as ps:
        box = ps.container("Echo", name="s1")
        info = await box.start(env={"MODE": "sandbox"})
        assert (info.class_name, info.name, info.state) == ("Echo", "s1", "healthy")
        assert info.node_id.startswith(cluster.tag) and info.region == "fra"

        result = await box.exec(["sh", "-c", "echo $MODE $FROM_CLASS; echo oops >&2; exit 7"])
        assert (result.exit_code, result.stdout, result.stderr) == (7, b"sandbox yes\n", b"oops\n")
        result = await box.exec(["sh", "-c", "echo $A; pwd"], env={"A": "b"}, workdir="/www")
        assert result.ok and result.stdout == b"b\n/www\n"
        big = bytes(range(256)) * 1024
        assert (await box.exec(["cat"], stdin=big)).stdout == big

        async def pieces() -> AsyncIterator[bytes]:
            for piece in (b"one ", b"two ", b"three"):
                yield piece
                await asyncio.sleep(0.05)  # time must pass: stdin arrives as a stream, not at once

        assert (await box.exec(["cat"], stdin=pieces())).stdout == b"one two three"

        chunks = [
            c async for c in box.exec_stream(["sh", "-c", "echo a; sleep 0.3; echo b >&2; exit 3"])
        ]
        assert [(c.stream, c.data) for c in chunks[:-1]] == [("stdout", b"a\n"), ("stderr", b"b\n")]
        assert chunks[-1] == portside.ExecChunk("exit", exit_code=3)

        # fetch goes through the edge; the /sdk route reads the Portside-Instance header.
        who = await box.fetch("/sdk/whoami")
        assert who.status == 200 and who.text.split()[1] == "s1", who
        posted = await box.fetch(
            "/session/run", method="POST", data=b"print(1)", name_header="X-Session-Id"
        )
        assert posted.status == 200 and posted.text == "POST /session/run\nprint(1)"
        again = await box.fetch("/sdk/whoami")
        assert again.text.split()[0] == who.text.split()[0]  # the same container
        missing = await box.fetch("/nowhere")
        assert missing.status == 404 and missing.error == "no-route"

        assert (await box.state()).state == "healthy"
        await box.renew_activity()
        stopped = await box.stop(grace=2)
        assert stopped.state in ("stopped", "stopped_with_code"), stopped
        with pytest.raises(portside.FailedPrecondition):
            await box.exec(["true"])
        assert (await box.start()).state == "healthy"  # same instance, woken again
        await box.destroy()
        with pytest.raises(portside.NotFound):
            await box.state()


async def test_signals_logs_and_events(cluster: Cluster, edge: str) -> None:
    async with portside.connect(cluster.controlplane_address, edge=edge) as ps:
        box = ps.container("Echo", name="sig")
        seen: list[portside.Event] = []
        # From a revision before its events: however late the watch opens, it sees them all.
        since = cluster.store_revision()

        async def watch() -> None:
            async for event in box.events(after_revision=since):
                seen.append(event)
                if event.kind == "removed":
                    return

        watcher = asyncio.create_task(watch())
        await box.start(entrypoint=TRAPPING, env={"GREETING": "hi"})
        # One at a time: two of the same signal sent at once may arrive as one.
        for count, sig in ((1, signal.SIGHUP), (2, int(signal.SIGHUP))):
            await box.signal(sig)
            recorded = partial(signals_recorded, box, b"got HUP\n" * count)
            await eventually(recorded, within=10, what=f"{count} HUP recorded")

        await box.stop(signal=signal.SIGTERM, grace=5)
        info = await box.state()
        assert info.exit_code == 7, info
        logs = b"".join([c.data async for c in box.logs() if c.stream == "stdout"])
        assert b"started with GREETING=hi" in logs and b"got TERM" in logs
        tail = b"".join([c.data async for c in box.logs(tail=1)])
        assert tail == b"got TERM\n"
        with pytest.raises(portside.FailedPrecondition):
            await box.signal(signal.SIGHUP)
        await box.destroy()
        await asyncio.wait_for(watcher, 20)

    kinds = [e.kind for e in seen]
    for kind in ("starting", "ready", "exited", "removed"):
        assert kind in kinds, kinds
    assert kinds.index(portside.EventKind.READY) < kinds.index(portside.EventKind.EXITED)
    assert kinds.index(portside.EventKind.EXITED) < kinds.index(portside.EventKind.REMOVED)
    exited = seen[kinds.index(portside.EventKind.EXITED)]
    assert exited.exit_code == 7 and exited.name == "sig" and exited.node_id
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions)) and revisions[0] > 0


async def test_event_watch_resumes_after_a_controlplane_restart(
    cluster: Cluster, edge: str
) -> None:
    async with portside.connect(cluster.controlplane_address, edge=edge) as ps:
        # From a revision before "before" starts: however late the watch opens, it sees it.
        events = ps.events("Echo", after_revision=cluster.store_revision())
        seen: list[portside.Event] = []

        async def watch() -> None:
            async for event in events:
                seen.append(event)
                if event.name == "after" and event.kind == "ready":
                    return

        watcher = asyncio.create_task(watch())
        await ps.container("Echo", "before").start()
        # The watch has a revision to resume from before the control plane goes.
        await eventually(
            lambda: any(e.name == "before" and e.kind == "ready" for e in seen),
            within=10,
            what="the watch saw before's ready",
        )

        (controlplane,) = [p for p in cluster.procs if p.name.startswith("controlplane")]
        cluster.stop(controlplane)
        cluster.restart(controlplane)
        # The agent's heartbeat reconnects with backoff (up to 2 s): until it has, the new
        # replica may know no live node (the stop's grace can outlast the node's lease).
        cluster.wait_for_nodes(1)
        await ps.container("Echo", "after").start()
        await asyncio.wait_for(watcher, 30)

    names = [(e.name, e.kind) for e in seen]
    assert ("after", "starting") in names and ("after", "ready") in names, names
    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions)), revisions


async def test_state_values_listing_and_errors(cluster: Cluster, edge: str) -> None:
    async with portside.connect(cluster.controlplane_address, edge=edge) as ps:
        box = ps.container("Echo", "values")
        await box.start(hint="weur")
        await box.put_state_value("progress", b"42")
        await box.put_state_value("note", "text is stored as UTF-8")
        assert await box.get_state_value("progress") == b"42"
        assert await box.get_state_value("note") == b"text is stored as UTF-8"
        assert await box.delete_state_value("progress") is True
        assert await box.delete_state_value("progress") is False
        with pytest.raises(portside.NotFound):
            await box.get_state_value("progress")
        with pytest.raises(portside.InvalidArgument, match="64"):
            await box.put_state_value("big", b"x" * (64 * 1024 + 1))
        with pytest.raises(portside.InvalidArgument):
            await box.put_state_value("bad key!", b"x")

        (cls,) = await ps.classes()
        assert (cls.name, cls.default_port, cls.instance_type.name, dict(cls.env)) == (
            "Echo",
            8080,
            "lite",
            {"FROM_CLASS": "yes"},
        )
        (node,) = await ps.nodes()
        assert node.node.region == "fra" and node.alive and node.instances >= 1
        listed = await ps.instances("Echo")
        assert [(i.class_name, i.name, i.node_id) for i in listed] == [
            ("Echo", "values", node.node.id)
        ]
        assert await ps.instances(node="elsewhere") == []

        # Listed states are as the node last reported them (every heartbeat).
        async def listed_healthy() -> bool:
            return [i.name for i in await ps.instances(state="healthy")] == ["values"]

        await eventually(listed_healthy, within=10)
        assert await ps.instances(state=portside.InstanceState.STOPPED) == []
        with pytest.raises(portside.InvalidArgument, match="stopped_with_code"):
            await ps.instances(state="exited")

        with pytest.raises(portside.NotFound):
            await ps.container("Nope", "x").start()
        with pytest.raises(portside.InvalidArgument):
            await ps.container("Echo", "x").start(hint="atlantis")
        with pytest.raises(portside.NotFound):
            await ps.container("Echo", "never-started").signal(signal.SIGHUP)
        with pytest.raises(portside.ContainerExited) as exited:
            await ps.container("Echo", "crash").start(entrypoint=["/bin/sh", "-c", "exit 3"])
        assert "3" in str(exited.value) and exited.value.exit_code == 3
        with pytest.raises(portside.NotFound, match="never placed"):
            await ps.container("Echo", "x").exec(["true"])


def test_sync_client(cluster: Cluster, edge: str) -> None:
    with portside.connect_sync(cluster.controlplane_address, edge=edge) as ps:
        box = ps.container("Echo", name="sync")
        assert box.start(env={"MODE": "sync"}).state == "healthy"
        assert box.exec(["sh", "-c", "echo $MODE"]).stdout == b"sync\n"
        assert box.exec(["cat"], stdin=iter([b"a", b"b"])).stdout == b"ab"
        assert box.fetch("/sdk/whoami").text.split()[1] == "sync"
        assert [i.name for i in ps.instances()] == ["sync"]
        box.put_state_value("k", b"v")
        assert box.get_state_value("k") == b"v"
        chunks = list(box.exec_stream(["echo", "hi"]))
        assert chunks[0].data == b"hi\n" and chunks[-1].exit_code == 0
        box.destroy()
