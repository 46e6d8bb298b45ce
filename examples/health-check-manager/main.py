"""Health-check manager: pre-warm N instances in a region with location hints, then check
them every 500 ms and mark each healthy or not.

A worker is healthy when Portside reports it `healthy` (running, its port answers) and a probe
command in it succeeds. Each change is printed and saved as the worker's "health" state value
(so another process can read it: `portside state get Worker worker-0 health`). To show a
failure being noticed and repaired, one worker is killed part way (--kill-after), and
unhealthy workers are started again (--no-heal to only report). The run is bounded
(--duration).

    python examples/health-check-manager/main.py --controlplane 127.0.0.1:7070 --region fra
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import portside

HERE = Path(__file__).resolve().parent
TEST_IMAGE = "portside-test/echo:latest"
CHECK_EVERY_S = 0.5


async def deploy(ps: portside.Portside, image: str) -> None:
    text = (HERE / "portside.toml").read_text().replace(TEST_IMAGE, image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "portside.toml"
        path.write_text(text)
        await ps.deploy(path)


async def is_healthy(box: portside.Container) -> bool:
    try:
        async with asyncio.timeout(CHECK_EVERY_S * 2):
            if (await box.state()).state != "healthy":
                return False
            return (await box.exec(["test", "-d", "/www"])).ok
    except (portside.PortsideError, TimeoutError):
        return False


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlplane", default=os.environ.get("PORTSIDE_CONTROLPLANE"))
    parser.add_argument("--image", default=os.environ.get("PORTSIDE_EXAMPLE_IMAGE", TEST_IMAGE))
    parser.add_argument("--no-deploy", action="store_true", help="the class is deployed already")
    parser.add_argument("--region", default="fra", help="location hint: region code or area")
    parser.add_argument("--count", type=int, default=3, help="workers to pre-warm")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of checking")
    parser.add_argument("--kill-after", type=float, default=1.5, help="kill worker-1 then")
    parser.add_argument("--no-heal", action="store_true", help="do not restart unhealthy ones")
    args = parser.parse_args()

    async with asyncio.timeout(args.duration + 120), portside.connect(args.controlplane) as ps:
        if not args.no_deploy:
            await deploy(ps, args.image)
        workers = [ps.container("Worker", name=f"worker-{i}") for i in range(args.count)]
        infos = await asyncio.gather(*(w.start(hint=args.region) for w in workers))
        for info in infos:
            print(f"pre-warmed {info.name} on {info.node_id} region={info.region}", flush=True)

        health: dict[str, bool] = {}
        ticks, healing = 0, set[str]()
        healers: set[asyncio.Task[None]] = set()
        last_heal: dict[str, float] = {}
        started = time.monotonic()
        killed = args.count < 2
        while (elapsed := time.monotonic() - started) < args.duration:
            if not killed and elapsed >= args.kill_after:
                await workers[1].signal(signal.SIGKILL)
                print("killed worker-1 (SIGKILL)", flush=True)
                killed = True
            results = await asyncio.gather(*(is_healthy(w) for w in workers))
            for box, ok in zip(workers, results, strict=True):
                if health.get(box.name) != ok:
                    before = {True: "healthy", False: "unhealthy", None: "new"}[
                        health.get(box.name)
                    ]
                    now = "healthy" if ok else "unhealthy"
                    print(f"{box.name}: {before} -> {now}", flush=True)
                    await box.put_state_value("health", now)
                    health[box.name] = ok
                # Heal an unhealthy worker, at most every 2 s (a restart takes a moment).
                due = time.monotonic() - last_heal.get(box.name, 0.0) >= 2.0
                if not ok and not args.no_heal and box.name not in healing and due:
                    healing.add(box.name)
                    last_heal[box.name] = time.monotonic()
                    healer = asyncio.create_task(heal(box, args.region, healing))
                    healers.add(healer)
                    healer.add_done_callback(healers.discard)
            ticks += 1
            await asyncio.sleep(max(0.0, started + ticks * CHECK_EVERY_S - time.monotonic()))

        for healer in list(healers):
            healer.cancel()
        healthy = sum(health.values())
        every = f"{CHECK_EVERY_S * 1000:.0f} ms"
        print(f"{ticks} checks every {every}; {healthy}/{len(workers)} healthy")
    return 0


async def heal(box: portside.Container, region: str, healing: set[str]) -> None:
    try:
        await box.start(hint=region)
        print(f"{box.name}: restarted", flush=True)
    except portside.PortsideError as exc:
        print(f"{box.name}: restart failed: {exc}", flush=True)
    finally:
        healing.discard(box.name)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except portside.PortsideError as exc:
        sys.exit(f"health-check-manager: {exc}")
