"""What every Portside daemon shares: logging, stop on SIGINT/SIGTERM, and a /metrics app.

/metrics (and the control plane's Prometheus discovery) are open unless the daemon was given
--metrics-token-file: then a scrape must send `Authorization: Bearer <the file's content>`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from portside.errors import ConfigError

# Request latency buckets of every proxy hop: from a warm loopback hop (~0.5 ms) to a cold boot
# behind a resolve (seconds) and long answers.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class Children:
    """A labelled metric's children by label values, for the per-request path: one dict get,
    where prometheus_client's `labels()` takes a lock and checks the values on every call.

        requests = Children(REQUESTS)
        requests("Echo", "200").inc()
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run a daemon whose hot path is network I/O (the edge, the node agent) on uvloop: its
    event loop is libuv's, about twice as fast per request as asyncio's own."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def stop_on_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM; a second one kills the process at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if stop.is_set():
            sys.exit(128 + sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)
    return stop


_metrics_token: bytes | None = None  # this process's, once require_metrics_token is called


def require_metrics_token(path: str) -> None:
    """From now on, scrapes of this process must send `Authorization: Bearer <token>`, the token
    being the content of the file at `path` (surrounding blanks ignored)."""
    global _metrics_token
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError("--metrics-token-file", path, exc.strerror or str(exc)) from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(
            "--metrics-token-file", path, "must hold one token: a line without blanks"
        )
    _metrics_token = token.encode()


def _scrape_allowed(request: web.Request) -> bool:
    if _metrics_token is None:
        return True
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credential.strip().encode(), _metrics_token
    )


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _scrape_only(handler: _Handler) -> _Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not _scrape_allowed(request):
            return web.Response(
                status=401,
                text="this endpoint needs the metrics token: Authorization: Bearer <token> "
                "(Prometheus: authorization: credentials_file:)\n",
                headers={"WWW-Authenticate": 'Bearer realm="portside metrics"'},
            )
        return await handler(request)

    return guarded


def scrape_route(route: web.RouteDef) -> web.RouteDef:
    """`route`, asking for the metrics token as /metrics does (Prometheus service discovery)."""
    return web.RouteDef(route.method, route.path, _scrape_only(route.handler), route.kwargs)


async def _metrics(_request: web.Request) -> web.StreamResponse:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


#: GET /metrics: every metric of this process, in Prometheus' text format (asking for the
#: metrics token if one is required).
serve_metrics = _scrape_only(_metrics)


async def serve_health(_request: web.Request) -> web.Response:
    """GET /healthz: the process is up and serving HTTP."""
    return web.Response(text="ok\n")


def metrics_app(extra: Sequence[web.RouteDef] = ()) -> web.Application:
    """GET /metrics (Prometheus text format) and GET /healthz, plus a daemon's `extra` routes
    (the control plane's Prometheus service discovery)."""
    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", serve_health)
    app.router.add_routes(extra)
    return app
