"""Rollouts on real processes and real Docker: a named instance mid-request when its version
changes finishes the request and serves the next from the new version; a pool rolls out in
steps under steady load with no failed request; a version whose containers crash is stopped at
its first step and rolled back by itself; pause, resume and abort do what they say."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import aiohttp
import pytest

from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import get
from tests.support import eventually

pytestmark = pytest.mark.e2e


def named(image: str, mark: str, extra: str = "") -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
instance_type = "lite"
sleep_after = "10m"
env = {{ MARK = "{mark}" }}
{extra}

[[routes]]
path = "/session"
class_name = "Echo"
instance = "header:X-Session-Id"
"""


def pool(image: str, mark: str, extra: str = "") -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
instance_type = "lite"
env = {{ MARK = "{mark}" }}
{extra}
[containers.autoscaling]
minimum_instances = 2
maximum_instances = 4

[[routes]]
path = "/"
class_name = "Echo"
"""


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PORTSIDE, *args, "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        timeout=60,
    )


def deploy(cluster: Cluster, config: str, rollout: str) -> None:
    path = cluster.tmp / "portside.toml"
    path.write_text(config)
    out = cli(cluster, "deploy", str(path), "--rollout", rollout)
    assert out.returncode == 0, out.stderr


def rollout(cluster: Cluster) -> dict[str, object]:
    out = cli(cluster, "rollout", "status", "Echo", "--json")
    assert out.returncode == 0, out.stderr
    status: dict[str, object] = json.loads(out.stdout)
    return status


def instances(cluster: Cluster) -> list[dict[str, object]]:
    out = cli(cluster, "ps", "--json")
    assert out.returncode == 0, out.stderr
    listed: list[dict[str, object]] = json.loads(out.stdout)
    return listed


def stored_events(cluster: Cluster) -> list[dict[str, object]]:
    """The class's lifecycle events as the control plane stored them."""
    out = subprocess.run(
        ["etcdctl", "--endpoints", cluster.store_url.removeprefix("etcd://")]
        + ["get", "--prefix", "/portside/events/Echo/", "--print-value-only"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def exec_mark(cluster: Cluster, name: str) -> str:
    """$MARK in the instance's container, by `portside exec`."""
    out = subprocess.run(
        [*PORTSIDE, "exec", "Echo", name, "--controlplane", cluster.controlplane_address]
        + ["--", "sh", "-c", "echo $MARK"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def ended(cluster: Cluster, state: str, within: float) -> dict[str, object]:
    seen: dict[str, object] = {}

    def reached() -> bool:
        seen.update(rollout(cluster))
        assert seen["state"] not in ("aborted", "rolled_back") or state == seen["state"], seen
        return seen["state"] == state

    await eventually(reached, within=within, every=0.3, what=f"the rollout {state}")
    return seen


async def test_a_request_in_flight_finishes_and_the_next_is_served_by_the_new_version(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane()
    deploy(cluster, named(test_image, "one"), "gradual")
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}/session"
    async with aiohttp.ClientSession() as s:
        status, before, _ = await get(s, f"{base}/whoami", "n")
        assert status == 200, before
        slow = asyncio.create_task(get(s, f"{base}/slow?3", "n"))
        await asyncio.sleep(0.5)  # in flight on the version 1 container
        deploy(cluster, named(test_image, "two"), "immediate")
        status, body, _ = await slow
        assert (status, body.strip()) == (200, "slept 3"), body
        done = await ended(cluster, "done", within=60)
        assert done["to_version"] == 2
        status, after, _ = await get(s, f"{base}/whoami", "n")
        assert status == 200, after
        assert after.split()[0] != before.split()[0]  # another container: the new version's
    (instance,) = instances(cluster)
    assert instance["version"] == 2
    assert exec_mark(cluster, "n") == "two"


async def test_a_pool_rolls_out_in_steps_under_load_with_no_failed_request(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane()
    steps = 'rollout_step_percentage = [50, 100]\nrollout_active_grace_period = "1s"'
    deploy(cluster, pool(test_image, "one", steps), "gradual")
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    url = f"http://{edge.address}/whoami"
    answers: list[int] = []
    stop = asyncio.Event()

    async def load(s: aiohttp.ClientSession) -> None:
        while not stop.is_set() and len(answers) < 5000:  # bounded in count and in time
            async with s.get(url) as resp:
                await resp.read()
                answers.append(resp.status)
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as s:

        def two_members_serve() -> bool:
            members = [i for i in instances(cluster) if i["state"] == "healthy"]
            return len(members) >= 2

        await eventually(two_members_serve, within=30, every=0.3, what="the pool at 2")
        workers = [asyncio.create_task(load(s)) for _ in range(4)]
        try:
            await asyncio.sleep(1)
            started = time.monotonic()
            deploy(cluster, pool(test_image, "two", steps), "gradual")
            done = await ended(cluster, "done", within=120)
            await asyncio.sleep(1)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    assert done["to_version"] == 2 and done["steps"] == [50, 100]
    assert answers and set(answers) == {200}, {c: answers.count(c) for c in set(answers)}
    serving = [i for i in instances(cluster) if i["state"] in ("running", "healthy")]
    assert serving and {i["version"] for i in serving} == {2}
    print(f"rolled out in {time.monotonic() - started:.1f}s; {len(answers)} requests, all 200")


async def test_a_version_that_crashes_is_stopped_at_its_first_step_and_rolled_back(
    cluster: Cluster, test_image: str
) -> None:
    cluster.start_controlplane()
    policy = 'rollout_step_percentage = [50, 100]\nrollout_health_deadline = "8s"'
    deploy(cluster, named(test_image, "one", policy), "gradual")
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    base = f"http://{edge.address}/session"
    async with aiohttp.ClientSession() as s:
        for name in ("a", "b"):
            status, body, _ = await get(s, f"{base}/whoami", name)
            assert status == 200, body
        crashing = policy + '\nentrypoint = ["sh", "-c", "exit 3"]'
        deploy(cluster, named(test_image, "two", crashing), "gradual")
        back = await ended(cluster, "rolled_back", within=90)
        # Either the rollout to 2, ended by its rollback (its reason: why), or the rollback to 1
        # that followed it, when an instance was awake on version 2 to move back.
        shape = (back["mode"], back["to_version"])
        assert shape in (("gradual", 2), ("rollback", 1)), back
        assert "health" in str(back["reason"]) or "rollback" in str(back["reason"]), back
        # The instance that ran version 2 has an event saying why it went back.
        said = [e for e in stored_events(cluster) if e["kind"] == "rolled-back"]
        assert said and all("version 2 rolled back to 1" in str(e["reason"]) for e in said)

        # The instance whose version 2 container crashed is stopped; its next request wakes it
        # in a new container of version 1 (its crash loop was version 2's, and is forgotten).
        for name in ("a", "b"):
            status, body, _ = await get(s, f"{base}/whoami", name)
            assert status == 200, body
    listed = {i["name"]: i for i in instances(cluster)}
    assert {n: listed[n]["version"] for n in ("a", "b")} == {"a": 1, "b": 1}, listed
    out = cli(cluster, "versions", "Echo", "--json")
    current = [v for v in json.loads(out.stdout) if v["current"]]
    assert [v["number"] for v in current] == [1]


async def test_pause_resume_and_abort(cluster: Cluster, test_image: str) -> None:
    cluster.start_controlplane()
    policy = 'rollout_step_percentage = [50, 100]\nrollout_active_grace_period = "30s"'
    deploy(cluster, named(test_image, "one", policy), "gradual")
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    async with aiohttp.ClientSession() as s:
        for name in ("a", "b"):
            status, body, _ = await get(s, f"http://{edge.address}/session/whoami", name)
            assert status == 200, body
    deploy(cluster, named(test_image, "two", policy), "gradual")

    def first_step_done() -> bool:
        now = rollout(cluster)
        return now["updated"] == 1 and now["state"] == "waiting"

    await eventually(first_step_done, within=60, every=0.3, what="the first step, then waiting")
    out = cli(cluster, "rollout", "pause", "Echo")
    assert out.returncode == 0, out.stderr
    assert rollout(cluster)["state"] == "paused"
    again = cli(cluster, "rollout", "pause", "Echo")
    assert again.returncode == 1 and "paused" in again.stderr, again.stderr
    out = cli(cluster, "rollout", "resume", "Echo")
    assert out.returncode == 0, out.stderr
    assert rollout(cluster)["state"] in ("waiting", "rolling")
    out = cli(cluster, "rollout", "abort", "Echo")
    assert out.returncode == 0, out.stderr
    aborted = rollout(cluster)
    assert aborted["state"] == "aborted"
    await asyncio.sleep(2)  # nothing moves after an abort
    versions = sorted(int(str(i["version"])) for i in instances(cluster) if i["name"] in ("a", "b"))
    assert versions == [1, 2]
    out = cli(cluster, "rollout", "abort", "Echo")
    assert out.returncode == 1 and "nothing to abort" in out.stderr, out.stderr
