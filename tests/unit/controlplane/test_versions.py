"""Which deploys make a new class version, and what each version records (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from controlplane.versions import VERSIONED_FIELDS, Version, changed_fields, next_version
from portside.spec import INSTANCE_TYPES, Autoscaling, ContainerClass

BASE = ContainerClass(name="Web", image="web:1", env={"A": "1"}, entrypoint=("serve",))


def test_the_first_deploy_makes_version_1() -> None:
    cls, made = next_version(None, BASE, now=100.0)
    assert cls.version == 1
    assert made == Version(1, cls, 100.0, ("new",))


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"image": "web:2"}, ("image",)),
        (
            {"image": "portside/web:abc", "image_digest": "sha256:" + "a" * 64},
            ("image", "image_digest"),
        ),
        ({"env": {"A": "2"}}, ("env",)),
        ({"env": {"A": "1", "B": "1"}}, ("env",)),
        ({"entrypoint": ("serve", "--fast")}, ("entrypoint",)),
        ({"instance_type": INSTANCE_TYPES["standard-1"]}, ("instance_type",)),
        ({"default_port": 9000}, ("default_port",)),
        ({"enable_internet": True}, ("enable_internet",)),
    ],
)
def test_a_change_to_what_containers_are_made_from_is_the_next_version(
    change: dict[str, object], fields: tuple[str, ...]
) -> None:
    first, _ = next_version(None, BASE, now=1.0)
    latest = Version(1, first, 1.0, ("new",))
    cls, made = next_version(latest, dataclasses.replace(BASE, **change), now=2.0)  # type: ignore[arg-type]
    assert cls.version == 2
    assert made is not None and made.changes == fields and made.created_at == 2.0


@pytest.mark.parametrize(
    "change",
    [
        {"sleep_after_s": 30.0},
        {"max_instances": 3},
        {"boot_timeout_s": 5.0},
        {"autoscaling": Autoscaling(minimum_instances=2)},
        {"ping_endpoint": "/healthz"},
        {"health_check_failures": 5},
    ],
)
def test_runtime_policy_changes_in_place(change: dict[str, object]) -> None:
    first, _ = next_version(None, BASE, now=1.0)
    latest = Version(1, first, 1.0, ("new",))
    cls, made = next_version(latest, dataclasses.replace(BASE, **change), now=2.0)  # type: ignore[arg-type]
    assert made is None and cls.version == 1


def test_env_order_is_no_change() -> None:
    a = dataclasses.replace(BASE, env={"A": "1", "B": "2"})
    b = dataclasses.replace(BASE, env={"B": "2", "A": "1"})
    assert changed_fields(a, b) == ()


def test_every_versioned_field_is_a_class_field() -> None:
    names = {f.name for f in dataclasses.fields(ContainerClass)}
    assert set(VERSIONED_FIELDS) <= names


def test_a_version_round_trips_through_its_record() -> None:
    cls, made = next_version(
        None, dataclasses.replace(BASE, image_digest="sha256:" + "b" * 64), 5.5
    )
    assert made is not None
    assert Version.decode(made.encode()) == made
    assert Version.decode(made.encode()).spec.version == 1
