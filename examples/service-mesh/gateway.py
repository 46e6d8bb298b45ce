"""Service mesh: a container's outbound requests to `sub.service` carry the account they are for
in `X-Account-Id`; each account has its own SubService instance, which this handler picks.

`route_sub` is named by Frontend's `outbound_by_host`, so it runs on the node of the container
that made the request (`ctx` says which one); `fetch` answers the edge's clients.
"""

from portside.gateway import Request, Response


async def fetch(request: Request, env) -> Response:
    return await env.FRONTEND.get("main").fetch(request)


async def route_sub(request: Request, env, ctx) -> Response:
    account = request.headers.get("x-account-id", "")
    if not account:
        return Response("X-Account-Id is required\n", status=400)
    request.headers["X-Called-By"] = f"{ctx.class_name}/{ctx.instance}"
    return await env.SUB_SERVICE.get(account).fetch(request)
