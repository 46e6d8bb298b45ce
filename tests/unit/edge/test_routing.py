"""Table-driven tests of the edge's routing rules: route match, instance name, location hint.

Plain values in, plain values out: no sockets, no aiohttp."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from edge.routing import (
    RequestParts,
    RouteTable,
    describe_source,
    instance_name,
    location_hint,
    match_route,
)
from portside.errors import InvalidArgument
from portside.spec import InstanceSource, Route

EXEC = Route("/execute-code", "sandbox", InstanceSource("header", "X-Session-Id"))
EXEC_DEEP = Route("/execute-code/v2", "sandbox2", InstanceSource("query", "id"))
ROOT = Route("/", "site", InstanceSource("cookie", "sid"))
USERS = Route("/users/", "profile", InstanceSource("path", index=1))
POOL = Route("/api", "stateless")

ROUTES = (EXEC, EXEC_DEEP, ROOT, USERS, POOL)


@pytest.mark.parametrize(
    ("routes", "path", "expected"),
    [
        ((EXEC,), "/execute-code", EXEC),
        ((EXEC,), "/execute-code/", EXEC),
        ((EXEC,), "/execute-code/x", EXEC),
        ((EXEC,), "/execute-code/x/y", EXEC),
        ((EXEC,), "/execute-codex", None),
        ((EXEC,), "/execute", None),
        ((EXEC,), "/", None),
        ((EXEC,), "/other/execute-code", None),
        ((ROOT,), "/", ROOT),
        ((ROOT,), "/anything/at/all", ROOT),
        (ROUTES, "/execute-code/v2", EXEC_DEEP),
        (ROUTES, "/execute-code/v2/run", EXEC_DEEP),
        (ROUTES, "/execute-code/v2x", EXEC),
        (ROUTES, "/execute-code/v1", EXEC),
        (ROUTES, "/execute-codex", ROOT),
        (ROUTES, "/users", USERS),  # the route was written with a trailing slash
        (ROUTES, "/users/ada/avatar", USERS),
        (ROUTES, "/api/v1", POOL),
        (ROUTES, "/", ROOT),
        ((), "/", None),
    ],
)
def test_match_route(routes: tuple[Route, ...], path: str, expected: Route | None) -> None:
    assert match_route(routes, path) == expected
    assert RouteTable(routes).match(path) == expected


def test_first_of_duplicate_prefixes_wins() -> None:
    other = Route("/execute-code/", "impostor", InstanceSource("query", "id"))
    assert match_route((EXEC, other), "/execute-code/x") == EXEC


def parts(
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    cookies: Mapping[str, str] | None = None,
) -> RequestParts:
    return RequestParts(path, headers or {}, query or {}, cookies or {})


@pytest.mark.parametrize(
    ("route", "request_parts", "expected"),
    [
        (EXEC, parts(headers={"X-Session-Id": "s1"}), "s1"),
        (EXEC, parts(headers={"x-session-id": "s1"}), "s1"),  # header names ignore case
        (EXEC, parts(headers={"X-SESSION-ID": "s1"}), "s1"),
        (EXEC, parts(headers={"X-Session-Id": ""}), None),
        (EXEC, parts(headers={"X-Other": "s1"}), None),
        (EXEC, parts(query={"X-Session-Id": "s1"}), None),  # only the source it names
        (EXEC_DEEP, parts(query={"id": "abc"}), "abc"),
        (EXEC_DEEP, parts(query={"ID": "abc"}), None),  # query parameters keep case
        (EXEC_DEEP, parts(query={"id": ""}), None),
        (ROOT, parts(cookies={"sid": "c-9"}), "c-9"),
        (ROOT, parts(cookies={"other": "c-9"}), None),
        (USERS, parts("/users/ada"), "ada"),
        (USERS, parts("/users/ada/avatar"), "ada"),
        (USERS, parts("/users//ada"), "ada"),  # empty segments are skipped
        (USERS, parts("/users"), None),
        (USERS, parts("/users/"), None),
        (USERS, parts("/users/ada%20lovelace"), "ada lovelace"),  # decoded per segment
        (USERS, parts("/users/a%2Fb/c"), "a/b"),  # an encoded slash stays inside its segment
        (Route("/u", "c", InstanceSource("path", index=2)), parts("/u/x/y/z"), "y"),
        (Route("/u", "c", InstanceSource("path", index=3)), parts("/u/x/y"), None),
        (Route("/u", "c", InstanceSource("path", index=0)), parts("/u/x"), None),
        (Route("/", "c", InstanceSource("path", index=1)), parts("/first/second"), "first"),
        (POOL, parts("/api", headers={"X-Session-Id": "s1"}), None),
    ],
)
def test_instance_name(route: Route, request_parts: RequestParts, expected: str | None) -> None:
    assert instance_name(route, request_parts) == expected


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("x" * 257, "257 characters long; the limit is 256"),
        ("bad\x00name", "non-printable"),
        ("tab\there", "non-printable"),
    ],
)
def test_invalid_instance_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem) as caught:
        instance_name(EXEC, parts(headers={"X-Session-Id": name}))
    assert "header X-Session-Id" in str(caught.value)


def test_longest_allowed_name_passes() -> None:
    name = "é" * 256
    assert instance_name(EXEC, parts(headers={"X-Session-Id": name})) == name


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (EXEC, "header X-Session-Id"),
        (EXEC_DEEP, "query parameter id"),
        (ROOT, "cookie sid"),
        (USERS, "path segment 1 after /users"),
        (POOL, "nowhere (the route serves a pool)"),
    ],
)
def test_describe_source(route: Route, expected: str) -> None:
    assert describe_source(route) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, "weur"),
        ({"Portside-Location-Hint": "enam"}, "enam"),
        ({"portside-location-hint": "ENAM"}, "enam"),
        ({"Portside-Location-Hint": "  Apac \t"}, "apac"),
        ({"Portside-Location-Hint": "   "}, "weur"),
        ({"Portside-Location-Hint": ""}, "weur"),
        ({"X-Other": "enam"}, "weur"),
    ],
)
def test_location_hint(headers: Mapping[str, str], expected: str) -> None:
    assert location_hint(headers, "weur") == expected


def test_case_insensitive_mappings_as_aiohttp_gives_them() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"x-session-id": "s1", "PORTSIDE-LOCATION-HINT": "Oc"}))
    assert instance_name(EXEC, parts(headers=headers)) == "s1"
    assert location_hint(headers, "weur") == "oc"
    assert location_hint(CIMultiDictProxy(CIMultiDict()), "weur") == "weur"
