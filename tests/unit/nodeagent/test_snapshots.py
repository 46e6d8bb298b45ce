"""Unit tests of snapshots on the agent: the snapshot image's config (no container env), its
archive, and the instance manager's hooks (a boot waits for a commit, snapshot_on_sleep, a
container made from a snapshot on a Start or after a re-placement) over a fake runtime and a
fake snapshot service. tests/integration/test_agent_snapshots.py covers the real engine."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodeagent.instances import InstanceManager
from nodeagent.snapshots import (
    Source,
    Taken,
    new_layers,
    snapshot_archive,
    snapshot_config,
)
from portside.errors import EngineError, FailedPrecondition, Unavailable
from portside.events import Event, EventKind
from portside.snapshots import SLEEP, Snapshot
from portside.spec import Autoscaling, ContainerClass, instance_id
from portside.states import InstanceState
from tests.support import eventually
from tests.unit.nodeagent.test_instances import FAST, FakeRuntime, Probe

BASE = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
TOP = "sha256:" + "c" * 64
HISTORY = [
    {"created": "2026-01-01T00:00:00Z", "created_by": "COPY busybox /bin/busybox"},
    {"created": "2026-01-01T00:00:01Z", "created_by": "COPY www /www"},
]
COMMITTED: dict[str, Any] = {
    "architecture": "amd64",
    "os": "linux",
    "created": "2026-12-02T16:24:55Z",
    "container": "0123abcd",
    "docker_version": "20.10.24",
    "config": {"Env": ["PATH=/bin", "API_KEY=s3cret"], "Cmd": ["serve", "--token=s3cret"]},
    "container_config": {"Env": ["API_KEY=s3cret"], "Hostname": "0123abcd"},
    "rootfs": {"type": "layers", "diff_ids": [*BASE, TOP]},
    "history": [
        *HISTORY,
        {"created": "2026-12-02T16:24:55Z", "created_by": "serve --token=s3cret"},
    ],
}
SETTINGS = {"Env": ["PATH=/bin"], "Cmd": ["serve"], "WorkingDir": "/"}


def test_the_snapshot_config_has_the_base_settings_and_nothing_of_the_container() -> None:
    config = snapshot_config(COMMITTED, SETTINGS, "portside snapshot (create)")
    assert b"s3cret" not in config and b"0123abcd" not in config
    body = json.loads(config)
    assert body["config"] == SETTINGS
    assert body["rootfs"] == COMMITTED["rootfs"]
    assert (body["architecture"], body["os"], body["created"]) == (
        "amd64",
        "linux",
        "2026-12-02T16:24:55Z",
    )
    assert set(body) == {"architecture", "os", "created", "config", "rootfs", "history"}
    assert body["history"][:2] == HISTORY
    assert body["history"][2] == {
        "created": "2026-12-02T16:24:55Z",
        "created_by": "portside snapshot (create)",
    }
    # The same commit makes the same image: its id is the config's sha256.
    assert config == snapshot_config(COMMITTED, SETTINGS, "portside snapshot (create)")


def test_a_commit_that_added_no_layer_keeps_its_history_entry_empty() -> None:
    committed = {
        **COMMITTED,
        "rootfs": {"type": "layers", "diff_ids": BASE},
        "history": [*HISTORY, {"created": "t", "empty_layer": True}],
    }
    body = json.loads(snapshot_config(committed, SETTINGS, "portside snapshot (sleep)"))
    assert body["history"][-1] == {
        "created": "t",
        "empty_layer": True,
        "created_by": "portside snapshot (sleep)",
    }


@pytest.mark.parametrize(
    ("diff_ids", "added"),
    [([*BASE, TOP], (TOP,)), (BASE, ())],
)
def test_the_new_layers_are_those_above_the_image(diff_ids: list[str], added: tuple[str]) -> None:
    assert new_layers(diff_ids, BASE) == added


def test_a_commit_that_does_not_stand_on_its_image_is_refused() -> None:
    with pytest.raises(EngineError, match="do not begin with its image's"):
        new_layers([BASE[1], TOP], BASE)


async def test_the_archive_holds_the_manifest_the_config_and_the_given_layers(
    tmp_path: Path,
) -> None:
    layer = tmp_path / "top.tar"
    layer.write_bytes(b"x" * 1000)
    config = snapshot_config(COMMITTED, SETTINGS, "portside snapshot (create)")
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    reference = f"portside/web.snapshot:{digest[7:19]}"
    data = b"".join(
        [piece async for piece in snapshot_archive(config, reference, [*BASE, TOP], {TOP: layer})]
    )
    assert len(data) % 512 == 0
    archive = tarfile.open(fileobj=io.BytesIO(data))
    names = archive.getnames()
    assert names == ["manifest.json", f"{digest[7:]}.json", f"{TOP[7:]}/layer.tar"]
    [entry] = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert entry == {
        "Config": f"{digest[7:]}.json",
        "RepoTags": [reference],
        "Layers": [f"{d[7:]}/layer.tar" for d in (*BASE, TOP)],
    }
    assert archive.extractfile(names[1]).read() == config  # type: ignore[union-attr]
    assert archive.extractfile(names[2]).read() == b"x" * 1000  # type: ignore[union-attr]


# -- the instance manager's hooks ----------------------------------------------------------------

WEB = ContainerClass("web", "portside/web:0123456789ab", sleep_after_s=0.05, boot_timeout_s=1.0)
SNAP = Snapshot(
    id="0123456789ab",
    name="before",
    class_name="web",
    instance_name="a",
    digest="sha256:0123456789ab" + "0" * 52,
    reference="portside/web.snapshot:0123456789ab",
    image_digest="sha256:" + "e" * 64,
)


class FakeSnapshots:
    """Records what the manager asks; `take` holds the commit until `release` is set."""

    def __init__(self) -> None:
        self.latest_found: Snapshot | None = None
        self.latest_error: Exception | None = None
        self.asked: list[tuple[str, str]] = []
        self.taken: list[tuple[Source, str, str, str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.committing = asyncio.Event()
        self.top = TOP
        self.error: Exception | None = None

    async def latest(self, cls: ContainerClass, name: str) -> Snapshot | None:
        self.asked.append((cls.name, name))
        if self.latest_error is not None:
            raise self.latest_error
        return self.latest_found

    async def take(
        self,
        source: Source,
        name: str,
        trigger: str,
        *,
        committed: Callable[[], None],
        unchanged: str = "",
    ) -> Taken:
        self.taken.append((source, name, trigger, unchanged))
        self.committing.set()
        await self.release.wait()
        committed()
        if self.error is not None:
            raise self.error
        if trigger == SLEEP and self.top == unchanged:
            return Taken(None, self.top)
        return Taken(dataclasses.replace(SNAP, name=name or SNAP.id, trigger=trigger), self.top)


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


def manager_with(
    runtime: FakeRuntime, snapshots: FakeSnapshots, *classes: ContainerClass
) -> tuple[InstanceManager, list[Event]]:
    events: list[Event] = []
    by_name = {c.name: c for c in (classes or (WEB,))}
    manager = InstanceManager(
        runtime,
        by_name.get,
        timing=FAST,
        port_probe=Probe(),
        on_event=events.append,
        snapshots=snapshots,
    )
    return manager, events


def kinds(events: list[Event]) -> list[EventKind]:
    return [e.kind for e in events]


async def slept(manager: InstanceManager, cls: ContainerClass, name: str) -> None:
    """Idle for its sleep_after, it is put to sleep (the sleep loop's step)."""
    await asyncio.sleep(cls.sleep_after_s)
    assert manager.sleep_idle() == [instance_id(cls.name, name)]
    await eventually(
        lambda: manager.info(instance_id(cls.name, name)).state is InstanceState.SLEEPING
    )


async def test_a_boot_waits_for_the_commit_of_its_container(runtime: FakeRuntime) -> None:
    snapshots = FakeSnapshots()
    manager, events = manager_with(runtime, snapshots)
    iid = instance_id(WEB.name, "a")
    await manager.start(WEB, "a")
    await manager.stop(iid)
    snapshots.release.clear()
    taking = asyncio.create_task(manager.take_snapshot(iid, "before"))
    await snapshots.committing.wait()
    runtime.calls.clear()
    wake = asyncio.create_task(manager.acquire(WEB, "a"))
    await asyncio.sleep(0.05)
    assert not wake.done() and ("start", next(iter(runtime.containers))) not in runtime.calls
    snapshots.release.set()
    (await wake).release()
    taken = await taking
    assert taken is not None and taken.name == "before"
    [(source, name, trigger, _)] = snapshots.taken
    assert (source.instance_id, source.class_name, name, trigger) == (
        iid,
        "web",
        "before",
        "create",
    )
    assert source.class_image == WEB.image  # no digest: the reference
    taken_events = [e for e in events if e.kind is EventKind.SNAPSHOT_TAKEN]
    assert [e.reason for e in taken_events] == [f"{SNAP.id} (0 B)"]


async def test_a_snapshot_without_a_container_is_refused(runtime: FakeRuntime) -> None:
    manager, _ = manager_with(runtime, FakeSnapshots())
    runtime.create_error = Unavailable("the engine said no")
    with pytest.raises(Unavailable):
        await manager.start(WEB, "a")
    with pytest.raises(FailedPrecondition, match="has no container yet"):
        await manager.take_snapshot(instance_id(WEB.name, "a"))


async def test_snapshot_on_sleep_takes_one_after_each_sleep_that_follows_a_run(
    runtime: FakeRuntime,
) -> None:
    cls = dataclasses.replace(WEB, snapshot_on_sleep=True)
    snapshots = FakeSnapshots()
    manager, events = manager_with(runtime, snapshots, cls)
    iid = instance_id(cls.name, "a")
    (await manager.acquire(cls, "a")).release()
    await slept(manager, cls, "a")
    await eventually(lambda: len(snapshots.taken) == 1, within=5)
    assert manager.info(iid).state is InstanceState.SLEEPING
    assert [t[2:] for t in snapshots.taken] == [("sleep", "")]
    await eventually(lambda: EventKind.SNAPSHOT_TAKEN in kinds(events))

    # It ran again and its layer is what it was: the commit is made, nothing is recorded.
    (await manager.acquire(cls, "a")).release()
    await slept(manager, cls, "a")
    await eventually(lambda: len(snapshots.taken) == 2, within=5)
    assert snapshots.taken[1][3] == TOP
    await asyncio.sleep(0.05)
    assert kinds(events).count(EventKind.SNAPSHOT_TAKEN) == 1


async def test_a_failed_sleep_snapshot_leaves_the_sleep_as_it_is(
    runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    cls = dataclasses.replace(WEB, snapshot_on_sleep=True)
    snapshots = FakeSnapshots()
    snapshots.error = Unavailable("the control plane is unreachable: connection refused")
    manager, _ = manager_with(runtime, snapshots, cls)
    (await manager.acquire(cls, "a")).release()
    await slept(manager, cls, "a")
    await eventually(lambda: "no snapshot after its sleep" in caplog.text, within=5)
    assert manager.info(instance_id(cls.name, "a")).state is InstanceState.SLEEPING
    [line] = [r.getMessage() for r in caplog.records if "no snapshot" in r.getMessage()]
    assert line == (
        "web/a: no snapshot after its sleep: the control plane is unreachable: connection refused"
    )
    # It wakes as ever.
    (await manager.acquire(cls, "a")).release()


async def test_without_snapshot_on_sleep_a_sleep_takes_none(runtime: FakeRuntime) -> None:
    snapshots = FakeSnapshots()
    manager, _ = manager_with(runtime, snapshots)
    (await manager.acquire(WEB, "a")).release()
    await slept(manager, WEB, "a")
    await asyncio.sleep(0.05)
    assert snapshots.taken == []


async def test_the_first_container_here_starts_from_the_latest_snapshot(
    runtime: FakeRuntime,
) -> None:
    snapshots = FakeSnapshots()
    snapshots.latest_found = SNAP
    manager, events = manager_with(runtime, snapshots)
    (await manager.acquire(WEB, "a")).release()
    assert snapshots.asked == [("web", "a")]
    [container] = runtime.containers.values()
    assert container.snapshot_id == SNAP.id
    [restored] = [e for e in events if e.kind is EventKind.SNAPSHOT_RESTORED]
    assert restored.reason == f"{SNAP.id} (before): placed anew after its node was lost"
    # Its next wake is of that container: nothing is asked again.
    await slept(manager, WEB, "a")
    (await manager.acquire(WEB, "a")).release()
    assert snapshots.asked == [("web", "a")]
    assert len(runtime.containers) == 1


async def test_a_first_container_fails_its_boot_when_the_control_plane_cannot_say(
    runtime: FakeRuntime,
) -> None:
    snapshots = FakeSnapshots()
    snapshots.latest_error = Unavailable("cannot make the first container of web/a: ...")
    manager, _ = manager_with(runtime, snapshots)
    with pytest.raises(Unavailable, match="cannot make the first container"):
        await manager.acquire(WEB, "a")
    assert runtime.containers == {}
    # Once it can be asked, the boot goes on (and asks again: nothing was remembered).
    snapshots.latest_error = None
    (await manager.acquire(WEB, "a")).release()
    assert len(snapshots.asked) == 2 and len(runtime.containers) == 1


async def test_pool_members_never_ask_for_a_snapshot(runtime: FakeRuntime) -> None:
    pool = dataclasses.replace(WEB, name="pool", autoscaling=Autoscaling(1, 2, 50))
    snapshots = FakeSnapshots()
    manager, _ = manager_with(runtime, snapshots, pool)
    (await manager.acquire(pool, "p-1")).release()
    assert snapshots.asked == []


async def test_a_start_from_a_snapshot_makes_the_container_again(runtime: FakeRuntime) -> None:
    snapshots = FakeSnapshots()
    manager, events = manager_with(runtime, snapshots)
    iid = instance_id(WEB.name, "a")
    await manager.start(WEB, "a")
    with pytest.raises(FailedPrecondition, match="stop it before starting it from snapshot"):
        await manager.start(WEB, "a", snapshot=SNAP)
    [old] = runtime.containers
    await manager.stop(iid)
    await manager.start(WEB, "a", snapshot=SNAP)
    [container] = runtime.containers.values()
    assert container.id == old  # the fake names containers by instance; it was made again:
    assert [c for c in runtime.calls if c[0] == "create"] == [("create", "a")] * 2
    assert container.snapshot_id == SNAP.id and container.running
    [restored] = [e for e in events if e.kind is EventKind.SNAPSHOT_RESTORED]
    assert restored.reason == f"{SNAP.id} (before)"
