"""API and join tokens on the control plane: checking a call's bearer against the records the
view keeps current, and creating, listing and revoking tokens in the store.

A revocation deletes the token's key; every replica's view applies the delete from its watch, so
the token is refused everywhere within the watch's delay (milliseconds). Messages name a token by
its name or id, never by its secret.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from controlplane import records
from controlplane.store import Store
from controlplane.view import ClusterView
from portside import tokens
from portside.errors import FailedPrecondition, InvalidArgument, NotFound
from portside.tokens import Role, Token, TokenKind, TokenRecord

# Short and without dots: a token's secret (43 characters) or "ID.SECRET" is never a name, so a
# reference that might be one is never echoed (`safe_reference`).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_@-]{0,31}")
_ID = re.compile(r"[0-9a-f]{16}")

#: What to do without a token, in every refusal that lacks one.
GET_A_TOKEN = (
    "send an API token ($PORTSIDE_TOKEN or --token-file; `portside bootstrap` wrote admin.token, "
    "`portside token create` makes more)"
)


def check_bearer(
    known: Mapping[str, TokenRecord],
    authorization: str | None,
    kind: TokenKind,
    now: float,
) -> TokenRecord | str:
    """The record of the token an `authorization` value ("Bearer ID.SECRET") carries, if it is
    a live token of `kind`; otherwise why not, in one line that says what to do."""
    if not authorization:
        if kind == "join":
            return "no join token: give the node --join-token-file (or $PORTSIDE_JOIN_TOKEN)"
        return "no API token: " + GET_A_TOKEN
    parsed = tokens.parse_bearer(authorization)
    if parsed is None:
        return (
            "the authorization metadata is not 'Bearer ID.SECRET': send the token as "
            "`portside bootstrap` or `portside token create` wrote it"
        )
    token_id, secret = parsed
    record = known.get(token_id)
    if record is None or not tokens.matches(secret, record.digest):
        # One message for both: which ids exist is no business of a caller without a secret.
        return (
            f"token {token_id} is not valid here (revoked, mistyped, or of another cluster): "
            "ask an admin for a new one (`portside token create`)"
        )
    if record.expired(now):
        return (
            f"token {record.name} expired at {utc_text(record.expires)}: ask an admin for a new "
            "one (`portside token create`)"
        )
    if record.kind != kind:
        if kind == "join":
            return f"token {record.name} is an API token; a node joins with a join token"
        return (
            f"token {record.name} is a join token: it only lets a node join; call the API with "
            "an API token"
        )
    return record


def safe_reference(text: str) -> str:
    """What may be said or logged of a token reference: an id or a name as it is; a whole token
    as its id; anything else as "?" (it might be a secret)."""
    text = text.strip()
    if _ID.fullmatch(text) or _NAME.fullmatch(text):
        return text
    if text.startswith(tokens.PREFIX + "."):
        try:
            return tokens.parse_token(text).id
        except InvalidArgument:
            return "?"
    return "?"


@dataclass(frozen=True)
class Created:
    token: Token  # the whole token: shown once, kept nowhere
    record: TokenRecord


class TokenRegistry:
    """Tokens in the store, as the view sees them."""

    def __init__(
        self,
        store: Store,
        view: ClusterView,
        ca_pem: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.view = view
        self.ca_pem = ca_pem
        self.clock = clock

    def list(self) -> list[TokenRecord]:
        return sorted(self.view.tokens.values(), key=lambda t: (t.kind, t.name))

    async def create(
        self,
        role: Role | None,
        *,
        classes: Sequence[str] = (),
        ttl_s: float = 0.0,
        name: str = "",
    ) -> Created:
        """A new API token of `role` (None: a join token), scoped to `classes` (empty: all),
        expiring after `ttl_s` (0: never), named `name` (default: its id)."""
        if ttl_s < 0:
            raise InvalidArgument(f"ttl: {ttl_s:g}s is negative (0: never expires)")
        if role is None and classes:
            raise InvalidArgument("classes: a join token is not scoped to classes")
        for c in classes:
            if not c:
                raise InvalidArgument("classes: a class name is empty")
        token = tokens.new_token("join" if role is None else "api", self.ca_pem)
        if name:
            self._check_name(name)
        now = self.clock()
        record = TokenRecord(
            id=token.id,
            kind=token.kind,
            name=name or token.id,
            digest=tokens.digest(token.secret),
            created=now,
            role=role,
            classes=tuple(sorted(set(classes))),
            expires=now + ttl_s if ttl_s else 0.0,
        )
        await write_token(self.store, record)
        self.view.tokens[record.id] = record  # usable on this replica before the watch says so
        return Created(token, record)

    async def revoke(self, reference: str) -> TokenRecord:
        """Delete the token `reference` names: its id, its name, or the whole token."""
        record = self._find(reference)
        if record.kind == "api" and record.role is Role.ADMIN:
            others = [
                t
                for t in self.view.tokens.values()
                if t.id != record.id and t.role is Role.ADMIN and not t.expired(self.clock())
            ]
            if not others:
                raise FailedPrecondition(
                    f"token {record.name} is the last admin token: create another first "
                    "(`portside token create --role admin`), or nobody could manage tokens again"
                )
        await self.store.delete(records.token_key(record.id))
        self.view.tokens.pop(record.id, None)
        return record

    def _find(self, reference: str) -> TokenRecord:
        ref = safe_reference(reference)
        by_id = self.view.tokens.get(ref)
        if by_id is not None:
            return by_id
        for record in self.view.tokens.values():
            if record.name == ref:
                return record
        raise NotFound(f"no token {ref} (`portside token list` shows them)")

    def _check_name(self, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                "name: use 1 to 32 of A-Z a-z 0-9 _ @ -, starting with a letter or a digit (it is "
                "not echoed: it might be a secret)"
            )
        if _ID.fullmatch(name):
            raise InvalidArgument(f"name {name!r} looks like a token id: choose another")
        if any(t.name == name for t in self.view.tokens.values()):
            raise InvalidArgument(f"name {name!r} is taken: choose another, or revoke that token")


async def write_token(store: Store, record: TokenRecord) -> None:
    key, value = records.token_key(record.id), records.encode_token(record)
    if not await store.compare_and_swap(key, 0, value):
        raise FailedPrecondition(f"token id {record.id} exists already: try again")


def utc_text(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
