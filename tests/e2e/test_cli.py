"""The CLI's client verbs against a real cluster, run as a user runs them: `portside ps`,
`nodes`, `classes`, `start|stop|signal|destroy`, `exec`, `logs`, `events` and `state`."""

from __future__ import annotations

import json
import os
import subprocess
from functools import partial

import pytest

from tests.e2e.harness import PORTSIDE, Cluster
from tests.support import eventually_sync

pytestmark = pytest.mark.e2e

TRAPPING = (
    "mkdir -p /tmp; echo booted with MODE=$MODE; "
    "trap 'echo got USR1 >> /tmp/signals' USR1; "
    "trap 'echo got INT; exit 5' INT; "
    'nc -ll -p "${PORT:-8080}" -e /app/serve & '
    "while true; do wait; done"
)


def config(image: str) -> str:
    return f"""
[[containers]]
class_name = "Echo"
image = "{image}"
default_port = 8080
instance_type = "lite"
sleep_after = "10m"
"""


def portside(
    cluster: Cluster, *args: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """`portside ARGS` with PORTSIDE_CONTROLPLANE pointing at the cluster."""
    env = dict(os.environ, PORTSIDE_CONTROLPLANE=cluster.controlplane_address)
    return subprocess.run(
        [*PORTSIDE, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=env,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.decode()


def signals_recorded(cluster: Cluster, name: str, expected: bytes) -> bool:
    """Whether the TRAPPING entrypoint has recorded just `expected` of the signals it got."""
    got = portside(cluster, "exec", "Echo", name, "--", "cat", "/tmp/signals").stdout
    assert got == expected, got
    return True


@pytest.fixture
def running(cluster: Cluster, test_image: str) -> Cluster:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)
    return cluster


def test_listing_verbs_print_tables_and_json(running: Cluster) -> None:
    classes = ok(portside(running, "classes"))
    assert classes.splitlines()[0].split()[:3] == ["CLASS", "IMAGE", "PORT"]
    assert "Echo" in classes and "lite" in classes
    assert json.loads(ok(portside(running, "classes", "--json")))[0]["name"] == "Echo"

    out = ok(portside(running, "start", "Echo", "a1", "--env", "MODE=cli", "--hint", "fra"))
    assert out.startswith("Echo/a1: healthy on " + running.tag)
    ps = ok(portside(running, "ps"))
    header, row = ps.splitlines()
    assert header.split() == ["CLASS", "NAME", "STATE", "NODE", "REGION", "SINCE"]
    assert row.split()[:2] == ["Echo", "a1"] and running.tag in row and "fra" in row
    (listed,) = json.loads(ok(portside(running, "ps", "--json", "--class", "Echo")))
    assert (listed["class_name"], listed["name"], listed["region"]) == ("Echo", "a1", "fra")
    assert json.loads(ok(portside(running, "ps", "--json", "--node", "elsewhere"))) == []

    nodes = ok(portside(running, "nodes"))
    assert nodes.splitlines()[0].startswith("NODE") and running.tag in nodes
    (node,) = json.loads(ok(portside(running, "nodes", "--json")))
    assert node["region"] == "fra" and node["alive"]


def test_instance_verbs(running: Cluster) -> None:
    out = ok(
        portside(
            running,
            "start",
            "Echo",
            "b1",
            "--env",
            "MODE=cli",
            "--entrypoint",
            json.dumps(["/bin/sh", "-c", TRAPPING]),
            "--json",
        )
    )
    assert json.loads(out)["state"] == "healthy"

    # exec streams the command's output and exits with its code; stdin is forwarded.
    result = portside(
        running,
        "exec",
        "Echo",
        "b1",
        "--env",
        "X=1",
        "--",
        "sh",
        "-c",
        "echo out $X; echo err >&2; exit 4",
    )
    assert (result.returncode, result.stdout, result.stderr) == (4, b"out 1\n", b"err\n")
    result = portside(running, "exec", "Echo", "b1", "--", "wc", "-c", stdin=b"x" * 100_000)
    assert result.returncode == 0 and result.stdout.strip() == b"100000"
    result = portside(running, "exec", "Echo", "b1", "--workdir", "/www", "--", "pwd")
    assert result.stdout == b"/www\n"

    # By name, then by number; one at a time (two at once may arrive as one).
    for count, sig in ((1, "USR1"), (2, "10")):
        assert ok(portside(running, "signal", "Echo", "b1", sig)) == "Echo/b1: sent signal 10\n"
        recorded = partial(signals_recorded, running, "b1", b"got USR1\n" * count)
        eventually_sync(recorded, within=10, what=f"{count} USR1 recorded")

    out = ok(portside(running, "stop", "Echo", "b1", "--signal", "INT", "--grace", "5"))
    assert out.startswith("Echo/b1: ")
    state = json.loads(ok(portside(running, "ps", "--json")))[0]
    assert state["name"] == "b1"
    logs = portside(running, "logs", "Echo", "b1")
    assert b"booted with MODE=cli" in logs.stdout and b"got INT" in logs.stdout
    assert ok(portside(running, "logs", "Echo", "b1", "--tail", "1")) == "got INT\n"

    # state values: from the argument or from stdin; get prints the bytes as they are.
    assert "3 bytes" in ok(portside(running, "state", "put", "Echo", "b1", "step", "two"))
    assert ok(portside(running, "state", "get", "Echo", "b1", "step")) == "two"
    ok(portside(running, "state", "put", "Echo", "b1", "blob", stdin=b"\x00\x01binary"))
    assert portside(running, "state", "get", "Echo", "b1", "blob").stdout == b"\x00\x01binary"
    got_json = json.loads(ok(portside(running, "state", "get", "Echo", "b1", "step", "--json")))
    assert got_json == {"key": "step", "value": "two"}
    assert "deleted" in ok(portside(running, "state", "delete", "Echo", "b1", "step"))

    assert ok(portside(running, "destroy", "Echo", "b1")) == "Echo/b1: destroyed\n"
    gone = portside(running, "state", "get", "Echo", "b1", "blob")
    assert gone.returncode == 1


def test_events_follow_until_count(running: Cluster) -> None:
    env = dict(os.environ, PORTSIDE_CONTROLPLANE=running.controlplane_address)
    # From a revision before the instance's events: however late the watch opens, it sees them.
    since = str(running.store_revision())
    watch = subprocess.Popen(
        [*PORTSIDE, "events", "Echo", "e1", "--json", "--count", "3", "--after", since],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        ok(portside(running, "start", "Echo", "e1"))
        ok(portside(running, "destroy", "Echo", "e1"))
        out, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert len(events) == 3 and all(e["name"] == "e1" for e in events)
    assert [e["revision"] for e in events] == sorted(e["revision"] for e in events)
    assert "starting" in [e["kind"] for e in events]

    # Replaying from before the first one gives the same events, as a table.
    after = events[0]["revision"] - 1
    table = ok(portside(running, "events", "Echo", "e1", "--after", str(after), "--count", "3"))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["TIME", "REVISION", "KIND"]
    assert [line.split()[2] for line in lines[1:]] == [e["kind"] for e in events]


def test_errors_are_one_line_and_exit_1(running: Cluster) -> None:
    for args, needle in [
        (("start", "Nope", "x"), "Nope"),
        (("signal", "Echo", "never", "HUP"), "never placed"),
        (("signal", "Echo", "x", "NOPE"), "unknown"),
        (("start", "Echo", "x", "--hint", "atlantis"), "atlantis"),
        (("exec", "Echo", "never", "--", "true"), "never placed"),
        (("ps", "--controlplane", "127.0.0.1:1"), "unreachable"),
    ]:
        result = portside(running, *args)
        err = result.stderr.decode()
        assert result.returncode == 1, (args, result)
        assert err.count("\n") == 1 and needle in err, (args, err)
        assert err.startswith(f"portside {args[0]}: ")
