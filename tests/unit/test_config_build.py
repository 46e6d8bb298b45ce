"""Classes whose image is built: Dockerfile paths and build directories in both formats, the
build context and build args, and the errors that name the file, the field and what is allowed.

The files are real (a temporary directory): the loader checks them before any build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from portside.config import (
    BuildSpec,
    is_build_path,
    load_config,
    load_deployment,
    read_toml,
    read_wrangler,
    validate_config,
)
from portside.errors import ConfigError
from portside.spec import Config, ContainerClass


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory: app/Dockerfile, web/Dockerfile, a shared/ context, and the current
    directory elsewhere, so that a path resolved against it instead of the file fails."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "web" / "Dockerfile.dev").write_text("FROM scratch\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "empty").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path


def toml_class(image: str, extra: str = "", name: str = "Web") -> str:
    return f'[[containers]]\nclass_name = "{name}"\nimage = "{image}"\n{extra}'


def write(project: Path, name: str, text: str) -> Path:
    path = project / name
    path.write_text(text)
    return path


def test_a_dockerfile_path_builds_in_its_directory(project: Path) -> None:
    loaded = load_deployment(write(project, "portside.toml", toml_class("./app/Dockerfile")))
    assert loaded.builds == {
        "Web": BuildSpec(
            dockerfile=project / "app" / "Dockerfile",
            context=project / "app",
            vars={},
            source="./app/Dockerfile",
            file=str(project / "portside.toml"),
            at="containers[0]",
        )
    }
    # The class keeps the path as written until `portside deploy` builds it.
    assert loaded.config.classes[0].image == "./app/Dockerfile"
    assert loaded.config.classes[0].image_digest == ""


def test_a_build_directory_means_its_dockerfile(project: Path) -> None:
    loaded = load_deployment(write(project, "portside.toml", toml_class("./web")))
    spec = loaded.builds["Web"]
    assert (spec.dockerfile, spec.context) == (project / "web" / "Dockerfile", project / "web")


def test_context_and_vars_relative_to_the_config_file(project: Path) -> None:
    extra = 'image_build_context = "."\nimage_vars = { GREETING = "hi", EMPTY = "" }\n'
    path = write(project, "portside.toml", toml_class("web/Dockerfile.dev", extra))
    spec = load_deployment(path).builds["Web"]
    assert spec.dockerfile == project / "web" / "Dockerfile.dev"
    assert spec.context == project
    assert spec.vars == {"GREETING": "hi", "EMPTY": ""}


def test_registry_references_have_no_build(project: Path) -> None:
    text = toml_class("registry.example/web:1") + toml_class("./app", name="App")
    loaded = load_deployment(write(project, "portside.toml", text))
    assert set(loaded.builds) == {"App"}
    assert load_config(project / "portside.toml") == loaded.config


def test_wrangler_builds_like_cloudflare(project: Path) -> None:
    text = """{
      "name": "worker",
      // Cloudflare builds this at deploy; so does Portside
      "containers": [
        {"class_name": "Web", "image": "./web/Dockerfile", "image_build_context": "./shared",
         "image_vars": {"MODE": "prod"}},
        {"class_name": "App", "image": "./app"},
        {"class_name": "Pulled", "image": "ghcr.io/a/b:1", "image_vars": {"X": "1"}},
      ],
    }"""
    loaded, warnings = read_wrangler(text, str(project / "wrangler.jsonc"))
    web, app = loaded.builds["Web"], loaded.builds["App"]
    assert (web.dockerfile, web.context, web.vars) == (
        project / "web" / "Dockerfile",
        project / "shared",
        {"MODE": "prod"},
    )
    assert (app.dockerfile, app.context, app.vars) == (
        project / "app" / "Dockerfile",
        project / "app",
        {},
    )
    assert "Pulled" not in loaded.builds
    assert warnings == [
        f"{project / 'wrangler.jsonc'}: containers[2].image_vars: ignored (only for an image "
        'Portside builds, from a Dockerfile path or build directory; image "ghcr.io/a/b:1" is '
        "a registry reference)"
    ]


def test_wrangler_json_file_is_read_by_load_deployment(project: Path) -> None:
    entry = {"class_name": "Web", "image": "./web", "image_vars": {"A": "b"}}
    path = write(project, "wrangler.json", json.dumps({"containers": [entry]}))
    assert load_deployment(path).builds["Web"].vars == {"A": "b"}


@pytest.mark.parametrize(
    ("image", "extra", "field", "fragments"),
    [
        (
            "./missing/Dockerfile",
            "",
            "containers[0].image",
            ('"./missing/Dockerfile": no such file or directory', "relative to the config file"),
        ),
        ("./empty", "", "containers[0].image", ("directory without a Dockerfile", "empty")),
        (
            "./app",
            'image_build_context = "./app/Dockerfile"\n',
            "containers[0].image_build_context",
            ("is not a directory", "build context"),
        ),
        (
            "./app",
            'image_build_context = "./nowhere"\n',
            "containers[0].image_build_context",
            ('"./nowhere" is not a directory',),
        ),
        (
            "./app",
            "image_vars = { PORT = 8080 }\n",
            "containers[0].image_vars.PORT",
            ("must be a string, not 8080", "quote it"),
        ),
        (
            "./app",
            'image_vars = ["A=1"]\n',
            "containers[0].image_vars",
            ("must be a table",),
        ),
        (
            "./app",
            "image_build_context = 3\n",
            "containers[0].image_build_context",
            ("must be a string, not 3",),
        ),
        (
            "web:1",
            'image_vars = { A = "1" }\n',
            "containers[0].image_vars",
            ("only for an image Portside builds", '"web:1" is a registry reference'),
        ),
        (
            "web:1",
            'image_build_context = "."\n',
            "containers[0].image_build_context",
            ("only for an image Portside builds",),
        ),
    ],
)
def test_toml_build_errors(
    project: Path, image: str, extra: str, field: str, fragments: tuple[str, ...]
) -> None:
    path = write(project, "portside.toml", toml_class(image, extra))
    with pytest.raises(ConfigError) as caught:
        load_deployment(path)
    assert (caught.value.file, caught.value.field) == (str(path), field)
    for fragment in fragments:
        assert fragment in caught.value.problem, caught.value.problem


@pytest.mark.parametrize(
    ("entry", "field", "fragment"),
    [
        ({"image": "./app", "image_vars": {"A": None}}, "containers[0].image_vars.A", "not null"),
        ({"image": "./app", "image_vars": {"": "x"}}, "containers[0].image_vars.", "arg name"),
        ({"image": "./app", "image_vars": "A=1"}, "containers[0].image_vars", "an object"),
        ({"image": "./Dockerfile"}, "containers[0].image", "no such file or directory"),
    ],
)
def test_wrangler_build_errors(
    project: Path, entry: dict[str, object], field: str, fragment: str
) -> None:
    text = json.dumps({"containers": [{"class_name": "Web", **entry}]})
    with pytest.raises(ConfigError) as caught:
        read_wrangler(text, str(project / "wrangler.jsonc"))
    assert caught.value.field == field
    assert fragment in caught.value.problem, caught.value.problem


def test_read_toml_resolves_against_the_named_file_not_the_current_directory(
    project: Path,
) -> None:
    (project / "sub").mkdir()
    loaded = read_toml(toml_class("../app"), str(project / "sub" / "portside.toml"))
    assert loaded.builds["Web"].context == project / "app"


@pytest.mark.parametrize(
    ("image", "built"),
    [
        ("./container/Dockerfile", True),
        ("Dockerfile", True),
        ("app/Dockerfile.dev", True),
        (".", True),
        ("./", True),
        ("../app", True),
        ("/srv/app", True),
        ("app", False),
        ("registry.example:5000/team/app:1.2", False),
        ("ghcr.io/a/b@sha256:" + "0" * 64, False),
    ],
)
def test_is_build_path(image: str, built: bool) -> None:
    assert is_build_path(image) is built


def test_a_deploy_call_carries_a_digest_of_the_right_form() -> None:
    good = ContainerClass("Web", "portside/web:0123456789ab", image_digest="sha256:" + "a" * 64)
    validate_config(Config(classes=(good,)))
    bad = ContainerClass("Web", "portside/web:x", image_digest="sha256:ABC")
    with pytest.raises(ConfigError) as caught:
        validate_config(Config(classes=(bad,)))
    assert caught.value.field == "containers[0].image_digest"
    assert "64 lower-case hex" in caught.value.problem


def test_the_file_reader_allows_build_paths_and_the_control_plane_does_not() -> None:
    config = Config(classes=(ContainerClass("Web", "./app/Dockerfile"),))
    validate_config(config, "portside.toml", allow_build_paths=True)
    with pytest.raises(ConfigError, match="portside deploy"):
        validate_config(config)
