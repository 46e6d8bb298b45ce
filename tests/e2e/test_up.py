"""`portside up` runs a whole Portside on one machine from ./portside.toml, and Ctrl-C stops it;
`portside deploy` of a bad file names the file, the field and what is allowed."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import docker
import pytest

from portside.net import free_port
from tests.e2e.harness import PORTSIDE
from tests.support import eventually_sync

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_portside_up_runs_the_readme_example_and_stops_on_ctrl_c(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    # The README's own steps: build the example image, `portside up` next to its portside.toml.
    subprocess.run([str(EXAMPLES / "hello" / "build.sh")], check=True, capture_output=True)
    shutil.copy(EXAMPLES / "portside.toml", tmp_path / "portside.toml")
    edge, cp, agent = (f"127.0.0.1:{free_port()}" for _ in range(3))
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*PORTSIDE, "up", "--listen", edge, "--controlplane-listen", cp, "--agent-listen", agent],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    node_id = f"{socket.gethostname()}-{agent.rsplit(':', 1)[1]}"  # the agent's default id
    try:

        def is_up() -> bool:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            return "Portside is up" in (tmp_path / "up.log").read_text()

        eventually_sync(is_up, within=30, every=0.05, what="portside up")
        replies = []
        for _ in range(2):
            request = urllib.request.Request(
                f"http://{edge}/cgi-bin/hello", headers={"X-Session-Id": "ada"}
            )
            with urllib.request.urlopen(request, timeout=30) as resp:
                assert resp.status == 200
                replies.append(resp.read().decode())
        assert "(instance ada), visit 1" in replies[0] and "visit 2" in replies[1], replies
        (container,) = docker_client.containers.list(
            filters={"label": ["portside.instance=ada", f"portside.node={node_id}"]}
        )
        assert container.status == "running"
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0, (tmp_path / "up.log").read_text()
        for address in (edge, cp, agent):
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://{address}/", timeout=1)
        assert (tmp_path / ".portside" / "store.db").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for c in docker_client.containers.list(all=True, filters={"label": "portside.node"}):
            if c.labels["portside.node"] == node_id:
                c.remove(force=True)


def test_deploy_of_a_bad_config_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "portside.toml"
    bad.write_text('[[containers]]\nclass_name = "A"\nimage = "x"\ninstance_type = "huge"\n')
    out = subprocess.run(
        [*PORTSIDE, "deploy", str(bad), "--controlplane", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert str(bad) in out.stderr and "containers[0].instance_type" in out.stderr
    assert "standard-1" in out.stderr


def test_up_refuses_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    (tmp_path / "portside.toml").write_text('[[routes]]\npath = "nope"\nclass_name = "X"\n')
    started = time.monotonic()
    out = subprocess.run(
        [*PORTSIDE, "up", "--listen", f"127.0.0.1:{free_port()}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "portside.toml" in out.stderr and "routes[0]" in out.stderr
    assert time.monotonic() - started < 10
