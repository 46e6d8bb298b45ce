"""Rollout settings of a class: the keys in portside.toml and wrangler files (wrangler's names and
forms), their defaults, their errors (file, field, what is allowed), a Deploy call checked by the
same rules, and the class on the wire and in the store (an older sender's zeros mean defaults)."""

from __future__ import annotations

import json

import pytest

from controlplane.records import decode_class, encode_class
from controlplane.versions import VERSIONED_FIELDS
from portside import convert
from portside.api.v1 import types_pb2 as pb
from portside.config import parse_toml, parse_wrangler, validate_config
from portside.errors import ConfigError
from portside.spec import Config, ContainerClass

CLASS = '[[containers]]\nclass_name = "A"\nimage = "a"\n'
ROLLOUT_FIELDS = (
    "rollout_step_percentage",
    "rollout_active_grace_period_s",
    "rollout_health_deadline_s",
    "rollout_on_unhealthy",
    "stop_timeout_s",
    "wake_min_version",
)


def read(extra: str) -> ContainerClass:
    return parse_toml(CLASS + extra, "portside.toml").classes[0]


def test_the_defaults() -> None:
    cls = read("")
    assert cls.rollout_step_percentage == ()
    assert cls.rollout_active_grace_period_s == 0.0
    assert cls.rollout_health_deadline_s == 300.0
    assert cls.rollout_on_unhealthy == "rollback"
    assert cls.stop_timeout_s == 900.0
    assert cls.wake_min_version == 0
    assert cls == ContainerClass("A", "a")  # the spec's defaults are the file's


@pytest.mark.parametrize(
    ("max_instances", "steps"),
    [(0, (10, 100)), (1, (100,)), (2, (10, 100)), (20, (10, 100))],
)
def test_default_steps_are_10_then_100_unless_the_class_has_one_instance(
    max_instances: int, steps: tuple[int, ...]
) -> None:
    # 0 is "no limit beyond capacity": many instances, so two steps.
    assert ContainerClass("A", "a", max_instances=max_instances).rollout_steps() == steps
    configured = ContainerClass("A", "a", max_instances=1, rollout_step_percentage=(50, 100))
    assert configured.rollout_steps() == (50, 100)


def test_every_key() -> None:
    cls = read(
        "rollout_step_percentage = [10, 50, 100]\n"
        'rollout_active_grace_period = "1m30s"\n'
        'rollout_health_deadline = "2m"\n'
        'rollout_on_unhealthy = "pause"\n'
        'stop_timeout = "20s"\n'
    )
    assert cls.rollout_step_percentage == (10, 50, 100)
    assert cls.rollout_active_grace_period_s == 90.0
    assert cls.rollout_health_deadline_s == 120.0
    assert cls.rollout_on_unhealthy == "pause"
    assert cls.stop_timeout_s == 20.0


@pytest.mark.parametrize(
    ("written", "steps"),
    [
        ("25", (25, 50, 75, 100)),
        ("30", (30, 60, 90, 100)),
        ("100", (100,)),
        ("[100]", (100,)),
        ("[1, 2, 100]", (1, 2, 100)),
    ],
)
def test_one_number_is_the_size_of_every_step(written: str, steps: tuple[int, ...]) -> None:
    assert read(f"rollout_step_percentage = {written}\n").rollout_step_percentage == steps


@pytest.mark.parametrize(
    ("written", "seconds"), [("300", 300.0), ("0", 0.0), ("2.5", 2.5), ('"5m"', 300.0)]
)
def test_the_grace_period_is_seconds_as_wrangler_writes_it_or_a_duration(
    written: str, seconds: float
) -> None:
    assert read(f"rollout_active_grace_period = {written}\n").rollout_active_grace_period_s == (
        seconds
    )


def test_wrangler_takes_its_rollout_keys_and_still_warns_about_rollout_kind() -> None:
    text = json.dumps(
        {
            "containers": [
                {
                    "class_name": "A",
                    "image": "a",
                    "max_instances": 10,
                    "rollout_step_percentage": [10, 100],
                    "rollout_active_grace_period": 300,
                    "rollout_kind": "full_auto",
                    "stop_timeout": "1m",
                    "rollout_on_unhealthy": "pause",
                }
            ]
        }
    )
    config, warnings = parse_wrangler(text, "wrangler.jsonc")
    cls = config.classes[0]
    assert cls.rollout_step_percentage == (10, 100)
    assert cls.rollout_active_grace_period_s == 300.0
    assert (cls.stop_timeout_s, cls.rollout_on_unhealthy) == (60.0, "pause")
    assert warnings == [
        "wrangler.jsonc: containers[0].rollout_kind: ignored (not used by Portside)"
    ]


@pytest.mark.parametrize(
    ("extra", "field", "fragments"),
    [
        ("rollout_step_percentage = [50, 10, 100]\n", "rollout_step_percentage", ("must go up",)),
        ("rollout_step_percentage = [10, 10, 100]\n", "rollout_step_percentage", ("must go up",)),
        (
            "rollout_step_percentage = [10, 50]\n",
            "rollout_step_percentage",
            ("the last step must be 100",),
        ),
        ("rollout_step_percentage = []\n", "rollout_step_percentage", ("[10, 50, 100]",)),
        ("rollout_step_percentage = 0\n", "rollout_step_percentage", ("from 1 to 100",)),
        ("rollout_step_percentage = 101\n", "rollout_step_percentage", ("from 1 to 100",)),
        (
            "rollout_step_percentage = [10.5, 100]\n",
            "rollout_step_percentage",
            ("step 1 (10.5) is not a whole number from 1 to 100",),
        ),
        ('rollout_step_percentage = "10%"\n', "rollout_step_percentage", ('"10%"',)),
        ("rollout_active_grace_period = -1\n", "rollout_active_grace_period", (">= 0",)),
        (
            "rollout_active_grace_period = true\n",
            "rollout_active_grace_period",
            ("a number of seconds or a duration",),
        ),
        ('rollout_active_grace_period = "soon"\n', "rollout_active_grace_period", ("soon",)),
        ('rollout_health_deadline = "0s"\n', "rollout_health_deadline", ("longer than zero",)),
        ('rollout_on_unhealthy = "retry"\n', "rollout_on_unhealthy", ('"rollback" or "pause"',)),
        ("rollout_on_unhealthy = 1\n", "rollout_on_unhealthy", ("must be a string",)),
        ("stop_timeout = 0\n", "stop_timeout", ("more than 0",)),
        ('stop_timeout = "forever"\n', "stop_timeout", ("forever", '"30s"')),
        ("wake_min_version = 3\n", "wake_min_version", ("unknown key",)),
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
        (ContainerClass("A", "a", rollout_step_percentage=(50, 20, 100)), "step_percentage", "up"),
        (ContainerClass("A", "a", rollout_step_percentage=(0, 100)), "step_percentage", "1 to"),
        (ContainerClass("A", "a", rollout_step_percentage=(10,)), "step_percentage", "in 100"),
        (ContainerClass("A", "a", rollout_active_grace_period_s=-1), "grace_period", "negative"),
        (ContainerClass("A", "a", rollout_health_deadline_s=0), "health_deadline", "longer"),
        (ContainerClass("A", "a", rollout_on_unhealthy="ignore"), "on_unhealthy", '"pause"'),
        (ContainerClass("A", "a", stop_timeout_s=-5), "stop_timeout", "longer than zero"),
        (ContainerClass("A", "a", wake_min_version=-1), "wake_min_version", ">= 0"),
    ],
)
def test_a_deploy_call_is_checked_by_the_same_rules(
    cls: ContainerClass, field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(Config(classes=(cls,)))
    assert caught.value.file == "deploy request"
    assert caught.value.field.startswith("containers[0].")
    assert caught.value.field.endswith(field)
    assert words in caught.value.problem


@pytest.mark.parametrize(
    "cls",
    [
        ContainerClass("A", "a"),
        ContainerClass(
            "A",
            "a",
            rollout_step_percentage=(5, 25, 100),
            rollout_active_grace_period_s=12.5,
            rollout_health_deadline_s=60.0,
            rollout_on_unhealthy="pause",
            stop_timeout_s=3.0,
            wake_min_version=7,
        ),
    ],
)
def test_on_the_wire_and_in_the_store_as_it_is(cls: ContainerClass) -> None:
    assert convert.class_from_pb(convert.class_to_pb(cls)) == cls
    assert decode_class(encode_class(cls)) == cls
    validate_config(Config(classes=(cls,)))


def test_an_older_senders_zeros_mean_the_defaults() -> None:
    sent = convert.class_to_pb(
        ContainerClass("A", "a", rollout_on_unhealthy="pause", stop_timeout_s=3.0)
    )
    for number in range(18, 24):  # fields 18-23, unknown to it
        sent.ClearField(pb.ContainerClass.DESCRIPTOR.fields_by_number[number].name)
    old = convert.class_from_pb(pb.ContainerClass.FromString(sent.SerializeToString()))
    assert old == ContainerClass("A", "a")
    validate_config(Config(classes=(old,)))  # valid as it is


def test_rollout_settings_are_runtime_policy_not_part_of_a_version() -> None:
    assert not set(ROLLOUT_FIELDS) & set(VERSIONED_FIELDS)
