"""Table-driven tests of the proxy core's pure parts: header hygiene, close codes, error answers,
the classification of transport failures and when a request may go out again. No sockets."""

from __future__ import annotations

import errno
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy

from portside.errors import (
    BootTimeout,
    ConfigError,
    ContainerExited,
    InvalidArgument,
    NoCapacity,
    NodeUnreachable,
    NoInstanceName,
    NoRoute,
    NotFound,
    NotThroughEdge,
    PortsideError,
    StoreError,
    UpstreamFailed,
    UpstreamRefused,
    UpstreamReset,
    UpstreamTimeout,
)
from portside.proxy import (
    Forward,
    RequestBody,
    UpgradeRefused,
    classify_failure,
    connection_tokens,
    error_response,
    forwardable_close_code,
    is_websocket_upgrade,
    may_resend,
    request_headers,
    response_headers,
)


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _lower(headers: CIMultiDict[str]) -> dict[str, list[str]]:
    """Each name (lower-cased) with its values in order; the order between names is free."""
    grouped: dict[str, list[str]] = {}
    for key, value in headers.items():
        grouped.setdefault(key.lower(), []).append(value)
    return grouped


EDGE = {"peer": "127.0.0.9", "scheme": "https", "host": "portside.example", "ingress": True}
AGENT = {"peer": "127.0.0.1", "scheme": "http", "host": "127.0.0.1:8788", "ingress": False}


@pytest.mark.parametrize(
    ("incoming", "hop", "expected"),
    [
        pytest.param(
            _headers(
                ("Host", "portside.example"),
                ("Connection", "keep-alive, X-Drop-Me"),
                ("Keep-Alive", "timeout=5"),
                ("X-Drop-Me", "hop"),
                ("TE", "trailers"),
                ("Expect", "100-continue"),
                ("Proxy-Authorization", "Basic eA=="),
                ("Portside-Class", "evil"),
                ("Portside-Instance", "evil"),
                ("X-Forwarded-For", "127.0.1.1"),
                ("X-Forwarded-For", "127.0.1.2"),
                ("X-Forwarded-Proto", "gopher"),
                ("X-Forwarded-Host", "spoofed.example"),
                ("Cookie", "a=1"),
                ("Cookie", "b=2"),
                ("X-Custom", "kept"),
            ),
            {**EDGE, "add": {"Portside-Class": "sandbox", "Portside-Instance": "s1"}},
            {
                "cookie": ["a=1", "b=2"],
                "x-custom": ["kept"],
                "portside-class": ["sandbox"],
                "portside-instance": ["s1"],
                "x-forwarded-for": ["127.0.1.1, 127.0.1.2, 127.0.0.9"],
                "x-forwarded-proto": ["https"],
                "x-forwarded-host": ["portside.example"],
            },
            id="the edge sets who a request is for, and what it saw",
        ),
        pytest.param(
            _headers(
                ("Host", "127.0.0.1:8788"),
                ("Portside-Class", "sandbox"),
                ("Portside-Instance", "s1"),
                ("X-Forwarded-For", "127.0.0.9"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "portside.example"),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
            ),
            {**AGENT, "drop": ("Portside-Class",)},
            {
                "portside-instance": ["s1"],
                "x-forwarded-for": ["127.0.0.9, 127.0.0.1"],
                "x-forwarded-proto": ["https"],
                "x-forwarded-host": ["portside.example"],
            },
            id="a hop behind the ingress keeps what the ingress saw",
        ),
        pytest.param(
            _headers(),
            {**AGENT, "peer": None},
            {"x-forwarded-proto": ["http"], "x-forwarded-host": ["127.0.0.1:8788"]},
            id="a hop behind the ingress fills in what nobody set",
        ),
    ],
)
def test_request_headers(
    incoming: CIMultiDictProxy[str], hop: dict[str, Any], expected: dict[str, list[str]]
) -> None:
    assert _lower(request_headers(incoming, **hop)) == expected


def test_responses_lose_hop_by_hop_headers_and_keep_repeated_ones() -> None:
    got = _headers(
        ("Content-Type", "text/plain"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Portside-Error", "no-capacity"),
        ("Proxy-Authenticate", "Basic"),
    )
    assert list(response_headers(got).items()) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Portside-Error", "no-capacity"),
    ]
    assert "Portside-Error" not in response_headers(got, drop=("portside-error",))


def test_connection_tokens_from_every_connection_header() -> None:
    headers = CIMultiDict([("Connection", " Keep-Alive , X-A,"), ("connection", "x-b")])
    assert connection_tokens(headers) == {"keep-alive", "x-a", "x-b"}


@pytest.mark.parametrize(
    ("method", "upgrade", "expected"),
    [
        ("GET", "websocket", True),
        ("GET", "WebSocket", True),
        ("POST", "websocket", False),
        ("GET", "h2c", False),
        ("GET", None, False),
    ],
)
def test_websocket_upgrade(method: str, upgrade: str | None, expected: bool) -> None:
    headers = CIMultiDict({"Upgrade": upgrade} if upgrade else {})
    assert is_websocket_upgrade(method, headers) is expected


@pytest.mark.parametrize(
    ("received", "passed_on"),
    [
        (None, 1000),  # no close frame code at all
        (1000, 1000),
        (1001, 1001),
        (4001, 4001),
        (1005, 1000),  # "no status code" may not be sent
        (1006, 1011),  # "dropped" may not be sent: the other side learns of an error
        (1015, 1011),  # "TLS failed" may not be sent either
    ],
)
def test_close_codes_passed_on(received: int | None, passed_on: int) -> None:
    assert forwardable_close_code(received) == passed_on


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        # The kinds README.md documents for clients keep their names and statuses.
        (NoRoute("no route for /x"), 404, "no-route"),
        (NoInstanceName("no instance name"), 400, "no-instance-name"),
        (InvalidArgument("unknown location"), 400, "invalid-argument"),
        (ContainerExited("exited with code 3", 3), 502, "container-exited"),
        (NoCapacity("no node has room"), 503, "no-capacity"),
        (BootTimeout("port did not answer"), 504, "boot-timeout"),
        (NodeUnreachable("node agent n1 is unreachable"), 502, "node-unreachable"),
        # And the ones the proxies add.
        (NotThroughEdge("no Portside-Class header"), 400, "not-through-edge"),
        (NotFound("class x is not deployed"), 404, "not-found"),
        (UpstreamRefused("refused"), 502, "upstream-refused"),
        (UpgradeRefused(404), 502, "upstream-refused"),
        (UpstreamReset("reset"), 502, "upstream-reset"),
        (UpstreamTimeout("no answer"), 504, "upstream-timeout"),
        (UpstreamFailed("failed"), 502, "upstream-failed"),
        (StoreError("etcd did not answer"), 503, "store-unavailable"),
        (PortsideError("the edge failed"), 500, "internal"),
    ],
)
def test_error_answers_come_from_the_one_table(
    error: PortsideError, status: int, kind: str
) -> None:
    answer = error_response(error)
    assert (answer.status, answer.headers["Portside-Error"]) == (status, kind)
    assert answer.content_type == "text/plain"
    assert answer.text == f"{error}\n"


def test_an_error_answer_is_one_line() -> None:
    answer = error_response(ConfigError("classes.toml", "image", "empty\nsee the docs"))
    assert answer.text == "classes.toml: image: empty\n"
    assert error_response(UpstreamFailed("")).text == "upstream-failed\n"


_KEY = ConnectionKey("127.0.0.1", 1, False, True, None, None, None, None)


@pytest.mark.parametrize(
    ("failure", "kind", "reason"),
    [
        (
            aiohttp.ClientConnectorError(_KEY, ConnectionRefusedError(errno.ECONNREFUSED, "x")),
            UpstreamRefused,
            "Connection refused",
        ),
        (
            aiohttp.ConnectionTimeoutError("Connection timeout to host"),
            UpstreamRefused,
            "no connection within the connect deadline",
        ),
        (aiohttp.ServerDisconnectedError(), UpstreamReset, "Server disconnected"),
        (aiohttp.ClientConnectionResetError("Cannot write"), UpstreamReset, "Cannot write"),
        (
            aiohttp.ClientOSError(errno.EPIPE, "Broken pipe"),
            UpstreamReset,
            "[Errno 32] Broken pipe",
        ),
        (
            aiohttp.ClientPayloadError("Response payload is not completed"),
            UpstreamReset,
            "Response payload is not completed",
        ),
        (
            aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
            UpstreamTimeout,
            "no answer within the read deadline",
        ),
        (TimeoutError(), UpstreamTimeout, "no answer within the read deadline"),
        (aiohttp.InvalidURL("http://x:y"), UpstreamFailed, "http://x:y"),
        (aiohttp.ClientError(), UpstreamFailed, "ClientError"),
    ],
)
def test_transport_failures_are_classified_once(
    failure: BaseException, kind: type[UpstreamFailed], reason: str
) -> None:
    classified = classify_failure(failure)
    assert type(classified) is kind
    assert str(classified) == reason


def _forward(method: str = "GET", body_read: bool | None = None) -> Forward:
    body = None
    if body_read is not None:
        body = RequestBody(cast(aiohttp.StreamReader, None))  # never read here
        body.started = body_read
    return Forward(method, "/", CIMultiDict(), body)


@pytest.mark.parametrize(
    ("forward", "failure", "again"),
    [
        (_forward("POST", body_read=False), UpstreamRefused("refused"), True),
        (_forward("POST", body_read=True), UpstreamRefused("refused"), False),
        (_forward("GET"), UpstreamReset("reset"), True),
        (_forward("PUT", body_read=False), UpstreamReset("reset"), True),
        (_forward("PUT", body_read=True), UpstreamReset("reset"), False),
        (_forward("POST"), UpstreamReset("reset"), False),  # it may have been acted on
        (_forward("PATCH"), UpstreamReset("reset"), False),
        (_forward("GET"), UpgradeRefused(403), False),  # an answer, not a failure to get one
        (_forward("GET"), UpstreamTimeout("no answer"), False),
        (_forward("GET"), UpstreamFailed("bad response"), False),
    ],
)
def test_when_a_request_may_go_out_again(
    forward: Forward, failure: UpstreamFailed, again: bool
) -> None:
    assert may_resend(forward, failure) is again


def test_an_upgrade_refusal_says_what_the_upstream_answered() -> None:
    assert str(UpgradeRefused(404)) == "answered the WebSocket upgrade with 404"
    refused = UpgradeRefused(504, "boot-timeout")
    assert (refused.status, refused.kind) == (504, "boot-timeout")
    assert str(refused) == "answered the WebSocket upgrade with 504 boot-timeout"


@pytest.mark.parametrize(
    ("failure", "kind", "reason"),
    [
        (
            aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
            UpstreamTimeout,
            "no answer within the first-byte deadline (100s)",
        ),
        (TimeoutError(), UpstreamTimeout, "no answer within the first-byte deadline (100s)"),
        # A connect deadline is a failed connect (nothing was sent), whatever read deadline ran.
        (
            aiohttp.ConnectionTimeoutError("Connection timeout to host"),
            UpstreamRefused,
            "no connection within the connect deadline",
        ),
    ],
)
def test_a_timeout_names_the_deadline_that_ran(
    failure: BaseException, kind: type[UpstreamFailed], reason: str
) -> None:
    classified = classify_failure(failure, "the first-byte deadline (100s)")
    assert type(classified) is kind
    assert str(classified) == reason
