"""Tests for placement constraints: the pure rules (portside.constraints), the scheduler's node
choice under them, the edge's pool choice, and how the config reader refuses bad ones."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from controlplane.scheduler import (
    REFUSED_CONSTRAINTS,
    REFUSED_NO_CAPACITY,
    REJECT_LABELS,
    REJECT_REGION,
    NodeState,
    PlacementRequest,
    place,
)
from edge.pools import choose
from portside import constraints, geo
from portside.capacity import Resources
from portside.config import parse_toml, parse_wrangler, validate_config
from portside.convert import class_from_pb, class_to_pb
from portside.errors import ConfigError
from portside.instances import PoolMember
from portside.spec import INSTANCE_TYPES, Config, Constraints, ContainerClass, Node

EU = Constraints(jurisdiction="eu", jurisdiction_regions=constraints.JURISDICTIONS["eu"])


def node(node_id: str, region: str, **labels: str) -> Node:
    city = geo.REGIONS[region]
    return Node(
        node_id, f"{node_id}:1", f"{node_id}:2", region, city.latitude, city.longitude, 4.0, 8192,
        labels=labels,
    )  # fmt: skip


def request(wanted: Constraints, near: str) -> PlacementRequest:
    return PlacementRequest("A", INSTANCE_TYPES["basic"], geo.lookup(near), 0, 0, wanted)


def free(*nodes: Node) -> list[NodeState]:
    return [NodeState(n, Resources(), 0) for n in nodes]


# --- the pure rules ----------------------------------------------------------------------------


def test_eu_is_the_regions_in_member_states() -> None:
    eu = set(constraints.JURISDICTIONS["eu"])
    assert {"fra", "ams", "cdg", "waw", "dub", "arn"} <= eu
    assert not eu & {"lhr", "zrh", "ist", "iad"}
    assert set(constraints.JURISDICTIONS["us"]) == {
        code for code, r in geo.REGIONS.items() if r.country == "US"
    }


@pytest.mark.parametrize(
    ("wanted", "region", "allowed"),
    [
        (Constraints(), "iad", True),
        (Constraints(regions=("weur",)), "lhr", True),
        (Constraints(regions=("weur",)), "waw", False),
        (Constraints(regions=("weur", "waw")), "waw", True),
        (Constraints(regions=("weur",)), "WEUR", True),  # a node registered by its area
        (EU, "fra", True),
        (EU, "lhr", False),
        (replace(EU, regions=("weur",)), "waw", False),  # both must allow it
        (replace(EU, regions=("weur",)), "ams", True),
    ],
)
def test_region_allowed(wanted: Constraints, region: str, allowed: bool) -> None:
    assert constraints.region_allowed(wanted, region) is allowed


@pytest.mark.parametrize(
    ("wanted", "hint", "moved"),
    [
        (Constraints(), "iad", ""),
        (EU, "fra", ""),
        (EU, "weur", ""),  # an area with an allowed member stays
        (EU, "iad", "dub"),  # across the Atlantic: the nearest EU region
        (EU, "lhr", "cdg"),
        (EU, "sin", "otp"),
        (Constraints(regions=("enam",)), "lax", "dfw"),
        (Constraints(labels={"gpu": "yes"}), "iad", ""),  # labels limit nodes, not places
        (EU, "mars", ""),  # no place: resolving refuses it
    ],
)
def test_moved_hint(wanted: Constraints, hint: str, moved: str) -> None:
    assert constraints.moved_hint(wanted, hint) == moved


def test_moved_demand_counts_outside_demand_in_the_nearest_allowed_region() -> None:
    demand = {"fra": 3.0, "iad": 5.0, "lhr": 1.0}
    assert constraints.moved_demand(EU, demand) == {"fra": 3.0, "dub": 5.0, "cdg": 1.0}


def test_missing_labels() -> None:
    wanted = Constraints(labels={"gpu": "yes", "disk": "ssd"})
    assert constraints.missing_labels(wanted, {"gpu": "yes", "disk": "ssd", "x": "1"}) == []
    assert constraints.missing_labels(wanted, {"gpu": "no"}) == ["gpu=yes", "disk=ssd"]


# --- the scheduler -----------------------------------------------------------------------------


def test_a_hint_outside_the_constraints_places_on_the_nearest_allowed_node() -> None:
    nodes = free(node("us", "iad"), node("uk", "lhr"), node("de", "fra"), node("pl", "waw"))
    decision = place(request(EU, "iad"), nodes)
    assert decision.node is not None and decision.node.id == "de"
    assert decision.rejected == {"us": REJECT_REGION, "uk": REJECT_REGION}


def test_labels_pick_the_labelled_node_over_a_nearer_one() -> None:
    nodes = free(node("near", "fra"), node("far", "waw", gpu="yes"))
    decision = place(request(Constraints(labels={"gpu": "yes"}), "fra"), nodes)
    assert decision.node is not None and decision.node.id == "far"
    assert decision.rejected == {"near": REJECT_LABELS}


def test_no_node_satisfying_the_constraints_says_which_one() -> None:
    nodes = free(node("us", "iad"), node("de", "fra"))
    wanted = replace(EU, labels={"gpu": "yes"})
    decision = place(request(wanted, "fra"), nodes)
    assert decision.node is None and decision.refusal == REFUSED_CONSTRAINTS
    assert decision.reason == (
        "no node satisfies the constraints of class A (jurisdiction eu; labels gpu=yes):"
        " de (gpu=yes), us (region iad, gpu=yes)"
    )
    assert "\n" not in decision.reason


def test_allowed_nodes_full_is_no_capacity() -> None:
    full = NodeState(node("de", "fra"), Resources(4.0, 8192), 16)
    decision = place(request(EU, "fra"), [full, *free(node("us", "iad"))])
    assert decision.refusal == REFUSED_NO_CAPACITY
    assert "de full (vCPU)" in decision.reason and "us outside the constraints" in decision.reason


# --- the edge's pool choice --------------------------------------------------------------------


def member(name: str, region: str) -> PoolMember:
    city = geo.REGIONS[region]
    return PoolMember("P", name, name, f"n-{name}", "a:1", region, city.latitude, city.longitude)


def test_edge_chooses_only_members_in_allowed_regions() -> None:
    members = [member("a", "iad"), member("b", "fra")]
    allowed = constraints.allowed_regions(EU)
    chosen = choose(members, geo.lookup("iad"), {}, 0, random.Random(1), allowed)
    assert chosen is not None and chosen.name == "b"
    assert choose(members[:1], geo.lookup("iad"), {}, 0, random.Random(1), allowed) is None


# --- config ------------------------------------------------------------------------------------


def toml(constraints_line: str, top: str = "") -> Config:
    return parse_toml(
        f'{top}\n[[containers]]\nclass_name = "A"\nimage = "x"\n{constraints_line}\n',
        "portside.toml",
    )


def test_toml_constraints_and_own_jurisdictions() -> None:
    config = toml(
        'constraints = { regions = ["WEUR", "waw"], jurisdiction = "eu", labels = { gpu = "yes" } }'
    )
    got = config.classes[0].constraints
    assert got.regions == ("weur", "waw") and got.jurisdiction == "eu"
    assert got.jurisdiction_regions == constraints.JURISDICTIONS["eu"]
    assert got.labels == {"gpu": "yes"}
    own = toml('constraints = { jurisdiction = "lab" }', '[jurisdictions]\nlab = ["fra", "eeur"]')
    assert own.classes[0].constraints.jurisdiction_regions == tuple(
        sorted({"fra", "eeur", *geo.AREA_MEMBERS["eeur"]})
    )
    override = toml('constraints = { jurisdiction = "eu" }', '[jurisdictions]\neu = ["fra"]')
    assert override.classes[0].constraints.jurisdiction_regions == ("fra",)


def test_constraints_survive_the_wire() -> None:
    cls = toml('constraints = { regions = ["weur"], labels = { gpu = "yes" } }').classes[0]
    assert class_from_pb(class_to_pb(cls)) == cls
    plain = ContainerClass("B", "x")
    assert not class_to_pb(plain).HasField("constraints")
    assert class_from_pb(class_to_pb(plain)) == plain


@pytest.mark.parametrize(
    ("line", "top", "field", "says"),
    [
        ('constraints = { regions = ["xyz"] }', "", "constraints.regions[0]", "not a region"),
        ('constraints = { regions = "fra" }', "", "constraints.regions", "must be an array"),
        ("constraints = { regions = [1] }", "", "constraints.regions[0]", "must be a string"),
        ('constraints = { jurisdiction = "mars" }', "", "constraints.jurisdiction", "eu, fedramp"),
        (
            'constraints = { regions = ["enam"], jurisdiction = "eu" }',
            "",
            "constraints.regions[0]",
            "outside jurisdiction eu",
        ),
        ("constraints = { labels = { gpu = 1 } }", "", "constraints.labels.gpu", "a string"),
        ('constraints = { region = ["fra"] }', "", "constraints.region", "did you mean regions"),
        ('constraints = "eu"', "", "constraints", "must be a table"),
        ("", '[jurisdictions]\nlab = ["fra", "moon"]', "jurisdictions.lab[1]", "not a region"),
        ("", "[jurisdictions]\nlab = []", "jurisdictions.lab", "non-empty array"),
    ],
)
def test_bad_constraints_name_the_file_field_and_what_is_allowed(
    line: str, top: str, field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        toml(line, top)
    message = str(caught.value)
    assert message.startswith("portside.toml: ")
    where = field if field.startswith("jurisdictions") else f"containers[0].{field}"
    assert f" {where}: " in message and says in message


def test_wrangler_constraints_are_read_and_cities_warned_about() -> None:
    config, warnings = parse_wrangler(
        '{"containers": [{"class_name": "A", "image": "x", "constraints":'
        ' {"regions": ["ENAM", "WNAM"], "jurisdiction": "fedramp", "cities": ["iad"]}}]}',
        "wrangler.jsonc",
    )
    got = config.classes[0].constraints
    assert got.regions == ("enam", "wnam") and got.jurisdiction == "fedramp"
    assert warnings == [
        "wrangler.jsonc: containers[0].constraints.cities: ignored (not used by Portside)"
    ]


def test_a_deploy_call_is_checked_too() -> None:
    bad = ContainerClass("A", "x", constraints=Constraints(jurisdiction="eu"))
    with pytest.raises(ConfigError, match=r"containers\[0\]\.constraints\.jurisdiction"):
        validate_config(Config(classes=(bad,)))
