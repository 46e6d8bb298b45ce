"""Pause session: idle sessions are frozen, not stopped, and thaw in milliseconds with their
memory as it was.

The class sleeps with sleep_mode "pause" (sleep_after 2s, pause_max 6s). The session writes a
note into its memory (/dev/shm, which a stop empties) through the edge, goes idle and is frozen;
the next request thaws the same process and reads the note back. Left alone for pause_max, it is
stopped and asleep: the next request boots a new process, and the note is gone.

    python examples/pause-session/main.py --controlplane 127.0.0.1:7070 --edge 127.0.0.1:8787
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


async def deploy(ps: portside.Portside, image: str) -> None:
    """Deploy this example's portside.toml with `image` in it."""
    text = (HERE / "portside.toml").read_text().replace(TEST_IMAGE, image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "portside.toml"
        path.write_text(text)
        await ps.deploy(path)


async def until(box: portside.Container, state: portside.InstanceState, within: float) -> None:
    """Wait until the session is in `state`."""
    start = time.monotonic()
    while (await box.state()).state is not state:
        if time.monotonic() - start > within:
            raise SystemExit(f"{box.name} was not {state} within {within:g}s")
        await asyncio.sleep(0.1)


async def collect(box: portside.Container, into: list[portside.Event]) -> None:
    async for event in box.events():
        into.append(event)


async def read_note(box: portside.Container) -> tuple[int, str, float]:
    """GET /state: its status, its text and how long it took, in ms."""
    start = time.perf_counter()
    resp = await box.fetch("/state")
    return resp.status, resp.text, (time.perf_counter() - start) * 1000


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlplane", default=os.environ.get("PORTSIDE_CONTROLPLANE"))
    parser.add_argument("--edge", default=os.environ.get("PORTSIDE_EDGE"))
    parser.add_argument("--image", default=os.environ.get("PORTSIDE_EXAMPLE_IMAGE", TEST_IMAGE))
    parser.add_argument("--no-deploy", action="store_true", help="the class is deployed already")
    parser.add_argument("--name", default=f"session-{secrets.token_hex(3)}")
    parser.add_argument("--note", default="draft-1")
    args = parser.parse_args()

    paused, sleeping = portside.InstanceState.PAUSED, portside.InstanceState.SLEEPING
    async with asyncio.timeout(90), portside.connect(args.controlplane, edge=args.edge) as ps:
        if not args.no_deploy:
            await deploy(ps, args.image)
        box = ps.container("Session", args.name)
        events: list[portside.Event] = []
        watch = asyncio.create_task(collect(box, events))
        try:
            wrote = await box.fetch("/state", params={"write": args.note})
            if wrote.status != 200:
                raise SystemExit(f"writing the note failed: {wrote.status} {wrote.text}")
            print(f"{args.name}: wrote {args.note!r} into its memory")

            await until(box, paused, within=10)
            print(f"{args.name}: idle for 2s, paused: frozen, its memory kept, no CPU used")
            status, text, ms = await read_note(box)
            state = (await box.state()).state
            print(f"{args.name}: a request thawed it in {ms:.0f} ms: {text!r} ({status}), {state}")

            await until(box, paused, within=10)
            await until(box, sleeping, within=15)
            print(f"{args.name}: paused again, then stopped after pause_max: {sleeping}")
            status, text, ms = await read_note(box)
            print(f"{args.name}: a request booted a new process in {ms:.0f} ms: {status} {text!r}")
        finally:
            watch.cancel()
        said = [f"{e.kind}" + (f" ({e.reason})" if e.reason else "") for e in events]
        print("events: " + ", ".join(said))
        await box.destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except portside.PortsideError as exc:
        sys.exit(f"pause-session: {exc}")
