"""Placement constraints end to end: a hint outside a class's jurisdiction lands on an allowed
node and the response says where (Portside-Location); a labels constraint picks the labelled
node over a nearer one; constraints no node meets are refused with the constraint named, and
bad ones at `portside deploy`."""

from __future__ import annotations

import subprocess

import aiohttp
import docker
import pytest

from portside.headers import ERROR, LOCATION
from tests.e2e.harness import PORTSIDE, Cluster
from tests.e2e.test_named_instances import containers_of, get

pytestmark = pytest.mark.e2e


def config(image: str) -> str:
    classes = {
        "InEu": 'constraints = { jurisdiction = "eu" }',
        "OnGpu": 'constraints = { labels = { gpu = "yes" } }',
        "InSin": 'constraints = { regions = ["sin"] }',
    }
    out = []
    for name, line in classes.items():
        out.append(
            f'[[containers]]\nclass_name = "{name}"\nimage = "{image}"\ninstance_type = "lite"\n'
            f'{line}\n\n[[routes]]\npath = "/{name.lower()}"\nclass_name = "{name}"\n'
            'instance = "header:X-Session-Id"\n'
        )
    return "\n".join(out)


def deploy(cluster: Cluster, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PORTSIDE, "deploy", path, "--controlplane", cluster.controlplane_address],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_constraints_move_hints_pick_labelled_nodes_and_refuse_clearly(
    cluster: Cluster, test_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_controlplane()
    cluster.deploy(config(test_image))
    cluster.start_agent("iad", "127.0.0.2")
    cluster.start_agent("fra", "127.0.0.3", "--label", "gpu=yes")
    edge = cluster.start_edge("iad")
    cluster.wait_for_nodes(2)
    base = f"http://{edge.address}"

    def node_of(name: str) -> str:
        (container,) = containers_of(docker_client, name, cluster)
        return str(container.labels["portside.node"])

    async with aiohttp.ClientSession() as s:
        # The edge's own region (iad) is the hint; the EU class goes to fra and says so.
        status, body, headers = await get(s, f"{base}/ineu/x", "eu-1")
        assert status == 200, body
        assert "-fra-" in node_of("eu-1")
        assert headers[LOCATION] == "dub; hint=iad"
        status, _, headers = await get(s, f"{base}/ineu/x", "eu-1", hint="ams")
        assert status == 200 and LOCATION not in headers  # a hint within: nothing moved

        # iad is nearer, but only fra carries gpu=yes; labels move no hint.
        status, body, headers = await get(s, f"{base}/ongpu/x", "gpu-1")
        assert status == 200, body
        assert "-fra-" in node_of("gpu-1")
        assert LOCATION not in headers

        status, body, headers = await get(s, f"{base}/insin/x", "sin-1")
        assert status == 503 and headers[ERROR] == "no-capacity"
        assert body.startswith("no node satisfies the constraints of class InSin (regions sin):")

    bad = cluster.tmp / "bad.toml"
    bad.write_text(config(test_image).replace('jurisdiction = "eu"', 'jurisdiction = "mars"'))
    out = deploy(cluster, str(bad))
    assert out.returncode != 0
    assert f"{bad}: containers[0].constraints.jurisdiction: " in out.stderr
    assert "use one of eu, fedramp, us" in out.stderr
