"""etcd backup and restore of a Portside cluster, with the commands docs/operations.md gives: a
cluster's state in an etcd of the test's own (loopback, free ports, never the shared 2379) is
saved with `etcdctl snapshot save`; etcd is stopped and its data dir deleted; the snapshot is
restored into a new data dir (`etcdutl snapshot restore` where installed, else etcd 3.4's
`etcdctl snapshot restore`) and etcd started from it on the same address. A control plane started
against it finds everything: the deployed class, the CA and the tokens (the admin token and a
token made before the backup still call; the join token still joins), and the placements (each
named instance answers on the node and in the very container it had)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import docker
import pytest

from portside.net import free_port
from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import config, get
from tests.support import eventually_sync

pytestmark = pytest.mark.e2e

NAMES = ("ada", "grace", "linus")


class Etcd:
    """One etcd member on loopback, started from `data_dir` (made fresh, or restored)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.client = f"127.0.0.1:{free_port()}"
        self.peer = f"http://127.0.0.1:{free_port()}"
        self.name = "portside-etcd"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"etcd://{self.client}"

    def start(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            ["etcd", "--name", self.name, "--data-dir", str(data_dir)]
            + ["--listen-client-urls", f"http://{self.client}"]
            + ["--advertise-client-urls", f"http://{self.client}"]
            + ["--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer]
            + ["--initial-cluster", f"{self.name}={self.peer}"],
            stdout=(self.tmp / "etcd.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        eventually_sync(self.healthy, within=20, what=f"etcd on {self.client}")

    def healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "etcd exited (see etcd.log)"
        return etcdctl("--endpoints", self.client, "endpoint", "health", check=False) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def etcdctl(*args: str, check: bool = True) -> int:
    done = subprocess.run(["etcdctl", *args], capture_output=True, text=True, timeout=30)
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done.returncode


def restore(snapshot: Path, data_dir: Path, etcd: Etcd) -> None:
    """The snapshot into a new data dir, as a one-member cluster at `etcd`'s peer address."""
    tool = ["etcdutl"] if shutil.which("etcdutl") else ["etcdctl"]  # etcd 3.5+ : 3.4
    subprocess.run(
        [*tool, "snapshot", "restore", str(snapshot), "--data-dir", str(data_dir)]
        + ["--name", etcd.name, "--initial-cluster", f"{etcd.name}={etcd.peer}"]
        + ["--initial-advertise-peer-urls", etcd.peer],
        check=True,
        capture_output=True,
        timeout=30,
    )


def portside(*args: str, token_file: Path | None = None) -> str:
    argv = [*PORTSIDE, *args] + (["--token-file", str(token_file)] if token_file else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"portside {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    server = Etcd(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def whoami(edge: str) -> dict[str, tuple[int, str]]:
    """Each name's status and answer through the edge: "<container hostname> <instance name>"."""
    async with aiohttp.ClientSession() as s:
        answers = {}
        for name in NAMES:
            status, body, _ = await get(s, f"http://{edge}/session/whoami", name)
            answers[name] = (status, body.strip())
        return answers


def answered(edge: str) -> dict[str, tuple[int, str]]:
    """The answers once every name has one (a node that just started may refuse named
    instances until its first heartbeat reply reconciled them, a moment)."""
    answers: dict[str, tuple[int, str]] = {}

    def all_answered() -> bool:
        answers.update(asyncio.run(whoami(edge)))
        return all(status == 200 for status, _ in answers.values())

    eventually_sync(all_answered, within=10, every=0.2, what=f"every name answered through {edge}")
    return answers


def test_a_cluster_restored_from_an_etcd_snapshot_has_its_classes_tokens_and_placements(
    tmp_path: Path, etcd: Etcd, docker_client: docker.DockerClient, test_image: str
) -> None:
    etcd.start(tmp_path / "etcd-data")
    cluster = Cluster(tmp=tmp_path, store_url=etcd.url, tag="b" + os.urandom(3).hex())
    try:
        controlplane = cluster.start_controlplane()
        agent = cluster.start_agent("fra")
        node_id = agent.option("--node-id")
        cluster.wait_for_nodes(1)
        cluster.deploy(config(test_image))
        edge = cluster.start_edge("fra")
        cp = ["--controlplane", cluster.controlplane_address]
        before = answered(edge.address)
        read_token = tmp_path / "read.token"
        read_token.write_text(portside("token", "create", "--role", "read", "--name", "ops", *cp))

        snapshot = tmp_path / "backup.db"
        etcdctl("--endpoints", etcd.client, "snapshot", "save", str(snapshot))

        # Everything stops; the agent leaves its containers running, as on a restart. Then etcd
        # is lost with its data.
        for proc in (edge, agent, controlplane):
            assert cluster.stop(proc) == 0, proc.log_text()
        etcd.stop()
        shutil.rmtree(tmp_path / "etcd-data")

        restore(snapshot, tmp_path / "etcd-restored", etcd)
        etcd.start(tmp_path / "etcd-restored")

        cluster.restart(controlplane)  # same address, same --store
        # The class, the placements, and the admin token that calls for both.
        classes = json.loads(portside("classes", "--json", *cp))
        assert [c["name"] for c in classes] == ["Echo"], classes
        placed = {i["name"]: i["node_id"] for i in json.loads(portside("ps", "--json", *cp))}
        assert placed == dict.fromkeys(NAMES, node_id), placed
        # A token made before the backup still calls (its role is kept: it may only read).
        portside("nodes", *cp, token_file=read_token)
        refused = subprocess.run(
            [*PORTSIDE, "token", "create", "--role", "read", *cp, "--token-file", str(read_token)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0 and "permission denied" in refused.stderr
        # The join token (and so the CA it carries) still joins: the same node comes back and
        # adopts its containers; every name answers from the container it had.
        cluster.restart(agent)
        cluster.wait_for_nodes(1)
        cluster.restart(edge)
        assert answered(edge.address) == before
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close(docker_client)
