"""Authentication and rate limiting in front of an API.

A request needs `Authorization: Bearer <token>` with the API_TOKEN secret as the token, or it is
answered 401. Each client (by its address) may then make `limit` calls a `period`
([[gateway.rate_limits]] in portside.toml), counted across every edge, and gets 429 beyond.
Allowed requests go on to the API's instance "main".
"""

import hmac

from portside.gateway import Request, Response


async def fetch(request: Request, env) -> Response:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expected = env.secrets.get("API_TOKEN", "")
    # compare_digest: the time taken does not tell how much of a wrong token was right.
    good = hmac.compare_digest(token.encode(), expected.encode())
    if scheme.lower() != "bearer" or not expected or not good:
        return Response(
            "a bearer token is needed\n", status=401, headers={"WWW-Authenticate": "Bearer"}
        )
    if not await env.LIMITER.limit(key=request.client):
        return Response("too many requests\n", status=429)
    return await env.API.get("main").fetch(request)
