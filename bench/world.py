"""World traffic: requests from the world's largest cities, weighted by population, placed and
routed by Portside's own decision code on an in-memory cluster (issue 15, goal 3).

It reports how often a request is served from the nearest region with room, and how much farther
the rest travel, for named instances and for pools, under steady and follow-the-sun load. Pure
and fast: no processes, no network, no sleeping. What decides is Portside's code, called as the
control plane and the edges call it:

- named instances: `controlplane.scheduler.place` over `controlplane.placement.node_states` of a
  `ClusterView` whose nodes and use are filled by hand (the store is never read);
- pools: `controlplane.autoscaler.decide` for the count, `controlplane.pools.target_region` and
  `place` for where a new member goes, `controlplane.pools.rebalance_move` for moves towards the
  demand, `controlplane.pools.drain_order` for which one leaves, `controlplane.pools.room_for`
  for the room, and the edges' `edge.pools.choose` for which member
  serves a request, with each edge's own counts of requests in flight.

The model. A request enters at the edge of the region nearest its city (anycast, one edge in
every region of `portside.geo`), which sends that region as the location hint. Every region has
`--nodes-per-region` nodes holding `--slots` basic instances (0.25 vCPU, 1 GiB) in all, shared by
population served (the cities nearer it than any other region) times a seeded factor in
[1 - jitter, 1 + jitter], at least one instance a node; `--region-slots fra=40,...` overrides.
A simulated day has 96 ticks of 15 minutes, after 24 unmeasured warm-up ticks. A city's demand
is its population, times, under "sun" load, an activity curve of its local solar time (lowest at
04:00, highest at 16:00), so demand moves west around the world over the day.

- Named: every request places a new instance, which stays awake for an exponential time chosen
  so that on average `--load` of the slots are taken, then sleeps (gives back its node's share).
- Pools: one pool (concurrency_limit 1, cpu_target 75%, scale-down delay 60 s). A tick's
  requests are all in flight at once; a member's CPU is 100% × its requests (at most 100). At
  the end of the tick the autoscaler samples the members and grows or drains the pool, placing
  new members near the demand its edges report (the expected rate per edge), or, with the count
  unchanged, moves members towards that demand. `--load` is the cluster share the pool's
  members would take at target.
- Constraints (goal 5): a named class limited to a jurisdiction or to areas, served to the whole
  world's traffic (`CONSTRAINED`), `load` of the allowed slots in use: how well it is placed
  within its constraints, and the km they add against the nearest node with room anywhere.

Measured per request: the distance from its city to the node that served it, against the
distance to the nearest node with room. "Room" for a named instance: the node can hold one more.
For pools two rules: "pool routing" counts only members with a request slot free (how well
edges choose among the members there are); "pool placement" also counts a node that could hold
one more member (how well the autoscaler put members near the demand). A request is served from
the nearest region with room when it travels at most 1 km (SAME_PLACE_KM) more than that.

Usage: python3 bench/world.py [--seed S] [--requests N] [--slots N] [--load F] [--jitter F]
                              [--nodes-per-region N] [--region-slots fra=40,iad=10]
                              [--hint edge|city]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import itertools
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.autoscaler import InstanceSample, PoolState, Recommendation, decide  # noqa: E402
from controlplane.placement import node_states  # noqa: E402
from controlplane.pools import drain_order, rebalance_move, room_for, target_region  # noqa: E402
from controlplane.records import InstanceRecord, instance_key  # noqa: E402
from controlplane.scheduler import (  # noqa: E402
    SAME_PLACE_KM,
    PlacementRequest,
    node_location,
    place,
)
from controlplane.view import ClusterView, NodeUse  # noqa: E402
from edge.pools import choose  # noqa: E402
from portside import constraints  # noqa: E402
from portside.capacity import Resources  # noqa: E402
from portside.geo import REGIONS, Location, distance_km  # noqa: E402
from portside.instances import InstanceInfo, InstanceStatus, PoolMember  # noqa: E402
from portside.spec import (  # noqa: E402
    CPU_SAMPLE_INTERVAL_S,
    INSTANCE_TYPES,
    Autoscaling,
    Constraints,
    ContainerClass,
    Node,
)
from portside.states import InstanceState  # noqa: E402

ITYPE = INSTANCE_TYPES["basic"]
SIZE = Resources.of(ITYPE)
TICK_S = 900.0  # 15 simulated minutes
TICKS = 96  # one simulated day, measured
WARMUP_TICKS = 24  # before it, unmeasured: the cluster fills and the pool grows
POOL = ContainerClass(
    name="WorldPool",
    image="world",
    instance_type=ITYPE,
    autoscaling=Autoscaling(minimum_instances=1, cpu_target=75.0, concurrency_limit=1),
)
NAMED = ContainerClass(name="World", image="world", instance_type=ITYPE)
ANYWHERE = Constraints()

# The world's largest cities (metropolitan areas): name, latitude, longitude, millions of people.
# Written for this benchmark from public figures, rounded: they only weight demand.
# fmt: off
CITIES: tuple[tuple[str, float, float, float], ...] = (
    # East Asia
    ("Tokyo", 35.68, 139.69, 37.2), ("Osaka", 34.69, 135.50, 19.0), ("Nagoya", 35.18, 136.91, 9.5),
    ("Fukuoka", 33.59, 130.40, 5.5), ("Sapporo", 43.06, 141.35, 2.6),
    ("Sendai", 38.27, 140.87, 2.3), ("Hiroshima", 34.39, 132.46, 1.4),
    ("Seoul", 37.57, 126.98, 25.5), ("Busan", 35.18, 129.08, 3.4), ("Daegu", 35.87, 128.60, 2.4),
    ("Pyongyang", 39.04, 125.76, 3.1), ("Shanghai", 31.23, 121.47, 29.2),
    ("Beijing", 39.90, 116.41, 21.3), ("Chongqing", 29.56, 106.55, 17.3),
    ("Guangzhou", 23.13, 113.26, 14.3), ("Shenzhen", 22.54, 114.06, 12.8),
    ("Tianjin", 39.34, 117.36, 13.9), ("Chengdu", 30.57, 104.07, 9.5),
    ("Wuhan", 30.59, 114.31, 8.9), ("Nanjing", 32.06, 118.80, 9.4), ("Xi'an", 34.34, 108.94, 8.3),
    ("Hangzhou", 30.27, 120.16, 8.2), ("Shenyang", 41.81, 123.43, 7.5),
    ("Harbin", 45.80, 126.53, 6.4), ("Dongguan", 23.02, 113.75, 7.4),
    ("Foshan", 23.02, 113.12, 7.3), ("Suzhou", 31.30, 120.59, 7.1),
    ("Qingdao", 36.07, 120.38, 6.2), ("Dalian", 38.91, 121.61, 5.6),
    ("Zhengzhou", 34.75, 113.63, 5.3), ("Jinan", 36.65, 117.12, 5.1),
    ("Changsha", 28.23, 112.94, 4.6), ("Kunming", 25.04, 102.72, 4.4),
    ("Xiamen", 24.48, 118.09, 4.4), ("Hefei", 31.82, 117.23, 4.4), ("Taiyuan", 37.87, 112.55, 3.9),
    ("Fuzhou", 26.07, 119.30, 3.9), ("Nanning", 22.82, 108.37, 3.6), ("Urumqi", 43.83, 87.62, 3.5),
    ("Changchun", 43.82, 125.32, 3.8), ("Shijiazhuang", 38.04, 114.51, 4.0),
    ("Lanzhou", 36.06, 103.83, 3.0), ("Guiyang", 26.65, 106.63, 3.5),
    ("Nanchang", 28.68, 115.86, 3.5), ("Hong Kong", 22.32, 114.17, 7.5),
    ("Taipei", 25.03, 121.57, 7.0), ("Kaohsiung", 22.63, 120.30, 2.8),
    ("Taichung", 24.15, 120.67, 2.8), ("Ulaanbaatar", 47.89, 106.91, 1.6),
    # South-East Asia
    ("Jakarta", -6.21, 106.85, 33.0), ("Surabaya", -7.25, 112.75, 6.5),
    ("Bandung", -6.92, 107.62, 8.5), ("Medan", 3.60, 98.67, 4.5), ("Semarang", -6.97, 110.42, 3.2),
    ("Makassar", -5.15, 119.43, 2.0), ("Manila", 14.60, 120.98, 24.0),
    ("Cebu", 10.32, 123.89, 3.0), ("Davao", 7.19, 125.46, 1.8), ("Bangkok", 13.76, 100.50, 17.0),
    ("Chiang Mai", 18.79, 98.98, 1.2), ("Ho Chi Minh City", 10.82, 106.63, 14.0),
    ("Hanoi", 21.03, 105.85, 8.5), ("Kuala Lumpur", 3.14, 101.69, 8.4),
    ("Penang", 5.41, 100.33, 2.8), ("Johor Bahru", 1.49, 103.74, 1.9),
    ("Singapore", 1.35, 103.82, 6.0), ("Yangon", 16.84, 96.17, 5.6),
    ("Phnom Penh", 11.56, 104.92, 2.3),
    # South Asia
    ("Delhi", 28.61, 77.21, 32.0), ("Mumbai", 19.08, 72.88, 24.0), ("Kolkata", 22.57, 88.36, 15.5),
    ("Bangalore", 12.97, 77.59, 13.5), ("Chennai", 13.08, 80.27, 11.8),
    ("Hyderabad", 17.39, 78.49, 10.8), ("Ahmedabad", 23.02, 72.57, 8.6),
    ("Pune", 18.52, 73.86, 7.0), ("Surat", 21.17, 72.83, 7.8), ("Jaipur", 26.91, 75.79, 4.2),
    ("Lucknow", 26.85, 80.95, 3.9), ("Kanpur", 26.45, 80.33, 3.2), ("Nagpur", 21.15, 79.09, 3.0),
    ("Indore", 22.72, 75.86, 3.3), ("Patna", 25.59, 85.14, 2.6), ("Kochi", 9.93, 76.27, 3.4),
    ("Coimbatore", 11.02, 76.96, 3.0), ("Bhopal", 23.26, 77.41, 2.4),
    ("Karachi", 24.86, 67.01, 17.0), ("Lahore", 31.55, 74.34, 13.5),
    ("Faisalabad", 31.45, 73.14, 3.7), ("Rawalpindi", 33.60, 73.04, 2.3),
    ("Islamabad", 33.68, 73.05, 1.2), ("Dhaka", 23.81, 90.41, 23.0),
    ("Chittagong", 22.36, 91.78, 5.3), ("Kathmandu", 27.72, 85.32, 1.6),
    ("Colombo", 6.93, 79.86, 2.4), ("Kabul", 34.56, 69.21, 4.5),
    # Central Asia and the Caucasus
    ("Tashkent", 41.30, 69.24, 2.9), ("Almaty", 43.24, 76.89, 2.1), ("Baku", 40.41, 49.87, 2.4),
    ("Tbilisi", 41.72, 44.79, 1.2), ("Yerevan", 40.18, 44.51, 1.1),
    # Middle East
    ("Tehran", 35.69, 51.39, 9.5), ("Mashhad", 36.30, 59.61, 3.3), ("Isfahan", 32.65, 51.67, 2.3),
    ("Baghdad", 33.31, 44.36, 7.5), ("Basra", 30.51, 47.78, 1.5), ("Riyadh", 24.71, 46.68, 7.7),
    ("Jeddah", 21.49, 39.19, 4.7), ("Mecca", 21.39, 39.86, 2.0), ("Dammam", 26.43, 50.10, 1.3),
    ("Dubai", 25.20, 55.27, 3.5), ("Abu Dhabi", 24.45, 54.38, 1.5), ("Doha", 25.29, 51.53, 2.4),
    ("Kuwait City", 29.38, 47.99, 3.1), ("Manama", 26.23, 50.59, 0.7),
    ("Muscat", 23.59, 58.41, 1.6), ("Amman", 31.95, 35.93, 4.2), ("Tel Aviv", 32.09, 34.78, 4.2),
    ("Jerusalem", 31.77, 35.21, 1.2), ("Beirut", 33.89, 35.50, 2.4),
    ("Damascus", 33.51, 36.28, 2.5), ("Aleppo", 36.20, 37.13, 2.1), ("Sana'a", 15.37, 44.19, 3.3),
    # Turkey and Eastern Europe
    ("Istanbul", 41.01, 28.98, 15.8), ("Ankara", 39.93, 32.86, 5.3), ("Izmir", 38.42, 27.14, 3.1),
    ("Bursa", 40.19, 29.06, 2.0), ("Antalya", 36.90, 30.70, 1.4), ("Moscow", 55.76, 37.62, 17.3),
    ("Saint Petersburg", 59.93, 30.36, 5.6), ("Novosibirsk", 55.01, 82.93, 1.6),
    ("Yekaterinburg", 56.84, 60.61, 1.5), ("Kazan", 55.79, 49.12, 1.3),
    ("Nizhny Novgorod", 56.30, 44.00, 1.2), ("Samara", 53.20, 50.15, 1.2),
    ("Rostov-on-Don", 47.24, 39.71, 1.1), ("Vladivostok", 43.12, 131.89, 0.6),
    ("Kyiv", 50.45, 30.52, 3.5), ("Kharkiv", 49.99, 36.23, 1.4), ("Odesa", 46.48, 30.72, 1.0),
    ("Minsk", 53.90, 27.56, 2.0), ("Warsaw", 52.23, 21.01, 3.1), ("Krakow", 50.06, 19.94, 1.5),
    ("Katowice", 50.26, 19.02, 2.2), ("Wroclaw", 51.11, 17.04, 1.0), ("Prague", 50.08, 14.44, 2.7),
    ("Budapest", 47.50, 19.04, 3.0), ("Vienna", 48.21, 16.37, 2.9),
    ("Bucharest", 44.43, 26.10, 2.3), ("Sofia", 42.70, 23.32, 1.7),
    ("Belgrade", 44.79, 20.45, 1.7), ("Zagreb", 45.81, 15.98, 1.1), ("Athens", 37.98, 23.73, 3.6),
    ("Thessaloniki", 40.64, 22.94, 1.1), ("Helsinki", 60.17, 24.94, 1.5),
    ("Riga", 56.95, 24.11, 0.9), ("Vilnius", 54.69, 25.28, 0.8), ("Chisinau", 47.01, 28.86, 0.7),
    # Western Europe
    ("London", 51.51, -0.13, 14.8), ("Birmingham", 52.49, -1.89, 2.9),
    ("Manchester", 53.48, -2.24, 2.8), ("Leeds", 53.80, -1.55, 1.9),
    ("Glasgow", 55.86, -4.25, 1.8), ("Dublin", 53.35, -6.26, 2.0), ("Paris", 48.86, 2.35, 12.3),
    ("Lyon", 45.76, 4.84, 2.3), ("Marseille", 43.30, 5.37, 1.9), ("Toulouse", 43.60, 1.44, 1.4),
    ("Lille", 50.63, 3.06, 1.5), ("Bordeaux", 44.84, -0.58, 1.0), ("Madrid", 40.42, -3.70, 6.8),
    ("Barcelona", 41.39, 2.17, 5.6), ("Valencia", 39.47, -0.38, 1.8),
    ("Seville", 37.39, -5.98, 1.5), ("Lisbon", 38.72, -9.14, 2.9), ("Porto", 41.15, -8.61, 1.7),
    ("Rhine-Ruhr", 51.43, 7.00, 10.0), ("Berlin", 52.52, 13.40, 4.5),
    ("Hamburg", 53.55, 9.99, 3.3), ("Munich", 48.14, 11.58, 2.9), ("Frankfurt", 50.11, 8.68, 2.3),
    ("Stuttgart", 48.78, 9.18, 2.8), ("Cologne", 50.94, 6.96, 2.1),
    ("Amsterdam", 52.37, 4.90, 2.5), ("Rotterdam", 51.92, 4.48, 1.8),
    ("Brussels", 50.85, 4.35, 2.1), ("Antwerp", 51.22, 4.40, 1.1), ("Zurich", 47.38, 8.54, 1.4),
    ("Geneva", 46.20, 6.14, 0.6), ("Milan", 45.46, 9.19, 4.3), ("Rome", 41.90, 12.50, 4.3),
    ("Naples", 40.85, 14.27, 3.1), ("Turin", 45.07, 7.69, 1.8), ("Copenhagen", 55.68, 12.57, 2.1),
    ("Stockholm", 59.33, 18.07, 2.4), ("Oslo", 59.91, 10.75, 1.6),
    ("Gothenburg", 57.71, 11.97, 1.0),
    # Africa
    ("Cairo", 30.04, 31.24, 21.8), ("Alexandria", 31.20, 29.92, 5.5), ("Lagos", 6.52, 3.38, 15.4),
    ("Kano", 12.00, 8.52, 4.2), ("Ibadan", 7.38, 3.95, 3.6), ("Abuja", 9.08, 7.40, 3.6),
    ("Port Harcourt", 4.82, 7.05, 3.2), ("Kinshasa", -4.44, 15.27, 15.6),
    ("Lubumbashi", -11.66, 27.48, 2.6), ("Luanda", -8.84, 13.23, 9.0),
    ("Johannesburg", -26.20, 28.05, 6.2), ("Pretoria", -25.75, 28.19, 2.8),
    ("Cape Town", -33.92, 18.42, 4.8), ("Durban", -29.86, 31.02, 3.9),
    ("Nairobi", -1.29, 36.82, 5.1), ("Mombasa", -4.04, 39.67, 1.4),
    ("Dar es Salaam", -6.79, 39.21, 7.4), ("Addis Ababa", 9.03, 38.74, 5.5),
    ("Khartoum", 15.50, 32.56, 6.2), ("Kampala", 0.35, 32.58, 3.7), ("Abidjan", 5.36, -4.01, 5.6),
    ("Accra", 5.60, -0.19, 2.6), ("Kumasi", 6.69, -1.62, 3.6), ("Dakar", 14.72, -17.47, 3.3),
    ("Bamako", 12.64, -8.00, 2.9), ("Ouagadougou", 12.37, -1.52, 3.0), ("Douala", 4.05, 9.77, 4.0),
    ("Yaounde", 3.85, 11.50, 4.4), ("Casablanca", 33.57, -7.59, 4.3), ("Rabat", 34.02, -6.84, 1.9),
    ("Algiers", 36.75, 3.06, 2.9), ("Tunis", 36.81, 10.18, 2.4), ("Tripoli", 32.89, 13.19, 1.2),
    ("Antananarivo", -18.88, 47.51, 3.9), ("Lusaka", -15.39, 28.32, 3.0),
    ("Harare", -17.83, 31.05, 1.6), ("Maputo", -25.97, 32.57, 1.8),
    ("Mogadishu", 2.05, 45.32, 2.6), ("Conakry", 9.64, -13.58, 2.0),
    # North America
    ("New York", 40.71, -74.01, 19.5), ("Los Angeles", 34.05, -118.24, 12.9),
    ("Chicago", 41.88, -87.63, 9.4), ("Dallas", 32.78, -96.80, 7.9),
    ("Houston", 29.76, -95.37, 7.3), ("Washington", 38.91, -77.04, 6.4),
    ("Philadelphia", 39.95, -75.17, 6.2), ("Miami", 25.76, -80.19, 6.1),
    ("Atlanta", 33.75, -84.39, 6.2), ("Boston", 42.36, -71.06, 4.9),
    ("Phoenix", 33.45, -112.07, 5.0), ("San Francisco", 37.77, -122.42, 4.7),
    ("Riverside", 33.95, -117.40, 4.6), ("Detroit", 42.33, -83.05, 4.4),
    ("Seattle", 47.61, -122.33, 4.0), ("Minneapolis", 44.98, -93.27, 3.7),
    ("San Diego", 32.72, -117.16, 3.3), ("Tampa", 27.95, -82.46, 3.2),
    ("Denver", 39.74, -104.99, 3.0), ("Baltimore", 39.29, -76.61, 2.8),
    ("St. Louis", 38.63, -90.20, 2.8), ("Orlando", 28.54, -81.38, 2.7),
    ("Charlotte", 35.23, -80.84, 2.7), ("San Antonio", 29.42, -98.49, 2.6),
    ("Portland", 45.52, -122.68, 2.5), ("Sacramento", 38.58, -121.49, 2.4),
    ("Pittsburgh", 40.44, -80.00, 2.4), ("Austin", 30.27, -97.74, 2.4),
    ("Las Vegas", 36.17, -115.14, 2.3), ("Cincinnati", 39.10, -84.51, 2.3),
    ("Kansas City", 39.10, -94.58, 2.2), ("Columbus", 39.96, -83.00, 2.1),
    ("Indianapolis", 39.77, -86.16, 2.1), ("Cleveland", 41.50, -81.69, 2.1),
    ("San Jose", 37.34, -121.89, 2.0), ("Nashville", 36.16, -86.78, 2.0),
    ("Salt Lake City", 40.76, -111.89, 1.3), ("New Orleans", 29.95, -90.07, 1.3),
    ("Honolulu", 21.31, -157.86, 1.0), ("Anchorage", 61.22, -149.90, 0.4),
    ("Toronto", 43.65, -79.38, 6.7), ("Montreal", 45.50, -73.57, 4.3),
    ("Vancouver", 49.28, -123.12, 2.7), ("Calgary", 51.05, -114.07, 1.6),
    ("Edmonton", 53.55, -113.49, 1.5), ("Ottawa", 45.42, -75.70, 1.5),
    ("Winnipeg", 49.90, -97.14, 0.9),
    # Mexico, Central America and the Caribbean
    ("Mexico City", 19.43, -99.13, 22.0), ("Guadalajara", 20.66, -103.35, 5.3),
    ("Monterrey", 25.69, -100.32, 5.3), ("Puebla", 19.04, -98.21, 3.2),
    ("Tijuana", 32.51, -117.04, 2.2), ("Leon", 21.12, -101.68, 1.9),
    ("Merida", 20.97, -89.62, 1.3), ("Guatemala City", 14.63, -90.51, 3.0),
    ("San Salvador", 13.69, -89.22, 1.1), ("Tegucigalpa", 14.07, -87.19, 1.4),
    ("Managua", 12.11, -86.24, 1.1), ("San Jose CR", 9.93, -84.08, 1.4),
    ("Panama City", 8.98, -79.52, 1.9), ("Havana", 23.11, -82.37, 2.1),
    ("Santo Domingo", 18.49, -69.93, 3.5), ("Port-au-Prince", 18.59, -72.31, 2.9),
    ("San Juan", 18.47, -66.11, 2.0), ("Kingston", 17.97, -76.79, 1.2),
    # South America
    ("Sao Paulo", -23.55, -46.63, 22.4), ("Rio de Janeiro", -22.91, -43.17, 13.6),
    ("Belo Horizonte", -19.92, -43.94, 6.1), ("Brasilia", -15.79, -47.88, 4.8),
    ("Porto Alegre", -30.03, -51.23, 4.4), ("Recife", -8.05, -34.88, 4.2),
    ("Fortaleza", -3.73, -38.53, 4.1), ("Salvador", -12.97, -38.50, 3.9),
    ("Curitiba", -25.43, -49.27, 3.7), ("Campinas", -22.91, -47.06, 3.3),
    ("Goiania", -16.69, -49.26, 2.7), ("Belem", -1.46, -48.49, 2.3),
    ("Manaus", -3.12, -60.02, 2.3), ("Buenos Aires", -34.60, -58.38, 15.4),
    ("Cordoba", -31.42, -64.18, 1.6), ("Rosario", -32.95, -60.64, 1.5),
    ("Santiago", -33.45, -70.67, 6.9), ("Lima", -12.05, -77.04, 11.0),
    ("Bogota", 4.71, -74.07, 11.3), ("Medellin", 6.24, -75.58, 4.1), ("Cali", 3.45, -76.53, 2.8),
    ("Barranquilla", 10.96, -74.80, 2.3), ("Caracas", 10.48, -66.90, 2.9),
    ("Maracaibo", 10.65, -71.64, 2.3), ("Quito", -0.18, -78.47, 2.0),
    ("Guayaquil", -2.17, -79.92, 3.1), ("La Paz", -16.49, -68.12, 1.9),
    ("Santa Cruz", -17.81, -63.16, 1.8), ("Asuncion", -25.26, -57.58, 3.5),
    ("Montevideo", -34.90, -56.16, 1.8),
    # Oceania
    ("Sydney", -33.87, 151.21, 5.3), ("Melbourne", -37.81, 144.96, 5.1),
    ("Brisbane", -27.47, 153.03, 2.6), ("Perth", -31.95, 115.86, 2.2),
    ("Adelaide", -34.93, 138.60, 1.4), ("Auckland", -36.85, 174.76, 1.7),
    ("Wellington", -41.29, 174.78, 0.4), ("Port Moresby", -9.44, 147.18, 0.4),
)
# fmt: on


@dataclass(frozen=True)
class City:
    """Where requests come from: a place, its population (the weight of its demand) and the edge
    its requests enter (the nearest region)."""

    location: Location
    population: float
    edge: str


def nearest_region(where: Location) -> str:
    """The region whose edge a request from `where` reaches (anycast: the nearest)."""
    return min(REGIONS, key=lambda code: distance_km(where, REGIONS[code]))


def cities() -> list[City]:
    out = []
    for name, lat, lon, millions in CITIES:
        where = Location(name, name, lat, lon, area="")
        out.append(City(where, millions, nearest_region(where)))
    return out


def activity(local_hour: float) -> float:
    """Share of its peak demand a city sends at this local solar time: 0.1 at 04:00, 1 at 16:00."""
    return 0.55 - 0.45 * math.cos(2 * math.pi * (local_hour - 4.0) / 24.0)


def weights(world: Sequence[City], tick: int, sun: bool) -> list[float]:
    if not sun:
        return [c.population for c in world]
    utc_hour = (tick * TICK_S / 3600.0) % 24.0
    return [c.population * activity(utc_hour + c.location.longitude / 15.0) for c in world]


def arrivals(rng: random.Random, mean: float) -> int:
    """A whole number of requests with mean `mean` (its fraction by a coin toss)."""
    whole = math.floor(mean)
    return whole + (1 if rng.random() < mean - whole else 0)


# --- the cluster -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a run simulates: the command line's options."""

    seed: int = 1
    requests: int = 5_000  # measured new named instances per scenario
    slots: int = 500  # basic instances the whole cluster holds
    load: float = 0.7  # mean share of the slots in use
    jitter: float = 0.5  # per-region capacity factor in [1 - jitter, 1 + jitter]
    nodes_per_region: int = 1
    region_slots: Mapping[str, int] = field(default_factory=dict)  # overrides, per region
    # "edge": the hint is the edge's region, as Portside sends it; "city": the client's own
    # coordinates, what an edge told where its client is could send (a what-if).
    hint: str = "edge"


def near(city: City, settings: Settings) -> Location:
    """The location hint a request from `city` carries (see Settings.hint)."""
    return city.location if settings.hint == "city" else REGIONS[city.edge]


def region_slots(world: Sequence[City], settings: Settings) -> dict[str, int]:
    """Instances each region holds: `slots` shared by population served, times a seeded factor."""
    rng = random.Random(settings.seed)
    served = dict.fromkeys(REGIONS, 0.0)
    for c in world:
        served[c.edge] += c.population
    total = sum(served.values())
    out = {}
    for code in sorted(REGIONS):
        factor = 1.0 + settings.jitter * (2 * rng.random() - 1)
        share = settings.slots * served[code] / total * factor
        out[code] = max(settings.nodes_per_region, round(share))
    out.update(settings.region_slots)
    return out


def new_view(slots: Mapping[str, int], per_region: int) -> ClusterView:
    """A view holding only live nodes; the store is never read (use is kept by `take`)."""
    view = ClusterView(store=cast(Any, None), clock=lambda: 0.0)
    for code, count in slots.items():
        region = REGIONS[code]
        for i in range(per_region):
            share = count // per_region + (1 if i < count % per_region else 0)
            if share <= 0:
                continue
            node = Node(
                id=f"{code}-{i}",
                data_address="",
                api_address="",
                region=code,
                latitude=region.latitude,
                longitude=region.longitude,
                vcpu=share * SIZE.vcpu,
                memory_mib=share * SIZE.memory_mib,
            )
            view.nodes[node.id] = node
            view.awake_use[node.id] = NodeUse()
    return view


def take(view: ClusterView, node_id: str, sign: int) -> None:
    """One instance more (+1) or fewer (-1) awake on the node: what its heartbeat would report."""
    use = view.awake_use[node_id]
    use.used = use.used + SIZE if sign > 0 else use.used - SIZE
    use.instances += sign


def by_distance(world: Sequence[City], view: ClusterView) -> list[list[tuple[float, str]]]:
    """Per city, every node as (km, node id), nearest first."""
    return [
        sorted((distance_km(c.location, node_location(n)), n.id) for n in view.nodes.values())
        for c in world
    ]


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Requests measured: how many went to the nearest region with room, the extra km of the
    others, and the km of all."""

    requests: int = 0
    nearest: int = 0
    extra: list[float] = field(default_factory=list)
    total_km: float = 0.0
    refused: int = 0

    def count(self, served_km: float, best_km: float) -> None:
        self.requests += 1
        self.total_km += served_km
        if served_km <= best_km + SAME_PLACE_KM:
            self.nearest += 1
        else:
            self.extra.append(served_km - best_km)


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


# --- named instances -------------------------------------------------------------------------


def run_named(
    world: Sequence[City],
    settings: Settings,
    sun: bool,
    wanted: Constraints = ANYWHERE,
    cost: Tally | None = None,
) -> Tally:
    """New named instances from the cities, each placed by the scheduler near its edge's region,
    each awake for an exponential time, then asleep.

    With constraints `wanted` the class runs only where they allow, `load` of the slots there
    taken; the tally measures against the nearest allowed node with room, and `cost` (if given)
    against the nearest node with room anywhere: what the constraints add to each request."""
    rng = random.Random(settings.seed)
    slots = region_slots(world, settings)
    view = new_view(slots, settings.nodes_per_region)
    nearest_nodes = by_distance(world, view)
    per_tick = settings.requests / TICKS
    allowed = {code for code in slots if constraints.region_allowed(wanted, code)}
    # Little's law: instances awake = arrivals per tick × ticks awake.
    awake_ticks = settings.load * sum(slots[code] for code in allowed) / per_tick
    asleep_at: list[tuple[float, int, str]] = []  # (tick, sequence, node id), soonest first
    sequence = itertools.count()
    tally = Tally()
    for tick in range(-WARMUP_TICKS, TICKS):
        while asleep_at and asleep_at[0][0] <= tick:
            take(view, heapq.heappop(asleep_at)[2], -1)
        cumulative = list(itertools.accumulate(weights(world, tick, sun)))
        for _ in range(arrivals(rng, per_tick)):
            i = bisect.bisect(cumulative, rng.random() * cumulative[-1])
            city = world[i]
            decision = place(
                PlacementRequest(NAMED.name, ITYPE, near(city, settings), 0, 0, wanted),
                node_states(view),
            )
            if tick >= 0:
                with_room = [
                    (km, view.nodes[n].region)
                    for km, n in nearest_nodes[i]
                    if view.free_on(view.nodes[n]).fits(SIZE)
                ]
                best = next((km for km, region in with_room if region in allowed), None)
                if decision.node is None or best is None:
                    tally.refused += 1
                else:
                    served = distance_km(city.location, node_location(decision.node))
                    tally.count(served, best)
                    if cost is not None:
                        cost.count(served, with_room[0][0])
            if decision.node is not None:
                take(view, decision.node.id, +1)
                heapq.heappush(
                    asleep_at,
                    (tick + rng.expovariate(1 / awake_ticks), next(sequence), decision.node.id),
                )
    return tally


# --- pools -----------------------------------------------------------------------------------


def status(rec: InstanceRecord, requests: int, cpu: float | None) -> InstanceStatus:
    """A running pool member as its node's heartbeat reports it."""
    info = InstanceInfo(
        POOL.name,
        rec.name,
        rec.instance_id,
        state=InstanceState.RUNNING,
        node_id=rec.node_id,
        pool=True,
        in_flight=requests,
    )
    return InstanceStatus(info, cpu_percent=cpu)


def run_pool(world: Sequence[City], settings: Settings, sun: bool) -> tuple[Tally, Tally]:
    """One pool serving the cities: edges choose members, the autoscaler sizes and places them.
    Returns the tallies by the routing rule and by the placement rule (see the module doc)."""
    assert POOL.autoscaling is not None
    limit = POOL.autoscaling.concurrency_limit
    rng = random.Random(settings.seed)
    slots = region_slots(world, settings)
    view = new_view(slots, settings.nodes_per_region)
    nearest_nodes = by_distance(world, view)
    # The pool at target takes `load` of the slots: that many requests in flight at once.
    per_tick = settings.load * sum(slots.values()) * limit * POOL.autoscaling.cpu_target / 100
    names = itertools.count()
    history: tuple[Recommendation, ...] = ()
    routing, placement = Tally(), Tally()

    def add_member(region: str) -> str | None:
        request = PlacementRequest(POOL.name, ITYPE, REGIONS[region], 0, 0)
        decision = place(request, node_states(view))
        if decision.node is None:
            return None
        name = f"{POOL.name}-{next(names)}"
        rec = InstanceRecord(
            POOL.name, name, name, decision.node.id, SIZE.vcpu, SIZE.memory_mib, 0.0, pool=True
        )
        view.instances[instance_key(POOL.name, name)] = rec
        view.pool_records[instance_key(POOL.name, name)] = rec
        view.by_id[name] = rec
        view.statuses[rec.node_id][name] = status(rec, 0, None)
        take(view, rec.node_id, +1)
        return decision.node.region

    def remove_member(r: InstanceRecord) -> None:
        # Drained: it finishes its requests and stops within the tick.
        del view.instances[instance_key(POOL.name, r.instance_id)]
        del view.pool_records[instance_key(POOL.name, r.instance_id)]
        del view.by_id[r.instance_id]
        del view.statuses[r.node_id][r.instance_id]
        take(view, r.node_id, -1)

    def members_by_region(members: Sequence[InstanceRecord]) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in members:
            region = view.nodes[r.node_id].region
            out[region] = out.get(region, 0) + 1
        return out

    view.statuses.update({n: {} for n in view.nodes})
    regions = {n.region for n in view.nodes.values()}
    add_member(target_region({}, {}, regions, "iad"))  # minimum_instances 1, before any demand
    for tick in range(-WARMUP_TICKS, TICKS):
        members = [r for r in view.pool_members(POOL.name) if not r.draining]
        routable = [
            PoolMember(
                POOL.name, r.name, r.instance_id, r.node_id, "", view.nodes[r.node_id].region,
                view.nodes[r.node_id].latitude, view.nodes[r.node_id].longitude,
            )
            for r in members
        ]  # fmt: skip
        load = dict.fromkeys((r.instance_id for r in members), 0)
        open_on: dict[str, int] = {}  # node id -> members there with a request slot free
        for r in members:
            open_on[r.node_id] = open_on.get(r.node_id, 0) + 1
        in_flight: dict[str, dict[str, int]] = {}  # edge -> its own counts, as each edge keeps
        roomy = {n.id for n in view.nodes.values() if view.free_on(n).fits(SIZE)}
        now = weights(world, tick, sun)
        cumulative = list(itertools.accumulate(now))
        # What the edges report: requests per second, counted over far more requests than the
        # sample routed here, so the expected rate rather than the sample's count.
        demand: dict[str, float] = {}
        for city, weight in zip(world, now, strict=True):
            rate = per_tick / TICK_S * weight / cumulative[-1]
            demand[city.edge] = demand.get(city.edge, 0.0) + rate
        for _ in range(arrivals(rng, per_tick)):
            i = bisect.bisect(cumulative, rng.random() * cumulative[-1])
            city = world[i]
            counts = in_flight.setdefault(city.edge, {})
            member = choose(routable, near(city, settings), counts, limit, rng)
            assert member is not None  # the pool never falls below its minimum of 1
            if tick >= 0:
                served = distance_km(city.location, node_location(view.nodes[member.node_id]))
                by_member = (km for km, n in nearest_nodes[i] if open_on.get(n, 0) > 0)
                by_node = (km for km, n in nearest_nodes[i] if open_on.get(n, 0) > 0 or n in roomy)
                routing.count(served, next(by_member, served))
                placement.count(served, next(by_node, served))
            counts[member.instance_id] = counts.get(member.instance_id, 0) + 1
            load[member.instance_id] += 1
            if load[member.instance_id] == limit:
                open_on[member.node_id] -= 1
        # The autoscaler's tick, as controlplane.pools.PoolManager._scale runs it.
        samples = []
        for r in members:
            cpu = min(100.0, 100.0 * load[r.instance_id] / limit)
            view.statuses[r.node_id][r.instance_id] = status(r, load[r.instance_id], cpu)
            samples.append(InstanceSample(r.instance_id, cpu))
        state = PoolState(POOL.name, POOL.autoscaling, 0, tuple(samples), room_for(view, ITYPE))
        decision = decide(state, history, (tick + 1) * TICK_S)
        history = decision.history
        if decision.desired > decision.current:
            by_region = members_by_region(members)
            for _ in range(decision.desired - decision.current):
                placed = add_member(target_region(demand, by_region, regions, "iad"))
                if placed is None:
                    break
                by_region[placed] = by_region.get(placed, 0) + 1
        elif decision.desired < decision.current:
            for r in drain_order(members, view, demand)[: decision.current - decision.desired]:
                remove_member(r)
        else:
            # The real loop moves at most one member a tick, and ticks once a CPU sample: as
            # often as that in a simulated tick, as long as a move pays (moves need demand,
            # not samples).
            for _ in range(int(TICK_S / CPU_SAMPLE_INTERVAL_S)):
                members = [r for r in view.pool_members(POOL.name) if not r.draining]
                with_room = {n.region for n in view.nodes.values() if view.free_on(n).fits(SIZE)}
                move = rebalance_move(demand, members_by_region(members), with_room)
                if move is None:
                    break
                source, target = move
                add_member(target)
                leaving = [r for r in members if view.nodes[r.node_id].region == source]
                remove_member(drain_order(leaving, view, demand)[0])
    return routing, placement


# --- the report ------------------------------------------------------------------------------


def row(kind: str, load: str, tally: Tally) -> str:
    share = 100.0 * tally.nearest / tally.requests if tally.requests else 0.0
    rest = tally.extra
    spread = (
        " | ".join(f"{percentile(rest, p):,.0f}" for p in (50, 90, 99)) + f" | {max(rest):,.0f}"
        if rest
        else "– | – | – | –"
    )
    mean = tally.total_km / tally.requests if tally.requests else 0.0
    return (
        f"| {kind} | {load} | {tally.requests:,} | **{share:.2f}%** | {len(rest):,} | {spread}"
        f" | {mean:,.0f} | {tally.refused} |"
    )


def jurisdiction(name: str) -> Constraints:
    return Constraints(jurisdiction=name, jurisdiction_regions=constraints.JURISDICTIONS[name])


# Constrained named classes served to the whole world's traffic (issue 15, goal 5).
CONSTRAINED: tuple[tuple[str, Constraints], ...] = (
    ("jurisdiction eu", jurisdiction("eu")),
    ("regions weur, eeur", Constraints(regions=("weur", "eeur"))),
    ("jurisdiction us", jurisdiction("us")),
)


def cost_row(name: str, within: Tally, cost: Tally) -> str:
    """A constrained class: how well it is placed within its constraints (`within`) and what the
    constraints add to the distance (`cost`: against the nearest node with room anywhere)."""
    share = 100.0 * within.nearest / within.requests if within.requests else 0.0
    moved = 100.0 * len(cost.extra) / cost.requests if cost.requests else 0.0
    rest = cost.extra
    spread = (
        " | ".join(f"{percentile(rest, p):,.0f}" for p in (50, 90, 99)) + f" | {max(rest):,.0f}"
        if rest
        else "– | – | – | –"
    )
    added = sum(rest) / cost.requests if cost.requests else 0.0
    mean = within.total_km / within.requests if within.requests else 0.0
    return (
        f"| {name} | {within.requests:,} | **{share:.2f}%** | {moved:.1f}% | {spread}"
        f" | {added:,.0f} | {mean:,.0f} | {within.refused:,} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--requests", type=int, default=Settings.requests)
    parser.add_argument("--slots", type=int, default=Settings.slots)
    parser.add_argument("--load", type=float, default=Settings.load)
    parser.add_argument("--jitter", type=float, default=Settings.jitter)
    parser.add_argument("--nodes-per-region", type=int, default=Settings.nodes_per_region)
    parser.add_argument("--hint", choices=("edge", "city"), default=Settings.hint)
    parser.add_argument(
        "--region-slots", default="", help="per-region overrides, e.g. fra=40,iad=0"
    )
    args = parser.parse_args(argv)
    overrides = {
        code.strip().lower(): int(count)
        for code, _, count in (item.partition("=") for item in args.region_slots.split(",") if item)
    }
    settings = Settings(
        args.seed, args.requests, args.slots, args.load, args.jitter, args.nodes_per_region,
        overrides, args.hint,
    )  # fmt: skip
    world = cities()
    started = time.perf_counter()
    print(
        f"{len(world)} cities, {sum(c.population for c in world):,.0f} M people;"
        f" {len(REGIONS)} regions, {sum(region_slots(world, settings).values())} slots"
        f" ({settings.nodes_per_region} node(s) a region, jitter {settings.jitter:g});"
        f" load {settings.load:g}; hint {settings.hint}; seed {settings.seed}"
    )
    print()
    print(
        "| kind | load | requests | nearest region with room | others | extra km p50 | p90"
        " | p99 | max | mean km | refused |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sun in (False, True):
        load = "follow-the-sun" if sun else "steady"
        print(row("named", load, run_named(world, settings, sun)))
        routing, placement = run_pool(world, settings, sun)
        print(row("pool routing", load, routing))
        print(row("pool placement", load, placement))
    print()
    print("Constraints, named instances, steady load, the world's traffic (`load` of the allowed")
    print("slots in use, `requests` scaled by their share); extra km against the nearest node")
    print("with room anywhere:")
    print()
    print(
        "| constraint | requests | nearest allowed region with room | farther than unconstrained"
        " | extra km p50 | p90 | p99 | max | extra km a request | mean km | refused |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    slots = region_slots(world, settings)
    for name, wanted in CONSTRAINED:
        # As many requests per allowed slot as the unconstrained run has per slot: the same
        # awake times, so only where the instances may go differs.
        share = sum(n for r, n in slots.items() if constraints.region_allowed(wanted, r)) / sum(
            slots.values()
        )
        scaled = dataclasses.replace(settings, requests=max(1, round(settings.requests * share)))
        cost = Tally()
        within = run_named(world, scaled, False, wanted, cost)
        print(cost_row(name, within, cost))
    print()
    print(f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
