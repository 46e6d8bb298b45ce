"""Builds Portside's test images from this directory with the local busybox, no registry needed.

`build_image(client)` takes about a second and is idempotent (Docker's build cache does the rest).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import docker

ECHO_IMAGE = "portside-test/echo:latest"
_IMAGES = Path(__file__).resolve().parent


def _busybox() -> Path:
    found = shutil.which("busybox")
    if found is None:
        raise RuntimeError("busybox is not installed: apt-get install busybox-static")
    return Path(found).resolve()


def build_image(client: docker.DockerClient, tag: str = ECHO_IMAGE, name: str = "echo") -> str:
    """Build tests/images/<name> as `tag` and return the image id."""
    with tempfile.TemporaryDirectory(prefix="portside-image-") as context:
        shutil.copytree(_IMAGES / name, context, dirs_exist_ok=True)
        # A scratch image needs a static binary: Debian's busybox-static is one.
        shutil.copy2(_busybox(), Path(context) / "busybox")
        image, _logs = client.images.build(path=context, tag=tag, rm=True, forcerm=True)
    image_id: str = image.id
    return image_id


if __name__ == "__main__":
    docker_client = docker.from_env()
    try:
        print(build_image(docker_client))
    finally:
        docker_client.close()
