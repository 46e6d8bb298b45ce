"""Images without a registry: `portside deploy` builds a Dockerfile with the local engine and
pushes it to the control plane's image store; a node whose engine never had the image gets it
from there on its first boot, verified by digest; `portside images` says where it is."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import docker
import pytest

from tests.e2e.engines import second_engine
from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import containers_of, get
from tests.images.build import _IMAGES, _busybox
from tests.support import eventually

pytestmark = pytest.mark.e2e

# The echo test image, with a mark baked in at build time from a build argument: /state answers
# what /data/state holds, so the answer says which build runs.
_MARKED = """
ARG MARK
RUN ["/bin/sh", "-c", "mkdir -p /data && echo \\"$MARK\\" > /data/state"]
"""


@pytest.fixture
def engine_b() -> Iterator[str]:
    with second_engine() as host:
        yield host


def build_dir(tmp: Path) -> Path:
    app = tmp / "app"
    shutil.copytree(_IMAGES / "echo", app)
    shutil.copy2(_busybox(), app / "busybox")
    dockerfile = app / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + _MARKED)
    return app


def config(mark: str) -> str:
    return f"""
[[containers]]
class_name = "Built"
image = "./app"
image_vars = {{ MARK = "{mark}" }}
default_port = 8080
instance_type = "lite"

[[routes]]
path = "/session"
class_name = "Built"
instance = "header:X-Session-Id"
"""


def images(cluster: Cluster) -> list[dict[str, object]]:
    out = subprocess.run(
        [*PORTSIDE, "images", "--json", "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        check=True,
    )
    listed: list[dict[str, object]] = json.loads(out.stdout)
    return listed


async def test_a_dockerfile_boots_on_the_node_whose_engine_never_had_it(
    cluster: Cluster, engine_b: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    build_dir(cluster.tmp)
    mark = "build-" + secrets.token_hex(4)
    cluster.deploy(config(mark))  # builds on this machine's engine, pushes to the control plane
    (image,) = images(cluster)
    digest = str(image["digest"])
    assert digest.startswith("sha256:") and image["classes"] == ["Built"]
    reference = str(image["reference"])
    assert reference == f"portside/built:{digest.removeprefix('sha256:')[:12]}"
    assert docker_client.images.get(reference).id == digest

    b = docker.DockerClient(base_url=engine_b)
    try:
        assert b.images.list(all=True) == []  # nothing on node B's engine, and no registry
        # Two nodes: fra's engine has the image (it was built there), syd's never had it.
        cluster.start_agent("fra", "127.0.0.2")
        syd = cluster.start_agent("syd", "127.0.0.3", env={"DOCKER_HOST": engine_b})
        edge = cluster.start_edge("syd")
        cluster.wait_for_nodes(2)
        async with aiohttp.ClientSession() as s:
            status, body, _ = await get(s, f"http://{edge.address}/session/state", "far", "syd")
        assert (status, body.strip()) == (200, mark), body
        (container,) = containers_of(b, "far", cluster)  # it runs on node B's engine
        assert container.image.id == digest
        assert b.images.get(reference).id == digest  # loaded, verified, tagged
        node_b = syd.option("--node-id")

        def listed_on_b() -> bool:
            (now,) = images(cluster)
            nodes = now["nodes"]
            assert isinstance(nodes, list)
            return node_b in nodes

        await eventually(listed_on_b, within=10, every=0.3, what="node B listed with the image")
        assert f"got image {digest} from the control plane" in syd.log_text()
    finally:
        b.close()


def test_a_build_that_fails_deploys_nothing_and_says_why(cluster: Cluster) -> None:
    cluster.start_controlplane()
    app = build_dir(cluster.tmp)
    (app / "Dockerfile").write_text('FROM scratch\nRUN ["/bin/false"]\n')
    path = cluster.tmp / "portside.toml"
    path.write_text(config("never"))
    out = subprocess.run(
        [*PORTSIDE, "deploy", str(path), "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "Built" in out.stderr and "build" in out.stderr.lower(), out.stderr
    assert images(cluster) == []


async def test_garbage_collection_keeps_the_current_image_and_removes_the_rest(
    cluster: Cluster, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane(
        "--image-gc-every", "1s", "--image-keep-versions", "1", "--image-gc-grace", "0s"
    )
    build_dir(cluster.tmp)
    cluster.deploy(config("gc-one-" + secrets.token_hex(3)))
    (first,) = images(cluster)
    cluster.deploy(config("gc-two-" + secrets.token_hex(3)))
    store = cluster.tmp / "images"
    try:

        def only_the_current_one() -> bool:
            listed = images(cluster)
            return [i["classes"] for i in listed] == [["Built"]] and len(listed) == 1

        await eventually(only_the_current_one, within=15, every=0.3, what="the old image gone")
        (kept,) = images(cluster)
        assert kept["digest"] != first["digest"]
        old_hex = str(first["digest"]).removeprefix("sha256:")
        kept_hex = str(kept["digest"]).removeprefix("sha256:")

        def swept() -> bool:
            return not (store / "images" / f"{old_hex}.json").exists()

        await eventually(swept, within=15, every=0.3, what="the old image's record swept")
        blobs = {p.name for p in (store / "blobs" / "sha256").iterdir()}
        assert old_hex not in blobs and kept_hex in blobs  # the configs
        assert (store / "images" / f"{kept_hex}.json").exists()
    finally:
        for image in (first, *images(cluster)):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(str(image["reference"]), force=True)
