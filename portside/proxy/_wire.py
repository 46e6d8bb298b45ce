"""HTTP/1.1 and WebSocket on the wire, as the proxy writes them: message heads, framing
(RFC 9112 6), chunked coding with trailers, and the few WebSocket frames a relay must see or say
(RFC 6455 5): it tracks frame boundaries and close frames, and writes close frames of its own."""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
LAST_CHUNK: Final = b"0\r\n\r\n"
CRLF: Final = b"\r\n"


class Framing(enum.Enum):
    """How a message's body is delimited (RFC 9112 6.3)."""

    NONE = "none"  # no body: HEAD's answer, 1xx, 204, 304, a request without one
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # Transfer-Encoding: chunked, trailers allowed
    CLOSE = "close"  # a response that ends when its connection does


def response_framing(
    status: int, request_method: str, headers: Iterable[tuple[str, str]]
) -> tuple[Framing, int | None]:
    """How the body of a response with `status` and `headers` to a `request_method` request is
    delimited, and its length when Content-Length gives it."""
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return Framing.NONE, None
    return _framing(headers, Framing.CLOSE)


def request_framing(headers: Iterable[tuple[str, str]]) -> tuple[Framing, int | None]:
    """How the body of a request with `headers` is delimited (without either header: none)."""
    return _framing(headers, Framing.NONE)


def _framing(headers: Iterable[tuple[str, str]], otherwise: Framing) -> tuple[Framing, int | None]:
    length: int | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == "transfer-encoding":
            # The parser has already refused messages with both, and codings other than chunked
            # last (RFC 9112 6.3 items 3 and 4).
            return Framing.CHUNKED, None
        if lower == "content-length":
            length = int(value)
    if length is not None:
        return Framing.LENGTH, length
    return otherwise, None


def reason_phrase(status: int, reason: str | None = None) -> str:
    return reason if reason else _REASONS.get(status, "")


def response_head(status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    return f"HTTP/1.1 {status} {reason}\r\n{''.join(lines)}\r\n".encode("latin-1")


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    return f"{method} {target} HTTP/1.1\r\n{''.join(lines)}\r\n".encode("latin-1")


def chunk_size_line(size: int) -> bytes:
    return b"%x\r\n" % size


def last_chunk(trailers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The zero-length chunk that ends a chunked body, with its trailer fields."""
    fields = "".join(f"{name}: {value}\r\n" for name, value in trailers)
    return b"0\r\n" + fields.encode("latin-1") + b"\r\n" if fields else LAST_CHUNK


# --- WebSocket frames ------------------------------------------------------------------------

CLOSE_OPCODE: Final = 0x8


class FrameTracker:
    """Follows the frames of one direction of a WebSocket as its bytes pass, without holding
    them: knows whether the bytes so far end on a frame boundary (so that a frame of the relay's
    own may go next) and whether a close frame went by."""

    __slots__ = ("_head", "_remaining", "closed")

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame still to come
        self._head = b""  # a frame head split across chunks, so far
        self.closed = False  # a close frame passed

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._head

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        at = 0
        end = len(view)
        while at < end:
            if self._remaining:
                step = min(self._remaining, end - at)
                self._remaining -= step
                at += step
                continue
            head = self._head + bytes(view[at : at + 14])
            need = _head_length(head)
            if need is None or len(head) < need:
                self._head = head  # too short to know its payload: wait for more
                return
            at += need - len(self._head)
            self._head = b""
            if head[0] & 0x0F == CLOSE_OPCODE:
                self.closed = True
            self._remaining = _payload_length(head)


def _head_length(head: bytes) -> int | None:
    if len(head) < 2:
        return None
    size = head[1] & 0x7F
    extra = 2 if size == 126 else 8 if size == 127 else 0
    return 2 + extra + (4 if head[1] & 0x80 else 0)


def _payload_length(head: bytes) -> int:
    size = head[1] & 0x7F
    if size == 126:
        return int(struct.unpack_from("!H", head, 2)[0])
    if size == 127:
        return int(struct.unpack_from("!Q", head, 2)[0])
    return size


def close_frame(code: int, reason: bytes = b"", *, masked: bool) -> bytes:
    """A close frame with `code` and `reason` (at most 123 bytes: a control frame's payload is
    at most 125); `masked` as a client must send it (RFC 6455 5.3)."""
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes((0x80 | CLOSE_OPCODE, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | CLOSE_OPCODE, 0x80 | len(payload))) + key + body
