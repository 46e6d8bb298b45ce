"""--metrics-token-file: /metrics (and routes guarded like it, the control plane's Prometheus
discovery) open without it, and asking for `Authorization: Bearer <token>` with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from portside import daemon
from portside.errors import ConfigError


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "_metrics_token", None)


async def scrape(headers: dict[str, str] | None = None) -> web.StreamResponse:
    return await daemon.serve_metrics(make_mocked_request("GET", "/metrics", headers=headers))


async def test_open_without_a_token_file() -> None:
    assert (await scrape()).status == 200


async def test_a_token_file_asks_every_scrape_for_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics.token"
    path.write_text("s3cret-value\n")
    daemon.require_metrics_token(str(path))
    refused = await scrape()
    assert refused.status == 401 and "WWW-Authenticate" in refused.headers
    assert "s3cret" not in str(getattr(refused, "text", ""))
    assert (await scrape({"Authorization": "Bearer wrong"})).status == 401
    assert (await scrape({"Authorization": "Bearer s3cret-value"})).status == 200

    async def targets(_request: web.Request) -> web.Response:
        return web.json_response([])

    route = daemon.scrape_route(web.get("/prometheus/targets", targets))
    request = make_mocked_request("GET", "/prometheus/targets")
    assert (await route.handler(request)).status == 401


@pytest.mark.parametrize("content", ["", "two words"])
def test_a_bad_token_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "t"
    path.write_text(content)
    with pytest.raises(ConfigError, match="--metrics-token-file"):
        daemon.require_metrics_token(str(path))
    with pytest.raises(ConfigError, match="--metrics-token-file"):
        daemon.require_metrics_token(str(tmp_path / "missing"))
