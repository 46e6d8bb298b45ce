"""Shared fixtures: the real etcd and Docker engine that .ci/run starts.

Integration and end-to-end tests fail loudly when either is missing; they are never skipped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import docker
import pytest

ETCD_URL = os.environ.get("PORTSIDE_TEST_ETCD", "etcd://127.0.0.1:2379")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def etcd_url() -> str:
    parsed = urlparse(ETCD_URL)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 2379
    if not _reachable(host, port):
        pytest.fail(
            f"etcd is not running at {host}:{port}: start it as .ci/run does", pytrace=False
        )
    return ETCD_URL


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means no engine
        pytest.fail(f"no Docker engine: {exc}; start dockerd as .ci/run does", pytrace=False)
    yield client
    client.close()
