"""Header hygiene of one proxy hop (RFC 9110 section 7.6): which request and response headers go
on to the next hop, which stop here, and the X-Forwarded-* a hop adds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDict[str] | CIMultiDictProxy[str]

# RFC 9110 7.6.1: meant for one connection only, never forwarded (plus the legacy
# Proxy-Connection); the names a Connection header lists are hop-by-hop too. Trailer is not
# (RFC 2616 had it): the trailers it announces pass through.
HOP_BY_HOP: Final = frozenset(
    name.lower()
    for name in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Host names this hop (the transport names the next one); Expect was answered by this hop's own
# server before the request reached the proxy.
_REQUEST_STOPS_HERE: Final = HOP_BY_HOP | {"host", "expect"}


def connection_tokens(headers: Headers) -> frozenset[str]:
    """The header names a Connection header lists, lower-cased."""
    return frozenset(
        token.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, ())
        for token in value.split(",")
        if token.strip()
    )


def request_headers(
    incoming: Headers,
    *,
    peer: str | None,
    scheme: str,
    host: str,
    ingress: bool,
    drop: Iterable[str] = (),
    add: Mapping[str, str] | None = None,
) -> CIMultiDict[str]:
    """The headers a request goes on with: without what stops at this hop and the names in
    `drop`, with `add` (replacing any value the sender gave), and X-Forwarded-For extended by
    `peer`, as nginx's $proxy_add_x_forwarded_for does.

    `ingress`: this hop is where clients arrive (the edge), so X-Forwarded-Proto and -Host are
    set from what it saw; a hop behind it keeps the values the ingress set."""
    skip: frozenset[str] | set[str] = _REQUEST_STOPS_HERE
    if hdrs.CONNECTION in incoming:
        skip = skip | connection_tokens(incoming)
    if drop or add:
        skip = skip | {n.lower() for n in drop} | {n.lower() for n in add or ()}
    if peer:
        prior = ", ".join(incoming.getall(hdrs.X_FORWARDED_FOR, ()))
        skip = skip | {"x-forwarded-for"}
    out = CIMultiDict([(k, v) for k, v in incoming.items() if k.lower() not in skip])
    if add:
        out.extend(add)
    if peer:
        out[hdrs.X_FORWARDED_FOR] = f"{prior}, {peer}" if prior else peer
    if ingress:
        out[hdrs.X_FORWARDED_PROTO] = scheme
        out[hdrs.X_FORWARDED_HOST] = host
    else:
        out.setdefault(hdrs.X_FORWARDED_PROTO, scheme)
        out.setdefault(hdrs.X_FORWARDED_HOST, host)
    return out


def response_headers(incoming: Headers, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """The headers a response goes back with: without hop-by-hop headers and the names in
    `drop`; repeated headers (Set-Cookie) stay repeated, in order."""
    return CIMultiDict(response_fields(list(incoming.items()), frozenset(n.lower() for n in drop)))


def response_fields(
    fields: list[tuple[str, str]], drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """`response_headers` on the fields as they came (the hot path: no mapping is built).
    `drop` holds lower-case names."""
    skip = HOP_BY_HOP | drop
    for name, value in fields:
        if name.lower() == "connection":
            skip = skip | {t.strip().lower() for t in value.split(",")}
    return [(k, v) for k, v in fields if k.lower() not in skip]


def is_websocket_upgrade(method: str, headers: Headers) -> bool:
    return method == hdrs.METH_GET and headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def offered_protocols(headers: Headers) -> tuple[str, ...]:
    """The WebSocket subprotocols a client offers, in its order of preference."""
    return tuple(
        p.strip() for p in headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",") if p.strip()
    )
