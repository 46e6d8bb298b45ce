"""Issue 13, snapshots: a named instance's filesystem kept in the cluster's image store and
restored — `portside snapshot create|list|delete`, `portside start --snapshot` into another name
(a fork), a class's `snapshot_on_sleep`, and a named instance whose node is lost starting on the
other node from its latest snapshot. One cluster of two agents on this machine's engine.

The test image is built from a Dockerfile (so the class has an image digest) with a mark written
into /data/state at build: `/state` answers the mark in a fresh container, and what was written
since (`/state?write=...`) in a kept or restored one."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence

import aiohttp
import pytest

import portside
from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_images import build_dir
from tests.e2e.test_named_instances import get
from tests.support import eventually

pytestmark = pytest.mark.e2e

LAYER_BYTES = 300_000  # what the test writes into an instance's writable layer, at least


def config(keep_mark: str, nap_mark: str) -> str:
    """Keep: awake for minutes (snapshots by hand). Nap: asleep after 1 s idle, a snapshot at
    every sleep that changed its filesystem."""
    return f"""
[[containers]]
class_name = "Keep"
image = "./app"
image_vars = {{ MARK = "{keep_mark}" }}
instance_type = "lite"
sleep_after = "10m"

[[containers]]
class_name = "Nap"
image = "./app"
image_vars = {{ MARK = "{nap_mark}" }}
instance_type = "lite"
sleep_after = "1s"
snapshot_on_sleep = true

[[routes]]
path = "/nap"
class_name = "Nap"
instance = "header:X-Session-Id"
"""


def cli(cluster: Cluster, *args: str) -> str:
    out = subprocess.run(
        [*PORTSIDE, *args, "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"portside {' '.join(args)}: {out.stderr}"
    return out.stdout


def listed(cluster: Cluster, *where: str) -> list[dict[str, object]]:
    snapshots: list[dict[str, object]] = json.loads(
        cli(cluster, "snapshot", "list", *where, "--json")
    )
    return snapshots


async def kinds_after(box: portside.Container, revision: int, kind: str, within: float) -> None:
    """Until an event of `kind` of the instance after `revision` has come."""

    async def first() -> None:
        async for event in box.events(after_revision=revision):
            if event.kind == kind:
                return

    await asyncio.wait_for(first(), within)


async def test_snapshot_fork_sleep_and_restore_after_node_loss(cluster: Cluster) -> None:
    cluster.start_controlplane()
    build_dir(cluster.tmp)
    keep_mark, nap_mark = ("mark-" + secrets.token_hex(3) for _ in range(2))
    cluster.deploy(config(keep_mark, nap_mark))
    fra = cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("sin", "127.0.0.3")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(2)
    nap_url = f"http://{edge.address}/nap/state"

    async with portside.connect(cluster.controlplane_address) as ps:
        # --- by hand: create, list, fork into another name, delete ---
        original = ps.container("Keep", "original")
        await original.start(hint="fra")
        write = f"printf kept > /data/state && head -c {LAYER_BYTES} /dev/urandom > /data/blob"
        assert (await original.exec(["sh", "-c", write])).exit_code == 0
        created = cli(cluster, "snapshot", "create", "Keep", "original", "--name", "first")
        assert created.startswith("created snapshot ") and "(first) of Keep/original" in created
        (first,) = listed(cluster, "Keep")
        assert (first["name"], first["instance_name"], first["trigger"]) == (
            "first",
            "original",
            "create",
        )
        assert isinstance(first["layer_bytes"], int) and first["layer_bytes"] >= LAYER_BYTES
        assert first["image_digest"] == (await ps.classes())[0].image_digest
        table = cli(cluster, "snapshot", "list", "Keep", "original")
        assert "LAYER" in table and f"{first['id']}  first  Keep/original" in table
        with pytest.raises(portside.AlreadyExists):
            await original.snapshot("first")

        cli(cluster, "start", "Keep", "fork", "--snapshot", "first")
        fork = ps.container("Keep", "fork")
        assert (await fork.exec(["cat", "/data/state"])).stdout == b"kept"
        assert (await ps.container("Keep", "fresh").start()).state == "healthy"
        assert (await ps.container("Keep", "fresh").exec(["cat", "/data/state"])).stdout == (
            keep_mark + "\n"
        ).encode()

        deleted = cli(cluster, "snapshot", "delete", "Keep", "first")
        assert deleted.startswith(f"deleted snapshot {first['id']} (first)")
        assert listed(cluster, "Keep") == []
        with pytest.raises(portside.NotFound):
            await ps.container("Keep", "late").start(snapshot="first")

        # --- snapshot_on_sleep: a sleep that changed the filesystem takes one, one that did not
        # takes none ---
        async with aiohttp.ClientSession() as http:
            status, text, _ = await get(http, f"{nap_url}?write=napped", "sleeper", "fra")
            assert (status, text) == (200, "wrote napped"), text
            nap = ps.container("Nap", "sleeper")

            async def one_sleep_snapshot() -> Sequence[portside.Snapshot]:
                found = await ps.snapshots("Nap", "sleeper")
                assert [f.trigger for f in found] == ["sleep"], found
                return found

            (slept,) = await eventually(one_sleep_snapshot, within=20, what="a sleep snapshot")
            assert slept.layer_bytes > 0
            status, text, _ = await get(http, nap_url, "sleeper")  # wakes it; changes nothing
            assert (status, text) == (200, "napped"), text
            await eventually(
                lambda: asleep(nap), within=20, every=0.2, what="Nap/sleeper asleep again"
            )
            await asyncio.sleep(2.0)  # a snapshot of that sleep would have been recorded by now
            assert [s.id for s in await ps.snapshots("Nap", "sleeper")] == [slept.id]

            # --- node loss: the instance is placed anew on the other node and starts from its
            # latest snapshot ---
            revision = cluster.store_revision()
            fra_node = fra.option("--node-id")
            os.kill(fra.popen.pid, signal.SIGKILL)
            lost_at = time.monotonic()

            async def fra_gone() -> bool:
                return fra_node not in [n.node.id for n in await ps.nodes()]

            await eventually(fra_gone, within=20, every=0.3, what="node fra's lease expired")
            status, text, _ = await get(http, nap_url, "sleeper")
            print(f"\nanswered from the other node {time.monotonic() - lost_at:.1f}s after loss")
            assert (status, text) == (200, "napped"), text
            info = await nap.state()
            assert info.node_id != fra_node and info.region == "sin"
            await kinds_after(nap, revision, "snapshot-restored", within=10)
            (restored,) = [s for s in await ps.snapshots("Nap") if s.id == slept.id]
            assert restored.expires_at > slept.expires_at  # a restore refreshes it

            # --- destroyed, then started again: fresh, not from a snapshot ---
            await nap.destroy()
            status, text, _ = await get(http, nap_url, "sleeper")
            assert (status, text) == (200, nap_mark), text

        # --- a snapshot is tied to the image it was taken on ---
        cluster.deploy(config(keep_mark, "mark-" + secrets.token_hex(3)))

        async def new_image() -> bool:
            (_, nap_class) = await ps.classes()
            return nap_class.image_digest != slept.image_digest

        await eventually(new_image, within=10, what="Nap deployed with a new image")
        with pytest.raises(portside.FailedPrecondition, match="tied to their image version"):
            await ps.container("Nap", "other").start(snapshot=slept.id)


async def asleep(box: portside.Container) -> bool:
    return (await box.state()).state == "sleeping"
