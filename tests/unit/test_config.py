"""Reading config files: the TOML contract, its validation errors, wrangler.jsonc and JSONC.

Each error case names the exact field path and fragments of the message a user will read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from portside.config import load_config, parse_toml, parse_wrangler, strip_jsonc, validate_config
from portside.errors import ConfigError
from portside.spec import (
    INSTANCE_TYPES,
    Autoscaling,
    Config,
    ContainerClass,
    InstanceSource,
    InstanceType,
    Route,
)

FULL_TOML = """
[[containers]]
class_name = "CodeExecutor"
image = "portside-example/executor:latest"
default_port = 8080
instance_type = "basic"
sleep_after = "1m"
max_instances = 50
enable_internet = false
env = { MODE = "sandbox" }
entrypoint = ["/bin/sh", "-c", "exec server"]
boot_timeout = "45s"

[[containers]]
class_name = "Renderer"
image = "renderer:1"
instance_type = { vcpu = 0.5, memory_mib = 512 }

[[containers]]
class_name = "GifMaker"
image = "gifmaker:2"
default_port = 1337
instance_type = "basic"
[containers.autoscaling]
minimum_instances = 1
maximum_instances = 10       # defaults to max_instances (0 = capacity only)
cpu_target = 75              # percent of the instance type's vCPU
scale_down_delay = "60s"     # stabilisation window before removing instances
concurrency_limit = 50       # optional: requests in flight per instance before overflow

[[routes]]
path = "/execute-code"
class_name = "CodeExecutor"
instance = "header:X-Session-Id"

[[routes]]
path = "/render"
class_name = "Renderer"
instance = "path:2"

[[routes]]
path = "/make-gif"
class_name = "GifMaker"      # no instance key: any instance of the pool serves
"""

FULL_CONFIG = Config(
    classes=(
        ContainerClass(
            name="CodeExecutor",
            image="portside-example/executor:latest",
            default_port=8080,
            instance_type=INSTANCE_TYPES["basic"],
            sleep_after_s=60.0,
            max_instances=50,
            env={"MODE": "sandbox"},
            entrypoint=("/bin/sh", "-c", "exec server"),
            enable_internet=False,
            boot_timeout_s=45.0,
        ),
        ContainerClass(
            name="Renderer",
            image="renderer:1",
            instance_type=InstanceType("custom", 0.5, 512, 2000),
        ),
        ContainerClass(
            name="GifMaker",
            image="gifmaker:2",
            default_port=1337,
            instance_type=INSTANCE_TYPES["basic"],
            autoscaling=Autoscaling(
                minimum_instances=1,
                maximum_instances=10,
                cpu_target=75.0,
                scale_down_delay_s=60.0,
                concurrency_limit=50,
            ),
        ),
    ),
    routes=(
        Route("/execute-code", "CodeExecutor", InstanceSource("header", name="X-Session-Id")),
        Route("/render", "Renderer", InstanceSource("path", index=2)),
        Route("/make-gif", "GifMaker", None),
    ),
)


def test_full_example_parses_to_the_expected_config() -> None:
    assert parse_toml(FULL_TOML, "portside.toml") == FULL_CONFIG


def test_defaults_come_from_the_spec() -> None:
    config = parse_toml('[[containers]]\nclass_name = "A"\nimage = "a"\n', "p.toml")
    assert config == Config(classes=(ContainerClass(name="A", image="a"),))
    assert config.classes[0].sleep_after_s == 600.0
    assert config.classes[0].boot_timeout_s == 30.0


def test_empty_file_is_an_empty_config() -> None:
    assert parse_toml("", "p.toml") == Config()


@pytest.mark.parametrize(
    ("source", "kind", "name", "index"),
    [
        ("header:X-Session-Id", "header", "X-Session-Id", 0),
        ("query:session", "query", "session", 0),
        ("cookie:sid", "cookie", "sid", 0),
        ("path:1", "path", "", 1),
        ("path:12", "path", "", 12),
    ],
)
def test_instance_sources(source: str, kind: str, name: str, index: int) -> None:
    text = f'{CONTAINER}\n[[routes]]\npath = "/x"\nclass_name = "A"\ninstance = "{source}"\n'
    route = parse_toml(text, "p.toml").routes[0]
    assert route.instance == InstanceSource(kind, name=name, index=index)  # type: ignore[arg-type]
    assert str(route.instance) == source


CONTAINER = '[[containers]]\nclass_name = "A"\nimage = "a"'


def _container(line: str) -> str:
    return f"{CONTAINER}\n{line}\n"


def _route(*lines: str) -> str:
    return CONTAINER + "\n[[routes]]\n" + "\n".join(lines) + "\n"


def _pool(autoscaling: str, *, before: str = "", routes: str = "") -> str:
    """Class A as a pool: `before` are container lines, `autoscaling` its block's lines."""
    return f"{CONTAINER}\n{before}\n[containers.autoscaling]\n{autoscaling}\n{routes}\n"


# (the class's max_instances, its autoscaling lines, the Autoscaling read, pool_maximum)
POOLS: list[tuple[int, str, Autoscaling, int]] = [
    (0, "", Autoscaling(), 0),
    (8, "", Autoscaling(), 8),
    (8, "maximum_instances = 3", Autoscaling(maximum_instances=3), 3),
    (8, "maximum_instances = 0", Autoscaling(maximum_instances=0), 8),
    (0, "minimum_instances = 4", Autoscaling(minimum_instances=4), 0),
    (4, "minimum_instances = 4", Autoscaling(minimum_instances=4), 4),
    (
        2,
        "minimum_instances = 5\nmaximum_instances = 5",
        Autoscaling(minimum_instances=5, maximum_instances=5),
        5,
    ),
    (0, "cpu_target = 100", Autoscaling(cpu_target=100.0), 0),
    (0, "cpu_target = 0.5", Autoscaling(cpu_target=0.5), 0),
    (0, 'scale_down_delay = "0s"', Autoscaling(scale_down_delay_s=0.0), 0),
    (0, 'scale_down_delay = "1m30s"', Autoscaling(scale_down_delay_s=90.0), 0),
    (0, 'scale_down_delay = "250ms"', Autoscaling(scale_down_delay_s=0.25), 0),
    (0, "concurrency_limit = 0", Autoscaling(concurrency_limit=0), 0),
    (0, "concurrency_limit = 1", Autoscaling(concurrency_limit=1), 0),
]


@pytest.mark.parametrize(("max_instances", "lines", "expected", "pool_maximum"), POOLS)
def test_autoscaling_blocks(
    max_instances: int, lines: str, expected: Autoscaling, pool_maximum: int
) -> None:
    pool_route = '[[routes]]\npath = "/p"\nclass_name = "A"'
    text = _pool(lines, before=f"max_instances = {max_instances}", routes=pool_route)
    config = parse_toml(text, "p.toml")
    cls = config.classes[0]
    assert cls.autoscaling == expected
    assert cls.pool_maximum == pool_maximum
    assert config.routes == (Route("/p", "A", None),)


def test_a_class_without_autoscaling_is_not_a_pool() -> None:
    cls = parse_toml(CONTAINER, "p.toml").classes[0]
    assert cls.autoscaling is None
    assert cls.pool_maximum == 0


# (config text, the field the error names, fragments its problem must contain)
TOML_ERRORS: list[tuple[str, str, tuple[str, ...]]] = [
    ("name = 'x'\n", "name", ("unknown key", "allowed: containers, routes")),
    ("[containers]\nclass_name = 'A'\n", "containers", ("array of tables", "[[containers]]")),
    ('[[containers]]\nimage = "a"\n', "containers[0].class_name", ("required",)),
    ('[[containers]]\nclass_name = "A"\n', "containers[0].image", ("required",)),
    (_container("imagee = 'b'"), "containers[0].imagee", ("unknown key", "did you mean image?")),
    (_container("sleepAfter = '1m'"), "containers[0].sleepAfter", ("allowed: class_name",)),
    ('[[containers]]\nclass_name = 5\nimage = "a"\n', "containers[0].class_name", ("string",)),
    (
        '[[containers]]\nclass_name = "9lives"\nimage = "a"\n',
        "containers[0].class_name",
        ('"9lives"', "not a class name"),
    ),
    (
        f'[[containers]]\nclass_name = "{"A" * 64}"\nimage = "a"\n',
        "containers[0].class_name",
        ("not a class name",),
    ),
    ('[[containers]]\nclass_name = "A"\nimage = " "\n', "containers[0].image", ("empty",)),
    (
        CONTAINER + "\n" + CONTAINER + "\n",
        "containers[1].class_name",
        ('"A"', "already declared by containers[0]"),
    ),
    (_container("default_port = 0"), "containers[0].default_port", ("from 1 to 65535", "not 0")),
    (_container("default_port = 65536"), "containers[0].default_port", ("not 65536",)),
    (_container('default_port = "80"'), "containers[0].default_port", ('not "80"',)),
    (_container("default_port = true"), "containers[0].default_port", ("integer", "not true")),
    (_container("default_port = 80.0"), "containers[0].default_port", ("integer",)),
    (
        _container('instance_type = "huge"'),
        "containers[0].instance_type",
        (
            '"huge" is not an instance type; use lite, basic, standard-1, standard-2, '
            "standard-3, standard-4, or a table {vcpu, memory_mib, disk_mb}",
        ),
    ),
    (_container("instance_type = 2"), "containers[0].instance_type", ("not an instance type",)),
    (
        _container("instance_type = { vcpu = 0, memory_mib = 512 }"),
        "containers[0].instance_type.vcpu",
        ("more than 0", "at most 64", "not 0"),
    ),
    (
        _container("instance_type = { vcpu = 65, memory_mib = 512 }"),
        "containers[0].instance_type.vcpu",
        ("at most 64",),
    ),
    (
        _container("instance_type = { memory_mib = 512 }"),
        "containers[0].instance_type.vcpu",
        ("required",),
    ),
    (
        _container("instance_type = { vcpu = 1, memory_mib = 8 }"),
        "containers[0].instance_type.memory_mib",
        (">= 16", "not 8"),
    ),
    (
        _container("instance_type = { vcpu = 1, memory_mib = 512, disk_mb = -1 }"),
        "containers[0].instance_type.disk_mb",
        (">= 0", "not -1"),
    ),
    (
        _container("instance_type = { vcpu = 1, memory_mib = 512, gpu = 1 }"),
        "containers[0].instance_type.gpu",
        ("unknown key", "allowed: vcpu, memory_mib, disk_mb"),
    ),
    (_container('sleep_after = "10x"'), "containers[0].sleep_after", ("'10x'", "not a duration")),
    (_container('sleep_after = "0s"'), "containers[0].sleep_after", ('"0s"', "longer than zero")),
    (_container("sleep_after = 60"), "containers[0].sleep_after", ("string", "not 60")),
    (_container('boot_timeout = "soon"'), "containers[0].boot_timeout", ("not a duration",)),
    (_container('boot_timeout = "0ms"'), "containers[0].boot_timeout", ("longer than zero",)),
    (_container("max_instances = -1"), "containers[0].max_instances", (">= 0", "not -1")),
    (_container('enable_internet = "yes"'), "containers[0].enable_internet", ("true or false",)),
    (_container("env = { MODE = 1 }"), "containers[0].env.MODE", ("string", "not 1")),
    (_container('env = ["MODE=x"]'), "containers[0].env", ("must be a table",)),
    (_container('env = { "A=B" = "x" }'), "containers[0].env.A=B", ("not a variable name",)),
    (_container('entrypoint = "/bin/sh"'), "containers[0].entrypoint", ("array",)),
    (_container('entrypoint = ["/bin/sh", 1]'), "containers[0].entrypoint[1]", ("not 1",)),
    (_container("entrypoint = []"), "containers[0].entrypoint", ("empty",)),
    (_container("autoscaling = 3"), "containers[0].autoscaling", ("must be a table",)),
    (_route('class_name = "A"'), "routes[0].path", ("required",)),
    (_route('path = "/x"'), "routes[0].class_name", ("required",)),
    (_route('path = "x"', 'class_name = "A"'), "routes[0].path", ('"x"', 'start with "/"')),
    (_route('path = "/x?y=1"', 'class_name = "A"'), "routes[0].path", ("bare path",)),
    (
        _route('path = "/x"', 'class_name = "B"'),
        "routes[0].class_name",
        ('"B" is not a declared container class', "declared: A"),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'method = "GET"'),
        "routes[0].method",
        ("unknown key", "allowed: path, class_name, instance"),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'instance = "session"'),
        "routes[0].instance",
        ('"session" is not an instance source', "header:NAME", "path:N"),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'instance = "body:id"'),
        "routes[0].instance",
        ("not an instance source",),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'instance = "path:0"'),
        "routes[0].instance",
        ('"path:0"', "from 1"),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'instance = "path:first"'),
        "routes[0].instance",
        ("whole number",),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'instance = "header:"'),
        "routes[0].instance",
        ("not a valid header name",),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'instance = "header:X Id"'),
        "routes[0].instance",
        ("'X Id'", "header name"),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', 'instance = "query:"'),
        "routes[0].instance",
        ("query name",),
    ),
    (
        _route('path = "/x"', 'class_name = "A"', "instance = 1"),
        "routes[0].instance",
        ("string",),
    ),
    (
        _route(
            'path = "/x"',
            'class_name = "A"',
            'instance = "query:id"',
            "[[routes]]",
            'path = "/x"',
            'class_name = "A"',
            'instance = "query:id"',
        ),
        "routes[1].path",
        ('"/x" is already routed by routes[0]',),
    ),
    *(
        (_pool(line), f"containers[0].autoscaling.{field}", fragments)
        for line, field, fragments in [
            ("minimum_instances = -1", "minimum_instances", ("integer >= 0", "not -1")),
            ('minimum_instances = "1"', "minimum_instances", ('not "1"',)),
            ("minimum_instances = 1.5", "minimum_instances", ("integer", "not 1.5")),
            ("maximum_instances = -2", "maximum_instances", ("integer >= 0", "not -2")),
            ("maximum_instances = true", "maximum_instances", ("integer", "not true")),
            ("concurrency_limit = -1", "concurrency_limit", ("integer >= 0", "not -1")),
            ("concurrency_limit = 2.5", "concurrency_limit", ("integer", "not 2.5")),
            ("cpu_target = 0", "cpu_target", ("more than 0", "at most 100", "not 0")),
            ("cpu_target = -5", "cpu_target", ("not -5",)),
            ("cpu_target = 100.5", "cpu_target", ("at most 100", "not 100.5")),
            ("cpu_target = nan", "cpu_target", ("at most 100", "not nan")),
            ('cpu_target = "75%"', "cpu_target", ("must be a number", 'not "75%"')),
            ("cpu_target = true", "cpu_target", ("must be a number", "not true")),
            ('scale_down_delay = "soon"', "scale_down_delay", ("'soon'", "not a duration")),
            ('scale_down_delay = "-5s"', "scale_down_delay", ("not a duration",)),
            ("scale_down_delay = 60", "scale_down_delay", ("string", "not 60")),
            (
                "minimum_instances = 3\nmaximum_instances = 2",
                "minimum_instances",
                ("3 is more than maximum_instances (2)",),
            ),
            (
                "min = 1",
                "min",
                (
                    "unknown key",
                    "allowed: minimum_instances, maximum_instances, cpu_target, "
                    "scale_down_delay, concurrency_limit",
                ),
            ),
            ("cpu_targett = 50", "cpu_targett", ("did you mean cpu_target?",)),
        ]
    ),
    (
        _pool("minimum_instances = 6", before="max_instances = 5"),
        "containers[0].autoscaling.minimum_instances",
        ("6 is more than the class's max_instances (5)", "maximum_instances is not set"),
    ),
    (
        _route('path = "/x"', 'class_name = "A"'),
        "routes[0].instance",
        (
            'missing; class "A" is not a pool (it has no autoscaling block)',
            "where the instance name comes from (header:NAME, query:NAME, cookie:NAME or path:N)",
        ),
    ),
    (
        _pool("", routes='[[routes]]\npath = "/x"\nclass_name = "A"\ninstance = "query:id"'),
        "routes[0].instance",
        ('class "A" is a pool (autoscaling): any instance serves, so its routes take no instance',),
    ),
]


@pytest.mark.parametrize(("text", "field", "fragments"), TOML_ERRORS)
def test_toml_validation_errors(text: str, field: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_toml(text, "portside.toml")
    assert caught.value.file == "portside.toml"
    assert caught.value.field == field
    for fragment in fragments:
        assert fragment in caught.value.problem
    assert str(caught.value).startswith(f"portside.toml: {field}: ")


def test_toml_syntax_error_names_the_file_and_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_toml('[[containers]]\nclass_name = "A"\nimage = \n', "portside.toml")
    assert caught.value.file == "portside.toml"
    assert "line 3" in caught.value.problem
    assert str(caught.value).startswith("portside.toml: not valid TOML")


LITE = INSTANCE_TYPES["lite"]

WRANGLER = """
// A Worker with one container, as `wrangler init` writes it.
{
  "$schema": "./node_modules/wrangler/config-schema.json",
  "name": "executor-worker", // the Worker's name
  "main": "src/index.ts",
  "compatibility_date": "2025-06-01",
  /* Containers: read by Portside.
     "url": "http://not-a-comment" */
  "containers": [
    {
      "class_name": "CodeExecutor",
      "image": "registry.example/executor:1",
      "max_instances": 10,
      "instance_type": {"vcpu": 1, "memory_mib": 3072, "disk_mb": 4000,},
      "rollout_step_percentage": 50,
      "rollout_kind": "full_auto",
      "image_build_context": ".",
      "sleepAfter": "1m",
      "sleep_after": "2m", // Portside extra
      "env": {"URL": "http://example.com/*not-a-comment*/"},
    },
    {"class_name": "Lite", "image": "lite:1", "instance_type": "dev"},
  ],
  "durable_objects": {"bindings": [{"name": "EXEC", "class_name": "CodeExecutor"}]},
  "migrations": [{"tag": "v1", "new_sqlite_classes": ["CodeExecutor"]}],
  "routes": [
    {"path": "/execute-code", "class_name": "CodeExecutor", "instance": "query:id"},
    {"pattern": "example.com/*", "zone_name": "example.com"},
    "example.org/*",
  ],
}
"""


def test_wrangler_with_comments_trailing_commas_and_extras() -> None:
    config, warnings = parse_wrangler(WRANGLER, "wrangler.jsonc")
    assert config == Config(
        classes=(
            ContainerClass(
                name="CodeExecutor",
                image="registry.example/executor:1",
                max_instances=10,
                instance_type=InstanceType("custom", 1.0, 3072, 4000),
                sleep_after_s=120.0,
                env={"URL": "http://example.com/*not-a-comment*/"},
                rollout_step_percentage=(50, 100),  # 50: steps of 50%
                binding="EXEC",  # the Worker's Durable Object binding names it
            ),
            ContainerClass(
                name="Lite", image="lite:1", instance_type=LITE, max_instances=20
            ),  # Cloudflare's default max_instances
        ),
        routes=(Route("/execute-code", "CodeExecutor", InstanceSource("query", name="id")),),
    )
    assert warnings == [
        "wrangler.jsonc: containers[0].rollout_kind: ignored (not used by Portside)",
        "wrangler.jsonc: containers[0].sleepAfter: ignored (unknown field; did you mean "
        "sleep_after?)",
        "wrangler.jsonc: containers[0].image_build_context: ignored (only for an image Portside "
        "builds, from a Dockerfile path or build directory; image "
        '"registry.example/executor:1" is a registry reference)',
        'wrangler.jsonc: containers[1].instance_type: "dev" read as "lite", its current name',
        "wrangler.jsonc: routes[1]: ignored (a Workers route; "
        "Portside routes are {path, class_name, instance})",
        "wrangler.jsonc: routes[2]: ignored (a Workers route; "
        "Portside routes are {path, class_name, instance})",
    ]


def test_wrangler_without_containers_warns() -> None:
    config, warnings = parse_wrangler('{"name": "w"}', "wrangler.json")
    assert config == Config()
    assert warnings == ["wrangler.json: containers: missing; there is nothing for Portside to run"]


WRANGLER_POOL = """
{
  "containers": [
    {
      "class_name": "GifMaker",
      "image": "registry.example/gif:1",
      "max_instances": 10,
      "autoscaling": {
        "minimum_instances": 1,
        "cpu_target": 75,
        "scale_down_delay": "2m",
        "concurrency_limit": 50,
        "max_surge": 2, // Cloudflare's, not Portside's
        "cpu_targets": 80,
      },
    },
    {"class_name": "Empty", "image": "e", "autoscaling": {}},
    {"class_name": "Named", "image": "n", "autoscaling": null},
  ],
  "routes": [
    {"path": "/make-gif", "class_name": "GifMaker"},
    {"path": "/empty", "class_name": "Empty"},
    {"path": "/named", "class_name": "Named", "instance": "cookie:sid"},
  ],
}
"""


def test_wrangler_reads_autoscaling_and_warns_about_unknown_fields_in_it() -> None:
    config, warnings = parse_wrangler(WRANGLER_POOL, "wrangler.jsonc")
    assert config == Config(
        classes=(
            ContainerClass(
                name="GifMaker",
                image="registry.example/gif:1",
                instance_type=LITE,  # Cloudflare's default instance type
                max_instances=10,
                autoscaling=Autoscaling(
                    minimum_instances=1,
                    cpu_target=75.0,
                    scale_down_delay_s=120.0,
                    concurrency_limit=50,
                ),
            ),
            ContainerClass(
                name="Empty",
                image="e",
                instance_type=LITE,
                max_instances=20,
                autoscaling=Autoscaling(),
            ),
            ContainerClass(name="Named", image="n", instance_type=LITE, max_instances=20),
        ),
        routes=(
            Route("/make-gif", "GifMaker", None),
            Route("/empty", "Empty", None),
            Route("/named", "Named", InstanceSource("cookie", name="sid")),
        ),
    )
    assert config.classes[0].pool_maximum == 10
    assert config.classes[1].pool_maximum == 20
    assert warnings == [
        "wrangler.jsonc: containers[0].autoscaling.max_surge: ignored (unknown field)",
        "wrangler.jsonc: containers[0].autoscaling.cpu_targets: ignored (unknown field; "
        "did you mean cpu_target?)",
    ]


def _wrangler_pool(autoscaling: str, route: str = '{"path": "/p", "class_name": "A"}') -> str:
    return (
        f'{{"containers": [{{"class_name": "A", "image": "a", "autoscaling": {autoscaling}}}],'
        f' "routes": [{route}]}}'
    )


# (wrangler text, the field the error names, fragments its problem must contain)
WRANGLER_ERRORS: list[tuple[str, str, tuple[str, ...]]] = [
    ('{"containers": [{"image": "a"}]}', "containers[0].class_name", ("required",)),
    ('{"containers": {"class_name": "A"}}', "containers", ("array of objects",)),
    ('{"containers": ["A"]}', "containers[0]", ("must be an object",)),
    (
        '{"containers": [{"class_name": "A", "image": "a", "instance_type": "huge"}]}',
        "containers[0].instance_type",
        ('"huge" is not an instance type', "or an object {vcpu, memory_mib, disk_mb}"),
    ),
    (
        '{"containers": [{"class_name": "A", "image": "a", "max_instances": "5"}]}',
        "containers[0].max_instances",
        ('not "5"',),
    ),
    (
        '{"containers": [{"class_name": "A", "image": "a"}],'
        ' "routes": [{"path": "/a", "class_name": "B"}]}',
        "routes[0].class_name",
        ("not a declared container class",),
    ),
    ('{"containers": [], "routes": [3]}', "routes[0]", ("must be an object",)),
    (_wrangler_pool("3"), "containers[0].autoscaling", ("must be an object", "not 3")),
    (_wrangler_pool("[]"), "containers[0].autoscaling", ("must be an object", "not []")),
    (
        _wrangler_pool('{"cpu_target": 0}'),
        "containers[0].autoscaling.cpu_target",
        ("more than 0 and at most 100", "not 0"),
    ),
    (
        _wrangler_pool('{"minimum_instances": -1}'),
        "containers[0].autoscaling.minimum_instances",
        ("integer >= 0", "not -1"),
    ),
    (
        _wrangler_pool('{"minimum_instances": 4, "maximum_instances": 3}'),
        "containers[0].autoscaling.minimum_instances",
        ("4 is more than maximum_instances (3)",),
    ),
    (
        _wrangler_pool('{"scale_down_delay": 60}'),
        "containers[0].autoscaling.scale_down_delay",
        ("string", "not 60"),
    ),
    (
        _wrangler_pool('{"concurrency_limit": "50"}'),
        "containers[0].autoscaling.concurrency_limit",
        ('not "50"',),
    ),
    (
        _wrangler_pool("{}", '{"path": "/p", "class_name": "A", "instance": "query:id"}'),
        "routes[0].instance",
        ('class "A" is a pool (autoscaling)',),
    ),
    (
        _wrangler_pool("null"),
        "routes[0].instance",
        ('missing; class "A" is not a pool', "header:NAME"),
    ),
]


@pytest.mark.parametrize(("text", "field", "fragments"), WRANGLER_ERRORS)
def test_wrangler_validation_errors(text: str, field: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_wrangler(text, "wrangler.jsonc")
    assert caught.value.field == field
    for fragment in fragments:
        assert fragment in caught.value.problem


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('{\n  "containers": [\n    {"class_name": "A" "image": "a"}\n  ]\n}', 3),
        ('{\n  // fine\n  /* never closed\n  "containers": []\n}', 3),
        ("[1, 2]", 0),
    ],
)
def test_wrangler_syntax_errors_name_the_line(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_wrangler(text, "wrangler.jsonc")
    assert caught.value.file == "wrangler.jsonc"
    if line:
        assert f"line {line}," in caught.value.problem
    else:
        assert "one JSON object" in caught.value.problem


@pytest.mark.parametrize(
    ("jsonc", "value"),
    [
        ('{"a": 1,}', {"a": 1}),
        ("[1, 2, ]", [1, 2]),
        ('{"a": [1,\n// c\n],\n}', {"a": [1]}),
        ('{"a": [1, /* c */ ]}', {"a": [1]}),
        ('{"a": "//not a comment"}', {"a": "//not a comment"}),
        ('{"a": "/* not */ a comment"}', {"a": "/* not */ a comment"}),
        (
            '{"a": "quote \\" // still a string", "b": 2}',
            {"a": 'quote " // still a string', "b": 2},
        ),
        ('{"a": "ends in backslash \\\\"} // c', {"a": "ends in backslash \\"}),
        ('{"a": ",}"}', {"a": ",}"}),
        ("// only a comment\n{}", {}),
    ],
)
def test_strip_jsonc(jsonc: str, value: object) -> None:
    assert json.loads(strip_jsonc(jsonc)) == value


def test_strip_jsonc_keeps_lines_and_columns() -> None:
    jsonc = '{ /* a\nb */ "x": 1, // c\n "y": 2,\n}'
    stripped = strip_jsonc(jsonc)
    assert len(stripped) == len(jsonc)
    assert [len(line) for line in stripped.split("\n")] == [len(line) for line in jsonc.split("\n")]


def test_strip_jsonc_leaves_a_bare_comma_for_json_to_reject() -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(strip_jsonc("[1,,]"))


@pytest.mark.parametrize("name", ["portside.toml", "Portside.TOML"])
def test_load_config_reads_toml_by_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(FULL_TOML)
    assert load_config(path) == FULL_CONFIG
    assert load_config(str(path)) == FULL_CONFIG


@pytest.mark.parametrize("name", ["wrangler.jsonc", "wrangler.json"])
def test_load_config_reads_wrangler_by_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(WRANGLER)
    warnings: list[str] = []
    config = load_config(path, on_warning=warnings.append)
    assert config.class_named("CodeExecutor") is not None
    assert len(warnings) == 6
    assert warnings[0].startswith(f"{path}: containers[0].rollout_kind")


def test_load_config_logs_wrangler_warnings_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "wrangler.jsonc"
    path.write_text('{"containers": [{"class_name": "A", "image": "a", "name": "a"}]}')
    load_config(path)
    assert "containers[0].name: ignored (not used by Portside)" in caplog.text


def test_load_config_reads_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "portside.toml"
    path.write_text(FULL_TOML, encoding="utf-8-sig")
    assert load_config(path) == FULL_CONFIG


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("portside.yaml", "containers: []", "'.yaml'"),
        ("Portsidefile", "", "no extension"),
        ("missing.toml", None, "no such file"),
        ("latin1.toml", b"name = '\xe9'", "not UTF-8"),
        ("bad.toml", "[[containers]\n", "line 1"),
    ],
)
def test_load_config_file_errors(
    tmp_path: Path, name: str, content: str | bytes | None, fragment: str
) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.file == str(path)
    assert fragment in caught.value.problem


@pytest.mark.parametrize(
    "image",
    ["./container/Dockerfile", "Dockerfile", "./", ".", "/srv/app", "../app", "app/Dockerfile.dev"],
)
def test_a_build_path_in_a_deploy_call_is_refused_with_what_to_do(image: str) -> None:
    """The control plane's check: a Deploy carries what `portside deploy` built, never a path."""
    with pytest.raises(ConfigError) as caught:
        validate_config(Config(classes=(ContainerClass("A", image),)))
    assert caught.value.field == "containers[0].image"
    assert "`portside deploy FILE` builds it" in caught.value.problem


@pytest.mark.parametrize(
    "image", ["registry.example:5000/team/app:1.2", "app", "ghcr.io/a/b@sha256:" + "0" * 64]
)
def test_registry_references_are_images(image: str) -> None:
    config, _ = parse_wrangler(
        f'{{"containers": [{{"class_name": "A", "image": "{image}"}}]}}', "w.json"
    )
    assert config.classes[0].image == image


def test_wrangler_entries_get_cloudflares_defaults_and_toml_keeps_portsides() -> None:
    config, _ = parse_wrangler('{"containers": [{"class_name": "A", "image": "a"}]}', "w.json")
    assert (config.classes[0].instance_type.name, config.classes[0].max_instances) == ("lite", 20)
    toml = parse_toml('[[containers]]\nclass_name = "A"\nimage = "a"\n', "portside.toml")
    assert (toml.classes[0].instance_type.name, toml.classes[0].max_instances) == ("basic", 0)


def one(cls: ContainerClass) -> Config:
    return Config(classes=(cls,))


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        (one(ContainerClass("9lives", "a")), "containers[0].class_name", "not a class name"),
        (one(ContainerClass("A", "./Dockerfile")), "containers[0].image", "build"),
        (one(ContainerClass("A", "a", default_port=0)), "containers[0].default_port", "1 to 65535"),
        (one(ContainerClass("A", "a", sleep_after_s=0)), "containers[0].sleep_after", "than zero"),
        (
            Config(classes=(ContainerClass("A", "a"), ContainerClass("A", "b"))),
            "containers[1].class_name",
            "already declared by containers[0]",
        ),
        (
            Config(classes=(ContainerClass("A", "a"),), routes=(Route("/x", "A"),)),
            "routes[0].instance",
            "is not a pool",
        ),
        (Config(routes=(Route("x", "A"),)), "routes[0].path", "must start with"),
    ],
)
def test_a_deployed_config_is_checked_by_the_same_rules_as_a_file(
    config: Config, field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert caught.value.file == "deploy request" and caught.value.field == field
    assert words in caught.value.problem
