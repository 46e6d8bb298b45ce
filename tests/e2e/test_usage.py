"""Issue 5, usage metering end to end: the seconds an agent meters match the time Docker ran the
container (State.StartedAt to State.FinishedAt, summed over its runs) within 1%, a sleeping
instance accrues nothing, and `portside usage --json` reports the use with its cost."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import time
from typing import Any

import aiohttp
import docker
import pytest

from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import config, containers_of, get, stopped
from tests.support import eventually

pytestmark = pytest.mark.e2e

LITE = (1 / 16, 256 / 1024, 2_000 / 1000)  # vCPU, GiB, GB of disk


def cli_usage(cluster: Cluster, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PORTSIDE, "usage", "--controlplane", cluster.controlplane_address, *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )


def usage(cluster: Cluster, *extra: str) -> dict[str, Any]:
    out = cli_usage(cluster, "--json", *extra)
    if out.returncode != 0:  # not an AssertionError: a failing CLI fails a poll at once too
        pytest.fail(f"portside usage failed: {out.stderr}")
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def docker_time(text: str) -> float:
    # Docker gives nanoseconds ("2026-11-27T08:31:02.123456789Z"); datetime takes microseconds.
    head, _, frac = text.rstrip("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC).timestamp()
    return stamp + (float("0." + frac) if frac else 0.0)


async def run_for(
    session: aiohttp.ClientSession,
    url: str,
    seconds: float,
    container: docker.models.containers.Container,
) -> float:
    """Keep the instance busy for `seconds`, then wait for its sleep; returns how long Docker
    says the container ran this time."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        status, body, _ = await get(session, url, "metered")
        assert status == 200, body
        await asyncio.sleep(0.25)  # time must pass: a request every 0.25 s keeps it awake
    await eventually(lambda: stopped(container), within=10, every=0.1, what="the instance slept")
    state = container.attrs["State"]
    return docker_time(state["FinishedAt"]) - docker_time(state["StartedAt"])


async def settled(cluster: Cluster, class_name: str) -> dict[str, Any]:
    """The usage report once two reads a heartbeat apart agree (the last run's end is in)."""
    reads: list[dict[str, Any]] = []

    def agreed() -> dict[str, Any]:
        reads.append(usage(cluster, "--class", class_name))
        assert len(reads) > 1 and reads[-1] == reads[-2] and reads[-1]["usage"], (
            f"usage did not settle: {reads[-1]}"
        )
        return reads[-1]

    report: dict[str, Any] = await eventually(agreed, within=50, every=2.5)
    return report


async def test_metered_seconds_match_dockers_running_time(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image, sleep_after="2s"))
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    url = f"http://{edge.address}/session/whoami"
    async with aiohttp.ClientSession() as session:
        status, body, _ = await get(session, url, "metered")
        assert status == 200, body
        (container,) = containers_of(docker_client, "metered", cluster)
        ran = [await run_for(session, url, 5.0, container)]

        # Asleep: nothing accrues.
        asleep = await settled(cluster, "Echo")
        await asyncio.sleep(5)  # time must pass: for 5 s asleep, nothing may accrue
        assert usage(cluster, "--class", "Echo")["usage"] == asleep["usage"]

        ran.append(await run_for(session, url, 3.0, container))

    report = await settled(cluster, "Echo")
    (day,) = report["usage"]
    assert day["class_name"] == "Echo"
    assert day["day"] == datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    metered_s = day["running_ms"] / 1000
    docker_s = sum(ran)
    assert docker_s > 8.0
    assert abs(metered_s - docker_s) <= 0.01 * docker_s, (metered_s, ran)
    assert day["running_ms"] % 10 == 0

    vcpu, gib, gb = LITE
    assert day["vcpu_seconds"] == pytest.approx(metered_s * vcpu, rel=1e-6)
    assert day["memory_gib_seconds"] == pytest.approx(metered_s * gib, rel=1e-6)
    assert day["disk_gb_seconds"] == pytest.approx(metered_s * gb, rel=1e-6)
    assert 0 < day["cpu_seconds_used"] < metered_s * vcpu * 1.1  # the quota caps it
    assert day["egress_bytes"] == 0  # an internal-network class
    cost = metered_s * (vcpu * 0.000020 + gib * 0.0000025 + gb * 0.00000007)
    assert day["cost"] == pytest.approx(cost, rel=1e-6)
    assert report["total"]["cost"] == pytest.approx(cost, rel=1e-6)
    assert report["total"]["running_ms"] == day["running_ms"]

    # Filters, and the table for people.
    tomorrow = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).date()
    assert usage(cluster, "--since", tomorrow.isoformat())["usage"] == []
    assert usage(cluster, "--class", "Other")["usage"] == []
    bad = cli_usage(cluster, "--since", "27.11.2026")
    assert bad.returncode != 0 and "YYYY-MM-DD" in bad.stderr
    table = cli_usage(cluster)
    assert table.returncode == 0, table.stderr
    assert "Echo" in table.stdout and "TOTAL" in table.stdout and "$" in table.stdout
