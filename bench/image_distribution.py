"""Image distribution without a registry (issue 12): the time to get a large image onto a second
node through Portside, against `docker save | docker load` between the same two engines.

Builds a FROM-scratch image of about --mib MiB (busybox and a file of random bytes) with this
machine's Docker engine, starts a second, empty engine beside it (tests/e2e/engines.py), and in
each round, with the image removed from the second engine first:
  docker          `docker save IMAGE | DOCKER_HOST=<second> docker load`, timed
  portside        a node agent on the second engine registers with a control plane whose store
                  holds the image (pushed by `portside deploy`, which built it); the agent
                  fetches it because its class was just deployed (prefetch), streams it into its
                  engine's load and verifies the digest. Timed from the agent's registration to
                  the image's arrival (the agent's own figure, from its log), and from the
                  agent's start (what an operator waits for).
The push (`portside deploy` of an image the store lacks) is timed once. Everything runs on this
machine: both engines, the control plane on an embedded store, the agent; traffic only on
loopback and unix sockets.
Usage: python bench/image_distribution.py [--mib 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.named_instances import wait_port  # noqa: E402
from portside.net import free_port  # noqa: E402
from tests.e2e.engines import second_engine  # noqa: E402

PY = [sys.executable, "-m", "portside", "--log-level", "info"]
CLASS = "Big"


def write_build_dir(where: Path, mib: int) -> None:
    where.mkdir(parents=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("busybox is not installed: apt-get install busybox-static")
    shutil.copy2(Path(busybox).resolve(), where / "busybox")
    with (where / "payload").open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    (where / "Dockerfile").write_text(
        "FROM scratch\n"
        "COPY busybox /bin/busybox\n"
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        "COPY payload /payload\n"
        'CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/"]\n'
    )


def config() -> str:
    return f"""
[[containers]]
class_name = "{CLASS}"
image = "./big"
default_port = 8080
instance_type = "lite"
"""


def remove_everywhere(client: docker.DockerClient, image_id: str) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(image_id, force=True)


def docker_save_load(image_id: str, engine: str) -> float:
    started = time.perf_counter()
    save = subprocess.Popen(["docker", "save", image_id], stdout=subprocess.PIPE)
    subprocess.run(
        ["docker", "load", "-q"],
        stdin=save.stdout,
        env=dict(os.environ, DOCKER_HOST=engine),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    assert save.stdout is not None
    save.stdout.close()
    if save.wait() != 0:
        raise RuntimeError("docker save failed")
    return time.perf_counter() - started


_PULLED = re.compile(r"got image (sha256:[0-9a-f]+) from the control plane in ([\d.]+)s")


def agent_pull_seconds(log: str, digest: str) -> float | None:
    """The agent's own figure for the pull (transfer and load), from its log."""
    for found in _PULLED.finditer(log):
        if found.group(1) == digest:
            return float(found.group(2))
    return None


def run(args: argparse.Namespace) -> None:
    os.chdir(ROOT)
    client = docker.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-images-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print(f"writing a build directory with {args.mib} MiB of random bytes ...", flush=True)
        write_build_dir(tmp / "big", args.mib)
        (tmp / "portside.toml").write_text(config())
        store = f"sqlite://{tmp}/store.db"
        tokens = tmp / "tokens"
        subprocess.run(
            [*PY, "bootstrap", "--store", store, "--out", str(tokens)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cp = f"127.0.0.1:{free_port()}"
        cp_log = (tmp / "controlplane.log").open("wb")
        procs.append(
            subprocess.Popen(
                [*PY, "controlplane", "--listen", cp, "--store", store]
                + ["--metrics-listen", f"127.0.0.1:{free_port()}"]
                + ["--image-dir", str(tmp / "images")],
                stdout=cp_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_port("127.0.0.1", int(cp.rsplit(":", 1)[1]), timeout_s=30)
        print("portside deploy (build, then push to the control plane) ...", flush=True)
        started = time.perf_counter()
        subprocess.run(
            [*PY, "deploy", str(tmp / "portside.toml"), "--controlplane", cp]
            + ["--token-file", str(tokens / "admin.token")],
            check=True,
        )
        deploy_s = time.perf_counter() - started
        reference = next(t for image in client.images.list("portside/big") for t in image.tags)
        image = client.images.get(reference)
        size_mib = image.attrs["Size"] / (1 << 20)

        with second_engine() as engine:
            b = docker.DockerClient(base_url=engine, timeout=120)
            baseline: list[float] = []
            through: list[float] = []
            registered_to_loaded: list[float] = []
            for i in range(args.rounds):
                remove_everywhere(b, image.id)
                print(f"round {i + 1}/{args.rounds}: docker save | docker load ...", flush=True)
                baseline.append(docker_save_load(image.id, engine))
                remove_everywhere(b, image.id)
                print(f"round {i + 1}/{args.rounds}: through Portside ...", flush=True)
                log_path = tmp / f"agent-{i}.log"
                started = time.perf_counter()
                agent = subprocess.Popen(
                    [*PY, "agent", "--controlplane", cp]
                    + ["--listen", f"127.0.0.1:{free_port()}"]
                    + ["--api-listen", f"127.0.0.1:{free_port()}"]
                    + ["--metrics-listen", f"127.0.0.1:{free_port()}"]
                    + ["--region", "fra", "--node-id", f"bench-images-{i}"]
                    + ["--join-token-file", str(tokens / "join.token")],
                    stdout=log_path.open("wb"),
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, DOCKER_HOST=engine),
                    start_new_session=True,
                )
                procs.append(agent)
                deadline = time.monotonic() + 300
                while True:
                    with contextlib.suppress(docker.errors.ImageNotFound):
                        if b.images.get(image.id).id == image.id:
                            break
                    if agent.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            "the image did not arrive:\n" + log_path.read_text()[-3000:]
                        )
                    time.sleep(0.02)
                through.append(time.perf_counter() - started)
                agent.send_signal(signal.SIGTERM)
                agent.wait(30)
                own = agent_pull_seconds(log_path.read_text(errors="replace"), image.id)
                if own is not None:
                    registered_to_loaded.append(own)
            b.close()

        print()
        print(
            f"image {reference}: {size_mib:.0f} MiB; `portside deploy` (build and push) "
            f"{deploy_s:.2f} s; the median of {args.rounds} rounds:"
        )
        print("| path | seconds | MiB/s | × docker save and load |")
        print("|---|---|---|---|")
        base = statistics.median(baseline)
        rows = [("docker save, piped into docker load on the second engine", base)]
        if registered_to_loaded:
            rows.append(
                (
                    "Portside: the agent's pull, control plane → engine (its log)",
                    statistics.median(registered_to_loaded),
                )
            )
        rows.append(
            ("Portside: from the agent's start to the image loaded", statistics.median(through))
        )
        for label, seconds in rows:
            print(f"| {label} | {seconds:.2f} | {size_mib / seconds:.0f} | {seconds / base:.2f}× |")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(15)
                if p.poll() is None:
                    p.kill()
        with contextlib.suppress(docker.errors.APIError):
            for found in client.images.list("portside/big"):
                client.images.remove(found.id, force=True)
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="size of the payload file")
    parser.add_argument("--rounds", type=int, default=3)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
