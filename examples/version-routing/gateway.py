"""Version routing: a request with `x-version: v2` goes to the v2 API, every other one to v1.

Each version is a class of its own (ApiV1, ApiV2) with one named instance, "main", which the
first request to it boots.
"""

from portside.gateway import Request, Response


async def fetch(request: Request, env) -> Response:
    api = env.API_V2 if request.headers.get("x-version") == "v2" else env.API_V1
    return await api.get("main").fetch(request)
