"""Every replica holds every image: an image `portside deploy` pushed to one control plane is
copied to the other (mutual TLS between replicas, each with its own image directory), and an
agent that talks only to the other one, on an engine that never had the image, boots it."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator

import aiohttp
import docker
import pytest

from tests.e2e.engines import second_engine
from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_images import build_dir, config
from tests.e2e.test_named_instances import containers_of, get
from tests.support import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture
def engine_b() -> Iterator[str]:
    with second_engine() as host:
        yield host


def images_on(address: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [*PORTSIDE, "images", "--json", "--controlplane", address],
        capture_output=True,
        text=True,
        check=True,
    )
    listed: list[dict[str, object]] = json.loads(out.stdout)
    return listed


async def test_an_image_pushed_to_one_replica_is_copied_to_the_other_which_serves_it(
    cluster: Cluster, engine_b: str, docker_client: docker.DockerClient
) -> None:
    one = cluster.start_controlplane("--replica-id", "cp1", "--image-dir", str(cluster.tmp / "i1"))
    two = cluster.start_controlplane("--replica-id", "cp2", "--image-dir", str(cluster.tmp / "i2"))
    assert cluster.controlplane_address == one.address  # the deploy goes to replica 1 only
    build_dir(cluster.tmp)
    mark = "replica-" + secrets.token_hex(4)
    cluster.deploy(config(mark))
    (image,) = images_on(one.address)
    digest = str(image["digest"])
    pushed = f"image {digest} ({image['reference']}) pushed"
    assert pushed in one.log_text()
    assert pushed not in two.log_text()  # replica 2 gets it only by copying it

    held_by_two = cluster.tmp / "i2" / "images" / (digest.removeprefix("sha256:") + ".json")

    def copied() -> bool:
        (now,) = images_on(two.address)
        return held_by_two.exists() and now["replicas"] == ["cp1", "cp2"]

    await eventually(copied, within=10, every=0.2, what="replica 2 holding the image")
    assert f"copied image {digest} from replica cp1" in two.log_text()

    # An agent and an edge that know only replica 2; the agent's engine never had the image.
    cluster.controlplane_address = two.address
    b = docker.DockerClient(base_url=engine_b)
    try:
        assert b.images.list(all=True) == []
        syd = cluster.start_agent("syd", "127.0.0.3", env={"DOCKER_HOST": engine_b})
        edge = cluster.start_edge("syd")
        cluster.wait_for_nodes(1)
        async with aiohttp.ClientSession() as s:
            status, body, _ = await get(s, f"http://{edge.address}/session/state", "far", "syd")
        assert (status, body.strip()) == (200, mark), body
        (container,) = containers_of(b, "far", cluster)
        assert container.image.id == digest
        assert f"got image {digest} from the control plane" in syd.log_text()
    finally:
        b.close()
