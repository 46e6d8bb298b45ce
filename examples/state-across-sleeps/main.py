"""State across sleeps: on exit, read the state out of the container and save it beside the
instance with put_state_value; on start, load it back in.

The container keeps its notes in memory (/dev/shm, which is empty again after every stop,
like a process's memory). Each round: start, load the saved notes back, add a line, read the
notes out and save them, stop. Without the save and the load, every round would start empty.
State values live in the store, so they also survive the instance moving to another node.

    python examples/state-across-sleeps/main.py --controlplane 127.0.0.1:7070 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
from pathlib import Path

import portside

HERE = Path(__file__).resolve().parent
TEST_IMAGE = "portside-test/echo:latest"
NOTES = "/dev/shm/notes"
KEY = "notes"


async def deploy(ps: portside.Portside, image: str) -> None:
    text = (HERE / "portside.toml").read_text().replace(TEST_IMAGE, image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "portside.toml"
        path.write_text(text)
        await ps.deploy(path)


async def on_start(box: portside.Container) -> int:
    """Load the saved notes back into the container; returns how many lines came back."""
    try:
        saved = await box.get_state_value(KEY)
    except portside.NotFound:
        saved = b""  # the first start: nothing saved yet
    loaded = await box.exec(["sh", "-c", f"cat > {NOTES}"], stdin=saved)
    if not loaded.ok:
        raise SystemExit(f"loading the notes failed: {loaded.stderr.decode()}")
    return saved.count(b"\n")


async def on_exit(box: portside.Container) -> bytes:
    """Read the notes out of the container and save them beside the instance."""
    notes = await box.exec(["cat", NOTES])
    if not notes.ok:
        raise SystemExit(f"reading the notes failed: {notes.stderr.decode()}")
    await box.put_state_value(KEY, notes.stdout)
    return notes.stdout


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlplane", default=os.environ.get("PORTSIDE_CONTROLPLANE"))
    parser.add_argument("--image", default=os.environ.get("PORTSIDE_EXAMPLE_IMAGE", TEST_IMAGE))
    parser.add_argument("--no-deploy", action="store_true", help="the class is deployed already")
    parser.add_argument("--name", default=f"notebook-{secrets.token_hex(3)}")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    async with asyncio.timeout(120), portside.connect(args.controlplane) as ps:
        if not args.no_deploy:
            await deploy(ps, args.image)
        box = ps.container("Notebook", name=args.name)
        for round_ in range(1, args.rounds + 1):
            info = await box.start()
            in_memory = (await box.exec(["sh", "-c", f"cat {NOTES} 2>/dev/null | wc -l"])).text
            restored = await on_start(box)
            await box.exec(["sh", "-c", f"echo 'round {round_} on {info.node_id}' >> {NOTES}"])
            saved = (await on_exit(box)).count(b"\n")
            await box.stop(grace=2)
            print(
                f"round {round_}: found {in_memory.strip()} lines in memory after start, "
                f"restored {restored}, saved {saved}",
                flush=True,
            )
        print("notes:\n" + (await box.get_state_value(KEY)).decode(), end="")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except portside.PortsideError as exc:
        sys.exit(f"state-across-sleeps: {exc}")
