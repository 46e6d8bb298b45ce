"""Issue 10, engine faults: the Docker engine restarts under a running agent, which reconnects,
takes its containers again and serves its instance again without being restarted itself.

This test restarts the host's dockerd: every other test using the engine meanwhile breaks, which
is fine for the suite (it runs one test at a time) and for CI; do not run it beside another test
run on the same engine. It restarts dockerd exactly as
it was started: the same command line (from /proc/<pid>/cmdline), working directory and log file.
tests/integration/test_agent_restarts.py covers the same recovery through a relay of the engine's
socket, without touching the shared engine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import docker
import pytest

import portside
from portside.states import InstanceState
from tests.e2e.harness import Cluster
from tests.support import eventually, eventually_sync

pytestmark = pytest.mark.e2e


def config(image: str) -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "10m"

[[routes]]
path = "/session"
class_name = "Echo"
instance = "header:X-Session-Id"
"""


def dockerd_pid() -> int:
    found = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _comm(entry) == "dockerd"
    ]
    assert len(found) == 1, f"expected one dockerd, found {found}"
    return found[0]


def _comm(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return ""


def restart_dockerd() -> None:
    """SIGTERM to dockerd, then the same command line again, appending to the same log."""
    pid = dockerd_pid()
    proc = Path(f"/proc/{pid}")
    command = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
    cwd = os.readlink(proc / "cwd")
    log = os.readlink(proc / "fd" / "1")
    os.kill(pid, signal.SIGTERM)
    eventually_sync(lambda: not proc.exists(), within=60, every=0.1, what="dockerd exited")
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "ab")) if log.startswith("/") else subprocess.DEVNULL
        subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # it outlives this test
        )

    def answers() -> bool:
        return subprocess.run(["docker", "info"], capture_output=True).returncode == 0

    eventually_sync(answers, within=60, every=0.2, what="docker info answers again")


async def get(session: aiohttp.ClientSession, url: str, name: str) -> tuple[int, str]:
    async with session.get(url, headers={"X-Session-Id": name}) as resp:
        return resp.status, await resp.text()


async def test_the_agent_serves_again_after_its_engine_restarted(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    live_restore = bool(docker_client.info().get("LiveRestoreEnabled"))
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    agent = cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}"
    async with aiohttp.ClientSession() as s:
        status, before = await get(s, f"{base}/session/whoami", "eng")
        assert status == 200, before
        assert (await get(s, f"{base}/session/state?write=kept", "eng"))[0] == 200

        restart_dockerd()
        assert agent.popen.poll() is None, "the agent must live through the engine's restart"

        async def serves_again() -> bool:
            status, _ = await get(s, f"{base}/session/whoami", "eng")
            return status == 200

        await eventually(serves_again, within=30, every=0.5, what="served again")
        assert agent.popen.poll() is None
        # The same container (its writable layer kept): woken again, or kept by live-restore.
        assert (await get(s, f"{base}/session/whoami", "eng"))[1] == before
        assert (await get(s, f"{base}/session/state", "eng"))[1] == "kept"
        # A request may wake the instance before the event stream's reconnect (with backoff)
        # logs that the engine is back.
        await eventually(
            lambda: "the container engine is back" in agent.log_text(),
            within=10,
            what="the engine's return logged",
        )
        log = agent.log_text()
        assert log.count("lost the container engine") == 1, log[-4000:]
        assert log.count("the container engine is back") == 1, log[-4000:]
        # Without live-restore the engine stopped it and the next request woke it; with it, it
        # kept running and stayed adopted.
        assert ("woke Echo/eng" in log) is not live_restore, log[-4000:]
        # Events are followed again: a container killed now is noticed without a request.
        (container,) = [
            c
            for c in docker_client.containers.list(filters={"label": "portside.instance=eng"})
            if c.labels["portside.node"].startswith(cluster.tag + "-")
        ]
        container.kill()
        async with portside.connect(cluster.controlplane_address) as ps:

            async def exited() -> bool:
                (info,) = await ps.instances("Echo")
                return info.state is InstanceState.STOPPED_WITH_CODE

            await eventually(exited, within=10, what="the kill noticed from the event stream")
