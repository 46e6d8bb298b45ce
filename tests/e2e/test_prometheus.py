"""Issue 5 end to end: a real Prometheus server (the Debian package) finds a running cluster
through the control plane's /prometheus/targets, scrapes every daemon, and answers the queries
the dashboards and alert rules are built on. Also: promtool accepts deploy/prometheus/."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from portside.net import free_port
from tests.e2e.harness import Cluster, Proc, wait_for_port
from tests.e2e.test_named_instances import config, get
from tests.support import eventually
from tests.unit.test_dashboards import ROOT, dashboard_queries

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy/prometheus"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: .ci/run installs the Debian package prometheus",
            pytrace=False,
        )
    return path


def metrics_listen(proc: Proc) -> str:
    args = [str(a) for a in proc.popen.args]  # type: ignore[union-attr]
    return args[args.index("--metrics-listen") + 1]


def test_promtool_accepts_the_deploy_files() -> None:
    promtool = tool("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "alerts.yml")],
    ):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr


def start_prometheus(tmp: Path, sd_url: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    address = f"127.0.0.1:{free_port()}"
    conf = tmp / "prometheus.yml"
    # JSON is YAML: the test's scrape config, with the alert rules from deploy/ loaded as well.
    conf.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "portside",
                        "http_sd_configs": [{"url": sd_url, "refresh_interval": "1s"}],
                    }
                ],
            }
        )
    )
    log = tmp / "prometheus.log"
    popen = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={conf}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address={address}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return popen, address, log


async def api(s: aiohttp.ClientSession, base: str, path: str, **params: str) -> Any:
    async with s.get(f"{base}/api/v1/{path}", params=params) as resp:
        body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]


async def vector(s: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    """The query's vector now: empty until the series it needs have been scraped."""
    result: list[dict[str, Any]] = (await api(s, base, "query", query=promql))["result"]
    return result


async def test_prometheus_discovers_and_scrapes_the_cluster(
    cluster: Cluster, test_image: str, tmp_path: Path
) -> None:
    cp = cluster.start_controlplane()
    cluster.deploy(config(test_image))
    agent = cluster.start_agent("fra")
    edge = cluster.start_edge("sin")
    cluster.wait_for_nodes(1)
    node_id = [str(a) for a in agent.popen.args][-1]  # type: ignore[union-attr]
    sd_url = f"http://{metrics_listen(cp)}/prometheus/targets"

    async with aiohttp.ClientSession() as s:
        for name in ("alice", "bob", "alice"):
            status, text, _ = await get(s, f"http://{edge.address}/session/whoami", name)
            assert status == 200, text
        assert (await get(s, f"http://{edge.address}/nowhere"))[0] == 404

        # The discovery document itself: one group per daemon, labelled (edges appear with
        # their first demand report, within 2 s).
        async def discovered() -> list[dict[str, Any]]:
            async with s.get(sd_url) as resp:
                groups: list[dict[str, Any]] = await resp.json()
            assert len(groups) == 3, groups
            return groups

        groups = await eventually(discovered, within=10, every=0.2, what="three target groups")
        by_role = {g["labels"]["portside_role"]: g for g in groups}
        assert by_role["agent"]["targets"] == [metrics_listen(agent)]  # not its data port
        assert by_role["agent"]["labels"]["portside_node"] == node_id
        assert by_role["agent"]["labels"]["portside_region"] == "fra"
        assert by_role["edge"]["targets"] == [metrics_listen(edge)]
        assert by_role["edge"]["labels"]["portside_region"] == "sin"
        assert by_role["controlplane"]["targets"] == [metrics_listen(cp)]

        popen, address, log = start_prometheus(tmp_path, sd_url)
        base = f"http://{address}"
        try:
            wait_for_port(address, within=30)

            # The port opens before the TSDB is ready: until then the API answers 503.
            async def ready() -> bool:
                async with s.get(f"{base}/-/ready") as resp:
                    return resp.status == 200

            await eventually(ready, within=30, every=0.2, what="Prometheus ready")

            async def all_up() -> list[dict[str, Any]]:
                targets: list[dict[str, Any]] = (await api(s, base, "targets"))["activeTargets"]
                health = {t["labels"].get("portside_role"): t["health"] for t in targets}
                every_role_up = {"controlplane": "up", "agent": "up", "edge": "up"}
                assert health == every_role_up, json.dumps(targets, indent=1)
                return targets

            targets = await eventually(all_up, within=30, every=0.5, what="every target up")
            for t in targets:
                assert t["discoveredLabels"]["__meta_url"] == sd_url

            # Scrapes arrive every second: each query answers once the series it needs are in.
            def scrape(promql: str) -> Awaitable[list[dict[str, Any]]]:
                return eventually(
                    partial(vector, s, base, promql), within=30, every=0.5, what=promql
                )

            (series,) = await scrape("sum(portside_edge_requests_total) > 0")
            assert float(series["value"][1]) == 4
            requests = await scrape('portside_edge_requests_total{class="Echo", code="200"}')
            assert requests[0]["metric"]["portside_region"] == "sin"
            assert requests[0]["metric"]["region"] == "sin"
            assert requests[0]["metric"]["route"] == "/session"
            (alive,) = await scrape("portside_controlplane_nodes_alive == 1")
            assert alive["metric"]["portside_role"] == "controlplane"
            boots = await scrape('portside_agent_boots_total{outcome="ok"}')
            assert float(boots[0]["value"][1]) == 2  # alice and bob; alice's second was warm
            assert boots[0]["metric"]["portside_node"] == node_id
            memory = await scrape("portside_agent_instance_memory_bytes > 0")
            # The scraped `instance` label yields to the target's (see docs/metrics.md).
            assert {m["metric"]["instance_name"] for m in memory} == {"alice", "bob"}
            for present in (
                "portside_controlplane_leader == 1",
                "portside_agent_boot_seconds_count > 0",
                'portside_agent_instances{state="healthy"} == 2',
                'portside_controlplane_placements_total{outcome="placed"}',
                "portside_controlplane_store_seconds_count > 0",
                "portside_agent_instance_cpu_ratio >= 0",
                'portside_edge_route_cache_total{result="hit"}',
            ):
                await scrape(present)

            # Every dashboard query is valid PromQL for this Prometheus.
            for where, query in dashboard_queries():
                concrete = (
                    query.replace("$__rate_interval", "1m")
                    .replace("$class", "Echo")
                    .replace("$node", node_id)
                )
                async with s.get(f"{base}/api/v1/query", params={"query": concrete}) as resp:
                    assert resp.status == 200, f"{where}: {concrete}: {await resp.text()}"
            # The alert rules loaded and evaluate without errors.
            rules = (await api(s, base, "rules"))["groups"]
            assert sum(len(g["rules"]) for g in rules) > 0
            assert all(r["health"] != "err" for g in rules for r in g["rules"]), rules
        except BaseException:
            print(log.read_text(errors="replace")[-6000:])
            raise
        finally:
            popen.terminate()
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
