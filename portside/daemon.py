"""What every Portside daemon shares: logging, stop on SIGINT/SIGTERM, and a /metrics app."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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


async def serve_metrics(_request: web.Request) -> web.Response:
    """GET /metrics: every metric of this process, in Prometheus' text format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


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
