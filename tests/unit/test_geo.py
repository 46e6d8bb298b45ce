"""Tests for portside.geo: the region table, the areas, lookup and great-circle distance.

Reference distances are WGS84 geodesics (Vincenty) between the table's coordinates.
"""

from __future__ import annotations

import math

import pytest

from portside import geo
from portside.errors import InvalidArgument

# Geodesic km on the WGS84 ellipsoid, computed independently of the haversine under test;
# a sphere stays within 0.5% of them, so 1% catches a wrong radius, swapped axes or degrees.
REFERENCE_KM = [
    ("fra", "iad", 6_566),
    ("lhr", "cdg", 344),
    ("ams", "fra", 364),
    ("ewr", "lax", 3_930),
    ("sjc", "sea", 1_141),
    ("yyz", "yul", 505),
    ("gru", "eze", 1_673),
    ("jnb", "cpt", 1_261),
    ("nbo", "cai", 3_518),
    ("dxb", "bom", 1_937),
    ("tlv", "ist", 1_118),
    ("sin", "hkg", 2_576),
    ("nrt", "icn", 1_152),
    ("nrt", "kix", 393),
    ("syd", "mel", 714),
    ("fra", "sin", 10_261),
    ("lhr", "syd", 16_989),
    ("akl", "scl", 9_691),  # across the antimeridian
]

# Every inhabited continent, by the areas that cover it.
CONTINENT_AREAS = {
    "North America": {"wnam", "enam"},
    "South America": {"sam"},
    "Europe": {"weur", "eeur"},
    "Africa": {"afr"},
    "Asia": {"apac", "me"},
    "Oceania": {"oc"},
}

REQUIRED_REGIONS = (
    "fra ams lhr cdg mad waw arn otp iad ewr ord dfw lax sjc sea yyz yul mia atl den mex gru "
    "scl bog eze gig jnb cpt nbo los cai dxb bom del sin hkg nrt icn syd mel akl bne per tlv "
    "ist kix bkk cgk mnl"
).split()


@pytest.mark.parametrize(("a", "b", "km"), REFERENCE_KM)
def test_distance_matches_reference_within_one_percent(a: str, b: str, km: float) -> None:
    assert geo.distance_km(geo.REGIONS[a], geo.REGIONS[b]) == pytest.approx(km, rel=0.01)


@pytest.mark.parametrize(("a", "b", "km"), REFERENCE_KM)
def test_distance_is_symmetric(a: str, b: str, km: float) -> None:
    forth = geo.distance_km(geo.REGIONS[a], geo.REGIONS[b])
    back = geo.distance_km(geo.REGIONS[b], geo.REGIONS[a])
    assert forth == pytest.approx(back)


@pytest.mark.parametrize(
    ("a", "b", "km"),
    [
        ((0.0, 0.0), (0.0, 0.0), 0.0),
        ((0.0, 0.0), (0.0, 180.0), math.pi * geo.EARTH_RADIUS_KM),  # antipodes
        ((90.0, 0.0), (-90.0, 0.0), math.pi * geo.EARTH_RADIUS_KM),  # pole to pole
        ((0.0, 0.0), (0.0, 1.0), 2 * math.pi * geo.EARTH_RADIUS_KM / 360),  # 1° of equator
        ((10.0, 179.5), (10.0, -179.5), 109.5),  # short way across the antimeridian
    ],
)
def test_distance_edge_cases(a: tuple[float, float], b: tuple[float, float], km: float) -> None:
    here = geo.Location("a", "a", a[0], a[1], "x")
    there = geo.Location("b", "b", b[0], b[1], "x")
    assert geo.distance_km(here, there) == pytest.approx(km, rel=0.01, abs=1e-6)


def test_table_has_at_least_45_regions_including_the_required_ones() -> None:
    assert len(geo.REGIONS) >= 45
    assert [c for c in REQUIRED_REGIONS if c not in geo.REGIONS] == []


@pytest.mark.parametrize("code", sorted(geo.REGIONS))
def test_region_entry_is_well_formed(code: str) -> None:
    region = geo.REGIONS[code]
    assert region.code == code
    assert len(code) == 3 and code.isalpha() and code.islower()
    assert region.name
    assert len(region.country) == 2 and region.country.isupper()
    assert -90 <= region.latitude <= 90 and -180 <= region.longitude <= 180
    assert region.area in geo.AREAS
    assert code in geo.AREA_MEMBERS[region.area]


def test_areas_are_cloudflares_location_hints() -> None:
    assert list(geo.AREAS) == "wnam enam sam weur eeur apac oc afr me".split()


@pytest.mark.parametrize("area", list(geo.AREAS))
def test_every_area_has_cities_and_a_centroid_among_them(area: str) -> None:
    centroid = geo.AREAS[area]
    members = [geo.REGIONS[c] for c in geo.AREA_MEMBERS[area]]
    assert members
    assert (centroid.code, centroid.area) == (area, area)
    # A representative point: inside the area, so every member is within a few thousand km.
    assert max(geo.distance_km(centroid, m) for m in members) < 5_000


def test_every_region_is_in_exactly_one_area() -> None:
    members = [c for codes in geo.AREA_MEMBERS.values() for c in codes]
    assert sorted(members) == sorted(geo.REGIONS)


@pytest.mark.parametrize(("continent", "areas"), CONTINENT_AREAS.items())
def test_every_continent_has_regions(continent: str, areas: set[str]) -> None:
    assert any(r.area in areas for r in geo.REGIONS.values()), continent


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("fra", "fra"),
        ("FRA", "fra"),
        ("Sin", "sin"),
        (" iad ", "iad"),
        ("weur", "weur"),
        ("WNAM", "wnam"),
        ("Me", "me"),
    ],
)
def test_lookup_is_case_insensitive_for_regions_and_areas(code: str, expected: str) -> None:
    assert geo.lookup(code).code == expected


@pytest.mark.parametrize(
    ("code", "area"),
    [("fra", "weur"), ("WAW", "eeur"), ("iad", "enam"), ("sjc", "wnam"), ("gru", "sam"),
     ("sin", "apac"), ("syd", "oc"), ("jnb", "afr"), ("dxb", "me"), ("oc", "oc")],
)  # fmt: skip
def test_area_of(code: str, area: str) -> None:
    assert geo.area_of(code) == area


@pytest.mark.parametrize("code", ["xyz", "", "frankfurt", "eu", "fra1"])
def test_unknown_code_says_so_and_where_to_find_valid_ones(code: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        geo.lookup(code)
    message = str(caught.value)
    assert message.startswith(f'unknown location "{code}": ')
    assert "fra, iad, sin" in message
    assert "portside regions" in message
    assert "wnam, enam, sam, weur, eeur, apac, oc, afr, me" in message


def test_area_of_unknown_code_raises() -> None:
    with pytest.raises(InvalidArgument, match='unknown location "xyz"'):
        geo.area_of("xyz")


def test_tables_are_read_only() -> None:
    with pytest.raises(TypeError):
        geo.REGIONS["zzz"] = geo.REGIONS["fra"]  # type: ignore[index]
