"""Gateway secrets' pure parts (controlplane/secrets.py): names, sizes, the key file, sealing with
AES-GCM (the name bound as associated data), and errors that never hold a value."""

from __future__ import annotations

import base64
import dataclasses
import stat
from pathlib import Path

import pytest

from controlplane.access import RULES
from controlplane.audit import Target
from controlplane.secrets import (
    MAX_VALUE_BYTES,
    SealedSecret,
    SecretsKey,
    load_key_file,
    validate_name,
    validate_value,
    write_key_file,
)
from portside.api.v1 import controlplane_pb2 as cp
from portside.errors import ConfigError, FailedPrecondition, InvalidArgument

VALUE = "s3cr3t-value-that-must-not-leak"


@pytest.fixture
def key() -> SecretsKey:
    return SecretsKey(b"k" * 32)


@pytest.mark.parametrize("name", ["API_KEY", "_private", "a", "Db2_Password", "X" * 128])
def test_names_like_environment_variables_are_valid(name: str) -> None:
    validate_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "name: required"),
        ("2FA", "not starting with a digit"),
        ("api-key", "letters, digits and _"),
        ("a.b", "letters, digits and _"),
        ("naïve", "letters, digits and _"),
        ("X" * 129, "129 characters is over the limit of 128"),
    ],
)
def test_invalid_names_say_what_a_name_is(name: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="^name: ") as exc:
        validate_name(name)
    assert message in str(exc.value)


def test_values_are_limited_in_size_and_never_echoed() -> None:
    validate_value("x" * MAX_VALUE_BYTES)
    with pytest.raises(InvalidArgument, match="value: empty"):
        validate_value("")
    big = VALUE * 1000
    with pytest.raises(InvalidArgument, match=r"^value: 31000 bytes is over the limit") as exc:
        validate_value(big)
    assert VALUE not in str(exc.value)


def test_sealed_values_open_with_the_key_and_the_record_holds_no_plaintext(
    key: SecretsKey,
) -> None:
    sealed = key.seal("API_KEY", VALUE, now=123.0)
    assert key.open(sealed) == VALUE
    record = sealed.encode()
    assert VALUE.encode() not in record and b"must-not-leak" not in record
    assert SealedSecret.decode(record) == sealed
    assert sealed.updated_at == 123.0 and sealed.key_id == key.id


def test_each_seal_has_its_own_nonce(key: SecretsKey) -> None:
    one, two = key.seal("A", VALUE, 0), key.seal("A", VALUE, 0)
    assert one.nonce != two.nonce and one.ciphertext != two.ciphertext
    assert one.digest == two.digest  # the same value: the same digest


def test_a_value_moved_to_another_name_does_not_open(key: SecretsKey) -> None:
    sealed = key.seal("API_KEY", VALUE, 0)
    moved = dataclasses.replace(sealed, name="OTHER")
    with pytest.raises(FailedPrecondition, match="secret OTHER does not decrypt") as exc:
        key.open(moved)
    assert VALUE not in str(exc.value)


def test_an_altered_record_does_not_open(key: SecretsKey) -> None:
    sealed = key.seal("API_KEY", VALUE, 0)
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(FailedPrecondition, match="altered"):
        key.open(dataclasses.replace(sealed, ciphertext=flipped))


def test_another_key_names_both_keys_not_the_value(key: SecretsKey) -> None:
    other = SecretsKey(b"o" * 32)
    sealed = other.seal("API_KEY", VALUE, 0)
    with pytest.raises(FailedPrecondition) as exc:
        key.open(sealed)
    assert other.id in str(exc.value) and key.id in str(exc.value)
    assert "--secrets-key-file" in str(exc.value) and VALUE not in str(exc.value)


def test_digests_are_keyed(key: SecretsKey) -> None:
    other = SecretsKey(b"o" * 32)
    assert key.digest("A", VALUE) != other.digest("A", VALUE)
    assert key.digest("A", VALUE) != key.digest("B", VALUE)
    assert key.digest("A", VALUE).startswith("hmac-sha256:")


def test_key_files_are_made_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "new" / "secrets.key"
    write_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_key_file(str(path)).id.startswith("key:")
    assert load_key_file(str(path)).id == load_key_file(str(path)).id
    with pytest.raises(FileExistsError):
        write_key_file(path)  # a key is never replaced


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not base64!", "is not a secrets key"),
        (base64.b64encode(b"short").decode(), "holds 5 bytes; a secrets key is 32"),
    ],
)
def test_a_bad_key_file_names_the_flag_not_its_content(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "secrets.key"
    path.write_text(content)
    with pytest.raises(ConfigError, match="^--secrets-key-file: ") as exc:
        load_key_file(str(path))
    assert message in str(exc.value) and content not in str(exc.value)


def test_a_missing_key_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_key_file(str(tmp_path / "absent.key"))


def test_an_invalid_name_is_not_echoed() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_name("sk-live-1234")  # a value pasted where the name goes
    assert "sk-live-1234" not in str(exc.value)


def test_audit_lines_name_the_secret_never_the_value() -> None:
    for method in ("PutSecret", "DeleteSecret"):
        target = RULES[method].target(cp.PutSecretRequest(name="API_KEY", value=VALUE))
        assert target == Target(secret="API_KEY")
        assert RULES[method].audited
    assert RULES["PutSecret"].target(cp.PutSecretRequest(name="sk-live-1")) == Target(secret="?")
