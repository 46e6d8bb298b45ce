"""Table-driven tests of the proxy core's pure parts: header hygiene, the answers a Request writes
(Portside's errors from the one table, framing by client version and status), when a request may
go out again, and the wire format (framing rules, chunked trailers, WebSocket frames as the relay
tracks and writes them). No sockets: a Request writes into a byte buffer here;
tests/integration/test_proxy_core.py runs the same core against real servers."""

from __future__ import annotations

import os
import struct
from typing import Any, cast

import httptools
import pytest
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
    Framing,
    Request,
    RequestBody,
    UpgradeRefused,
    answer_error,
    connection_tokens,
    forward_request,
    is_websocket_upgrade,
    may_resend,
    request_headers,
    response_headers,
)
from portside.proxy._wire import (
    FrameTracker,
    close_frame,
    last_chunk,
    request_framing,
    response_framing,
)


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _lower(headers: CIMultiDict[str]) -> dict[str, list[str]]:
    """Each name (lower-cased) with its values in order; the order between names is free."""
    grouped: dict[str, list[str]] = {}
    for key, value in headers.items():
        grouped.setdefault(key.lower(), []).append(value)
    return grouped


# --- header hygiene ----------------------------------------------------------------------------

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
        ("Keep-Alive", "timeout=5"),
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


# --- a Request and its answer, written into a buffer -------------------------------------------


class _Wire:
    """The transport a Request writes to: keeps the bytes."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.sent += piece

    def abort(self) -> None:
        self.aborted = True


class _Connection:
    """The few attributes of a server connection a Request reads."""

    def __init__(self) -> None:
        self.transport = _Wire()
        self.closing = False
        self.writing_paused = False
        self.peer = "127.0.0.9"
        self.scheme = "https"
        self.local = "127.0.0.1:8080"
        self.ssl_object = None


def _request(
    method: str = "GET",
    target: str = "/",
    *headers: tuple[str, str],
    version: str = "1.1",
    keep_alive: bool = True,
    websocket: bool = False,
) -> tuple[Request, _Wire]:
    conn = _Connection()
    request = Request(
        cast(Any, conn),
        method,
        target,
        CIMultiDict(headers),
        version,
        keep_alive,
        None,
        websocket,
    )
    return request, conn.transport


class _Parsed:
    """An answer as an HTTP client reads it (llhttp): status, headers, body, trailers."""

    def __init__(self, data: bytes, method: str = "GET") -> None:
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.body = b""
        self.trailers: CIMultiDict[str] = CIMultiDict()
        self.complete = False
        self._in_body = False
        parser = httptools.HttpResponseParser(self)
        if method == "HEAD":
            head, sep, rest = data.partition(b"\r\n\r\n")
            # llhttp cannot know the request was HEAD: what follows the head is all extra.
            parser.feed_data(head + sep)
            self.status = parser.get_status_code()
            self.extra = rest
            return
        parser.feed_data(data)
        self.status = parser.get_status_code()
        self.extra = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        target = self.trailers if self._in_body else self.headers
        target.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


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
    request, wire = _request()
    answer_error(request, error)
    answer = _Parsed(bytes(wire.sent))
    assert (answer.status, answer.headers["Portside-Error"]) == (status, kind)
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert answer.body == f"{error}\n".encode()
    assert answer.headers["Content-Length"] == str(len(answer.body))
    assert answer.complete and "Connection" not in answer.headers  # the connection stays
    assert request.status == status and request.ended


def test_an_error_answer_is_one_line() -> None:
    request, wire = _request()
    answer_error(request, ConfigError("classes.toml", "image", "empty\nsee the docs"))
    assert _Parsed(bytes(wire.sent)).body == b"classes.toml: image: empty\n"
    request, wire = _request()
    answer_error(request, UpstreamFailed(""))
    assert _Parsed(bytes(wire.sent)).body == b"upstream-failed\n"


def test_an_error_answer_may_close_the_connection() -> None:
    request, wire = _request()
    answer_error(request, NoCapacity("draining"), close=True)
    assert _Parsed(bytes(wire.sent)).headers["Connection"] == "close"
    assert not request.keep_alive


def test_an_error_answer_to_head_has_its_length_and_no_body() -> None:
    """The bytes after a HEAD answer's head are the next answer's: a body there would be read
    as the start of the next response on a kept-alive connection."""
    request, wire = _request("HEAD")
    answer_error(request, UpstreamRefused("Connection refused"))
    answer = _Parsed(bytes(wire.sent), "HEAD")
    assert answer.status == 502
    assert answer.headers["Content-Length"] == str(len(b"Connection refused\n"))
    assert answer.extra == b""


# Per client version, method, status and the upstream's framing: whether the answer goes chunked,
# says Connection: close, and carries the body.
@pytest.mark.parametrize(
    ("version", "method", "status", "framing", "chunked", "closes", "has_body"),
    [
        ("1.1", "GET", 200, Framing.LENGTH, False, False, True),
        ("1.1", "GET", 200, Framing.CHUNKED, True, False, True),
        ("1.1", "GET", 200, Framing.CLOSE, True, False, True),  # a close-delimited body
        ("1.0", "GET", 200, Framing.CHUNKED, False, True, True),  # 1.0 knows no chunks
        ("1.0", "GET", 200, Framing.CLOSE, False, True, True),
        ("1.1", "HEAD", 200, Framing.NONE, False, False, False),
        ("1.1", "GET", 204, Framing.NONE, False, False, False),
        ("1.1", "GET", 304, Framing.NONE, False, False, False),
    ],
)
def test_an_answer_is_framed_for_its_client(
    version: str,
    method: str,
    status: int,
    framing: Framing,
    chunked: bool,
    closes: bool,
    has_body: bool,
) -> None:
    request, wire = _request(method, version=version)
    fields = [("Content-Length", "5")] if framing is Framing.LENGTH else []
    request.start(status, None, fields, framing)
    if has_body:
        request.write(b"hello")
    request.end()
    head, _, body = bytes(wire.sent).partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith(f"http/1.1 {status} ")
    assert ("transfer-encoding: chunked" in lines) is chunked
    assert ("connection: close" in lines) is closes
    assert not request.keep_alive if closes else request.keep_alive
    if chunked:
        assert body == b"5\r\nhello\r\n0\r\n\r\n"
    else:
        assert body == (b"hello" if has_body else b"")


def test_an_empty_chunked_answer_still_sends_its_head() -> None:
    """An upstream's empty chunked or close-delimited body: the client gets a head, then the
    last chunk, never the last chunk alone."""
    request, wire = _request()
    request.start(200, None, [("Content-Type", "text/plain")], Framing.CHUNKED)
    request.end()
    answer = _Parsed(bytes(wire.sent))
    assert answer.status == 200 and answer.complete and answer.body == b""


def test_trailers_follow_a_chunked_answer() -> None:
    request, wire = _request()
    request.start(200, None, [], Framing.CHUNKED)
    request.write(b"abc")
    request.end([("X-Checksum", "900150983cd24fb0")])
    answer = _Parsed(bytes(wire.sent))
    assert answer.body == b"abc"
    assert answer.trailers["X-Checksum"] == "900150983cd24fb0"


def test_a_request_goes_on_in_origin_form() -> None:
    request, _ = _request("GET", "http://portside.example/a%2Fb?x=1", ("Host", "portside.example"))
    forward = forward_request(request, ingress=True)
    assert forward.target == "/a%2Fb?x=1"
    assert forward.headers["X-Forwarded-For"] == "127.0.0.9"
    assert forward.headers["X-Forwarded-Proto"] == "https"
    assert forward.headers["X-Forwarded-Host"] == "portside.example"
    assert "Host" not in forward.headers  # the transport names the next hop


def test_a_websocket_upgrade_goes_on_with_its_protocols() -> None:
    request, _ = _request(
        "GET",
        "/ws",
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "chat, superchat"),
        websocket=True,
    )
    forward = forward_request(request, ingress=False)
    assert forward.websocket and forward.body is None
    assert forward.protocols == ("chat", "superchat")
    assert forward.headers["Sec-WebSocket-Key"] == "dGhlIHNhbXBsZSBub25jZQ=="
    assert "Upgrade" not in forward.headers  # the transport sets the handshake's own


# --- sending again -----------------------------------------------------------------------------


def _forward(method: str = "GET", body_read: bool | None = None) -> Forward:
    body = None
    if body_read is not None:
        body = RequestBody(cast(Any, _Connection()), Framing.LENGTH, 3)  # never read here
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


# --- the wire: framing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "method", "headers", "expected"),
    [
        (200, "GET", [("Content-Length", "12")], (Framing.LENGTH, 12)),
        (200, "GET", [("content-length", "0")], (Framing.LENGTH, 0)),
        (200, "GET", [("Transfer-Encoding", "chunked")], (Framing.CHUNKED, None)),
        (200, "GET", [("Transfer-Encoding", "gzip, chunked")], (Framing.CHUNKED, None)),
        (200, "GET", [("Content-Type", "text/plain")], (Framing.CLOSE, None)),
        (200, "HEAD", [("Content-Length", "12")], (Framing.NONE, None)),
        (204, "GET", [], (Framing.NONE, None)),
        (304, "GET", [("Content-Length", "12")], (Framing.NONE, None)),
        (101, "GET", [("Upgrade", "websocket")], (Framing.NONE, None)),
        (103, "GET", [("Link", "</a.css>; rel=preload")], (Framing.NONE, None)),
        (404, "POST", [("Content-Length", "3")], (Framing.LENGTH, 3)),
    ],
)
def test_response_framing(
    status: int, method: str, headers: list[tuple[str, str]], expected: tuple[Framing, int | None]
) -> None:
    assert response_framing(status, method, headers) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], (Framing.NONE, None)),  # a request without either header has no body
        ([("Content-Length", "7")], (Framing.LENGTH, 7)),
        ([("Transfer-Encoding", "chunked")], (Framing.CHUNKED, None)),
        ([("Host", "x"), ("TRANSFER-ENCODING", "chunked")], (Framing.CHUNKED, None)),
    ],
)
def test_request_framing(
    headers: list[tuple[str, str]], expected: tuple[Framing, int | None]
) -> None:
    assert request_framing(headers) == expected


def test_the_last_chunk_carries_the_trailers() -> None:
    assert last_chunk() == b"0\r\n\r\n"
    assert last_chunk([("X-A", "1"), ("X-B", "two")]) == b"0\r\nX-A: 1\r\nX-B: two\r\n\r\n"


# --- the wire: WebSocket frames ----------------------------------------------------------------


def _frame(opcode: int, payload: bytes, *, masked: bool, fin: bool = True) -> bytes:
    """A frame as RFC 6455 5.2 lays it out, in the shortest length encoding."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 1 << 16:
        head = bytes((first, mask_bit | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, mask_bit | 127)) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _decode_close(frame: bytes) -> tuple[bool, int, bytes]:
    """(masked, code, reason) of one close frame."""
    assert frame[0] == 0x88  # FIN, close
    masked = bool(frame[1] & 0x80)
    size = frame[1] & 0x7F
    assert size < 126
    at = 2
    payload = frame[at + 4 * masked :]
    if masked:
        key = frame[at : at + 4]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert len(payload) == size
    return masked, struct.unpack("!H", payload[:2])[0], payload[2:]


# One direction of a WebSocket: frames of every length encoding, masked and not, a fragmented
# message with a ping between its fragments, then a close.
STREAM = [
    _frame(0x1, b"hi", masked=True),
    _frame(0x2, b"", masked=False),
    _frame(0x2, bytes(range(256)) * 2, masked=True),  # 16-bit length
    _frame(0x1, b"x" * 125, masked=False),  # the longest 7-bit length
    _frame(0x2, b"y" * 126, masked=False),  # the shortest 16-bit length
    _frame(0x2, b"z" * 65_536, masked=True),  # 64-bit length
    _frame(0x1, b"frag", masked=True, fin=False),
    _frame(0x9, b"ping", masked=True),
    _frame(0x0, b"ment", masked=True),
    _frame(0x8, struct.pack("!H", 1000) + b"bye", masked=True),
]
ENDS = [sum(len(f) for f in STREAM[: i + 1]) for i in range(len(STREAM))]
WHOLE = b"".join(STREAM)
CLOSE_STARTS = ENDS[-2]


def test_frame_tracker_knows_every_boundary_fed_byte_by_byte() -> None:
    tracker = FrameTracker()
    for at in range(len(WHOLE)):
        tracker.feed(WHOLE[at : at + 1])
        assert tracker.at_boundary is (at + 1 in ENDS), at + 1
        if at < CLOSE_STARTS:
            assert not tracker.closed, at + 1
    assert tracker.closed


def test_frame_tracker_across_two_pieces_split_at_every_offset() -> None:
    whole = memoryview(WHOLE)
    for split in range(1, len(WHOLE)):
        tracker = FrameTracker()
        tracker.feed(whole[:split])
        assert tracker.at_boundary is (split in ENDS), split
        assert not tracker.closed or split > CLOSE_STARTS, split
        tracker.feed(whole[split:])
        assert tracker.at_boundary and tracker.closed, split


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536])
def test_frame_tracker_reads_each_length_encoding(size: int, masked: bool) -> None:
    frame = _frame(0x2, b"\x00" * size, masked=masked)
    for split in (1, 2, 3, 4, 9, 10, 13, 14, len(frame) - 1):
        if not 0 < split < len(frame):
            continue
        tracker = FrameTracker()
        tracker.feed(frame[:split])
        assert not tracker.at_boundary, split
        tracker.feed(frame[split:] + frame)  # the rest, then a second whole frame
        assert tracker.at_boundary and not tracker.closed, split


def test_frame_tracker_in_one_feed_of_everything() -> None:
    tracker = FrameTracker()
    assert tracker.at_boundary and not tracker.closed
    tracker.feed(WHOLE)
    assert tracker.at_boundary and tracker.closed


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize(
    ("code", "reason"),
    [(1000, b""), (1001, b"edge shutting down"), (1011, b""), (4001, "é".encode() * 10)],
)
def test_a_close_frame_decodes_to_its_code_and_reason(
    code: int, reason: bytes, masked: bool
) -> None:
    frame = close_frame(code, reason, masked=masked)
    assert _decode_close(frame) == (masked, code, reason)
    tracker = FrameTracker()
    tracker.feed(frame)
    assert tracker.closed and tracker.at_boundary


def test_a_close_reason_fits_a_control_frame() -> None:
    frame = close_frame(1001, b"r" * 300, masked=True)
    masked, code, reason = _decode_close(frame)
    assert (masked, code, reason) == (True, 1001, b"r" * 123)  # 2 + 123 = 125 bytes of payload
