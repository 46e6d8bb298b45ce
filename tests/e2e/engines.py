"""A second, empty Docker engine on this machine, for tests where nodes must not share images.

It runs beside the main engine with a data root, exec root, socket and default bridge of its own
(never `--bridge none`: an engine started so deletes the host's docker0, the main engine's), no
packet-filter rules of its own, and its networks drawn from 172.29.0.0/16 (host-local bridges it
creates itself), so that nothing it does touches the main engine's containers."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker

_ADDRESS_POOL = "base=172.29.0.0/16,size=24"
_BRIDGE_ADDRESS = "172.28.255.1/24"  # its default bridge's, outside the pool


@contextlib.contextmanager
def second_engine() -> Iterator[str]:
    """Start the engine; yield its DOCKER_HOST (unix://...); stop it and delete its data."""
    # Under /var/lib: overlay2 needs a file system like the main engine's, not a tmpfs.
    root = Path(tempfile.mkdtemp(prefix="portside-engine-", dir="/var/lib"))
    socket = root / "docker.sock"
    host = f"unix://{socket}"
    bridge = f"psb{os.getpid() % 100_000}"  # an interface name: at most 15 characters
    for step in (
        ["ip", "link", "add", bridge, "type", "bridge"],
        ["ip", "addr", "add", _BRIDGE_ADDRESS, "dev", bridge],
        ["ip", "link", "set", bridge, "up"],
    ):
        subprocess.run(step, check=True, capture_output=True)
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            "dockerd",
            "--host",
            host,
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
            "--bridge",
            bridge,
            "--iptables=false",
            "--ip-masq=false",
            "--default-address-pool",
            _ADDRESS_POOL,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                # The client asks the engine its API version as it is made.
                client = docker.DockerClient(base_url=host, timeout=10)
                break
            except docker.errors.DockerException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the second Docker engine did not start:\n"
                        + (root / "dockerd.log").read_text(errors="replace")[-3000:]
                    ) from None
                time.sleep(0.2)
        try:
            yield host
        finally:
            for c in client.api.containers(all=True):
                with contextlib.suppress(docker.errors.APIError):
                    client.api.remove_container(c["Id"], force=True)
            client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        # The engine unmounts its layers on a clean stop; what is left is plain files.
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
