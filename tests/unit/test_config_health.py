"""Health check settings of a class: the four keys in portside.toml and wrangler files, their
defaults, their errors (file, field, what is allowed), a Deploy call checked by the same rules,
and the class on the wire and in the store (an older sender's zeros mean the defaults)."""

from __future__ import annotations

import json

import pytest

from controlplane.records import decode_class, encode_class
from portside import convert
from portside.api.v1 import types_pb2 as pb
from portside.config import parse_toml, parse_wrangler, validate_config
from portside.errors import ConfigError
from portside.spec import Config, ContainerClass, ping_path

CLASS = '[[containers]]\nclass_name = "A"\nimage = "a"\n'


def read(extra: str) -> ContainerClass:
    return parse_toml(CLASS + extra, "portside.toml").classes[0]


def test_the_defaults_check_ping_every_10s_three_failures_within_2s() -> None:
    cls = read("")
    assert cls.ping_endpoint == "/ping" and cls.health_checked
    assert (cls.health_check_interval_s, cls.health_check_failures) == (10.0, 3)
    assert cls.health_check_timeout_s == 2.0
    assert cls == ContainerClass("A", "a")  # the spec's defaults are the file's


def test_all_four_keys() -> None:
    cls = read(
        'ping_endpoint = "healthz?deep=1"\nhealth_check_interval = "500ms"\n'
        'health_check_failures = 2\nhealth_check_timeout = "200ms"\n'
    )
    assert cls.ping_endpoint == "/healthz?deep=1"
    assert (cls.health_check_interval_s, cls.health_check_failures) == (0.5, 2)
    assert cls.health_check_timeout_s == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("written", "path"), [("ping", "/ping"), ("/ping", "/ping"), ("a/b", "/a/b"), ("", "")]
)
def test_a_leading_slash_is_optional_and_empty_turns_checks_off(written: str, path: str) -> None:
    cls = read(f'ping_endpoint = "{written}"\n')
    assert cls.ping_endpoint == path == ping_path(written)
    assert cls.health_checked is bool(path)


def test_wrangler_takes_the_same_keys_without_a_warning() -> None:
    text = json.dumps(
        {
            "containers": [
                {
                    "class_name": "A",
                    "image": "a",
                    "ping_endpoint": "up",
                    "health_check_interval": "3s",
                    "health_check_failures": 5,
                    "health_check_timeout": "1s",
                }
            ]
        }
    )
    config, warnings = parse_wrangler(text, "wrangler.jsonc")
    cls = config.classes[0]
    assert (cls.ping_endpoint, cls.health_check_interval_s) == ("/up", 3.0)
    assert (cls.health_check_failures, cls.health_check_timeout_s) == (5, 1.0)
    assert warnings == []


@pytest.mark.parametrize(
    ("extra", "field", "fragments"),
    [
        ('ping_endpoint = "http://x/ping"\n', "ping_endpoint", ('"http://x/ping" is not a path',)),
        ('ping_endpoint = "/a b"\n', "ping_endpoint", ("no spaces", '"" for no health checks')),
        ('ping_endpoint = "/a#b"\n', "ping_endpoint", ("no #",)),
        ("ping_endpoint = 8\n", "ping_endpoint", ("must be a string",)),
        ('health_check_interval = "soon"\n', "health_check_interval", ("soon",)),
        ('health_check_interval = "0s"\n', "health_check_interval", ("longer than zero",)),
        ("health_check_failures = 0\n", "health_check_failures", ("integer >= 1", "not 0")),
        ("health_check_failures = 1.5\n", "health_check_failures", ("integer >= 1",)),
        ('health_check_timeout = "0s"\n', "health_check_timeout", ("longer than zero",)),
        (
            'health_check_timeout = "10s"\n',
            "health_check_timeout",
            ("10s must be shorter than health_check_interval (10s)",),
        ),
        (
            'health_check_interval = "1s"\n',
            "health_check_timeout",
            ("2s must be shorter than health_check_interval (1s)",),
        ),
        ('health_chek_interval = "1s"\n', "health_chek_interval", ("health_check_interval",)),
    ],
)
def test_errors_name_the_file_the_field_and_what_is_allowed(
    extra: str, field: str, fragments: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as caught:
        read(extra)
    assert caught.value.file == "portside.toml"
    assert caught.value.field == f"containers[0].{field}"
    for fragment in fragments:
        assert fragment in caught.value.problem


@pytest.mark.parametrize(
    ("cls", "field", "words"),
    [
        (ContainerClass("A", "a", ping_endpoint="ping"), "ping_endpoint", "is not a path"),
        (ContainerClass("A", "a", health_check_failures=0), "health_check_failures", ">= 1"),
        (
            ContainerClass("A", "a", health_check_interval_s=1.0, health_check_timeout_s=1.0),
            "health_check_timeout",
            "shorter than health_check_interval",
        ),
    ],
)
def test_a_deploy_call_is_checked_by_the_same_rules(
    cls: ContainerClass, field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(Config(classes=(cls,)))
    assert caught.value.file == "deploy request"
    assert caught.value.field == f"containers[0].{field}"
    assert words in caught.value.problem


@pytest.mark.parametrize(
    "cls",
    [
        ContainerClass("A", "a"),
        ContainerClass("A", "a", ping_endpoint=""),
        ContainerClass(
            "A",
            "a",
            ping_endpoint="/healthz",
            health_check_interval_s=0.5,
            health_check_failures=7,
            health_check_timeout_s=0.25,
        ),
    ],
)
def test_on_the_wire_and_in_the_store_as_it_is(cls: ContainerClass) -> None:
    assert convert.class_from_pb(convert.class_to_pb(cls)) == cls
    assert decode_class(encode_class(cls)) == cls


def test_an_older_senders_zeros_mean_the_defaults_and_its_missing_path_no_checks() -> None:
    sent = convert.class_to_pb(ContainerClass("A", "a"))
    for field in (
        "ping_endpoint",
        "health_check_interval_seconds",
        "health_check_failures",
        "health_check_timeout_seconds",
    ):
        sent.ClearField(field)  # fields 13-16, unknown to it
    old = convert.class_from_pb(pb.ContainerClass.FromString(sent.SerializeToString()))
    assert not old.health_checked
    assert (old.health_check_interval_s, old.health_check_failures) == (10.0, 3)
    assert old.health_check_timeout_s == 2.0
    validate_config(Config(classes=(old,)))  # valid as it is
