"""`portside up` runs a whole Portside on one machine from ./portside.toml, and Ctrl-C stops it;
`portside deploy` of a bad file names the file, the field and what is allowed."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import docker
import pytest

from portside.net import free_port
from tests.e2e.harness import PORTSIDE

pytestmark = pytest.mark.e2e


def test_portside_up_serves_and_stops_on_ctrl_c(
    tmp_path: Path, test_image: str, docker_client: docker.DockerClient
) -> None:
    (tmp_path / "portside.toml").write_text(f"""
[[containers]]
class_name = "Hello"
image = "{test_image}"
instance_type = "lite"

[[routes]]
path = "/hello"
class_name = "Hello"
instance = "query:user"
""")
    edge, cp, agent = (f"127.0.0.1:{free_port()}" for _ in range(3))
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*PORTSIDE, "up", "--listen", edge, "--controlplane-listen", cp, "--agent-listen", agent],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    node_prefix = None
    try:
        deadline = time.monotonic() + 30
        while "Portside is up" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None and time.monotonic() < deadline, (
                tmp_path / "up.log"
            ).read_text()
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://{edge}/hello/whoami?user=ada", timeout=30) as resp:
            assert resp.status == 200
        (container,) = docker_client.containers.list(filters={"label": "portside.instance=ada"})
        node_prefix = container.labels["portside.node"]
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
            if node_prefix and c.labels["portside.node"] == node_prefix:
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
