"""Snapshot workspace: a per-user workspace whose files are kept as snapshots, taken at every
sleep and by hand, and forked into a second workspace.

The class sleeps after 2s idle with snapshot_on_sleep: each sleep that changed the workspace's
files (its container's writable layer; not its memory) takes a snapshot, and a workspace whose
node is lost starts elsewhere from its latest. The script writes a file into the workspace, lets
it sleep and shows the snapshot the sleep took, takes one by hand ("before-upgrade"), starts a
second workspace from it (a fork) and reads the file there, lists the snapshots, and cleans up.

    python examples/snapshot-workspace/main.py --controlplane 127.0.0.1:7070 --user ada
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import portside

HERE = Path(__file__).resolve().parent
TEST_IMAGE = "portside-test/echo:latest"
CLASS = "Workspace"
NOTES = "/workspace/notes.txt"  # on the container's filesystem, which snapshots keep


async def deploy(ps: portside.Portside, image: str) -> None:
    """Deploy this example's portside.toml with `image` in it."""
    text = (HERE / "portside.toml").read_text().replace(TEST_IMAGE, image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "portside.toml"
        path.write_text(text)
        await ps.deploy(path)


async def sleep_snapshot(ps: portside.Portside, box: portside.Container) -> portside.Snapshot:
    """Wait until the workspace is asleep and its sleep's snapshot is recorded."""
    start = time.monotonic()
    while time.monotonic() - start < 20:
        if (await box.state()).state is portside.InstanceState.SLEEPING:
            taken = [s for s in await ps.snapshots(CLASS, box.name) if s.trigger == "sleep"]
            if taken:
                return taken[0]
        await asyncio.sleep(0.2)
    raise SystemExit(f"{box.name}: no sleep snapshot within 20s")


async def read_notes(box: portside.Container) -> str:
    notes = await box.exec(["cat", NOTES])
    if not notes.ok:
        raise SystemExit(f"{box.name}: reading {NOTES} failed: {notes.stderr.decode()}")
    return notes.text.strip()


def kib(snapshot: portside.Snapshot) -> str:
    return f"{snapshot.layer_bytes / 1024:.1f} KiB"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlplane", default=os.environ.get("PORTSIDE_CONTROLPLANE"))
    parser.add_argument("--image", default=os.environ.get("PORTSIDE_EXAMPLE_IMAGE", TEST_IMAGE))
    parser.add_argument("--no-deploy", action="store_true", help="the class is deployed already")
    parser.add_argument("--user", default=f"user-{secrets.token_hex(3)}", help="whose workspace")
    args = parser.parse_args()

    async with asyncio.timeout(120), portside.connect(args.controlplane) as ps:
        if not args.no_deploy:
            await deploy(ps, args.image)
        box = ps.container(CLASS, args.user)
        await box.start()
        note = f"draft 1 by {args.user}"
        script = f"mkdir -p {os.path.dirname(NOTES)} && echo '{note}' > {NOTES}"
        wrote = await box.exec(["sh", "-c", script])
        if not wrote.ok:
            raise SystemExit(f"writing {NOTES} failed: {wrote.stderr.decode()}")
        print(f"{box.name}: wrote {note!r} into {NOTES}")

        slept = await sleep_snapshot(ps, box)
        print(f"{box.name}: idle for 2s, asleep; its sleep took snapshot {slept.id} ({kib(slept)})")

        snap = await box.snapshot(name="before-upgrade")
        print(f"{box.name}: snapshot {snap.id} ({snap.name}) taken by hand while it sleeps")

        fork = ps.container(CLASS, f"{args.user}-fork")
        info = await fork.start(snapshot=snap)
        notes = await read_notes(fork)
        print(f"{fork.name}: started from {snap.name} ({info.state}); {NOTES}: {notes!r}")

        print(f"snapshots of {CLASS}/{box.name}, newest first:")
        for s in await ps.snapshots(CLASS, box.name):
            print(f"  {s.name:<15} {s.trigger:<7} {kib(s)} of writable layer")

        await fork.destroy()
        await box.destroy()
        # The fork may have slept (and taken a snapshot) too: every snapshot of either goes.
        names = (box.name, fork.name)
        ours = [s for s in await ps.snapshots(CLASS) if s.instance_name in names]
        for s in ours:
            await ps.delete_snapshot(CLASS, s.id)
        left = [s for s in await ps.snapshots(CLASS) if s.instance_name in names]
        print(
            f"destroyed {box.name} and {fork.name}; deleted {len(ours)} snapshots, {len(left)} left"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except portside.PortsideError as exc:
        sys.exit(f"snapshot-workspace: {exc}")
