"""Where nodes and clients find their tokens (flags, variables, ./.portside/), the lines a refusal
prints, and who each server admits. No network: files in a temporary directory at most."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from portside import cli, pki, tokens
from portside.client._async import api_token
from portside.errors import InvalidArgument, PermissionDenied, Unauthenticated
from portside.join import join_token
from portside.net import refusal
from portside.pki import Peer, PeerRole

CA = pki.CertificateAuthority.create("unit", time.time())
JOIN = tokens.new_token("join", CA.cert_pem)
API = tokens.new_token("api", CA.cert_pem)


def test_a_join_token_comes_from_its_file_else_the_variable_else_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PORTSIDE_JOIN_TOKEN", raising=False)
    assert join_token(None) is None
    monkeypatch.setenv("PORTSIDE_JOIN_TOKEN", JOIN.text())
    assert join_token(None) == JOIN
    path = tmp_path / "join.token"
    path.write_text(JOIN.text() + "\n")
    assert join_token(str(path)) == JOIN


def test_a_wrong_join_token_says_what_is_wrong_without_echoing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PORTSIDE_JOIN_TOKEN", raising=False)
    with pytest.raises(InvalidArgument, match="--join-token-file .*nope: cannot read it"):
        join_token(str(tmp_path / "nope"))
    path = tmp_path / "admin.token"
    path.write_text(API.text())
    with pytest.raises(InvalidArgument, match="an API token, not a join token") as caught:
        join_token(str(path))
    assert API.secret not in str(caught.value)
    monkeypatch.setenv("PORTSIDE_JOIN_TOKEN", "garbage")
    with pytest.raises(InvalidArgument, match=r"^\$PORTSIDE_JOIN_TOKEN: not a Portside token"):
        join_token(None)


def test_an_api_token_comes_from_the_argument_the_variable_or_dot_portside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PORTSIDE_TOKEN", raising=False)
    assert api_token() is None  # nothing anywhere: plaintext, for an --insecure cluster
    (tmp_path / ".portside").mkdir()
    (tmp_path / ".portside" / "admin.token").write_text(API.text() + "\n")
    assert api_token() == API  # where `portside up` ran
    other = tokens.new_token("api", CA.cert_pem)
    monkeypatch.setenv("PORTSIDE_TOKEN", other.text())
    assert api_token() == other
    third = tokens.new_token("api", CA.cert_pem)
    assert api_token(third.text()) == third
    with pytest.raises(InvalidArgument, match="a join token, which only lets a node join"):
        api_token(JOIN.text())


def test_refusals_say_which_and_what_to_do() -> None:
    assert cli.refused(Unauthenticated("token 0123 is not valid here")) == (
        "the control plane refused the call (unauthenticated): token 0123 is not valid here"
        " — give a valid token with --token-file or $PORTSIDE_TOKEN"
    )
    line = cli.refused(PermissionDenied("token ci has role read; this needs deploy"))
    assert line.startswith("the control plane refused the call (permission denied): token ci")
    assert "portside token create" in line


@pytest.mark.parametrize(
    ("peer", "allowed", "reason"),
    [
        (Peer(PeerRole.CONTROLPLANE, "cp1"), {PeerRole.CONTROLPLANE}, ""),
        (
            Peer(PeerRole.AGENT, "fra-2"),
            {PeerRole.CONTROLPLANE},
            "the API of agent fra-1 admits only control planes, not agent/fra-2",
        ),
        (
            Peer(PeerRole.AGENT, "fra-2"),
            {PeerRole.EDGE, PeerRole.CONTROLPLANE},
            "the API of agent fra-1 admits only edges and control planes, not agent/fra-2",
        ),
        (
            None,
            {PeerRole.CONTROLPLANE},
            "the API of agent fra-1 admits only control planes: no client certificate",
        ),
    ],
)
def test_who_a_server_admits(peer: Peer | None, allowed: set[PeerRole], reason: str) -> None:
    assert refusal(peer, allowed, "the API of agent fra-1") == reason
