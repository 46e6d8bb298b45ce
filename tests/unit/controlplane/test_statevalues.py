"""The limits on per-instance state values, checked before any store call: each error names the
field and the limit."""

from __future__ import annotations

import pytest

from controlplane import records
from controlplane.statevalues import MAX_KEY_BYTES, MAX_VALUE_BYTES, validate_key, validate_value
from portside.errors import InvalidArgument


@pytest.mark.parametrize(
    "key", ["a", "A-z_0.9", "dir/sub/file.txt", "-", "x" * MAX_KEY_BYTES, "..", "a//b"]
)
def test_valid_keys(key: str) -> None:
    validate_key(key)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "key: must not be empty"),
        ("x" * (MAX_KEY_BYTES + 1), "key: 257 bytes is over the limit of 256"),
        ("a b", "key: 'a b' has ' '"),
        ("naïve", "has 'ï'"),
        ("a\nb", "[A-Za-z0-9._/-]"),
        ("semi;colon", "has ';'"),
    ],
)
def test_invalid_keys_name_the_field_and_the_rule(key: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="^key: ") as exc:
        validate_key(key)
    assert message in str(exc.value)


def test_value_limit_is_64_kib() -> None:
    validate_value(b"")
    validate_value(b"x" * MAX_VALUE_BYTES)
    with pytest.raises(InvalidArgument, match=r"^value: 65537 bytes is over the limit of 65536"):
        validate_value(b"x" * (MAX_VALUE_BYTES + 1))


def test_state_keys_live_beside_the_instance() -> None:
    assert records.state_prefix("Echo", "abc") == "/portside/state/Echo/abc/"
    assert records.state_key("Echo", "abc", "dir/k") == "/portside/state/Echo/abc/dir/k"
