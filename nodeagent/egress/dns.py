"""The DNS responder of the egress network (UDP and TCP on one port of the bridge's gateway
address; containers reach it as port 53 of any server, rules.py): a name an outbound handler
of the asking container's policy takes (`CompiledPolicy.intercepts`) is answered with the
node's own address on the bridge, where its connections reach the egress proxy; every other
question is passed to the host's resolvers as it is, and their answer back.

Only the question is read (RFC 1035 4.1.2); answers are built for A (the node's address) and
AAAA (no address, NOERROR) questions about intercepted names. A resolver is "10.0.0.2" (port
53) or "127.0.0.1:5300".

Bounded per container, so that a container flooding its node's responder holds only its own
share of the agent: at most MOST_IN_FLIGHT questions at a time (UDP ones being answered plus
TCP connections open; beyond that a datagram is dropped and a connection closed, as a busy
resolver does, and the container's resolver asks again), and a TCP connection that sends no
question for TCP_IDLE_S is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from nodeagent import metrics
from nodeagent.egress.policies import OutboundPolicies
from portside.net import split_hostport

log = logging.getLogger(__name__)

TTL_S: Final = 30  # of an intercepted name's answer: a new policy is seen within this
UPSTREAM_TIMEOUT_S: Final = 3.0
# Questions one container may have in flight (UDP ones being answered, TCP connections open),
# so as many tasks and upstream sockets at most: a resolver rarely has more than a few out, and
# with resolvers that do not answer a flood gets ~20 questions/s (64 per UPSTREAM_TIMEOUT_S).
MOST_IN_FLIGHT: Final = 64
# A TCP connection silent this long is closed (RFC 7766 6.2.3: a few seconds; BIND's 30 s).
TCP_IDLE_S: Final = 10.0
_HEADER = struct.Struct("!HHHHHH")
_TYPE_A, _TYPE_AAAA, _CLASS_IN = 1, 28, 1
_RCODE_SERVFAIL = 2


@dataclass(frozen=True)
class Question:
    name: str  # lower case, without the trailing dot
    qtype: int
    qclass: int
    end: int  # where the question ends in the message


def question(message: bytes) -> Question | None:
    """The first question of a DNS query, None if it is not one (a response, or malformed)."""
    if len(message) < _HEADER.size:
        return None
    _, flags, qdcount, _, _, _ = _HEADER.unpack_from(message)
    if flags & 0x8000 or qdcount < 1:
        return None
    labels, at = [], _HEADER.size
    while True:
        if at >= len(message):
            return None
        size = message[at]
        at += 1
        if size == 0:
            break
        if size & 0xC0 or at + size > len(message):  # no compression in a question
            return None
        labels.append(message[at : at + size].decode("ascii", "replace").lower())
        at += size
    if at + 4 > len(message):
        return None
    qtype, qclass = struct.unpack_from("!HH", message, at)
    return Question(".".join(labels), qtype, qclass, at + 4)


def intercepted_answer(query: bytes, asked: Question, address: str) -> bytes:
    """The answer to `query` about an intercepted name: `address` for A, no address for other
    types; the question echoed, authoritative, recursion available."""
    ident, flags, _, _, _, _ = _HEADER.unpack_from(query)
    answers = b""
    if asked.qtype == _TYPE_A and asked.qclass == _CLASS_IN:
        answers = struct.pack("!HHHIH", 0xC00C, _TYPE_A, _CLASS_IN, TTL_S, 4)
        answers += socket.inet_aton(address)
    reply_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080  # QR, AA, RD as asked, RA
    header = _HEADER.pack(ident, reply_flags, 1, 1 if answers else 0, 0, 0)
    return header + query[_HEADER.size : asked.end] + answers


def failure(query: bytes, asked: Question | None) -> bytes:
    """SERVFAIL for `query` (the upstream resolvers did not answer)."""
    ident, flags = struct.unpack_from("!HH", query)
    end = asked.end if asked is not None else _HEADER.size
    header = _HEADER.pack(
        ident, 0x8000 | (flags & 0x0100) | 0x0080 | _RCODE_SERVFAIL, 1 if asked else 0, 0, 0, 0
    )
    return header + query[_HEADER.size : end]


def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    """The nameservers of the host's resolv.conf (IPv4 ones; the responder asks over IPv4)."""
    found = []
    with contextlib.suppress(OSError), open(path) as conf:
        for line in conf:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver" and ":" not in words[1]:
                found.append(words[1])
    return found


class DnsResponder:
    """Answers the containers of `policies` on one UDP and one TCP socket of the same port.
    `address`: the node's address on the egress bridge (both where it listens and what an
    intercepted name resolves to); `upstreams`: the resolvers asked for everything else."""

    def __init__(
        self,
        policies: OutboundPolicies,
        address: str,
        upstreams: Sequence[str],
        *,
        most_in_flight: int = MOST_IN_FLIGHT,
        tcp_idle_s: float = TCP_IDLE_S,
    ) -> None:
        self.policies = policies
        self.address = address
        self.upstreams = tuple(upstreams)
        self.most_in_flight = most_in_flight
        self.tcp_idle_s = tcp_idle_s
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # UDP answers and TCP connections
        self._in_flight: Counter[str] = Counter()  # by container address

    async def listen(self, port: int = 0) -> int:
        """Listen for UDP and TCP on one port (0: a free one); the port."""
        loop = asyncio.get_running_loop()
        for _ in range(20):  # a free UDP port may be taken for TCP: try another
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), local_addr=(self.address, port)
            )
            udp = transport
            bound: int = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._stream, self.address, bound)
            except OSError:
                udp.close()
                if port:
                    raise
                continue
            self._udp = udp
            return bound
        raise OSError(f"no port on {self.address} is free for both UDP and TCP")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()

    async def answer(self, query: bytes, peer: str, *, tcp: bool) -> bytes | None:
        """The answer to `query` from the container at `peer`; None: no answer (not ours)."""
        occupant = self.policies.occupant(peer)
        if occupant is None:
            return None
        asked = question(query)
        if asked is None:
            return None
        if self.policies.policy_of(occupant).intercepts(asked.name):
            metrics.EGRESS_DNS.labels("intercepted").inc()
            return intercepted_answer(query, asked, self.address)
        for upstream in self.upstreams:
            try:
                async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                    reply = await (_ask_tcp if tcp else _ask_udp)(upstream, query)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.info("DNS: resolver %s did not answer: %s", upstream, exc)
                continue
            metrics.EGRESS_DNS.labels("forwarded").inc()
            return reply
        metrics.EGRESS_DNS.labels("failed").inc()
        return failure(query, asked)

    def in_flight(self, peer: str) -> int:
        """Questions (UDP ones being answered, TCP connections open) of the container at `peer`."""
        return self._in_flight[peer]

    def admit(self, peer: str) -> bool:
        """Whether `peer` may have one more question in flight (then counted until `release`);
        when not, the drop is counted."""
        if self._in_flight[peer] >= self.most_in_flight:
            metrics.EGRESS_DNS.labels("dropped").inc()
            return False
        self._in_flight[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self._in_flight[peer] -= 1
        if self._in_flight[peer] <= 0:
            del self._in_flight[peer]

    def spawn(self, work: Coroutine[Any, Any, None], peer: str) -> None:
        """Answer in a task of its own, counted as one of `peer`'s in flight (admitted)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self.release(peer))

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        if not self.admit(peer):
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                async with asyncio.timeout(self.tcp_idle_s):  # the next question, whole
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    query = await reader.readexactly(size)
                reply = await self.answer(query, peer, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                async with asyncio.timeout(self.tcp_idle_s):  # a container that reads no reply
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            self.release(peer)
            writer.close()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.responder.admit(addr[0]):
            self.responder.spawn(self._reply(data, addr), addr[0])

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.responder.answer(data, addr[0], tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _address(upstream: str) -> tuple[str, int]:
    """A resolver's address: "10.0.0.2" (port 53) or "127.0.0.1:5300"."""
    return split_hostport(upstream, "resolver") if ":" in upstream else (upstream, 53)


async def _ask_udp(upstream: str, query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, _address(upstream))
        await loop.sock_sendall(sock, query)
        while True:
            reply = await loop.sock_recv(sock, 65535)
            if reply[:2] == query[:2]:  # its id: not a stray datagram
                return reply


async def _ask_tcp(upstream: str, query: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*_address(upstream))
    try:
        writer.write(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        return await reader.readexactly(size)
    finally:
        writer.close()


__all__ = [
    "MOST_IN_FLIGHT",
    "TCP_IDLE_S",
    "TTL_S",
    "DnsResponder",
    "Question",
    "failure",
    "host_resolvers",
    "intercepted_answer",
    "question",
]
