"""`portside deploy`'s build on the real Docker engine: a FROM-scratch busybox image built from a
config's Dockerfile, named by its id, and its `docker save` archive as a push streams it.

Pushing it to a control plane is the end-to-end test's; here the archive is checked against the
digest the way the image store checks it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from portside.build import archive_chunks, build_image, image_reference
from portside.config import BuildSpec, load_deployment
from portside.errors import ConfigError

# No RUN step: this machine's engine has no docker0 bridge for build containers.
DOCKERFILE = """\
FROM scratch
COPY busybox /busybox
ARG GREETING=nobody
LABEL greeting=$GREETING
CMD ["/busybox", "httpd", "-f", "-p", "8080"]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A config, its Dockerfile in docker/, and a separate build context holding busybox."""
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox is not installed: apt-get install busybox-static"
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "context").mkdir()
    shutil.copy2(Path(busybox).resolve(), tmp_path / "context" / "busybox")
    return tmp_path


@pytest.fixture
def built_ids(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    """Image ids a test built; removed afterwards with their tags, even on failure."""
    ids: list[str] = []
    yield ids
    for image_id in ids:
        try:
            docker_client.images.remove(image_id, force=True)
        except docker.errors.ImageNotFound:
            pass


def spec_of(project: Path, greeting: str) -> BuildSpec:
    config = project / "portside.toml"
    config.write_text(
        '[[containers]]\nclass_name = "Hello_World"\nimage = "./docker/Dockerfile"\n'
        f'image_build_context = "./context"\nimage_vars = {{ GREETING = "{greeting}" }}\n'
    )
    return load_deployment(config).builds["Hello_World"]


def test_build_names_the_image_by_its_id_and_tags_it(
    project: Path, docker_client: docker.DockerClient, built_ids: list[str]
) -> None:
    log: list[str] = []
    image = build_image(docker_client, "Hello_World", spec_of(project, "ada"), log.append)
    built_ids.append(image.digest)

    engine_image = docker_client.images.get(image.reference)
    assert image.digest == engine_image.id and image.digest.startswith("sha256:")
    assert len(image.digest) == len("sha256:") + 64
    assert image.reference == image_reference("Hello_World", image.digest)
    assert image.reference == f"portside/hello_world:{image.digest[7:19]}"
    assert image.reference in engine_image.tags
    busybox_size = (project / "context" / "busybox").stat().st_size
    assert image.size_bytes == engine_image.attrs["Size"]
    assert busybox_size <= image.size_bytes < busybox_size + 64 * 1024
    # The build arg reached the build, and its output reached on_log.
    assert engine_image.labels == {"greeting": "ada"}
    assert any("LABEL greeting=$GREETING" in line for line in log), log


def test_another_build_arg_is_another_image(
    project: Path, docker_client: docker.DockerClient, built_ids: list[str]
) -> None:
    first = build_image(docker_client, "Hello_World", spec_of(project, "ada"))
    built_ids.append(first.digest)
    again = build_image(docker_client, "Hello_World", spec_of(project, "ada"))
    other = build_image(docker_client, "Hello_World", spec_of(project, "grace"))
    built_ids.append(other.digest)
    assert again == first  # the same inputs: the same id (from the build cache)
    assert other.digest != first.digest and other.reference != first.reference


async def test_the_pushed_archive_holds_the_image_its_digest_names(
    project: Path, docker_client: docker.DockerClient, built_ids: list[str]
) -> None:
    image = build_image(docker_client, "Hello_World", spec_of(project, "ada"))
    built_ids.append(image.digest)
    pieces = [piece async for piece in archive_chunks(docker_client, image.reference, 4096)]
    assert len(pieces) > 1 and all(len(p) <= 4096 for p in pieces)

    with tarfile.open(fileobj=io.BytesIO(b"".join(pieces))) as archive:
        (manifest,) = json.load(_member(archive, "manifest.json"))
        config = _member(archive, manifest["Config"]).read()
        assert "sha256:" + hashlib.sha256(config).hexdigest() == image.digest
        assert manifest["RepoTags"] == [image.reference]
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        layers = [_member(archive, name).read() for name in manifest["Layers"]]
    assert ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers] == diff_ids


def test_a_failed_build_names_the_file_and_class_with_the_builds_reason(
    project: Path, docker_client: docker.DockerClient
) -> None:
    (project / "docker" / "Dockerfile").write_text(
        "FROM scratch\nCOPY busybox /busybox\nCOPY not-in-the-context /x\n"
    )
    spec = spec_of(project, "ada")
    log: list[str] = []
    with pytest.raises(ConfigError) as caught:
        build_image(docker_client, "Hello_World", spec, log.append)
    assert caught.value.file == str(project / "portside.toml")
    assert caught.value.field == "containers[0].image"
    assert caught.value.problem.startswith(
        "building class Hello_World from ./docker/Dockerfile failed: "
    )
    assert "not-in-the-context" in caught.value.problem
    # What the build printed up to there reaches on_log (the CLI shows its last lines).
    assert any("COPY busybox /busybox" in line for line in log), log


def test_a_dockerfile_the_engine_cannot_read_is_the_users_error(
    project: Path, docker_client: docker.DockerClient
) -> None:
    (project / "docker" / "Dockerfile").write_text("FROM scratch\nNOT-AN-INSTRUCTION x\n")
    with pytest.raises(ConfigError) as caught:
        build_image(docker_client, "Hello_World", spec_of(project, "ada"))
    assert caught.value.field == "containers[0].image"
    assert "not-an-instruction" in caught.value.problem.lower()


def _member(archive: tarfile.TarFile, name: str) -> io.BufferedReader:
    member = archive.extractfile(name)
    assert member is not None, name
    return member  # type: ignore[return-value]
