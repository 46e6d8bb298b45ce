"""The edge's Prometheus metrics: every proxied request, route-cache lookup and resolve.

Served on a separate port (`portside.daemon.metrics_app`), never on the ingress, where `/` may be
a route.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from portside.daemon import LATENCY_BUCKETS

REQUESTS = Counter(
    "portside_edge_requests_total",
    "Requests the edge answered, by class, route prefix, status code and the edge's region.",
    ["class", "route", "code", "region"],
)
PROXY_SECONDS = Histogram(
    "portside_edge_proxy_seconds",
    "Time from sending a request to the node agent until its response headers arrive.",
    ["class"],
    buckets=LATENCY_BUCKETS,
)
ROUTE_CACHE = Counter(
    "portside_edge_route_cache_total",
    "Route cache lookups: hit (no resolve) or miss (resolved, or joined a resolve in flight).",
    ["result"],
)
RESOLVE_SECONDS = Histogram(
    "portside_edge_resolve_seconds",
    "Time the resolver took to name the node of an instance (one per single-flight group).",
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "portside_edge_upstream_errors_total",
    "Failures talking to node agents: connect (refused, reset, connect timeout; retried once),"
    " timeout (no response head within the first-byte deadline), failed (any other client"
    " error), broken (the response stream broke midway).",
    ["kind"],
)
ROUTE_DROPS = Counter(
    "portside_edge_route_drops_total",
    "Cached routes dropped on the route watch's word: node_lost (every route to a lost node),"
    " moved, removed (one instance's), reset (every named route: the watch could not resume).",
    ["reason"],
)
NODE_LOST_ABORTS = Counter(
    "portside_edge_node_lost_aborts_total",
    "Requests cut before their response head because their node was lost: resent (to the"
    " instance's new place) or failed (502 node-lost: it may have run, so it was not resent).",
    ["outcome"],
)
GATEWAY_SECONDS = Histogram(
    "portside_edge_gateway_seconds",
    "Time the gateway module's fetch took to return its response (the head; the body streams"
    " on), for requests it answered; failures are counted in portside_edge_gateway_errors_total.",
    buckets=LATENCY_BUCKETS,
)
GATEWAY_ERRORS = Counter(
    "portside_edge_gateway_errors_total",
    "Gateway fetch calls that failed, by kind: gateway-error (the code raised, returned no"
    " Response, or its module failed to load), gateway-timeout (past the gateway's deadline),"
    " or the kind of a Portside error raised through a binding (no-capacity...).",
    ["kind"],
)
CONNECT_RETRIES = Counter(
    "portside_edge_connect_retries_total",
    "Connects retried to the same node agent after a refusal while its node is alive (an agent"
    " restarting).",
)
RATE_LIMIT_CALLS = Counter(
    "portside_edge_rate_limit_calls_total",
    "Gateway rate-limiter calls (`env.<LIMITER>.limit`) on this edge, by binding and result:"
    " allowed or limited.",
    ["binding", "result"],
)
RATE_LIMIT_SYNC_FAILURES = Counter(
    "portside_edge_rate_limit_sync_failures_total",
    "Rate-limit syncs with the control plane that failed; the edge limited on its own counts"
    " and the last totals meanwhile.",
)
