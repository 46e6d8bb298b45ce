"""Orchestrator: workers pre-warmed near each region, their health, and requests sent to them.

`POST /prewarm` starts PER_REGION workers for each region of REGIONS ([gateway.vars]), each with
its region as the location hint, and answers where each was placed. `GET /status` asks every
worker's state and answers a dict, name -> where it runs and whether it is healthy (Portside's
health checks of its /health pass). Any other request goes to one of the workers of the region
in `?region=` (default: the first region), at random.

Workers are named `<region>-<i>`, so every edge knows them all without sharing memory (each edge
runs its own copy of this module): the cluster holds the state, not the module.
"""

import asyncio
import random

from portside import NotFound
from portside.gateway import Request, Response


def workers(env) -> dict[str, str]:
    """Every worker's name -> the region it belongs near."""
    per_region = int(env.vars["PER_REGION"])
    regions = [region.strip() for region in env.vars["REGIONS"].split(",") if region.strip()]
    return {f"{region}-{i}": region for region in regions for i in range(per_region)}


async def prewarm(env) -> Response:
    names = workers(env)
    infos = await asyncio.gather(
        *(env.WORKER.get(name, location_hint=region).start() for name, region in names.items())
    )
    return Response.from_json(
        {
            name: {"asked": region, "region": info.region, "node": info.node_id}
            for (name, region), info in zip(names.items(), infos, strict=True)
        }
    )


async def health(env, name: str, region: str) -> dict[str, object]:
    try:
        info = await env.WORKER.get(name).state()
    except NotFound:
        return {"asked": region, "state": "not started", "healthy": False}
    return {
        "asked": region,
        "region": info.region,
        "node": info.node_id,
        "state": str(info.state),
        "healthy": info.state == "healthy",
    }


async def status(env) -> Response:
    names = workers(env)
    found = await asyncio.gather(*(health(env, name, region) for name, region in names.items()))
    return Response.from_json(dict(zip(names, found, strict=True)))


async def fetch(request: Request, env) -> Response:
    if request.path == "/prewarm" and request.method == "POST":
        return await prewarm(env)
    if request.path == "/status":
        return await status(env)
    names = workers(env)
    region = request.query.get("region", next(iter(names.values()), ""))
    near = [name for name, home in names.items() if home == region]
    if not near:
        return Response(f"no workers for region {region!r}\n", status=404)
    return await env.WORKER.get(random.choice(near), location_hint=region).fetch(request)
