"""The defects a new user hit first, each driven through the CLI as that user would: `portside up`
answering before it could serve, Ctrl-C leaving containers running, a wrangler file that builds
its image, wrangler's defaults, a Docker error reported as an unreachable agent, and a store
that does not answer turning into a 500."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from portside.net import free_port
from tests.e2e.harness import PORTSIDE, Cluster
from tests.support import eventually_sync

pytestmark = pytest.mark.e2e

# An image no engine has, in a registry on a closed loopback port: the agent's pull is refused at
# once, and no request leaves the machine.
MISSING = "127.0.0.1:1/portside-test/not-built:1"

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def get(url: str, headers: dict[str, str], timeout: float = 30) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


class Up:
    """`portside up` in a directory, as a user runs it, with its log."""

    def __init__(self, cwd: Path, log: str = "up.log", like: Up | None = None) -> None:
        self.cwd = cwd
        fresh = [f"127.0.0.1:{free_port()}" for _ in range(3)]
        # `like`: the same addresses, hence the same node id
        self.edge: str = like.edge if like else fresh[0]
        self.cp: str = like.cp if like else fresh[1]
        self.agent: str = like.agent if like else fresh[2]
        self.node_id = f"{socket.gethostname()}-{self.agent.rsplit(':', 1)[1]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cwd / log

    def wait_until_up(self) -> None:
        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            assert "Portside is up" in self.log.read_text(), self.log.read_text()[-3000:]
            return True

        eventually_sync(up, within=60, what="portside up")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*PORTSIDE, "up", "--listen", self.edge, "--controlplane-listen", self.cp]
            + ["--agent-listen", self.agent],
            cwd=self.cwd,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def ctrl_c(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(40) == 0, self.log.read_text()

    def close(self) -> None:
        """Stop it as a user does (Ctrl-C), or kill it: its parts die with it either way."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def hello(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[Path]:
    """A directory with the README's example config, its image built."""
    subprocess.run([str(EXAMPLES / "hello" / "build.sh")], check=True, capture_output=True)
    shutil.copy(EXAMPLES / "portside.toml", tmp_path / "portside.toml")
    yield tmp_path


def remove_node_containers(client: docker.DockerClient, node_id: str) -> None:
    for c in client.api.containers(all=True, filters={"label": f"portside.node={node_id}"}):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(c["Id"], force=True)


def test_up_opens_its_port_only_when_a_request_can_be_served(
    hello: Path, docker_client: docker.DockerClient
) -> None:
    up = Up(hello)
    up.start()
    host, port = up.edge.rsplit(":", 1)
    try:
        # What `wait-for-it` and CI jobs do: wait for the port, then send the first request.
        def port_open() -> bool:
            assert up.proc is not None and up.proc.poll() is None, up.log.read_text()
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.2):
                return True
            return False

        eventually_sync(port_open, within=60, every=0.01, what="the edge's port")
        status, headers, body = get(f"http://{up.edge}/cgi-bin/hello", {"X-Session-Id": "ci"})
        assert status == 200 and "(instance ci), visit 1" in body, (status, headers, body)
    finally:
        up.close()
        remove_node_containers(docker_client, up.node_id)


def test_ctrl_c_stops_the_containers_and_the_next_up_adopts_them(
    hello: Path, docker_client: docker.DockerClient
) -> None:
    up = Up(hello)
    try:
        up.start()
        up.wait_until_up()
        status, _, body = get(f"http://{up.edge}/cgi-bin/hello", {"X-Session-Id": "ada"})
        assert status == 200 and "visit 1" in body, body
        (container,) = docker_client.containers.list(
            all=True, filters={"label": ["portside.instance=ada", f"portside.node={up.node_id}"]}
        )
        assert container.status == "running"
        up.ctrl_c()
        container.reload()
        assert container.status == "exited", "Ctrl-C stops the container, keeping it"

        up = Up(hello, "again.log", like=up)
        up.start()
        up.wait_until_up()
        status, _, body = get(f"http://{up.edge}/cgi-bin/hello", {"X-Session-Id": "ada"})
        # The same container, woken: its writable layer kept the count.
        assert status == 200 and "visit 2" in body and container.short_id in body, body
        up.ctrl_c()
    finally:
        up.close()
        remove_node_containers(docker_client, up.node_id)


WRANGLER = """{
  // as `wrangler init` writes it for a container built from a Dockerfile
  "name": "worker",
  "containers": [{"class_name": "Builder", "image": "./container/Dockerfile", "max_instances": 3}],
}
"""


def test_deploy_of_a_wrangler_image_whose_dockerfile_is_missing_says_what_is_missing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wrangler.jsonc"
    path.write_text(WRANGLER)
    out = subprocess.run(
        [*PORTSIDE, "deploy", str(path), "--controlplane", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"portside deploy: {path}: containers[0].image: ")
    assert '"./container/Dockerfile": no such file or directory' in lines[-1]
    assert str(tmp_path / "container" / "Dockerfile") in lines[-1]


def test_wrangler_defaults_and_docker_errors_as_they_are(
    cluster: Cluster, tmp_path: Path, test_image: str
) -> None:
    cluster.start_controlplane()
    cluster.start_agent("fra")
    edge = cluster.start_edge("fra")
    cluster.wait_for_nodes(1)
    path = tmp_path / "wrangler.jsonc"
    path.write_text(
        json.dumps(
            {
                "name": "worker",
                "containers": [
                    {"class_name": "Echo", "image": test_image},
                    {"class_name": "Missing", "image": MISSING},
                ],
                "routes": [
                    {"path": "/echo", "class_name": "Echo", "instance": "header:X-Session-Id"},
                    {"path": "/gone", "class_name": "Missing", "instance": "header:X-Session-Id"},
                ],
            }
        )
    )
    control = ["--controlplane", cluster.controlplane_address]
    subprocess.run([*PORTSIDE, "deploy", str(path), *control], check=True, timeout=30)
    out = subprocess.run(
        [*PORTSIDE, "classes", "--json", *control], capture_output=True, text=True, timeout=30
    )
    classes = {c["name"]: c for c in json.loads(out.stdout)}
    # Cloudflare's defaults for an entry that does not say: lite, and at most 20 instances.
    assert classes["Echo"]["instance_type"]["name"] == "lite"
    assert classes["Echo"]["max_instances"] == 20

    status, headers, body = get(f"http://{edge.address}/gone/x", {"X-Session-Id": "a"})
    assert (status, headers.get("Portside-Error")) == (502, "image-unavailable"), (status, body)
    assert MISSING in body and "unreachable" not in body
    assert body.count("\n") == 1, body
    # The lifecycle API says the same, with the same kind.
    out = subprocess.run(
        [*PORTSIDE, "start", "Missing", "b", *control], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and MISSING in out.stderr, out.stderr
    assert "unreachable" not in out.stderr


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An etcd of this test's own, which it may freeze (never the shared one)."""
    client, peer = free_port(), free_port()
    proc = subprocess.Popen(
        [
            "etcd",
            "--data-dir",
            str(tmp_path / "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
        ],
        stdout=(tmp_path / "etcd.log").open("wb"),
        stderr=subprocess.STDOUT,
    )

    def healthy() -> bool:
        return (
            subprocess.run(
                ["etcdctl", "--endpoints", f"127.0.0.1:{client}", "endpoint", "health"],
                capture_output=True,
            ).returncode
            == 0
        )

    try:
        eventually_sync(healthy, within=30, what="the test's own etcd")
        yield f"etcd://127.0.0.1:{client}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_a_store_that_does_not_answer_is_a_503_with_its_reason_and_recovers(
    tmp_path: Path,
    own_etcd: tuple[str, subprocess.Popen[bytes]],
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    url, etcd = own_etcd
    cluster = Cluster(tmp=tmp_path, store_url=url, tag="s" + str(free_port()))
    try:
        cluster.start_controlplane()
        cluster.start_agent("fra")
        edge = cluster.start_edge("fra")
        cluster.wait_for_nodes(1)
        cluster.deploy(
            f'[[containers]]\nclass_name = "Echo"\nimage = "{test_image}"\ninstance_type = "lite"\n'
            '[[routes]]\npath = "/"\nclass_name = "Echo"\ninstance = "header:X-Session-Id"\n'
        )
        status, _, _ = get(f"http://{edge.address}/", {"X-Session-Id": "warm"})
        assert status == 200
        os.kill(etcd.pid, signal.SIGSTOP)
        started = time.monotonic()
        # Warm traffic does not need the store — for named instances, until the node's fence
        # closes (7 s after its last confirmed lease): a frozen etcd does not prove that no one
        # can place them elsewhere (docs/architecture.md, "Fencing").
        assert get(f"http://{edge.address}/", {"X-Session-Id": "warm"})[0] == 200
        status, headers, body = get(f"http://{edge.address}/", {"X-Session-Id": "new-name"})
        assert (status, headers.get("Portside-Error")) == (503, "store-unavailable"), body
        assert body.count("\n") == 1 and "etcd" in body and "did not answer" in body, body
        assert time.monotonic() - started < 15
        os.kill(etcd.pid, signal.SIGCONT)

        def served() -> bool:
            return get(f"http://{edge.address}/", {"X-Session-Id": "new-name"})[0] == 200

        eventually_sync(served, within=30, every=0.5, what="the new name once etcd is back")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(etcd.pid, signal.SIGCONT)
        cluster.close(docker_client)


def test_the_parts_of_a_killed_up_do_not_outlive_it(hello: Path) -> None:
    up = Up(hello)
    try:
        up.start()
        up.wait_until_up()
        assert up.proc is not None
        parts = subprocess.run(
            ["pgrep", "-f", f"(--listen {up.agent}|--listen {up.edge}|--listen {up.cp})( |$)"],
            capture_output=True,
            text=True,
        ).stdout.split()
        parts.remove(str(up.proc.pid))  # `up --listen EDGE` itself
        assert len(parts) == 3, parts
        up.proc.kill()  # no Ctrl-C: killed, as a crashed terminal or an OOM kill does
        up.proc.wait()

        def all_gone() -> bool:
            return not any(os.path.exists(f"/proc/{pid}") for pid in parts)

        eventually_sync(all_gone, within=30, what="the control plane, agent and edge stopped")
    finally:
        up.close()
