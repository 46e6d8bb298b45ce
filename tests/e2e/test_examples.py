"""Every SDK example in examples/ run as a user runs it (`python examples/X/main.py`) against a
real cluster, its output checked."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import Cluster

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(cluster: Cluster, name: str, image: str, *args: str, timeout: float = 150) -> str:
    # This checkout's portside, whatever else is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PORTSIDE_CONTROLPLANE=cluster.controlplane_address, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name / "main.py"), "--image", image, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    print(result.stdout)
    return result.stdout


def one_node(cluster: Cluster) -> None:
    cluster.start_controlplane()
    cluster.start_agent("fra")
    cluster.wait_for_nodes(1)


def test_code_executor(cluster: Cluster, test_image: str) -> None:
    one_node(cluster)
    edge = cluster.start_edge("fra")
    out = run_example(
        cluster, "code-executor", test_image, "--edge", edge.address, "alice", "bob", "carol"
    )
    assert "alice: executed \"print('hello from alice')\"" in out
    assert "env: sandbox alice" in out and "env: sandbox carol" in out
    assert "3 sessions, 3 sandboxes" in out
    assert "sandboxes destroyed" in out


def test_ci_builder(cluster: Cluster, test_image: str, tmp_path: Path) -> None:
    one_node(cluster)
    results = tmp_path / "results.json"
    out = run_example(cluster, "ci-builder", test_image, "--results", str(results))
    assert "lint-and-test: success (exited, exit code 0)" in out
    assert "broken-build: failure (exited, exit code 3)" in out
    assert "1/2 builds succeeded" in out
    recorded = {r["build"]: r for r in json.loads(results.read_text())}
    assert recorded["lint-and-test"]["success"] and recorded["lint-and-test"]["exit_code"] == 0
    assert recorded["broken-build"]["exit_code"] == 3
    assert "test_parse failed" in recorded["broken-build"]["output"]
    assert "12 tests passed" in recorded["lint-and-test"]["output"]


def test_state_across_sleeps(cluster: Cluster, test_image: str) -> None:
    one_node(cluster)
    out = run_example(cluster, "state-across-sleeps", test_image, "--rounds", "3", "--name", "nb")
    # Memory is empty after every start; what is there comes back from the store.
    assert "round 1: found 0 lines in memory after start, restored 0, saved 1" in out
    assert "round 2: found 0 lines in memory after start, restored 1, saved 2" in out
    assert "round 3: found 0 lines in memory after start, restored 2, saved 3" in out
    notes = out.split("notes:\n", 1)[1].splitlines()
    assert [line.split(" on ")[0] for line in notes] == ["round 1", "round 2", "round 3"]
    saved = subprocess.run(
        [
            sys.executable,
            "-m",
            "portside",
            "state",
            "get",
            "Notebook",
            "nb",
            "notes",
            "--controlplane",
            cluster.controlplane_address,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert saved.stdout.splitlines() == notes


def test_pause_session(cluster: Cluster, test_image: str) -> None:
    one_node(cluster)
    edge = cluster.start_edge("fra")
    out = run_example(
        cluster, "pause-session", test_image, "--edge", edge.address, "--name", "s", "--note", "n1"
    )
    assert "s: wrote 'n1' into its memory" in out
    assert "s: idle for 2s, paused" in out
    # Thawed: the same process answers with the note it kept in memory.
    assert "'n1' (200), healthy" in out
    assert "stopped after pause_max: sleeping" in out
    assert "a new process" in out and "404 'no state written yet'" in out
    assert (
        "paused (idle for 2s), resumed (a request), paused (idle for 2s), "
        "activity-expired (paused for 6s), slept" in out
    )


def test_snapshot_workspace(cluster: Cluster, test_image: str) -> None:
    one_node(cluster)
    out = run_example(cluster, "snapshot-workspace", test_image, "--user", "ada")
    assert "ada: wrote 'draft 1 by ada' into /workspace/notes.txt" in out
    slept = out.split("its sleep took snapshot ", 1)[1].split()[0]
    assert "(before-upgrade) taken by hand while it sleeps" in out
    # The fork has the file the snapshot kept.
    assert (
        "ada-fork: started from before-upgrade (healthy); /workspace/notes.txt: 'draft 1 by ada'"
        in out
    )
    listed = out.split("newest first:\n", 1)[1].splitlines()[:2]
    assert [line.split()[:2] for line in listed] == [["before-upgrade", "create"], [slept, "sleep"]]
    assert all(float(line.split()[2]) > 0 for line in listed), listed
    # The fork changed nothing, so it has no snapshot of its own: the two above are all.
    assert "destroyed ada and ada-fork; deleted 2 snapshots, 0 left" in out


def test_health_check_manager(cluster: Cluster, test_image: str) -> None:
    cluster.start_controlplane()
    cluster.start_agent("fra", "127.0.0.2")
    cluster.start_agent("sin", "127.0.0.3")
    cluster.wait_for_nodes(2)
    out = run_example(
        cluster,
        "health-check-manager",
        test_image,
        "--region",
        "sin",
        "--count",
        "3",
        "--duration",
        "6",
        "--kill-after",
        "1.5",
    )
    prewarmed = [line for line in out.splitlines() if line.startswith("pre-warmed")]
    assert len(prewarmed) == 3 and all("region=sin" in line for line in prewarmed), out
    for i in range(3):
        assert f"worker-{i}: new -> healthy" in out
    assert "killed worker-1 (SIGKILL)" in out
    assert "worker-1: healthy -> unhealthy" in out
    assert "worker-1: restarted" in out
    assert out.index("worker-1: healthy -> unhealthy") < out.index("worker-1: unhealthy -> healthy")
    summary = out.strip().splitlines()[-1]
    checks = int(summary.split()[0])
    assert 8 <= checks <= 13 and summary.endswith("3/3 healthy"), summary


def test_short_job(cluster: Cluster, test_image: str, tmp_path: Path) -> None:
    one_node(cluster)
    source = tmp_path / "input.txt"
    source.write_bytes(b"".join(b"line %d of the input\n" % i for i in range(100_000)))
    target = tmp_path / "out.gz"
    out = run_example(
        cluster,
        "short-job",
        test_image,
        "--input",
        str(source),
        "--output",
        str(target),
        "--fail-once",
        "compress",
    )
    assert "compress: attempt 1 failed: failed on purpose" in out
    assert "compress: ok (attempt 2)" in out
    assert "start: ok (attempt 1)" in out and "destroy: ok (attempt 1)" in out
    assert gzip.decompress(target.read_bytes()) == source.read_bytes()
    ps = subprocess.run(
        [
            sys.executable,
            "-m",
            "portside",
            "ps",
            "--json",
            "--controlplane",
            cluster.controlplane_address,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(ps.stdout) == []  # the job's container is gone
