"""What a container's outbound connection speaks, from its first bytes: an HTTP/1.x request (the
proxy reads its Host header), a TLS ClientHello (its server name, SNI), or anything else. Pure
functions over bytes."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# A ClientHello larger than this is not waited for (its name is then unknown).
MOST_PEEKED = 16 * 1024

_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")
_REQUEST = re.compile(rb"(?:" + b"|".join(_METHODS) + rb") ")
_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000


class Kind(enum.Enum):
    HTTP = "http"
    TLS = "tls"
    OTHER = "other"
    MORE = "more"  # too few bytes to tell: peek again


@dataclass(frozen=True)
class Sniffed:
    kind: Kind
    host: str = ""  # the TLS server name, when the ClientHello carries one


def sniff(data: bytes) -> Sniffed:
    """What the first bytes `data` of a connection are (MORE: wait for more of them)."""
    if not data:
        return Sniffed(Kind.MORE)
    if _REQUEST.match(data):
        return Sniffed(Kind.HTTP)
    if len(data) < 8 and any(m.startswith(data[: len(m)]) for m in _METHODS):
        return Sniffed(Kind.MORE)  # "GE", "POS": a method still arriving
    if data[0] == _TLS_HANDSHAKE:
        return _tls(data)
    return Sniffed(Kind.OTHER)


def _tls(data: bytes) -> Sniffed:
    if len(data) < 6:
        return Sniffed(Kind.MORE)
    if data[1] != 0x03 or data[5] != _CLIENT_HELLO:
        return Sniffed(Kind.OTHER)
    end = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < end and end <= MOST_PEEKED:
        return Sniffed(Kind.MORE)
    return Sniffed(Kind.TLS, server_name(data[5:end]))


def server_name(hello: bytes) -> str:
    """The host_name of a ClientHello's server_name extension (RFC 6066 3), "" if it has none
    or the message is cut short."""
    try:
        at = 4 + 2 + 32  # handshake header, client_version, random
        at += 1 + hello[at]  # session_id
        at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher_suites
        at += 1 + hello[at]  # compression_methods
        end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
        at += 2
        while at + 4 <= min(end, len(hello)):
            kind = int.from_bytes(hello[at : at + 2], "big")
            size = int.from_bytes(hello[at + 2 : at + 4], "big")
            at += 4
            if kind == _SERVER_NAME:
                names_end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
                at += 2
                while at + 3 <= names_end:
                    name_type, length = hello[at], int.from_bytes(hello[at + 1 : at + 3], "big")
                    at += 3
                    if name_type == 0 and at + length <= len(hello):
                        return hello[at : at + length].decode("ascii", "replace").lower()
                    at += length
                return ""
            at += size
    except IndexError:
        pass
    return ""


__all__ = ["MOST_PEEKED", "Kind", "Sniffed", "server_name", "sniff"]
