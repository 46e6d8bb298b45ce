"""Fixtures for end-to-end tests: a fresh cluster per test on the real etcd and Docker engine,
and the test image built once per session."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.e2e.harness import Cluster
from tests.images.build import build_image

TEST_IMAGE = "portside-test/echo:latest"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture(scope="session")
def test_image(docker_client: docker.DockerClient) -> str:
    build_image(docker_client, TEST_IMAGE)
    return TEST_IMAGE


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    etcd_url: str,
    docker_client: docker.DockerClient,
    test_image: str,
) -> Iterator[Cluster]:
    # Every e2e test gets an empty Portside keyspace in the shared etcd.
    subprocess.run(
        [
            "etcdctl",
            "--endpoints",
            etcd_url.removeprefix("etcd://"),
            "del",
            "--prefix",
            "/portside/",
        ],
        check=True,
        capture_output=True,
    )
    c = Cluster(tmp=tmp_path, store_url=etcd_url, tag="t" + secrets.token_hex(3))
    try:
        yield c
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(c.logs())
        c.close(docker_client)
