"""Snapshots (issue 13): the size and time of a snapshot of a container whose writable layer has
--mib MiB written (random bytes), and of its restore on a node that lacks it, against
`docker commit` and `docker save | docker load` of the same container in the same run.

Everything is on this machine: the main Docker engine is the node the instance runs on; a second,
empty engine (tests/e2e/engines.py) is the node it is restored on, with the class image loaded
first (as prefetch leaves it where a class runs). The agent's own pieces run in this process (its
instance manager, image keeper and snapshots, on nodeagent.runtime.DockerRuntime); the control
plane's image store is the real one (controlplane/images.py) behind the small gRPC servicer of
tests/integration/test_agent_snapshots.py, on loopback. Each round:

  docker       `docker commit` of the container, then `docker save` of the commit piped into
               `docker load` on the second engine (the whole image: docker sends every layer)
  portside     the snapshot: commit (the container is held), read its layer out, make and load
               the clean image, push it to the store, record it (the agent's log splits it);
               the restore: a Start from the snapshot on the second node: pull (only the new
               layer travels) and load, create, start, until the container's port answers

Usage: python bench/snapshot.py [--mib 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodeagent.images import ControlPlaneImages, ImageKeeper  # noqa: E402
from nodeagent.instances import InstanceManager, Timing  # noqa: E402
from nodeagent.runtime import DockerRuntime  # noqa: E402
from nodeagent.snapshots import Snapshots  # noqa: E402
from portside.build import image_reference  # noqa: E402
from portside.spec import INSTANCE_TYPES, ContainerClass, instance_id  # noqa: E402
from tests.e2e.engines import second_engine  # noqa: E402
from tests.images.build import build_image  # noqa: E402
from tests.integration.test_agent_snapshots import control_plane  # noqa: E402

CLASS = "SnapBench"
COMMIT = {"class": CLASS, "step": "commit"}
PULL = {"source": "controlplane"}
SAVE_LOAD = "docker save, piped into docker load on the second engine"
RESTORE = "Portside restore on the second node (pull, load, create, first answer)"
FRESH = "Portside boot of a fresh instance on the second node (create, first answer)"
MIB = 1 << 20


def observed(histogram: str, labels: dict[str, str]) -> float:
    """The seconds a histogram of this process has summed so far."""
    return REGISTRY.get_sample_value(f"{histogram}_sum", labels) or 0.0


def save_load(image_id: str, engine: str) -> tuple[float, int]:
    """`docker save IMAGE | DOCKER_HOST=engine docker load`: seconds, and the archive's bytes."""
    started = time.perf_counter()
    save = subprocess.Popen(["docker", "save", image_id], stdout=subprocess.PIPE)
    load = subprocess.Popen(
        ["docker", "load", "-q"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, DOCKER_HOST=engine),
    )
    assert save.stdout is not None and load.stdin is not None
    size = 0
    while piece := save.stdout.read(MIB):
        size += len(piece)
        load.stdin.write(piece)
    load.stdin.close()
    if save.wait() != 0 or load.wait() != 0:
        raise RuntimeError("docker save | docker load failed")
    return time.perf_counter() - started, size


async def run(args: argparse.Namespace) -> None:
    main_engine = docker.from_env()
    base = build_image(main_engine)
    reference = image_reference(CLASS, base)
    repository, _, tag = reference.rpartition(":")
    main_engine.api.tag(base, repository, tag)
    cls = ContainerClass(
        CLASS,
        reference,
        image_digest=base,
        instance_type=INSTANCE_TYPES["basic"],
        boot_timeout_s=60.0,
        sleep_after_s=3600.0,
    )
    tmp = Path(tempfile.mkdtemp(prefix="portside-bench-snapshot-"))
    commits: list[str] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            control, channel = await stack.enter_async_context(
                control_plane(tmp / "images", main_engine, base, reference)
            )
            here = DockerRuntime("bench-snap-a")
            stack.push_async_callback(here.close)
            manager = InstanceManager(
                here,
                {CLASS: cls}.get,
                timing=Timing(reconcile=3600),
                node_id=here.node_id,
                snapshots=Snapshots(here, channel, node_id=here.node_id),
            )
            stack.push_async_callback(manager.close)
            iid = instance_id(CLASS, "a")
            await manager.start(cls, "a")
            container = main_engine.containers.get(here_container(manager, iid))
            print(f"writing {args.mib} MiB of random bytes into the container ...", flush=True)
            write = f"head -c {args.mib * MIB} /dev/urandom > /blob"
            code, out = container.exec_run(["sh", "-c", write])
            assert code == 0, out

            engine = stack.enter_context(second_engine())
            other = docker.DockerClient(base_url=engine, timeout=300)
            stack.callback(other.close)
            save_load(base, engine)  # the class image is there, as prefetch leaves it
            other.api.tag(base, repository, tag)
            there = DockerRuntime("bench-snap-b", client=other)
            stack.push_async_callback(there.close)
            keeper = ImageKeeper(there, ControlPlaneImages(channel), lambda: [cls])
            stack.push_async_callback(keeper.close)
            restorer = InstanceManager(
                there,
                {CLASS: cls}.get,
                timing=Timing(reconcile=3600),
                node_id=there.node_id,
                images=keeper,
                snapshots=Snapshots(there, channel, node_id=there.node_id),
            )
            stack.push_async_callback(restorer.close)
            rows: dict[str, list[float]] = {}
            sizes: dict[str, int] = {}
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds} ...", flush=True)
                started = time.perf_counter()
                commit = main_engine.api.commit(container.id)["Id"]
                rows.setdefault("docker commit", []).append(time.perf_counter() - started)
                commits.append(commit)
                seconds, sizes["docker save archive"] = save_load(commit, engine)
                rows.setdefault(SAVE_LOAD, []).append(seconds)
                other.images.remove(commit, force=True)

                control.pushes.clear()
                control.pulls.clear()
                held = observed("portside_agent_snapshot_seconds", COMMIT)
                started = time.perf_counter()
                snap = await manager.take_snapshot(iid)
                rows.setdefault("Portside snapshot (commit, read, push, record)", []).append(
                    time.perf_counter() - started
                )
                rows.setdefault("  of which the commit (the container held)", []).append(
                    observed("portside_agent_snapshot_seconds", COMMIT) - held
                )
                assert snap is not None
                sizes["snapshot layer"] = snap.layer_bytes
                sizes["pushed to the store"] = control.pushes[0][1]
                pulled = observed("portside_agent_image_pull_seconds", PULL)
                started = time.perf_counter()
                await restorer.start(cls, f"r{i}", snapshot=snap)
                rows.setdefault(RESTORE, []).append(time.perf_counter() - started)
                rows.setdefault("  of which the pull and load", []).append(
                    observed("portside_agent_image_pull_seconds", PULL) - pulled
                )
                sizes["pulled by the second node"] = control.pulls[0][1]
                started = time.perf_counter()
                await restorer.start(cls, f"f{i}")
                rows.setdefault(FRESH, []).append(time.perf_counter() - started)
                for name in (f"r{i}", f"f{i}"):
                    await restorer.destroy(instance_id(CLASS, name))
                other.images.remove(snap.digest, force=True)
                main_engine.images.remove(snap.digest, force=True)

        print()
        print(f"a container with {args.mib} MiB written; the median of {args.rounds} rounds:")
        print("| step | seconds |")
        print("|---|---|")
        for label, samples in rows.items():
            print(f"| {label} | {statistics.median(samples):.2f} |")
        print()
        print("| bytes | MiB |")
        print("|---|---|")
        for label, size in sizes.items():
            print(f"| {label} | {size / MIB:.1f} |")
    finally:
        for found in main_engine.containers.list(all=True, filters={"label": "portside.node"}):
            if found.labels.get("portside.node") == "bench-snap-a":
                found.remove(force=True)
        for image in (*commits, reference):
            with contextlib.suppress(docker.errors.APIError):
                main_engine.api.remove_image(image, force=True)
        for image in main_engine.images.list(f"portside/{CLASS.lower()}.snapshot"):
            main_engine.images.remove(image.id, force=True)
        main_engine.close()
        shutil.rmtree(tmp, ignore_errors=True)


def here_container(manager: InstanceManager, iid: str) -> str:
    snap = manager.get(iid)
    assert snap is not None and snap.container_id is not None
    return snap.container_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=50, help="bytes written into the container")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
