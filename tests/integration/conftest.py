"""Fixtures for the node agent's integration tests: the test image and a node id of each test's
own, whose containers are removed afterwards, even on failure."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import docker
import pytest

from nodeagent.runtime.labels import LABEL_NODE
from tests.images.build import build_image


@pytest.fixture(scope="session")
def echo_image(docker_client: docker.DockerClient) -> str:
    return build_image(docker_client)


@pytest.fixture
def node_id(docker_client: docker.DockerClient) -> Iterator[str]:
    node = f"test-{uuid.uuid4().hex[:10]}"
    yield node
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_NODE}={node}"}
    ):
        container.remove(force=True)
