"""Dashboards, alert rules and docs/metrics.md against the metrics the code exports: every
PromQL query in deploy/ names only exported metrics, and the docs' table lists exactly those."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import controlplane
import edge
import nodeagent

ROOT = Path(__file__).resolve().parents[2]
# Each daemon's metrics are module-level objects: in its metrics.py, and in a few modules of
# their own (usage metering). Every module of the package is imported to find them all.
DAEMONS: dict[str, ModuleType] = {"control plane": controlplane, "agent": nodeagent, "edge": edge}
# Labels Prometheus attaches from service discovery, and the series it makes itself.
TARGET_LABELS = {"portside_role", "portside_region", "portside_node"}
PROMETHEUS_OWN = {"up"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}


def families() -> dict[str, tuple[str, str]]:
    """Documented name (counters with _total) -> (type, daemon), from the metric modules."""
    out: dict[str, tuple[str, str]] = {}
    for daemon, package in DAEMONS.items():
        for module in _modules(package):
            for metric in vars(module).values():
                if isinstance(metric, MetricWrapperBase):
                    kind = str(metric._type)  # noqa: SLF001 - prometheus_client has no accessor
                    name = metric._name + ("_total" if kind == "counter" else "")  # noqa: SLF001
                    out[name] = (kind, daemon)
    return out


def _modules(package: ModuleType) -> Iterator[ModuleType]:
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        yield importlib.import_module(info.name)


def exported_series_names() -> set[str]:
    names: set[str] = set()
    for name, (kind, _) in families().items():
        base = name.removesuffix("_total")
        names.update(base + suffix for suffix in _SUFFIXES[kind])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges, grouping clauses, function calls, keywords and numbers are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    # Not after a digit (the unit of 5m) or a $ (a Grafana variable such as $__rate_interval).
    for match in re.finditer(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        after = expr[match.end() :].lstrip()
        if after.startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_queries() -> Iterator[tuple[str, str]]:
    for path in sorted((ROOT / "deploy/grafana").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                yield f"{path.name}: {panel['title']}", target["expr"]
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
                assert inner, f"{path.name}: variable {variable['name']}: not label_values()"
                yield f"{path.name}: variable {variable['name']}", inner.group(1)


def alert_queries() -> Iterator[tuple[str, str]]:
    rules: Any = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"alerts.yml: {rule['alert']}", rule["expr"]


def documented() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in (ROOT / "docs/metrics.md").read_text().splitlines():
        if line.startswith("| `portside_"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = (cells[1], cells[-1])
    return rows


def test_the_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, class) (rate(portside_edge_proxy_seconds_bucket"
        '{class="$class", portside_node=~"a|b"}[$__rate_interval]))) > 1 '
        "and on (class) up == bool 0 unless portside_agent_instances offset 5m"
    )
    assert metric_names(expr) == {
        "portside_edge_proxy_seconds_bucket",
        "up",
        "portside_agent_instances",
    }


@pytest.mark.parametrize(
    ("where", "expr"), [*dashboard_queries(), *alert_queries()], ids=lambda v: str(v)[:60]
)
def test_queries_use_only_exported_metrics(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - exported_series_names() - PROMETHEUS_OWN - TARGET_LABELS
    assert not unknown, f"{where}: {sorted(unknown)} not exported by Portside (docs/metrics.md)"
    assert not names & TARGET_LABELS, f"{where}: a target label used as a metric"


def test_every_dashboard_exists_and_has_panels() -> None:
    boards = {p.name: json.loads(p.read_text()) for p in (ROOT / "deploy/grafana").glob("*.json")}
    assert set(boards) == {"cluster-overview.json", "class.json", "node.json"}
    assert all(board["panels"] for board in boards.values())
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids)


def test_docs_list_exactly_the_exported_metrics() -> None:
    exported = families()
    docs = documented()
    assert sorted(set(exported) - set(docs)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(docs) - set(exported)) == [], "in docs/metrics.md but not exported"
    for name, (kind, daemon) in exported.items():
        assert docs[name] == (kind, daemon), f"docs/metrics.md: {name}"


def test_names_follow_prometheus_conventions() -> None:
    for name, (kind, daemon) in families().items():
        prefix = {"control plane": "controlplane", "agent": "agent", "edge": "edge"}[daemon]
        assert name.startswith(f"portside_{prefix}_"), name
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
