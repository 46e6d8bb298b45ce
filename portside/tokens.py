"""Credentials as people and parts hold them: join tokens (a node joins the cluster) and API tokens
(a person or a program calls the API), and the roles API tokens carry.

A token is one line of text:

    pst1.<kind>.<id>.<secret>.<ca>

`kind` is `join` or `api`; `id` names its record in the store (16 hex digits); `secret` is 32
random bytes (base64url); `ca` is the cluster CA's certificate (DER, base64url), so holding a
token is all it takes to verify the control plane, as a k3s token pins its CA. Only
`<id>.<secret>` is ever sent (as `authorization: Bearer <id>.<secret>`); the store keeps the
secret's SHA-256, never the secret. Roles nest: admin ⊃ deploy ⊃ read.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from portside.errors import InvalidArgument
from portside.pki import ca_der, ca_from_der

PREFIX = "pst1"
TokenKind = Literal["join", "api"]
_KINDS: tuple[TokenKind, ...] = ("join", "api")
_ID = re.compile(r"[0-9a-f]{16}")
_B64 = re.compile(r"[A-Za-z0-9_-]+")


class Role(enum.StrEnum):
    """What an API token may do: `read` lists, gets, watches, reads logs and usage; `deploy` also
    deploys and starts, stops, signals, destroys, execs and writes state values; `admin` also
    manages tokens."""

    READ = "read"
    DEPLOY = "deploy"
    ADMIN = "admin"

    def includes(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(r.value for r in cls)
            raise InvalidArgument(f"role {text!r} is not one of {allowed}") from None


_RANK = {Role.READ: 0, Role.DEPLOY: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    id: str
    secret: str
    ca_pem: bytes

    @property
    def bearer(self) -> str:
        """What is sent with each call: the id and the secret, not the CA."""
        return f"{self.id}.{self.secret}"

    def text(self) -> str:
        """The whole token, as written to a file or printed once."""
        return ".".join((PREFIX, self.kind, self.id, self.secret, _b64(ca_der(self.ca_pem))))

    def __repr__(self) -> str:  # never the secret, in a log or a traceback
        return f"Token({self.kind}, {self.id})"


def new_token(kind: TokenKind, ca_pem: bytes) -> Token:
    return Token(kind, secrets.token_hex(8), _b64(secrets.token_bytes(32)), ca_pem)


def parse_token(text: str, where: str = "token") -> Token:
    """The token in `text` (surrounding blanks ignored). InvalidArgument saying what is wrong,
    never echoing the text (it is a secret)."""
    parts = text.strip().split(".")
    if len(parts) != 5 or parts[0] != PREFIX:
        raise InvalidArgument(
            f"{where}: not a Portside token (one line: pst1.KIND.ID.SECRET.CA, as written by "
            "`portside bootstrap` or `portside token create`)"
        )
    _, kind, ident, secret, ca = parts
    if kind not in _KINDS:
        raise InvalidArgument(f"{where}: kind {kind!r} is not join or api")
    if not _ID.fullmatch(ident) or not _B64.fullmatch(secret) or not _B64.fullmatch(ca):
        raise InvalidArgument(f"{where}: damaged (copy the whole line)")
    try:
        der = base64.urlsafe_b64decode(ca + "=" * (-len(ca) % 4))
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{where}: damaged (copy the whole line)") from None
    try:
        ca_pem = ca_from_der(der)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    return Token(kind, ident, secret, ca_pem)


# What to say when a token of the other kind is given where one of this kind is needed.
_WRONG_KIND = {
    "join": "an API token, not a join token (give a node the join.token `portside bootstrap` "
    "wrote)",
    "api": "a join token, which only lets a node join: give an API token (admin.token, or one "
    "from `portside token create`)",
}


def find_token(
    kind: TokenKind,
    *,
    variable: str,
    text: str | None = None,
    path: str | None = None,
    flag: str = "",
    default_file: str | None = None,
) -> Token | None:
    """The token of `kind` to use: `text` if given, else the file `path` (named `flag` in
    errors), else $`variable` (the token's text), else `default_file` if it exists; None if
    there is none. InvalidArgument saying what is wrong (unreadable, malformed, of the other
    kind), never echoing the token."""
    where = "token"
    if text is None and path:
        text, where = _read(path, f"{flag} {path}".strip())
    if text is None and os.environ.get(variable, "").strip():
        text, where = os.environ[variable], f"${variable}"
    if text is None and default_file and os.path.exists(default_file):
        text, where = _read(default_file, default_file)
    if text is None:
        return None
    token = parse_token(text, where)
    if token.kind != kind:
        raise InvalidArgument(f"{where}: {_WRONG_KIND[kind]}")
    return token


def _read(path: str, where: str) -> tuple[str, str]:
    try:
        with open(path) as f:
            return f.read(), where
    except OSError as exc:
        raise InvalidArgument(f"{where}: cannot read it ({exc.strerror})") from None


def parse_bearer(text: str) -> tuple[str, str] | None:
    """(id, secret) from an `authorization` value ("Bearer ID.SECRET"); None if malformed."""
    scheme, _, credential = text.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    ident, dot, secret = credential.strip().partition(".")
    if not dot or not _ID.fullmatch(ident) or not _B64.fullmatch(secret):
        return None
    return ident, secret


def digest(secret: str) -> str:
    """What the store keeps of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


@dataclass(frozen=True)
class TokenRecord:
    """A token as the store keeps it. `role` is None for a join token; `classes` empty: every
    class; `expires` 0: never (unix seconds otherwise)."""

    id: str
    kind: TokenKind
    name: str
    digest: str
    created: float
    role: Role | None = None
    classes: tuple[str, ...] = ()
    expires: float = 0.0

    def expired(self, now: float) -> bool:
        return 0 < self.expires <= now

    def may(self, needed: Role, class_names: Sequence[str] = ()) -> str:
        """ "" if this token may do what needs `needed` on `class_names` (empty: the whole
        cluster); otherwise why not, in one line."""
        if self.kind != "api" or self.role is None:
            return f"token {self.name} is a join token; it only lets a node join"
        if not self.role.includes(needed):
            return f"token {self.name} has role {self.role}; this needs {needed}"
        if self.classes:
            if not class_names:
                return (
                    f"token {self.name} is scoped to {', '.join(self.classes)}; this call "
                    "reaches every class (name one of them)"
                )
            outside = sorted(set(class_names) - set(self.classes))
            if outside:
                return f"token {self.name} is scoped to {', '.join(self.classes)}, not {outside[0]}"
        return ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


__all__ = [
    "PREFIX",
    "Role",
    "Token",
    "TokenKind",
    "TokenRecord",
    "digest",
    "find_token",
    "matches",
    "new_token",
    "parse_bearer",
    "parse_token",
]
