"""CI builder: start a container with a build as its entrypoint, watch for its exit, and
record success or failure with the exit code.

Builds run concurrently, one instance each. The exit is seen through the instance's events
(`exited`, with the exit code); the instance's state is polled alongside as a safety net, in
case the build ends before the watch is open. The build's output comes from its logs.

    python examples/ci-builder/main.py --controlplane 127.0.0.1:7070 --results results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import portside

HERE = Path(__file__).resolve().parent
TEST_IMAGE = "portside-test/echo:latest"

# name -> build script (busybox sh); each takes a couple of seconds, like a tiny build.
BUILDS = {
    "lint-and-test": "echo compiling; sleep 2; echo 12 tests passed",
    "broken-build": "echo compiling; sleep 2; echo 'test_parse failed' >&2; exit 3",
}


@dataclass(frozen=True)
class BuildResult:
    build: str
    instance: str
    success: bool
    exit_code: int | None
    output: str


async def deploy(ps: portside.Portside, image: str) -> None:
    text = (HERE / "portside.toml").read_text().replace(TEST_IMAGE, image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "portside.toml"
        path.write_text(text)
        await ps.deploy(path)


async def wait_for_exit(box: portside.Container) -> tuple[int | None, str]:
    """(exit code, how it ended) from the first of: an exited/failed event, an exited state."""

    async def from_events() -> tuple[int | None, str]:
        async for event in box.events():
            if event.kind == "exited":
                return event.exit_code, "exited"
            if event.kind == "failed":
                return None, f"failed: {event.reason}"
        raise AssertionError("the watch never ends by itself")

    async def from_state() -> tuple[int | None, str]:
        while True:
            await asyncio.sleep(1)
            info = await box.state()
            if info.state == portside.InstanceState.STOPPED_WITH_CODE:
                return info.exit_code, "exited"

    tasks = [asyncio.create_task(from_events()), asyncio.create_task(from_state())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for task in tasks:
            task.cancel()


async def run_build(ps: portside.Portside, build: str, script: str, run_id: str) -> BuildResult:
    box = ps.container("Builder", name=f"{build}-{run_id}")
    # No port answers in a build: return once the container runs.
    await box.start(entrypoint=["/bin/sh", "-c", script], wait=False)
    print(f"{build}: started as {box.name}", flush=True)
    exit_code, how = await wait_for_exit(box)
    output = b"".join([chunk.data async for chunk in box.logs()]).decode(errors="replace")
    result = BuildResult(build, box.name, exit_code == 0, exit_code, output)
    verdict = "success" if result.success else "failure"
    print(f"{build}: {verdict} ({how}, exit code {exit_code})", flush=True)
    await box.destroy()
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlplane", default=os.environ.get("PORTSIDE_CONTROLPLANE"))
    parser.add_argument("--image", default=os.environ.get("PORTSIDE_EXAMPLE_IMAGE", TEST_IMAGE))
    parser.add_argument("--no-deploy", action="store_true", help="the class is deployed already")
    parser.add_argument("--results", help="write the results to this JSON file")
    args = parser.parse_args()

    run_id = secrets.token_hex(3)
    async with asyncio.timeout(120), portside.connect(args.controlplane) as ps:
        if not args.no_deploy:
            await deploy(ps, args.image)
        results = await asyncio.gather(
            *(run_build(ps, build, script, run_id) for build, script in BUILDS.items())
        )
    if args.results:
        text = json.dumps([asdict(r) for r in results], indent=2)
        await asyncio.to_thread(Path(args.results).write_text, text)
    passed = sum(r.success for r in results)
    print(f"{passed}/{len(results)} builds succeeded")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except portside.PortsideError as exc:
        sys.exit(f"ci-builder: {exc}")
