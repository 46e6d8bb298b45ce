"""Reads a user's config file, Portside TOML or a Cloudflare wrangler.jsonc, into `spec.Config`,
with a `BuildSpec` for each class whose image `portside deploy` builds.

Every problem is a ConfigError naming the file, the field path and the values that are allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from portside.constraints import JURISDICTIONS, place_problem, places
from portside.constraints import problem as constraints_problem
from portside.durations import parse_duration
from portside.errors import ConfigError
from portside.outbound import pattern_problem
from portside.spec import (
    DEFAULT_GATEWAY_DEADLINE_S,
    INSTANCE_TYPES,
    ROLLOUT_ON_UNHEALTHY,
    SLEEP_MODES,
    Autoscaling,
    Config,
    Constraints,
    ContainerClass,
    Gateway,
    InstanceSource,
    InstanceSourceKind,
    InstanceType,
    RateLimit,
    Route,
    binding_of,
    ping_path,
)

__all__ = [
    "BuildSpec",
    "LoadedConfig",
    "is_build_path",
    "load_config",
    "load_deployment",
    "parse_toml",
    "parse_wrangler",
    "read_toml",
    "read_wrangler",
    "strip_jsonc",
    "validate_config",
]

log = logging.getLogger(__name__)

_CLASS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SEGMENT_INDEX = re.compile(r"[0-9]+")

_TOML_TOP_KEYS = ("containers", "routes", "gateway", "jurisdictions")
_GATEWAY_KEYS = ("module", "vars", "rate_limits", "deadline")
_RATE_LIMIT_KEYS = ("binding", "limit", "period")
# The container fields both formats map onto ContainerClass.
_CONTAINER_KEYS = (
    "class_name",
    "image",
    "default_port",
    "instance_type",
    "sleep_after",
    "max_instances",
    "enable_internet",
    "env",
    "entrypoint",
    "boot_timeout",
    "autoscaling",
    "image_build_context",
    "image_vars",
    "ping_endpoint",
    "health_check_interval",
    "health_check_failures",
    "health_check_timeout",
    "rollout_step_percentage",
    "rollout_active_grace_period",
    "rollout_health_deadline",
    "rollout_on_unhealthy",
    "stop_timeout",
    "sleep_mode",
    "pause_max",
    "snapshot_on_sleep",
    "snapshot_retention",
    "snapshot_keep",
    "binding",
    "allowed_hosts",
    "denied_hosts",
    "outbound_by_host",
    "intercept_https",
    "constraints",
)
_CONSTRAINT_KEYS = ("regions", "jurisdiction", "labels")
_BUILD_KEYS = ("image_build_context", "image_vars")
_AUTOSCALING_KEYS = (
    "minimum_instances",
    "maximum_instances",
    "cpu_target",
    "scale_down_delay",
    "concurrency_limit",
)
_ROUTE_KEYS = ("path", "class_name", "instance", "gateway")
# A gateway binding: an identifier that is not one of env's own attributes.
_BINDING = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_RESERVED_BINDINGS = frozenset({"vars", "secrets"})
_CUSTOM_TYPE_KEYS = ("vcpu", "memory_mib", "disk_mb")
_CUSTOM_DISK_MB = 2_000
_MAX_VCPU = 64.0
_MIN_MEMORY_MIB = 16

_SOURCE_KINDS: Mapping[str, InstanceSourceKind] = {
    "header": "header",
    "query": "query",
    "cookie": "cookie",
    "path": "path",
}
_SOURCE_FORMS = "header:NAME, query:NAME, cookie:NAME or path:N"
_SOURCE_SYNTAX = f"use {_SOURCE_FORMS}"

# Container fields that mean something to Cloudflare but nothing to Portside: a wrangler
# file keeps working on both, so these are warnings, not errors.
_WRANGLER_IGNORED = frozenset(
    {
        "name",
        "rollout_kind",
        "affinities",
        "scheduling_policy",
        "instances",
        "configuration",
        "durable_objects",
        "observability",
    }
)
# What Cloudflare gives a `containers` entry that leaves these out (Portside's TOML keeps its own
# defaults: basic, and no limit beyond capacity).
_WRANGLER_DEFAULTS: Mapping[str, object] = {"instance_type": "lite", "max_instances": 20}
# Older wrangler files still use the instance types' first names.
_WRANGLER_TYPE_ALIASES = {"dev": "lite", "standard": "standard-1"}

_NOT_BUILT = (
    "only for an image Portside builds, from a Dockerfile path or build directory; "
    "image {image} is a registry reference"
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A request target's path and query: printable ASCII, no space, no fragment.
_PING_PATH = re.compile(r"/[!-~]*")

_DEFAULT = ContainerClass(name="", image="")
_DEFAULT_AUTOSCALING = Autoscaling()


class _Required:
    """Marks a field with no default: missing it is an error."""


_REQUIRED = _Required()


@dataclass(frozen=True)
class BuildSpec:
    """How `portside deploy` builds a class's image: a Dockerfile, its build context and build
    args, all resolved against the config file. Never sent to the control plane: a Deploy
    carries the built image's reference and digest instead."""

    dockerfile: Path  # absolute
    context: Path  # absolute, a directory
    vars: Mapping[str, str] = dataclasses.field(
        default_factory=dict
    )  # build args (wrangler's image_vars)
    source: str = ""  # `image` as the user wrote it
    file: str = ""  # the config file it came from
    at: str = ""  # the class's place in that file, e.g. containers[0]


@dataclass(frozen=True)
class LoadedConfig:
    """A config as read from its file: `config` (a built class's `image` is still the path the
    user wrote) and a BuildSpec per class name whose image is to be built."""

    config: Config
    builds: Mapping[str, BuildSpec] = dataclasses.field(default_factory=dict)


def load_config(
    path: str | os.PathLike[str], *, on_warning: Callable[[str], None] | None = None
) -> Config:
    """Reads `path`: `*.toml` as Portside TOML, `*.json`/`*.jsonc` as a wrangler file.

    A wrangler file's warnings go to `on_warning`, or to this module's logger. A class whose
    image is a Dockerfile or build directory keeps that path as its `image`: `load_deployment`
    says how to build it.
    """
    return load_deployment(path, on_warning=on_warning).config


def load_deployment(
    path: str | os.PathLike[str], *, on_warning: Callable[[str], None] | None = None
) -> LoadedConfig:
    """Like `load_config`, with the BuildSpec of each class whose image is to be built."""
    file = os.fspath(path)
    suffix = Path(file).suffix.lower()
    if suffix not in (".toml", ".json", ".jsonc"):
        raise ConfigError(
            file,
            "",
            f"cannot tell the format from {suffix or 'no extension'!r}; "
            "use a .toml, .json or .jsonc file",
        )
    try:
        text = Path(file).read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise ConfigError(file, "", "no such file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from exc
    if suffix == ".toml":
        return read_toml(text, file)
    loaded, warnings = read_wrangler(text, file)
    for warning in warnings:
        (on_warning or log.warning)(warning)
    return loaded


def parse_toml(text: str, file: str) -> Config:
    """Portside's own format: `[[containers]]` and `[[routes]]`; unknown keys are errors."""
    return read_toml(text, file).config


def read_toml(text: str, file: str) -> LoadedConfig:
    """`parse_toml`, with the BuildSpecs (paths relative to `file`'s directory)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from exc
    top = _Table(file, "", data, noun="table")
    top.check_keys(_TOML_TOP_KEYS)
    jurisdictions = _jurisdictions(top)
    classes: list[tuple[_Table, ContainerClass]] = []
    builds: dict[str, BuildSpec] = {}
    for table in top.tables("containers"):
        table.check_keys(_CONTAINER_KEYS)
        if "autoscaling" in table:
            table.table("autoscaling").check_keys(_AUTOSCALING_KEYS)
        if "constraints" in table:
            table.table("constraints").check_keys(_CONSTRAINT_KEYS)
        cls = _container(table, jurisdictions)
        classes.append((table, cls))
        if is_build_path(cls.image):
            builds[cls.name] = _build_spec(table)
        else:
            for key in _BUILD_KEYS:
                if key in table:
                    raise table.error(key, _NOT_BUILT.format(image=_show(cls.image)))
    routes = [(table, _route(table)) for table in top.tables("routes")]
    return LoadedConfig(_assemble(classes, routes, _gateway(top), file), builds)


def parse_wrangler(text: str, file: str) -> tuple[Config, list[str]]:
    """A wrangler.jsonc's `containers` as they are, plus `routes` in Portside's form.

    Container fields Portside does not use are returned as warnings; the Worker's own keys
    (name, main, durable_objects, migrations, ...) are skipped without a word.
    """
    loaded, warnings = read_wrangler(text, file)
    return loaded.config, warnings


def read_wrangler(text: str, file: str) -> tuple[LoadedConfig, list[str]]:
    """`parse_wrangler`, with the BuildSpecs (paths relative to `file`'s directory)."""
    try:
        data = json.loads(strip_jsonc(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            file, "", f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(file, "", f"must hold one JSON object, not {_show(data)}")
    top = _Table(file, "", data, noun="object")
    warnings: list[str] = []
    if "containers" not in top:
        warnings.append(f"{file}: containers: missing; there is nothing for Portside to run")

    classes: list[tuple[_Table, ContainerClass]] = []
    builds: dict[str, BuildSpec] = {}
    for table in top.tables("containers"):
        known: dict[str, object] = {}
        for key, value in table.data.items():
            if key in _CONTAINER_KEYS:
                known[key] = value
            elif key in _WRANGLER_IGNORED:
                warnings.append(f"{file}: {table.where(key)}: ignored (not used by Portside)")
            else:
                hint = _did_you_mean(key, _CONTAINER_KEYS, "; ")
                warnings.append(f"{file}: {table.where(key)}: ignored (unknown field{hint})")
        if "autoscaling" in table:
            # Cloudflare may add fields here too: warn about the ones Portside does not read.
            scaling = table.table("autoscaling")
            known["autoscaling"] = {
                key: value for key, value in scaling.data.items() if key in _AUTOSCALING_KEYS
            }
            for key in scaling.data:
                if key not in _AUTOSCALING_KEYS:
                    hint = _did_you_mean(key, _AUTOSCALING_KEYS, "; ")
                    warnings.append(f"{file}: {scaling.where(key)}: ignored (unknown field{hint})")
        if "constraints" in table:
            # Cloudflare's cities and tiers mean nothing here: warned about, the rest is read.
            limits = table.table("constraints")
            known["constraints"] = {
                key: value for key, value in limits.data.items() if key in _CONSTRAINT_KEYS
            }
            for key in limits.data:
                if key not in _CONSTRAINT_KEYS:
                    warnings.append(f"{file}: {limits.where(key)}: ignored (not used by Portside)")
        # Cloudflare's defaults where the entry is silent: a wrangler file means the same here.
        for key, default in _WRANGLER_DEFAULTS.items():
            if known.get(key) is None:
                known[key] = default
        old_name = known.get("instance_type")
        if isinstance(old_name, str) and old_name in _WRANGLER_TYPE_ALIASES:
            known["instance_type"] = _WRANGLER_TYPE_ALIASES[old_name]
            warnings.append(
                f"{file}: {table.where('instance_type')}: {_show(old_name)} read as "
                f"{_show(known['instance_type'])}, its current name"
            )
        image = known.get("image")
        if not (isinstance(image, str) and is_build_path(image)):
            # Build settings beside a registry reference: Cloudflare would not build either.
            for key in _BUILD_KEYS:
                if known.pop(key, None) is not None:
                    problem = _NOT_BUILT.format(image=_show(image))
                    warnings.append(f"{file}: {table.where(key)}: ignored ({problem})")
        kept = _Table(file, table.at, known, noun="object")
        cls = _container(kept)
        classes.append((kept, cls))
        if is_build_path(cls.image):
            builds[cls.name] = _build_spec(kept)

    # The Worker's Durable Object bindings name the classes for the gateway module (env.NAME).
    named = _durable_object_bindings(top)
    classes = [
        (table, dataclasses.replace(cls, binding=named[cls.name]))
        if cls.name in named and not cls.binding
        else (table, cls)
        for table, cls in classes
    ]
    routes: list[tuple[_Table, Route]] = []
    for index, entry in enumerate(top.array("routes")):
        at = f"routes[{index}]"
        if isinstance(entry, str) or (
            isinstance(entry, dict) and "pattern" in entry and "path" not in entry
        ):
            # A Workers route (`example.com/*` or {pattern, zone_name}): Cloudflare's, not ours.
            warnings.append(
                f"{file}: {at}: ignored (a Workers route; "
                "Portside routes are {path, class_name, instance})"
            )
            continue
        if not isinstance(entry, dict):
            raise ConfigError(file, at, f"must be an object, not {_show(entry)}")
        table = _Table(file, at, entry, noun="object")
        routes.append((table, _route(table)))
    return LoadedConfig(_assemble(classes, routes), builds), warnings


def _durable_object_bindings(top: _Table) -> dict[str, str]:
    """class_name -> binding name, from wrangler's durable_objects.bindings (malformed entries
    are Cloudflare's business and skipped)."""
    objects = top.data.get("durable_objects")
    entries = objects.get("bindings") if isinstance(objects, dict) else None
    out: dict[str, str] = {}
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict):
            name, cls = entry.get("name"), entry.get("class_name")
            if isinstance(name, str) and isinstance(cls, str):
                out.setdefault(cls, name)
    return out


def strip_jsonc(text: str) -> str:
    """JSON from JSONC: `//` and `/* */` comments and trailing commas become spaces.

    Line and column numbers are kept, so JSON errors point into the user's file.
    """
    out: list[str] = []
    last = -1  # index in `out` of the last character that is neither blank nor comment
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[i : end + 1])
            last = len(out) - 1
            i = end + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise json.JSONDecodeError("unterminated /* comment", text, i)
            out.append(re.sub(r"[^\n]", " ", text[i : end + 2]))
            i = end + 2
        else:
            if char in "}]" and last >= 0 and out[last] == ",":
                out[last] = " "
            out.append(char)
            if not char.isspace():
                last = len(out) - 1
            i += 1
    return "".join(out)


def _container(
    table: _Table, jurisdictions: Mapping[str, tuple[str, ...]] = JURISDICTIONS
) -> ContainerClass:
    name = table.text("class_name")
    if not _CLASS_NAME.fullmatch(name):
        raise table.error(
            "class_name",
            f"{_show(name)} is not a class name; use a letter, then up to 62 letters, "
            "digits, '_' or '-'",
        )
    image = table.text("image")
    if not image.strip():
        raise table.error("image", "must not be empty")
    max_instances = table.integer("max_instances", _DEFAULT.max_instances, low=0)
    return ContainerClass(
        name=name,
        image=image,
        default_port=table.integer("default_port", _DEFAULT.default_port, low=1, high=65535),
        instance_type=(
            _instance_type(table) if "instance_type" in table else _DEFAULT.instance_type
        ),
        sleep_after_s=table.duration("sleep_after", _DEFAULT.sleep_after_s),
        max_instances=max_instances,
        env=_env(table) if "env" in table else {},
        entrypoint=_entrypoint(table) if "entrypoint" in table else (),
        enable_internet=table.boolean("enable_internet", _DEFAULT.enable_internet),
        boot_timeout_s=table.duration("boot_timeout", _DEFAULT.boot_timeout_s),
        autoscaling=_autoscaling(table, max_instances) if "autoscaling" in table else None,
        ping_endpoint=_ping_endpoint(table),
        health_check_interval_s=table.duration(
            "health_check_interval", _DEFAULT.health_check_interval_s
        ),
        health_check_failures=table.integer(
            "health_check_failures", _DEFAULT.health_check_failures, low=1
        ),
        health_check_timeout_s=table.duration(
            "health_check_timeout", _DEFAULT.health_check_timeout_s
        ),
        rollout_step_percentage=_rollout_steps(table),
        rollout_active_grace_period_s=table.duration(
            "rollout_active_grace_period",
            _DEFAULT.rollout_active_grace_period_s,
            allow_zero=True,
            allow_seconds=True,
        ),
        rollout_health_deadline_s=table.duration(
            "rollout_health_deadline", _DEFAULT.rollout_health_deadline_s, allow_seconds=True
        ),
        rollout_on_unhealthy=_rollout_on_unhealthy(table),
        stop_timeout_s=table.duration("stop_timeout", _DEFAULT.stop_timeout_s, allow_seconds=True),
        sleep_mode=table.text("sleep_mode", _DEFAULT.sleep_mode),
        pause_max_s=table.duration("pause_max", _DEFAULT.pause_max_s, allow_seconds=True),
        snapshot_on_sleep=table.boolean("snapshot_on_sleep", _DEFAULT.snapshot_on_sleep),
        snapshot_retention_s=table.duration(
            "snapshot_retention", _DEFAULT.snapshot_retention_s, allow_seconds=True
        ),
        snapshot_keep=table.integer("snapshot_keep", _DEFAULT.snapshot_keep, low=1),
        binding=table.text("binding", ""),
        allowed_hosts=_hosts(table, "allowed_hosts"),
        denied_hosts=_hosts(table, "denied_hosts"),
        outbound_by_host=_outbound_by_host(table) if "outbound_by_host" in table else {},
        intercept_https=table.boolean("intercept_https", _DEFAULT.intercept_https),
        constraints=(
            _constraints(table, jurisdictions) if "constraints" in table else Constraints()
        ),
    )


def _jurisdictions(top: _Table) -> Mapping[str, tuple[str, ...]]:
    """The built-in jurisdictions (portside.constraints), with those the file's [jurisdictions]
    defines or replaces: `eu = ["fra", "ams", "eeur"]` (region codes or areas)."""
    out = dict(JURISDICTIONS)
    if "jurisdictions" not in top:
        return out
    table = top.table("jurisdictions")
    for name, value in table.data.items():
        if not isinstance(value, list) or not value:
            raise table.error(
                name, f"must be a non-empty array of region codes or areas, not {_show(value)}"
            )
        for index, item in enumerate(value):
            problem = place_problem(item) if isinstance(item, str) else _not_a_string(item)
            if problem:
                raise table.error(f"{name}[{index}]", problem)
        out[name.lower()] = tuple(sorted(places(value)))
    return out


def _not_a_string(value: object) -> str:
    return f"must be a string, not {_show(value)}"


def _constraints(table: _Table, jurisdictions: Mapping[str, tuple[str, ...]]) -> Constraints:
    """A class's `constraints`: regions (areas or region codes), a jurisdiction by name and the
    node labels every node holding it must carry."""
    limits = table.table("constraints")
    regions = []
    for index, item in enumerate(limits.array("regions")):
        if not isinstance(item, str):
            raise limits.error(f"regions[{index}]", _not_a_string(item))
        problem = place_problem(item)
        if problem:
            raise limits.error(f"regions[{index}]", problem)
        regions.append(item.strip().lower())
    name = limits.text("jurisdiction", "").strip().lower()
    if name and name not in jurisdictions:
        raise limits.error(
            "jurisdiction",
            f"{_show(name)} is not a jurisdiction; use one of {', '.join(sorted(jurisdictions))}"
            " or define it under [jurisdictions]",
        )
    labels: dict[str, str] = {}
    if "labels" in limits:
        for key, value in limits.table("labels").data.items():
            if not isinstance(value, str):
                raise limits.error(f"labels.{key}", f"must be a string, not {_show(value)}")
            labels[key] = value
    constraints = Constraints(tuple(regions), name, jurisdictions.get(name, ()), labels)
    field, problem = constraints_problem(constraints)
    if problem:
        raise limits.error(field, problem)
    return constraints


def _hosts(table: _Table, key: str) -> tuple[str, ...]:
    out = []
    for index, item in enumerate(table.array(key)):
        if not isinstance(item, str):
            raise table.error(f"{key}[{index}]", f"must be a string, not {_show(item)}")
        problem = pattern_problem(item)
        if problem:
            raise table.error(f"{key}[{index}]", problem)
        out.append(item.strip())
    return tuple(out)


def _outbound_by_host(table: _Table) -> dict[str, str]:
    hosts = table.table("outbound_by_host")
    out = {}
    for host in hosts.data:
        handler = hosts.text(host)
        problem = pattern_problem(host)
        if problem:
            raise hosts.error(host, problem)
        if not handler.isidentifier():
            raise hosts.error(
                host, f"{_show(handler)} is not a function name of the gateway module"
            )
        out[host.strip()] = handler
    return out


_STEPS_SYNTAX = (
    "use a percentage from 1 to 100 (each step moves that many more instances: 25 is "
    "[25, 50, 75, 100]), or an ascending array of them ending in 100, like [10, 50, 100]"
)


def _rollout_steps(table: _Table) -> tuple[int, ...]:
    """wrangler's rollout_step_percentage: one step size, or every step's percentage."""
    if "rollout_step_percentage" not in table:
        return ()
    value = table.data["rollout_step_percentage"]
    if isinstance(value, int) and _is_percentage(value):
        return (*range(value, 100, value), 100)
    if not isinstance(value, list) or not value:
        raise table.error("rollout_step_percentage", f"{_show(value)}: {_STEPS_SYNTAX}")
    steps = tuple(value)
    problem = _steps_problem(steps)
    if problem:
        raise table.error("rollout_step_percentage", f"{_show(value)}: {problem}; {_STEPS_SYNTAX}")
    return tuple(int(step) for step in steps)


def _is_percentage(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100


def _steps_problem(steps: Sequence[object]) -> str:
    """What is wrong with a list of rollout steps ("" when nothing is)."""
    for index, step in enumerate(steps):
        if not _is_percentage(step):
            return f"step {index + 1} ({_show(step)}) is not a whole number from 1 to 100"
    numbers = [step for step in steps if isinstance(step, int)]
    if any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
        return "the steps must go up"
    if numbers[-1] != 100:
        return "the last step must be 100"
    return ""


def _rollout_on_unhealthy(table: _Table) -> str:
    value = table.text("rollout_on_unhealthy", _DEFAULT.rollout_on_unhealthy)
    if value not in ROLLOUT_ON_UNHEALTHY:
        raise table.error(
            "rollout_on_unhealthy",
            f"{_show(value)} is not allowed; use {' or '.join(map(_show, ROLLOUT_ON_UNHEALTHY))}",
        )
    return value


def _build_spec(table: _Table) -> BuildSpec:
    """The Dockerfile, build context and build args of a class whose image is built, resolved
    against the config file's directory and checked now, so that a typo fails before a build."""
    source = table.text("image").strip()
    base = Path(table.file).resolve().parent if table.file else Path.cwd()
    target = Path(os.path.normpath(base / source))  # an absolute `source` stays as it is
    if target.is_dir():
        dockerfile = target / "Dockerfile"
        if not dockerfile.is_file():
            raise table.error(
                "image",
                f"{_show(source)} is a directory without a Dockerfile ({dockerfile}); name the "
                "Dockerfile, or a directory holding one",
            )
        context = target
    elif target.is_file():
        dockerfile, context = target, target.parent
    else:
        raise table.error(
            "image",
            f"{_show(source)}: no such file or directory ({target}); use a registry reference, "
            "or a Dockerfile or a directory holding one, relative to the config file",
        )
    if "image_build_context" in table:
        written = table.text("image_build_context")
        context = Path(os.path.normpath(base / written))
        if not context.is_dir():
            raise table.error(
                "image_build_context",
                f"{_show(written)} is not a directory ({context}); it is the build context, a "
                "directory relative to the config file (default: the Dockerfile's)",
            )
    return BuildSpec(
        dockerfile=dockerfile.resolve(),
        context=context.resolve(),
        vars=_image_vars(table) if "image_vars" in table else {},
        source=source,
        file=table.file,
        at=table.at,
    )


def _image_vars(table: _Table) -> dict[str, str]:
    """Build args: names to strings, as Docker's --build-arg and wrangler's image_vars take."""
    image_vars = table.table("image_vars")
    for key, value in image_vars.data.items():
        if not key or "=" in key or "\0" in key:
            raise image_vars.error(
                key, "is not a build arg name; it must be non-empty, without '='"
            )
        if not isinstance(value, str):
            raise image_vars.error(
                key, f"must be a string, not {_show(value)} (build args are text: quote it)"
            )
    return {key: str(value) for key, value in image_vars.data.items()}


def _autoscaling(table: _Table, max_instances: int) -> Autoscaling:
    """A pool's bounds and target; an empty block is a pool with every default."""
    scaling = table.table("autoscaling")
    default = _DEFAULT_AUTOSCALING
    minimum = scaling.integer("minimum_instances", default.minimum_instances, low=0)
    maximum = scaling.integer("maximum_instances", default.maximum_instances, low=0)
    cpu_target = scaling.number("cpu_target", default.cpu_target)
    if not 0 < cpu_target <= 100:
        raise scaling.error(
            "cpu_target",
            "must be more than 0 and at most 100 (percent of the instance type's vCPU), "
            f"not {cpu_target:g}",
        )
    # maximum_instances = 0 (or absent) means the class's max_instances bounds the pool.
    if maximum and minimum > maximum:
        raise scaling.error(
            "minimum_instances", f"{minimum} is more than maximum_instances ({maximum})"
        )
    if not maximum and max_instances and minimum > max_instances:
        raise scaling.error(
            "minimum_instances",
            f"{minimum} is more than the class's max_instances ({max_instances}), "
            "which bounds the pool when maximum_instances is not set",
        )
    return Autoscaling(
        minimum_instances=minimum,
        maximum_instances=maximum,
        cpu_target=cpu_target,
        scale_down_delay_s=scaling.duration(
            "scale_down_delay", default.scale_down_delay_s, allow_zero=True
        ),
        concurrency_limit=scaling.integer("concurrency_limit", default.concurrency_limit, low=0),
    )


def _instance_type(table: _Table) -> InstanceType:
    value = table.data["instance_type"]
    if isinstance(value, str) and value in INSTANCE_TYPES:
        return INSTANCE_TYPES[value]
    if not isinstance(value, dict):
        raise table.error(
            "instance_type",
            f"{_show(value)} is not an instance type; use {', '.join(INSTANCE_TYPES)}, "
            f"or {table.a_noun} {{{', '.join(_CUSTOM_TYPE_KEYS)}}}",
        )
    custom = table.table("instance_type")
    custom.check_keys(_CUSTOM_TYPE_KEYS)
    vcpu = custom.number("vcpu")
    if not 0 < vcpu <= _MAX_VCPU:
        raise custom.error("vcpu", f"must be more than 0 and at most {_MAX_VCPU:g}, not {vcpu:g}")
    return InstanceType(
        name="custom",
        vcpu=vcpu,
        memory_mib=custom.integer("memory_mib", low=_MIN_MEMORY_MIB),
        disk_mb=custom.integer("disk_mb", _CUSTOM_DISK_MB, low=0),
    )


def _env(table: _Table) -> dict[str, str]:
    env = table.table("env")
    for key in env.data:
        if not key or "=" in key or "\0" in key:
            raise env.error(key, "is not a variable name; it must be non-empty, without '='")
    return {key: env.text(key) for key in env.data}


def _entrypoint(table: _Table) -> tuple[str, ...]:
    items = table.array("entrypoint")
    if not items:
        raise table.error("entrypoint", "must not be empty; leave it out to use the image's")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise table.error(f"entrypoint[{index}]", f"must be a string, not {_show(item)}")
    return tuple(str(item) for item in items)


def _route(table: _Table) -> Route:
    table.check_keys(_ROUTE_KEYS)
    path = table.text("path")
    if not path.startswith("/"):
        raise table.error("path", f'{_show(path)} must start with "/"')
    if any(char in "?#" or char.isspace() for char in path):
        raise table.error("path", f"{_show(path)} must be a bare path: no query, '#' or spaces")
    instance = _instance_source(table) if "instance" in table else None
    if table.boolean("gateway", False):
        for key in ("class_name", "instance"):
            if key in table:
                raise table.error(
                    key, "a gateway route names no class: the gateway module's fetch answers"
                )
        return Route(path=path, gateway=True)
    return Route(path=path, class_name=table.text("class_name"), instance=instance)


def _gateway(top: _Table) -> Gateway | None:
    """`[gateway]`: the module's source is read now, relative to the config file."""
    if "gateway" not in top:
        return None
    table = top.table("gateway")
    table.check_keys(_GATEWAY_KEYS)
    name = table.text("module")
    path = Path(top.file).resolve().parent / name
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise table.error("module", f"{_show(name)}: no such file (looked for {path})") from exc
    except UnicodeDecodeError as exc:
        raise table.error("module", f"{_show(name)}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise table.error("module", f"{_show(name)}: cannot read: {exc.strerror or exc}") from exc
    variables = table.table("vars") if "vars" in table else None
    limits = []
    for limit in table.tables("rate_limits"):
        limit.check_keys(_RATE_LIMIT_KEYS)
        limits.append(
            RateLimit(
                binding=limit.text("binding"),
                limit=limit.integer("limit", low=1),
                period_s=limit.duration("period", 60.0, allow_seconds=True),
            )
        )
    return Gateway(
        module=Path(name).name,
        source=source,
        vars={k: variables.text(k) for k in variables.data} if variables is not None else {},
        rate_limits=tuple(limits),
        deadline_s=table.duration("deadline", DEFAULT_GATEWAY_DEADLINE_S, allow_seconds=True),
    )


def _instance_source(table: _Table) -> InstanceSource:
    text = table.text("instance")
    prefix, colon, arg = text.partition(":")
    kind = _SOURCE_KINDS.get(prefix)
    if not colon or kind is None:
        raise table.error("instance", f"{_show(text)} is not an instance source; {_SOURCE_SYNTAX}")
    if kind == "path":
        if not _SEGMENT_INDEX.fullmatch(arg) or int(arg) < 1:
            raise table.error(
                "instance",
                f"{_show(text)}: N in path:N must be a whole number from 1 "
                "(the N-th path segment after the route's path)",
            )
        return InstanceSource(kind, index=int(arg))
    if kind in ("header", "cookie") and not _HTTP_TOKEN.fullmatch(arg):
        raise table.error("instance", f"{_show(text)}: {arg!r} is not a valid {kind} name")
    if kind == "query" and (not arg or any(c in "&=#" or c.isspace() for c in arg)):
        raise table.error("instance", f"{_show(text)}: {arg!r} is not a valid query name")
    return InstanceSource(kind, name=arg)


def _assemble(
    classes: Sequence[tuple[_Table, ContainerClass]],
    routes: Sequence[tuple[_Table, Route]],
    gateway: Gateway | None = None,
    file: str = "",
) -> Config:
    config = Config(
        classes=tuple(cls for _, cls in classes),
        routes=tuple(route for _, route in routes),
        gateway=gateway,
    )
    file = classes[0][0].file if classes else routes[0][0].file if routes else file
    validate_config(
        config,
        file,
        class_at=[table.at for table, _ in classes],
        route_at=[table.at for table, _ in routes],
        allow_build_paths=True,
    )
    return config


def validate_config(
    config: Config,
    source: str = "deploy request",
    *,
    class_at: Sequence[str] = (),
    route_at: Sequence[str] = (),
    allow_build_paths: bool = False,
) -> None:
    """The rules a config keeps however it was made: read from a file here, or sent in a Deploy
    call by any client. Each class's values; unique class names and paths; routes to declared
    classes; a route to a pool takes no instance source, a route to any other class needs one.
    An image that is a build path is refused unless `allow_build_paths` (a file read here, before
    `portside deploy` builds it): a Deploy call carries the built image's reference and digest.
    Raises ConfigError naming `source`, the field (at `class_at[i]` / `route_at[i]`, by default
    containers[i] and routes[i]) and what is allowed."""
    declared: dict[str, tuple[str, ContainerClass]] = {}
    for i, cls in enumerate(config.classes):
        at = class_at[i] if i < len(class_at) else f"containers[{i}]"
        _check_class(cls, source, at, allow_build_paths=allow_build_paths)
        if cls.name in declared:
            raise ConfigError(
                source,
                f"{at}.class_name",
                f"{_show(cls.name)} is already declared by {declared[cls.name][0]}",
            )
        declared[cls.name] = (at, cls)
    routed: dict[str, str] = {}
    handlers = _check_gateway(config, source, declared)
    for i, route in enumerate(config.routes):
        at = route_at[i] if i < len(route_at) else f"routes[{i}]"
        if not route.path.startswith("/"):
            raise ConfigError(source, f"{at}.path", f'{_show(route.path)} must start with "/"')
        if route.gateway:
            if config.gateway is None:
                raise ConfigError(
                    source,
                    f"{at}.gateway",
                    'no [gateway] module is configured; add [gateway] module = "gateway.py"',
                )
            if "fetch" not in handlers:
                raise ConfigError(
                    source,
                    f"{at}.gateway",
                    f"gateway module {config.gateway.module} defines no"
                    " `async def fetch(request, env)`",
                )
            if route.path in routed:
                raise ConfigError(
                    source,
                    f"{at}.path",
                    f"{_show(route.path)} is already routed by {routed[route.path]}",
                )
            routed[route.path] = at
            continue
        if route.class_name not in declared:
            known = ", ".join(declared) or "none"
            raise ConfigError(
                source,
                f"{at}.class_name",
                f"{_show(route.class_name)} is not a declared container class; declared: {known}",
            )
        is_pool = declared[route.class_name][1].autoscaling is not None
        if route.instance is None and not is_pool:
            raise ConfigError(
                source,
                f"{at}.instance",
                f"missing; class {_show(route.class_name)} is not a pool (it has no autoscaling "
                "block), so the route must say where the instance name comes from "
                f"({_SOURCE_FORMS})",
            )
        if route.instance is not None and is_pool:
            raise ConfigError(
                source,
                f"{at}.instance",
                f"class {_show(route.class_name)} is a pool (autoscaling): any instance serves, "
                "so its routes take no instance key",
            )
        if route.path in routed:
            raise ConfigError(
                source,
                f"{at}.path",
                f"{_show(route.path)} is already routed by {routed[route.path]}",
            )
        routed[route.path] = at


def _check_gateway(
    config: Config, source: str, declared: Mapping[str, tuple[str, ContainerClass]]
) -> set[str]:
    """The gateway's rules: bindings are identifiers, unique across classes and rate limiters;
    the module compiles and defines every handler the classes name (and `fetch` when no route
    is given, as it then answers everything). Returns the module's top-level functions."""
    bindings: dict[str, str] = {}

    def bind(name: str, where: str) -> None:
        if not _BINDING.fullmatch(name) or name in _RESERVED_BINDINGS:
            raise ConfigError(
                source,
                where,
                f"{_show(name)} is not a binding name; use a Python identifier other than "
                f"{' or '.join(sorted(_RESERVED_BINDINGS))}",
            )
        if name in bindings:
            raise ConfigError(source, where, f"binding {_show(name)} is already {bindings[name]}")
        bindings[name] = where

    for at, cls in declared.values():
        bind(binding_of(cls), f"{at}.binding" if cls.binding else f"{at}.class_name")
    gateway = config.gateway
    if gateway is None:
        for at, cls in declared.values():
            if cls.outbound_by_host:
                raise ConfigError(
                    source,
                    f"{at}.outbound_by_host",
                    "names gateway handlers, but no [gateway] module is configured",
                )
        return set()
    for i, limit in enumerate(gateway.rate_limits):
        where = f"gateway.rate_limits[{i}]"
        bind(limit.binding, f"{where}.binding")
        if limit.limit < 1:
            raise ConfigError(source, f"{where}.limit", f"must be >= 1, not {limit.limit}")
        if not limit.period_s > 0:
            raise ConfigError(
                source, f"{where}.period", f"{limit.period_s:g}s must be longer than zero"
            )
    if not gateway.deadline_s > 0:
        raise ConfigError(
            source, "gateway.deadline", f"{gateway.deadline_s:g}s must be longer than zero"
        )
    try:
        tree = ast.parse(gateway.source, filename=gateway.module)
    except SyntaxError as exc:
        raise ConfigError(
            source, "gateway.module", f"{gateway.module} line {exc.lineno}: {exc.msg}"
        ) from exc
    functions = {
        node.name: isinstance(node, ast.AsyncFunctionDef)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    wanted = [("fetch", "gateway.module")] if not config.routes else []
    if "outbound" in functions:
        wanted.append(("outbound", "gateway.module"))
    for at, cls in declared.values():
        for host, handler in cls.outbound_by_host.items():
            wanted.append((handler, f"{at}.outbound_by_host.{host}"))
    for handler, where in wanted:
        if handler not in functions:
            raise ConfigError(
                source, where, f"gateway module {gateway.module} defines no function {handler!r}"
            )
        if not functions[handler]:
            raise ConfigError(
                source, where, f"{gateway.module}: {handler} must be `async def`, not `def`"
            )
    return {name for name, is_async in functions.items() if is_async}


def _check_class(cls: ContainerClass, source: str, at: str, *, allow_build_paths: bool) -> None:
    """What one class must hold whoever sent it (the file reader checks the same as it reads,
    with the user's own text in its messages)."""

    def fail(field: str, problem: str) -> ConfigError:
        return ConfigError(source, f"{at}.{field}", problem)

    if not _CLASS_NAME.fullmatch(cls.name):
        raise fail(
            "class_name",
            f"{_show(cls.name)} is not a class name; use a letter, then up to 62 letters, "
            "digits, '_' or '-'",
        )
    if not cls.image.strip():
        raise fail("image", "must not be empty")
    if is_build_path(cls.image) and not allow_build_paths:
        raise fail(
            "image",
            f"{_show(cls.image)} is a Dockerfile or build directory: `portside deploy FILE` "
            "builds it and deploys the image's reference and digest; a Deploy call must carry "
            "those, not a path",
        )
    if cls.image_digest and not _DIGEST.fullmatch(cls.image_digest):
        raise fail(
            "image_digest",
            f"{_show(cls.image_digest)} is not an image id; use sha256: and 64 lower-case hex "
            "digits, or leave it empty for a registry reference",
        )
    if not 0 < cls.default_port < 65536:
        raise fail("default_port", f"must be an integer from 1 to 65535, not {cls.default_port}")
    itype = cls.instance_type
    if not 0 < itype.vcpu <= _MAX_VCPU or itype.memory_mib < _MIN_MEMORY_MIB:
        raise fail(
            "instance_type",
            f"{itype.vcpu:g} vCPU and {itype.memory_mib} MiB: vCPU must be more than 0 and at most "
            f"{_MAX_VCPU:g}, memory at least {_MIN_MEMORY_MIB} MiB",
        )
    for field, seconds in (
        ("sleep_after", cls.sleep_after_s),
        ("boot_timeout", cls.boot_timeout_s),
    ):
        if not seconds > 0:
            raise fail(field, f"{seconds:g}s must be longer than zero")
    if cls.max_instances < 0:
        raise fail("max_instances", f"must be an integer >= 0, not {cls.max_instances}")
    for field, patterns in (
        ("allowed_hosts", cls.allowed_hosts),
        ("denied_hosts", cls.denied_hosts),
        ("outbound_by_host", tuple(cls.outbound_by_host)),
    ):
        for index, pattern in enumerate(patterns):
            problem = pattern_problem(pattern)
            if problem:
                raise fail(f"{field}[{index}]", problem)
    for host, handler in cls.outbound_by_host.items():
        if not handler.isidentifier():
            raise fail(f"outbound_by_host.{host}", f"{_show(handler)} is not a function name")
    field, problem = constraints_problem(cls.constraints)
    if problem:
        raise fail(f"constraints.{field}", problem)
    _check_health(cls, fail)
    _check_rollout(cls, fail)


def _check_rollout(cls: ContainerClass, fail: Callable[[str, str], ConfigError]) -> None:
    steps = cls.rollout_step_percentage
    problem = _steps_problem(steps) if steps else ""
    if problem:
        raise fail("rollout_step_percentage", f"{list(steps)}: {problem}; {_STEPS_SYNTAX}")
    if not cls.rollout_active_grace_period_s >= 0:
        raise fail(
            "rollout_active_grace_period",
            f"{cls.rollout_active_grace_period_s:g}s must not be negative",
        )
    for field, seconds in (
        ("rollout_health_deadline", cls.rollout_health_deadline_s),
        ("stop_timeout", cls.stop_timeout_s),
    ):
        if not seconds > 0:
            raise fail(field, f"{seconds:g}s must be longer than zero")
    if cls.rollout_on_unhealthy not in ROLLOUT_ON_UNHEALTHY:
        raise fail(
            "rollout_on_unhealthy",
            f"{_show(cls.rollout_on_unhealthy)} is not allowed; use "
            f"{' or '.join(map(_show, ROLLOUT_ON_UNHEALTHY))}",
        )
    if cls.wake_min_version < 0:
        raise fail("wake_min_version", f"must be >= 0, not {cls.wake_min_version}")
    _check_sleep(cls, fail)


def _check_sleep(cls: ContainerClass, fail: Callable[[str, str], ConfigError]) -> None:
    if cls.sleep_mode not in SLEEP_MODES:
        raise fail(
            "sleep_mode",
            f"{_show(cls.sleep_mode)} is not allowed; use {' or '.join(map(_show, SLEEP_MODES))}",
        )
    for field, seconds in (
        ("pause_max", cls.pause_max_s),
        ("snapshot_retention", cls.snapshot_retention_s),
    ):
        if not seconds > 0:
            raise fail(field, f"{seconds:g}s must be longer than zero")
    if cls.snapshot_keep < 1:
        raise fail("snapshot_keep", f"must be an integer >= 1, not {cls.snapshot_keep}")


def _ping_endpoint(table: _Table) -> str:
    """The class's ping_endpoint as a path with its leading "/" ("" turns checks off)."""
    text = table.text("ping_endpoint", _DEFAULT.ping_endpoint)
    if not _is_ping_path(ping_path(text)):
        raise table.error("ping_endpoint", _NOT_A_PING_PATH.format(endpoint=_show(text)))
    return ping_path(text)


def _is_ping_path(endpoint: str) -> bool:
    if not endpoint:
        return True
    return "://" not in endpoint and "#" not in endpoint and bool(_PING_PATH.fullmatch(endpoint))


_NOT_A_PING_PATH = (
    '{endpoint} is not a path; use a path on the container\'s default_port like "/ping" or '
    '"healthz?deep=1" (printable ASCII, no spaces, no #, not a URL), or "" for no health checks'
)


def _check_health(cls: ContainerClass, fail: Callable[[str, str], ConfigError]) -> None:
    if not _is_ping_path(cls.ping_endpoint) or (
        cls.ping_endpoint and not cls.ping_endpoint.startswith("/")
    ):
        raise fail("ping_endpoint", _NOT_A_PING_PATH.format(endpoint=_show(cls.ping_endpoint)))
    if cls.health_check_failures < 1:
        raise fail(
            "health_check_failures", f"must be an integer >= 1, not {cls.health_check_failures}"
        )
    interval, timeout = cls.health_check_interval_s, cls.health_check_timeout_s
    for field, seconds in (("health_check_interval", interval), ("health_check_timeout", timeout)):
        if not seconds > 0:
            raise fail(field, f"{seconds:g}s must be longer than zero")
    if timeout >= interval:
        raise fail(
            "health_check_timeout",
            f"{timeout:g}s must be shorter than health_check_interval ({interval:g}s): a check "
            "ends before the next one is due",
        )


# A registry reference never starts with "." or "/", and nothing but a build path ends in
# Dockerfile: `image = "./container/Dockerfile"` is how wrangler files ask Cloudflare to build.
_BUILD_PATH = re.compile(r"^(\.{1,2}/|/)|(^|/)Dockerfile[^/]*$|^\.{1,2}$")


def is_build_path(image: str) -> bool:
    """True when `image` names a Dockerfile or build directory rather than a registry reference."""
    return bool(_BUILD_PATH.search(image.strip()))


class _Table:
    """One table (TOML) or object (JSON) of a config and where it sits, for error messages."""

    def __init__(self, file: str, at: str, data: Mapping[str, object], noun: str) -> None:
        self.file, self.at, self.data, self.noun = file, at, data, noun
        self.a_noun = f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None  # JSON null counts as absent

    def where(self, key: str) -> str:
        return f"{self.at}.{key}" if self.at else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.where(key), problem)

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                hint = _did_you_mean(key, allowed, " (", ")")
                raise self.error(key, f"unknown key{hint}; allowed: {', '.join(allowed)}")

    def _value(self, key: str, default: object) -> object:
        if key in self:
            return self.data[key]
        if isinstance(default, _Required):
            raise self.error(key, "required, but missing")
        return default

    def text(self, key: str, default: str | _Required = _REQUIRED) -> str:
        value = self._value(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_show(value)}")
        return value

    def boolean(self, key: str, default: bool | _Required = _REQUIRED) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_show(value)}")
        return value

    def integer(
        self, key: str, default: int | _Required = _REQUIRED, *, low: int, high: int | None = None
    ) -> int:
        value = self._value(key, default)
        in_range = f"from {low} to {high}" if high is not None else f">= {low}"
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            raise self.error(key, f"must be an integer {in_range}, not {_show(value)}")
        return value

    def number(self, key: str, default: float | _Required = _REQUIRED) -> float:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {_show(value)}")
        return float(value)

    def duration(
        self, key: str, default: float, *, allow_zero: bool = False, allow_seconds: bool = False
    ) -> float:
        """A duration string; with `allow_seconds` also a number of seconds (wrangler's form)."""
        if key not in self:
            return default
        raw = self.data[key]
        if allow_seconds and isinstance(raw, int | float) and not isinstance(raw, bool):
            if raw < 0 or (raw == 0 and not allow_zero):
                low = ">= 0" if allow_zero else "more than 0"
                raise self.error(key, f"{_show(raw)} seconds: must be {low}")
            return float(raw)
        if allow_seconds and not isinstance(raw, str):
            raise self.error(
                key, f'must be a number of seconds or a duration like "30s", not {_show(raw)}'
            )
        value = self.text(key)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from exc
        if seconds <= 0 and not allow_zero:  # parse_duration never returns less than zero
            raise self.error(key, f"{_show(value)} must be longer than zero")
        return seconds

    def array(self, key: str) -> list[object]:
        """The list at `key`, empty when absent."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"must be an array, not {_show(value)}")
        return value

    def table(self, key: str) -> _Table:
        value = self._value(key, _REQUIRED)
        if not isinstance(value, dict):
            raise self.error(key, f"must be {self.a_noun}, not {_show(value)}")
        return _Table(self.file, self.where(key), value, self.noun)

    def tables(self, key: str) -> Iterator[_Table]:
        """The tables of an array of tables, like TOML's `[[containers]]`."""
        value = self.data.get(key)
        if value is not None and not isinstance(value, list):
            example = f" like [[{key}]]" if self.noun == "table" else ""
            raise self.error(key, f"must be an array of {self.noun}s{example}, not {_show(value)}")
        for index, item in enumerate(value or []):
            at = f"{self.where(key)}[{index}]"
            if not isinstance(item, dict):
                raise ConfigError(self.file, at, f"must be {self.a_noun}, not {_show(item)}")
            yield _Table(self.file, at, item, self.noun)


def _did_you_mean(key: str, allowed: Sequence[str], before: str, after: str = "") -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"{before}did you mean {close[0]}?{after}" if close else ""


def _show(value: object) -> str:
    """A value as the user wrote it (JSON and TOML share strings, numbers and booleans)."""
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = str(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
