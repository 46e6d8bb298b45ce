"""Short job: start a container, stream a file through it (gzip, via exec stdin), save the
result, destroy the container, retrying a step that fails.

The file is read and sent in 64 KiB pieces as the command consumes them, never whole in
memory. Each step is retried up to --attempts times with a growing pause; a command that exits
non-zero counts as a failure. `--fail-once STEP` makes the first attempt of STEP fail on
purpose, to show the retry. The container is destroyed whatever happens.

    python examples/short-job/main.py --controlplane 127.0.0.1:7070 --input big.log
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import portside

HERE = Path(__file__).resolve().parent
TEST_IMAGE = "portside-test/echo:latest"
T = TypeVar("T")


class StepFailed(Exception):
    pass


async def deploy(ps: portside.Portside, image: str) -> None:
    text = (HERE / "portside.toml").read_text().replace(TEST_IMAGE, image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "portside.toml"
        path.write_text(text)
        await ps.deploy(path)


async def retry(
    step: str, action: Callable[[], Awaitable[T]], attempts: int, fail_once: set[str]
) -> T:
    for attempt in range(1, attempts + 1):
        try:
            if step in fail_once:
                fail_once.discard(step)
                raise StepFailed("failed on purpose (--fail-once)")
            result = await action()
            print(f"{step}: ok (attempt {attempt})", flush=True)
            return result
        except (portside.PortsideError, StepFailed) as exc:
            if attempt == attempts:
                raise
            pause = 0.5 * 2 ** (attempt - 1)
            print(f"{step}: attempt {attempt} failed: {exc}; retrying in {pause:g}s", flush=True)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")


async def read_file(path: Path, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while piece := await asyncio.to_thread(f.read, size):
            yield piece


def write_sample_log(path: Path) -> None:
    lines = (f"2026-11-27T08:00:{i % 60:02d}Z GET /item/{i} 200\n" for i in range(60000))
    path.write_text("".join(lines))


def verify_and_save(data: bytes, source: Path, target: Path) -> None:
    if gzip.decompress(data) != source.read_bytes():
        raise StepFailed("the compressed file does not decompress to the input")
    target.write_bytes(data)
    print(f"verified: {target} decompresses to {source}", flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlplane", default=os.environ.get("PORTSIDE_CONTROLPLANE"))
    parser.add_argument("--image", default=os.environ.get("PORTSIDE_EXAMPLE_IMAGE", TEST_IMAGE))
    parser.add_argument("--no-deploy", action="store_true", help="the class is deployed already")
    parser.add_argument("--input", type=Path, help="file to compress (default: 2 MiB of logs)")
    parser.add_argument("--output", type=Path, help="where to save it (default: INPUT.gz)")
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument(
        "--fail-once",
        action="append",
        default=[],
        metavar="STEP",
        choices=["start", "compress", "save", "destroy"],
    )
    args = parser.parse_args()
    fail_once = set(args.fail_once)

    with tempfile.TemporaryDirectory() as tmp:
        source: Path = args.input or Path(tmp) / "app.log"
        if args.input is None:
            await asyncio.to_thread(write_sample_log, source)
        target: Path = args.output or source.with_name(source.name + ".gz")

        async with asyncio.timeout(120), portside.connect(args.controlplane) as ps:
            if not args.no_deploy:
                await deploy(ps, args.image)
            box = ps.container("Compressor", name=f"job-{secrets.token_hex(3)}")

            async def compress() -> bytes:
                # wake: the job is the exec, so it holds the instance awake however long it takes
                # (and boots it again if it slept since the start: the retry after a failure).
                gzip = ["gzip", "-c", "-6"]
                result = await box.exec(gzip, stdin=read_file(source), wake=True)
                if not result.ok:
                    raise StepFailed(f"gzip exited {result.exit_code}: {result.stderr!r}")
                return result.stdout

            async def save(data: bytes) -> None:
                await asyncio.to_thread(verify_and_save, data, source, target)

            try:
                await retry("start", box.start, args.attempts, fail_once)
                data = await retry("compress", compress, args.attempts, fail_once)
                await retry("save", lambda: save(data), args.attempts, fail_once)
            finally:
                await retry("destroy", box.destroy, args.attempts, fail_once)
        size = (await asyncio.to_thread(source.stat)).st_size
        print(f"compressed {size} bytes to {len(data)} bytes in {box.name}, saved to {target}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (portside.PortsideError, StepFailed) as exc:
        sys.exit(f"short-job: {exc}")
