"""Code executor: one sandbox per session, requests routed to it by session id.

Each session gets its own container (started with the SDK, env set per session); the code is
POSTed through the edge, whose route reads the instance name from X-Session-Id. The test
image answers a POST with the request line and body, and /whoami with its container id.

    python examples/code-executor/main.py --controlplane 127.0.0.1:7070 --edge 127.0.0.1:8787
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
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


async def run_session(ps: portside.Portside, session: str, code: str) -> str:
    box = ps.container("CodeExecutor", name=session)
    info = await box.start(env={"SESSION": session})
    env = await box.exec(["sh", "-c", "echo $MODE $SESSION"])
    # The route reads X-Session-Id: fetch puts the instance name there.
    resp = await box.fetch("/execute-code", method="POST", data=code, name_header="X-Session-Id")
    who = await box.fetch("/execute-code/whoami", name_header="X-Session-Id")
    if resp.status != 200 or who.status != 200:
        raise SystemExit(f"{session}: edge answered {resp.status} {resp.error or resp.text}")
    container_id = who.text.split()[0]
    print(f"{session}: {info.state} on {info.node_id}, env: {env.text.strip()}")
    print(f"{session}: executed {code!r} -> {resp.text.splitlines()[-1]!r} in {container_id}")
    return container_id


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlplane", default=os.environ.get("PORTSIDE_CONTROLPLANE"))
    parser.add_argument("--edge", default=os.environ.get("PORTSIDE_EDGE"))
    parser.add_argument("--image", default=os.environ.get("PORTSIDE_EXAMPLE_IMAGE", TEST_IMAGE))
    parser.add_argument("--no-deploy", action="store_true", help="the class is deployed already")
    parser.add_argument("--keep", action="store_true", help="leave the sandboxes running")
    parser.add_argument("sessions", nargs="*", default=["alice", "bob"])
    args = parser.parse_args()

    async with asyncio.timeout(120), portside.connect(args.controlplane, edge=args.edge) as ps:
        if not args.no_deploy:
            await deploy(ps, args.image)
        ids = await asyncio.gather(
            *(run_session(ps, s, f"print('hello from {s}')") for s in args.sessions)
        )
        # The same session reaches the same sandbox again.
        again = await run_session(ps, args.sessions[0], "print('again')")
        if again != ids[0]:
            raise SystemExit(f"{args.sessions[0]} reached {again}, not its sandbox {ids[0]}")
        print(f"{len(args.sessions)} sessions, {len(set(ids))} sandboxes")
        if not args.keep:
            for s in args.sessions:
                await ps.container("CodeExecutor", s).destroy()
            print("sandboxes destroyed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except portside.PortsideError as exc:
        sys.exit(f"code-executor: {exc}")
