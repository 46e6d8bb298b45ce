"""Which route serves a request, which named instance it names, and where to place it.

Pure functions over plain values (path, headers, query, cookies): no I/O, no aiohttp types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy

from portside.errors import InvalidArgument
from portside.headers import LOCATION_HINT
from portside.spec import InstanceSource, Route

MAX_INSTANCE_NAME = 256


@dataclass(frozen=True)
class RequestParts:
    """What the instance name may come from. `path` is the raw (percent-encoded) path without
    the query; `headers` may be any mapping, looked up case-insensitively."""

    path: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    cookies: Mapping[str, str]


def normalize_prefix(path: str) -> str:
    """ "/execute-code/" and "/execute-code" are one route; "/" stays "/"."""
    stripped = path.rstrip("/")
    return stripped if stripped else "/"


def _candidate_prefixes(path: str) -> Iterable[str]:
    """Every prefix of `path` that ends on a segment boundary, longest first, "/" last."""
    prefix = path.rstrip("/")
    while prefix:
        yield prefix
        prefix = prefix[: prefix.rfind("/")]
    yield "/"


class RouteTable:
    """An immutable index of routes by prefix: a match costs one dict lookup per path segment,
    whatever the number of routes. Built once per config, swapped whole."""

    __slots__ = ("_by_prefix", "routes")

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        by_prefix: dict[str, Route] = {}
        for route in self.routes:
            # The first route of a prefix wins, so a duplicate cannot silently take over.
            by_prefix.setdefault(normalize_prefix(route.path), route)
        self._by_prefix = by_prefix

    def match(self, path: str) -> Route | None:
        for prefix in _candidate_prefixes(path):
            route = self._by_prefix.get(prefix)
            if route is not None:
                return route
        return None


def match_route(routes: RouteTable | Iterable[Route], path: str) -> Route | None:
    """The route with the longest prefix of `path` on a segment boundary: `/execute-code`
    serves `/execute-code` and `/execute-code/x`, not `/execute-codex`; `/` serves everything."""
    table = routes if isinstance(routes, RouteTable) else RouteTable(routes)
    return table.match(path)


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """`headers[name]`, ignoring case: aiohttp's CIMultiDict already does, a plain dict (as in
    tests) takes a scan."""
    value = headers.get(name)
    if value is not None or isinstance(headers, CIMultiDict | CIMultiDictProxy):
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def path_segment(route: Route, path: str, index: int) -> str | None:
    """The `index`-th (from 1) non-empty segment of `path` after the route's prefix, decoded."""
    if index < 1:
        return None
    prefix = normalize_prefix(route.path)
    rest = path[len(prefix) :] if prefix != "/" else path
    segments = [segment for segment in rest.split("/") if segment]
    if index > len(segments):
        return None
    return unquote(segments[index - 1])


def _raw_instance_name(source: InstanceSource, route: Route, parts: RequestParts) -> str | None:
    if source.kind == "header":
        return header_value(parts.headers, source.name)
    if source.kind == "query":
        return parts.query.get(source.name)
    if source.kind == "cookie":
        return parts.cookies.get(source.name)
    return path_segment(route, parts.path, source.index)


def instance_name(route: Route, parts: RequestParts) -> str | None:
    """The named instance this request is for, None if the request does not carry one (or the
    route is a pool's). Raises InvalidArgument for a name no instance may have."""
    if route.instance is None:
        return None
    name = _raw_instance_name(route.instance, route, parts)
    if not name:
        return None
    if len(name) > MAX_INSTANCE_NAME:
        raise InvalidArgument(
            f"instance name from {describe_source(route)} is {len(name)} characters long;"
            f" the limit is {MAX_INSTANCE_NAME}"
        )
    if not name.isprintable():
        raise InvalidArgument(
            f"instance name from {describe_source(route)} has non-printable characters"
        )
    return name


def describe_source(route: Route) -> str:
    """Where the route takes the instance name from, in words: "header X-Session-Id"."""
    source = route.instance
    if source is None:
        return "nowhere (the route serves a pool)"
    if source.kind == "header":
        return f"header {source.name}"
    if source.kind == "query":
        return f"query parameter {source.name}"
    if source.kind == "cookie":
        return f"cookie {source.name}"
    return f"path segment {source.index} after {normalize_prefix(route.path)}"


def location_hint(headers: Mapping[str, str], default_region: str) -> str:
    """The request's `Portside-Location-Hint` (trimmed, lowercased), else the edge's region."""
    hint = header_value(headers, LOCATION_HINT)
    if hint is not None:
        hint = hint.strip().lower()
        if hint:
            return hint
    return default_region
