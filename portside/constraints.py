"""Placement constraints (a class's `constraints`): which regions and nodes it may run on, and
where a location hint outside them goes instead — the allowed region nearest to it.

Pure functions over `spec.Constraints`: the config reader, the scheduler, the autoscaler and the
edge decide with the same ones, so the region an edge names in Portside-Location is the one the
control plane places near.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from portside import geo
from portside.errors import InvalidArgument
from portside.spec import Constraints, Node

# The European Union's member states (ISO 3166-1 alpha-2).
EU_MEMBER_STATES = frozenset(
    "AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK".split()
)


def _regions_in(countries: frozenset[str]) -> tuple[str, ...]:
    return tuple(code for code, r in geo.REGIONS.items() if r.country in countries)


# Cloudflare's container jurisdictions, by the countries of the region table: "eu" is the
# regions in EU member states (not London, Zurich or Istanbul, though Cloudflare's eu is its
# weur and eeur areas); "us" and "fedramp" the US regions. Which hosts hold a FedRAMP
# authorisation only their operator knows: list those under [jurisdictions] fedramp.
JURISDICTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "eu": _regions_in(EU_MEMBER_STATES),
        "us": _regions_in(frozenset({"US"})),
        "fedramp": _regions_in(frozenset({"US"})),
    }
)


def place_problem(code: str) -> str:
    """Why `code` names no place a constraint may list ("" if it names a region or an area)."""
    key = code.strip().lower()
    if key in geo.REGIONS or key in geo.AREAS:
        return ""
    return (
        f"{code!r} is not a region code or area; use a region code such as fra, iad, sin "
        f"(all of them: portside regions) or an area: {', '.join(geo.AREAS)}"
    )


def places(codes: Iterable[str]) -> frozenset[str]:
    """The region codes `codes` name: a region itself, an area its own code and its members'.
    Codes that name nothing are left out (the config reader refuses them first)."""
    out: set[str] = set()
    for code in codes:
        key = code.strip().lower()
        if key in geo.AREAS:
            out.add(key)
            out.update(geo.AREA_MEMBERS[key])
        elif key in geo.REGIONS:
            out.add(key)
    return frozenset(out)


def problem(c: Constraints) -> tuple[str, str]:
    """The first fault of `c` as (its field below `constraints`, what is wrong and allowed);
    ("", "") if none. Whoever made the class, the same rules."""
    for index, code in enumerate(c.regions):
        if place_problem(code):
            return f"regions[{index}]", place_problem(code)
    if bool(c.jurisdiction) != bool(c.jurisdiction_regions):
        return "jurisdiction", (
            f"jurisdiction {c.jurisdiction!r} names no regions"
            if c.jurisdiction
            else "regions of a jurisdiction without its name"
        )
    for code in c.jurisdiction_regions:
        if place_problem(code):
            return "jurisdiction", f"jurisdiction {c.jurisdiction} lists {place_problem(code)}"
    if c.jurisdiction:
        within = places(c.jurisdiction_regions)
        for index, code in enumerate(c.regions):
            if not places([code]) & within:
                return f"regions[{index}]", (
                    f"{code} lies outside jurisdiction {c.jurisdiction} "
                    f"({', '.join(sorted(within))}); list only places within it"
                )
    for key, value in c.labels.items():
        if not key or "=" in key:
            return "labels", f"label name {key!r} must be non-empty and hold no '='"
        if not isinstance(value, str):
            return f"labels.{key}", f"must be a string, not {value!r}"
    return "", ""


@functools.lru_cache(maxsize=1024)
def _allowed(regions: tuple[str, ...], jurisdiction: tuple[str, ...]) -> frozenset[str] | None:
    if not regions and not jurisdiction:
        return None
    allowed = places(regions) if regions else None
    if jurisdiction:
        within = places(jurisdiction)
        allowed = within if allowed is None else allowed & within
    return allowed


def allowed_regions(c: Constraints) -> frozenset[str] | None:
    """The region codes `c` lets a node be in (an area code: a node registered with that area);
    None if it limits no region."""
    return _allowed(c.regions, c.jurisdiction_regions)


def region_allowed(c: Constraints, region: str) -> bool:
    """A node (or pool member) in `region` may hold the class's instances, as far as regions go."""
    allowed = allowed_regions(c)
    return allowed is None or region.lower() in allowed


def missing_labels(c: Constraints, labels: Mapping[str, str]) -> list[str]:
    """The required labels ("gpu=yes") a node with `labels` lacks."""
    return [f"{k}={v}" for k, v in c.labels.items() if labels.get(k) != v]


def allows_node(c: Constraints, node: Node) -> bool:
    """`node` may hold the class's instances: an allowed region, every required label."""
    return region_allowed(c, node.region) and not missing_labels(c, node.labels)


def nearest_allowed(c: Constraints, near: geo.Location) -> geo.Location:
    """Where to place near, for a location hint `near`: itself when the constraints allow it (a
    region they allow, or an area holding one), else the allowed region nearest to it."""
    allowed = allowed_regions(c)
    if allowed is None:
        return near
    return _nearest(allowed, near)


@functools.lru_cache(maxsize=4096)
def _nearest(allowed: frozenset[str], near: geo.Location) -> geo.Location:
    code = near.code.lower()
    if code in allowed or (code in geo.AREAS and allowed & set(geo.AREA_MEMBERS[code])):
        return near
    candidates = sorted(c for c in allowed if c in geo.REGIONS)
    if not candidates:  # only area codes allowed (nodes registered by area): their centroid
        return min((geo.AREAS[c] for c in allowed), key=lambda a: geo.distance_km(near, a))
    return min((geo.REGIONS[c] for c in candidates), key=lambda r: geo.distance_km(near, r))


def moved_hint(c: Constraints, hint: str) -> str:
    """The allowed region a location hint (a region or area code) moves to, "" if it stays
    (or names no place: placement refuses it then)."""
    if allowed_regions(c) is None:
        return ""
    try:
        near = geo.lookup(hint)
    except InvalidArgument:
        return ""
    moved = nearest_allowed(c, near)
    return "" if moved is near else moved.code


def moved_demand(c: Constraints, demand: Mapping[str, float]) -> dict[str, float]:
    """A pool's demand by region as its allowed regions serve it: the demand of each region
    outside the constraints counted in the allowed region nearest to it."""
    out: dict[str, float] = {}
    for region, rate in demand.items():
        where = moved_hint(c, region) or region
        out[where] = out.get(where, 0.0) + rate
    return out


def describe(c: Constraints) -> str:
    """The constraints in words, for a one-line reason: "jurisdiction eu, labels gpu=yes"."""
    parts = []
    if c.regions:
        parts.append(f"regions {', '.join(c.regions)}")
    if c.jurisdiction:
        parts.append(f"jurisdiction {c.jurisdiction}")
    if c.labels:
        parts.append(f"labels {', '.join(f'{k}={v}' for k, v in c.labels.items())}")
    return "; ".join(parts)
