"""The live cluster page, on the control plane's HTTP (metrics) port: `/` and `/ui` serve a static
page (no build step, nothing fetched from elsewhere) that polls `/api/cluster`, a JSON snapshot of
the cluster view and of the latest lifecycle events.

Both need an API token that may read the whole cluster: `Authorization: Bearer ID.SECRET`, or the
cookie the login form (`POST /login`) sets, HttpOnly and SameSite=Strict. Without one, 401: the
page answers with the login form, which also takes the token from the URL's fragment
(`/#token=...`, never sent to the server). Unless the control plane runs with --insecure."""

from __future__ import annotations

import asyncio
import bisect
import html
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from importlib import resources
from typing import Any

from aiohttp import web

from controlplane import records
from controlplane.events import decode_event
from controlplane.records import Demand, InstanceRecord
from controlplane.store import Store
from controlplane.tokens import check_bearer
from controlplane.view import ClusterView
from portside import geo, tokens
from portside.errors import InvalidArgument, StoreError
from portside.events import Event
from portside.instances import InstanceStatus
from portside.spec import ContainerClass, Node
from portside.states import InstanceState
from portside.tokens import Role

log = logging.getLogger(__name__)

RECENT_EVENTS = 50
# A node that vanished from the view (its lease expired) stays on the page, marked lost, this
# long after the page last saw it alive, and as long as instances are still placed on it.
LOST_NODE_KEPT_S = 3600.0

_STATIC = {
    "cluster.js": "text/javascript",
    "login.js": "text/javascript",
    "world.js": "text/javascript",
    "cluster.css": "text/css",
}
# The page loads only its own files and its own JSON: no CDN, no tiles, no inline script.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_LOGIN_CSP = _CSP.replace("form-action 'none'", "form-action 'self'")
#: The cookie the login form sets: the token's "ID.SECRET", checked again on every request.
COOKIE = "portside_token"


class RecentEvents:
    """The newest lifecycle events, cluster-wide: one range of the events prefix, then a watch
    from its revision. Events expire from the store after about an hour; the page shows the
    newest written whatever their age."""

    def __init__(self, store: Store, size: int = RECENT_EVENTS, retry_s: float = 1.0) -> None:
        self.store = store
        self.size = size
        self.retry_s = retry_s
        self._events: list[Event] = []  # oldest first, by the event's own time

    def add(self, event: Event) -> None:
        # Agents send their events on their heartbeat: one may arrive after a newer one.
        bisect.insort(self._events, event, key=lambda e: e.time)
        del self._events[: -self.size]

    def latest(self) -> list[Event]:
        """Newest first."""
        return self._events[::-1]

    async def follow(self) -> None:
        """Load, then follow; a store failure is retried, never raised: the page must not take
        the control plane down with it. Runs until cancelled."""
        while True:
            try:
                kvs, revision = await self.store.range(records.EVENTS)
                loaded = (decode_event(kv) for kv in kvs)
                newest = sorted((e for e in loaded if e is not None), key=lambda e: e.time)
                self._events = newest[-self.size :]
                # Puts only: an event's expiry (its lease's delete) keeps it on the page.
                async with aclosing(self.store.watch(records.EVENTS, revision + 1)) as watch:
                    async for change in watch:
                        event = decode_event(change.kv) if change.type == "put" else None
                        if event is not None:
                            self.add(event)
            except StoreError as exc:
                log.warning("cluster page: events watch failed, loading them again: %s", exc)
            await asyncio.sleep(self.retry_s)


class ClusterPage:
    """The page's routes, the events it keeps, and the nodes it has seen alive (the view forgets
    a node when its lease expires; the page shows it as lost)."""

    def __init__(
        self,
        view: ClusterView,
        store: Store,
        clock: Callable[[], float] = time.time,
        *,
        protected: bool = True,
    ) -> None:
        self.view = view
        self.events = RecentEvents(store)
        self.clock = clock
        self.protected = protected  # False with --insecure: no token asked
        self._seen: dict[str, tuple[Node, float]] = {}  # node id -> node, last seen alive
        files = resources.files("controlplane").joinpath("ui")
        self._page_html = files.joinpath("index.html").read_bytes()
        self._login_html = files.joinpath("login.html").read_text()
        self._files = {name: files.joinpath(name).read_bytes() for name in _STATIC}

    def routes(self) -> list[web.RouteDef]:
        """GET / and /ui (the page), /ui/<file> (its script and style), /api/cluster, and
        POST /login (the login form)."""
        return [
            web.get("/", self._page),
            web.get("/ui", self._page),
            web.get("/ui/{name}", self._static),
            web.get("/api/cluster", self._api),
            web.post("/login", self._login),
        ]

    def refusal(self, request: web.Request) -> str:
        """ "" if `request` carries a token that may read the whole cluster (its Authorization
        header, else the login cookie); otherwise why not."""
        if not self.protected:
            return ""
        authorization = request.headers.get("Authorization")
        if authorization is None and request.cookies.get(COOKIE):
            authorization = "Bearer " + request.cookies[COOKIE]
        return self._check(authorization)

    def _check(self, authorization: str | None) -> str:
        found = check_bearer(self.view.tokens, authorization, "api", self.clock())
        if isinstance(found, str):
            return found
        return found.may(Role.READ)

    async def follow_events(self) -> None:
        await self.events.follow()

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        alive = self.view.nodes
        for node in alive.values():
            self._seen[node.id] = (node, now)
        placed_on = {r.node_id for r in self.view.instances.values()}
        for node_id, (_, seen) in list(self._seen.items()):
            gone = node_id not in alive and node_id not in placed_on
            if gone and now - seen > LOST_NODE_KEPT_S:
                del self._seen[node_id]
        return cluster_snapshot(
            nodes=alive,
            lost={i: node for i, (node, _) in self._seen.items() if i not in alive},
            instances=self.view.instances.values(),
            statuses=self.view.statuses,
            classes=self.view.classes,
            demand=self.view.demand,
            events=self.events.latest(),
            now=now,
            revision=self.view.revision,
        )

    async def _page(self, request: web.Request) -> web.Response:
        why = self.refusal(request)
        if why:
            sent = "Authorization" in request.headers or COOKIE in request.cookies
            return self._login_page(why if sent else "")
        return web.Response(
            body=self._page_html,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"},
        )

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._files:
            raise web.HTTPNotFound(text=f"no file {name} on the cluster page\n")
        return web.Response(
            body=self._files[name],
            content_type=_STATIC[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def _api(self, request: web.Request) -> web.Response:
        why = self.refusal(request)
        if why:
            headers = {"WWW-Authenticate": 'Bearer realm="portside"', "Cache-Control": "no-store"}
            return web.json_response({"error": why}, status=401, headers=headers)
        return web.json_response(self.snapshot(), headers={"Cache-Control": "no-store"})

    async def _login(self, request: web.Request) -> web.Response:
        """The login form's POST: a good token becomes the cookie, and the page follows."""
        origin = request.headers.get("Origin")
        if origin and origin != f"{request.scheme}://{request.host}":
            raise web.HTTPForbidden(text="log in from the cluster page itself\n")
        form = await request.post()
        credential = str(form.get("token", "")).strip()
        if credential.startswith(tokens.PREFIX + "."):
            try:
                credential = tokens.parse_token(credential, "token").bearer
            except InvalidArgument as exc:
                return self._login_page(str(exc))
        why = self._check("Bearer " + credential) if credential else "no token given"
        if why:
            log.warning("cluster page: login refused from %s: %s", request.remote, why)
            return self._login_page(why)
        response = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        response.set_cookie(
            COOKIE, credential, path="/", httponly=True, samesite="Strict", secure=request.secure
        )
        return response

    def _login_page(self, message: str) -> web.Response:
        body = self._login_html.replace("<!--message-->", html.escape(message))
        return web.Response(
            status=401,
            text=body,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": _LOGIN_CSP,
                "Cache-Control": "no-store",
                "WWW-Authenticate": 'Bearer realm="portside"',
            },
        )


def cluster_snapshot(
    *,
    nodes: Mapping[str, Node],
    lost: Mapping[str, Node],
    instances: Iterable[InstanceRecord],
    statuses: Mapping[str, Mapping[str, InstanceStatus]],
    classes: Mapping[str, ContainerClass],
    demand: Mapping[str, Demand],
    events: Sequence[Event],
    now: float,
    revision: int = 0,
) -> dict[str, Any]:
    """What /api/cluster returns: nodes (alive, then lost) with their instances, pools with their
    CPU against the target, edges with their request rates, and events newest first."""
    placed = sorted(instances, key=lambda r: (r.class_name, r.name))
    by_node: dict[str, list[dict[str, Any]]] = {}
    for rec in placed:
        status = _status(statuses, rec, nodes)
        by_node.setdefault(rec.node_id, []).append(_instance(rec, status, rec.node_id in nodes))
    out_nodes = [
        _node(nodes[i], i, True, by_node.get(i, []), statuses.get(i, {})) for i in sorted(nodes)
    ]
    for node_id in sorted((set(lost) | set(by_node)) - set(nodes)):
        out_nodes.append(_node(lost.get(node_id), node_id, False, by_node.get(node_id, []), {}))
    pools = [
        _pool(
            cls,
            [r for r in placed if r.pool and r.class_name == name and r.node_id in nodes],
            nodes,
            statuses,
        )
        for name, cls in sorted(classes.items())
        if cls.autoscaling is not None
    ]
    edges = []
    for edge_id, d in sorted(demand.items()):
        where = geo.REGIONS.get(d.region)
        edges.append(
            {
                "id": edge_id,
                "region": d.region,
                "latitude": where.latitude if where else None,
                "longitude": where.longitude if where else None,
                "requests_per_second": round(sum(d.requests_per_second.values()), 2),
            }
        )
    return {
        "time": now,
        "revision": revision,
        "summary": {
            "nodes_alive": len(nodes),
            "nodes_lost": len(out_nodes) - len(nodes),
            "instances": len(placed),
            "awake": sum(1 for n in out_nodes for i in n["instances"] if i["awake"]),
            "classes": len(classes),
            "pools": len(pools),
        },
        "nodes": out_nodes,
        "pools": pools,
        "edges": edges,
        "events": [_event(e) for e in events],
    }


def _status(
    statuses: Mapping[str, Mapping[str, InstanceStatus]],
    rec: InstanceRecord,
    nodes: Mapping[str, Node],
) -> InstanceStatus | None:
    """As its live node last reported it; None when not reported, or its node is lost."""
    return statuses.get(rec.node_id, {}).get(rec.instance_id) if rec.node_id in nodes else None


def _state(status: InstanceStatus | None, node_alive: bool) -> InstanceState:
    """Not reported by its live node: placed there, no container yet. On a lost node: stopped
    (as ListInstances says)."""
    if status is not None:
        return status.state
    return InstanceState.PLACED if node_alive else InstanceState.STOPPED


def _instance(rec: InstanceRecord, stat: InstanceStatus | None, node_alive: bool) -> dict[str, Any]:
    return {
        "class_name": rec.class_name,
        "name": rec.name,
        "instance_id": rec.instance_id,
        "state": _state(stat, node_alive).value,
        "awake": stat is not None and stat.state.awake,
        "reported": stat is not None,
        "node_alive": node_alive,
        "pool": rec.pool,
        "draining": rec.draining,
        "vcpu": rec.vcpu,
        "memory_mib": rec.memory_mib,
        "cpu_percent": stat.cpu_percent if stat else None,
        "memory_bytes": stat.memory_bytes if stat else 0,
        "in_flight": stat.info.in_flight if stat else 0,
        "placed_at": rec.placed_at,
    }


def _node(
    node: Node | None,
    node_id: str,
    alive: bool,
    placed: list[dict[str, Any]],
    statuses: Mapping[str, InstanceStatus],
) -> dict[str, Any]:
    """A node and its instances; a lost node the page never saw alive has no coordinates."""
    where = geo.REGIONS.get(node.region) if node else None
    awake = [i for i in placed if i["awake"]]
    known = {i["instance_id"] for i in placed}
    return {
        "id": node_id,
        "alive": alive,
        "region": node.region if node else "",
        "city": where.name if where else "",
        "latitude": node.latitude if node else None,
        "longitude": node.longitude if node else None,
        "vcpu": node.vcpu if node else 0.0,
        "memory_mib": node.memory_mib if node else 0,
        "used_vcpu": round(sum(i["vcpu"] for i in awake), 4),
        # A paused instance holds its memory (not its CPU), as placement counts it.
        "used_memory_mib": sum(
            i["memory_mib"] for i in placed if i["awake"] or i["state"] == InstanceState.PAUSED
        ),
        # Containers the agent runs without a record here (being removed, or adopted ones).
        "unplaced_awake": sum(
            1 for iid, st in statuses.items() if st.state.awake and iid not in known
        ),
        "instances": placed,
    }


def _pool(
    cls: ContainerClass,
    members: list[InstanceRecord],
    nodes: Mapping[str, Node],
    statuses: Mapping[str, Mapping[str, InstanceStatus]],
) -> dict[str, Any]:
    """A pool's CPU as the autoscaler reads it: the mean of its ready, non-draining members'
    samples, in percent of the instance type's vCPU."""
    assert cls.autoscaling is not None
    out_members, samples = [], []
    for rec in members:
        stat = _status(statuses, rec, nodes)
        ready = stat is not None and stat.state.ready
        cpu = stat.cpu_percent if stat is not None and ready else None
        if cpu is not None and not rec.draining:
            samples.append(cpu)
        out_members.append(
            {
                "name": rec.name,
                "state": _state(stat, rec.node_id in nodes).value,
                "node_id": rec.node_id,
                "ready": ready,
                "draining": rec.draining,
                "cpu_percent": cpu,
                "in_flight": stat.info.in_flight if stat else 0,
            }
        )
    return {
        "class_name": cls.name,
        "instance_type": cls.instance_type.name,
        "cpu_target": cls.autoscaling.cpu_target,
        "minimum_instances": cls.autoscaling.minimum_instances,
        "maximum_instances": cls.pool_maximum,
        "cpu_percent": round(sum(samples) / len(samples), 1) if samples else None,
        "members": out_members,
    }


def _event(e: Event) -> dict[str, Any]:
    return {
        "time": e.time,
        "kind": e.kind.value,
        "class_name": e.class_name,
        "name": e.name,
        "node_id": e.node_id,
        "exit_code": e.exit_code,
        "signal": e.signal,
        "reason": e.reason,
    }
