"""Where things are: the built-in region codes, the coarse areas of location hints, distance.

Regions are IATA-style city codes (`fra`, `iad`, `sin`); areas are Cloudflare's location hints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from portside.errors import InvalidArgument

EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True)
class Location:
    """A point a location hint or a node can name: a region (a city) or a coarse area.

    For an area, `code` and `area` are the same, and the coordinates are its members' centroid.
    """

    code: str
    name: str
    latitude: float
    longitude: float
    area: str
    country: str = ""  # ISO 3166-1 alpha-2; empty for an area


# The coarse areas, in the order Cloudflare documents its location hints.
AREA_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "wnam": "Western North America",
        "enam": "Eastern North America",
        "sam": "South America",
        "weur": "Western Europe",
        "eeur": "Eastern Europe",
        "apac": "Asia-Pacific",
        "oc": "Oceania",
        "afr": "Africa",
        "me": "Middle East",
    }
)

# code, city, country, latitude, longitude, area. City-centre coordinates: placement measures
# from a node's own coordinates, so these only need to be right to a few km. Areas follow the
# map a user has in mind, not the nearest centroid: Cairo is in afr and Stockholm in weur,
# though each is closer to a neighbouring area's centre.
_REGION_ROWS: tuple[tuple[str, str, str, float, float, str], ...] = (
    # Western North America
    ("lax", "Los Angeles", "US", 34.0522, -118.2437, "wnam"),
    ("sjc", "San Jose", "US", 37.3382, -121.8863, "wnam"),
    ("sea", "Seattle", "US", 47.6062, -122.3321, "wnam"),
    ("den", "Denver", "US", 39.7392, -104.9903, "wnam"),
    ("phx", "Phoenix", "US", 33.4484, -112.0740, "wnam"),
    ("yvr", "Vancouver", "CA", 49.2827, -123.1207, "wnam"),
    ("mex", "Mexico City", "MX", 19.4326, -99.1332, "wnam"),
    # Eastern North America
    ("iad", "Ashburn", "US", 39.0438, -77.4874, "enam"),
    ("ewr", "Newark", "US", 40.7357, -74.1724, "enam"),
    ("bos", "Boston", "US", 42.3601, -71.0589, "enam"),
    ("ord", "Chicago", "US", 41.8781, -87.6298, "enam"),
    ("dfw", "Dallas", "US", 32.7767, -96.7970, "enam"),
    ("atl", "Atlanta", "US", 33.7490, -84.3880, "enam"),
    ("mia", "Miami", "US", 25.7617, -80.1918, "enam"),
    ("yyz", "Toronto", "CA", 43.6532, -79.3832, "enam"),
    ("yul", "Montreal", "CA", 45.5017, -73.5673, "enam"),
    # South America
    ("gru", "São Paulo", "BR", -23.5505, -46.6333, "sam"),
    ("gig", "Rio de Janeiro", "BR", -22.9068, -43.1729, "sam"),
    ("eze", "Buenos Aires", "AR", -34.6037, -58.3816, "sam"),
    ("scl", "Santiago", "CL", -33.4489, -70.6693, "sam"),
    ("bog", "Bogotá", "CO", 4.7110, -74.0721, "sam"),
    ("lim", "Lima", "PE", -12.0464, -77.0428, "sam"),
    # Western Europe
    ("lhr", "London", "GB", 51.5074, -0.1278, "weur"),
    ("cdg", "Paris", "FR", 48.8566, 2.3522, "weur"),
    ("ams", "Amsterdam", "NL", 52.3676, 4.9041, "weur"),
    ("fra", "Frankfurt", "DE", 50.1109, 8.6821, "weur"),
    ("mad", "Madrid", "ES", 40.4168, -3.7038, "weur"),
    ("lis", "Lisbon", "PT", 38.7223, -9.1393, "weur"),
    ("dub", "Dublin", "IE", 53.3498, -6.2603, "weur"),
    ("zrh", "Zurich", "CH", 47.3769, 8.5417, "weur"),
    ("mxp", "Milan", "IT", 45.4642, 9.1900, "weur"),
    ("arn", "Stockholm", "SE", 59.3293, 18.0686, "weur"),
    # Eastern Europe
    ("waw", "Warsaw", "PL", 52.2297, 21.0122, "eeur"),
    ("prg", "Prague", "CZ", 50.0755, 14.4378, "eeur"),
    ("bud", "Budapest", "HU", 47.4979, 19.0402, "eeur"),
    ("otp", "Bucharest", "RO", 44.4268, 26.1025, "eeur"),
    ("sof", "Sofia", "BG", 42.6977, 23.3219, "eeur"),
    ("hel", "Helsinki", "FI", 60.1699, 24.9384, "eeur"),
    ("ist", "Istanbul", "TR", 41.0082, 28.9784, "eeur"),
    # Asia-Pacific
    ("bom", "Mumbai", "IN", 19.0760, 72.8777, "apac"),
    ("del", "New Delhi", "IN", 28.6139, 77.2090, "apac"),
    ("maa", "Chennai", "IN", 13.0827, 80.2707, "apac"),
    ("sin", "Singapore", "SG", 1.3521, 103.8198, "apac"),
    ("kul", "Kuala Lumpur", "MY", 3.1390, 101.6869, "apac"),
    ("bkk", "Bangkok", "TH", 13.7563, 100.5018, "apac"),
    ("cgk", "Jakarta", "ID", -6.2088, 106.8456, "apac"),
    ("mnl", "Manila", "PH", 14.5995, 120.9842, "apac"),
    ("hkg", "Hong Kong", "HK", 22.3193, 114.1694, "apac"),
    ("tpe", "Taipei", "TW", 25.0330, 121.5654, "apac"),
    ("icn", "Seoul", "KR", 37.5665, 126.9780, "apac"),
    ("nrt", "Tokyo", "JP", 35.6762, 139.6503, "apac"),
    ("kix", "Osaka", "JP", 34.6937, 135.5023, "apac"),
    # Oceania
    ("syd", "Sydney", "AU", -33.8688, 151.2093, "oc"),
    ("mel", "Melbourne", "AU", -37.8136, 144.9631, "oc"),
    ("bne", "Brisbane", "AU", -27.4698, 153.0251, "oc"),
    ("per", "Perth", "AU", -31.9505, 115.8605, "oc"),
    ("akl", "Auckland", "NZ", -36.8485, 174.7633, "oc"),
    # Africa
    ("jnb", "Johannesburg", "ZA", -26.2041, 28.0473, "afr"),
    ("cpt", "Cape Town", "ZA", -33.9249, 18.4241, "afr"),
    ("nbo", "Nairobi", "KE", -1.2921, 36.8219, "afr"),
    ("los", "Lagos", "NG", 6.5244, 3.3792, "afr"),
    ("acc", "Accra", "GH", 5.6037, -0.1870, "afr"),
    ("cmn", "Casablanca", "MA", 33.5731, -7.5898, "afr"),
    ("cai", "Cairo", "EG", 30.0444, 31.2357, "afr"),
    # Middle East
    ("dxb", "Dubai", "AE", 25.2048, 55.2708, "me"),
    ("doh", "Doha", "QA", 25.2854, 51.5310, "me"),
    ("bah", "Manama", "BH", 26.2285, 50.5860, "me"),
    ("ruh", "Riyadh", "SA", 24.7136, 46.6753, "me"),
    ("tlv", "Tel Aviv", "IL", 32.0853, 34.7818, "me"),
    ("amm", "Amman", "JO", 31.9454, 35.9284, "me"),
)

REGIONS: Mapping[str, Location] = MappingProxyType(
    {
        code: Location(code, name, lat, lon, area, country)
        for code, name, country, lat, lon, area in _REGION_ROWS
    }
)

AREA_MEMBERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {area: tuple(r.code for r in REGIONS.values() if r.area == area) for area in AREA_NAMES}
)


def _centroid(code: str, points: list[Location]) -> Location:
    # Averaging unit vectors rather than raw degrees keeps the centroid on the right side of
    # the antimeridian and of the poles, should an area ever straddle one.
    x = y = z = 0.0
    for p in points:
        lat, lon = math.radians(p.latitude), math.radians(p.longitude)
        x += math.cos(lat) * math.cos(lon)
        y += math.cos(lat) * math.sin(lon)
        z += math.sin(lat)
    lat = math.degrees(math.atan2(z, math.hypot(x, y)))
    lon = math.degrees(math.atan2(y, x))
    return Location(code, AREA_NAMES[code], round(lat, 4), round(lon, 4), code)


AREAS: Mapping[str, Location] = MappingProxyType(
    {area: _centroid(area, [REGIONS[c] for c in members]) for area, members in AREA_MEMBERS.items()}
)


def lookup(code: str) -> Location:
    """The region or area named by `code`, in any case; InvalidArgument names the valid ones."""
    key = code.strip().lower()
    found = REGIONS.get(key) or AREAS.get(key)
    if found is None:
        raise InvalidArgument(
            f'unknown location "{code}": use a region code such as fra, iad, sin '
            f"(all of them: portside regions) or an area: {', '.join(AREAS)}"
        )
    return found


def area_of(code: str) -> str:
    """The coarse area a region belongs to (an area is its own); InvalidArgument if unknown."""
    return lookup(code).area


def distance_km(a: Location, b: Location) -> float:
    """Great-circle distance by the haversine formula on a sphere of radius 6371 km.

    A sphere is off from the WGS84 ellipsoid by under 0.5%, far below what placement can tell.
    """
    lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
    dlat = lat2 - lat1
    dlon = math.radians(b.longitude - a.longitude)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    # min() guards asin against a rounding overshoot past 1 for antipodal points.
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
