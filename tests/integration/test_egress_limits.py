"""The bounds that keep a container from making its node's agent hold unbounded tasks or file
descriptors through egress (issue 14), on loopback sockets: the DNS responder's cap on one
container's questions in flight (UDP and TCP alike; beyond it dropped, counted), its idle
timeout on TCP connections, and the idle timeout of an allowed non-HTTP pipe, which bytes
either way keep open."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from nodeagent.egress.dns import DnsResponder
from nodeagent.egress.pipe import pipe
from nodeagent.egress.policies import Occupant, OutboundPolicies
from tests.support import eventually

pytestmark = pytest.mark.integration

CONTAINER = "127.0.0.1"  # the test stands in for a container at this address


def query(ident: int) -> bytes:
    """An A question about example.test."""
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    return header + b"\x07example\x04test\x00" + struct.pack("!HH", 1, 1)


def dropped() -> float:
    return (
        REGISTRY.get_sample_value("portside_agent_egress_dns_answers_total", {"how": "dropped"})
        or 0.0
    )


@pytest.fixture
async def silent_resolver() -> AsyncIterator[str]:
    """An upstream resolver that never answers: every forwarded question waits its timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def responder(upstream: str, most_in_flight: int, tcp_idle_s: float) -> DnsResponder:
    policies = OutboundPolicies(lambda name: None)
    policies.replace({CONTAINER: Occupant("Box", "one", "c0ffee")})
    return DnsResponder(
        policies, "127.0.0.1", [upstream], most_in_flight=most_in_flight, tcp_idle_s=tcp_idle_s
    )


async def test_a_container_has_at_most_its_share_of_questions_in_flight(
    silent_resolver: str,
) -> None:
    dns = responder(silent_resolver, most_in_flight=3, tcp_idle_s=30)
    port = await dns.listen()
    before = dropped()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as asker:
            for ident in range(5):
                asker.sendto(query(ident), ("127.0.0.1", port))

            async def two_dropped() -> bool:
                assert dropped() - before == 2
                return True

            await eventually(two_dropped, within=5, every=0.02, what="two questions dropped")
            assert dns.in_flight(CONTAINER) == 3
            # A TCP connection is one more in flight: refused while the three wait.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert dropped() - before == 3
    finally:
        await dns.close()


async def test_a_silent_dns_tcp_connection_is_closed(silent_resolver: str) -> None:
    dns = responder(silent_resolver, most_in_flight=3, tcp_idle_s=0.3)
    port = await dns.listen()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: dns.in_flight(CONTAINER) == 1, within=5, what="its connection")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the responder
        writer.close()
        assert dns.in_flight(CONTAINER) == 0
    finally:
        await dns.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_a_pipe_silent_both_ways_is_cut_and_bytes_keep_it_open() -> None:
    outside = await asyncio.start_server(echo, "127.0.0.1", 0)
    outside_port = outside.sockets[0].getsockname()[1]
    proxy_side = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    proxy_side.bind(("127.0.0.1", 0))
    proxy_side.listen(1)
    proxy_side.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection(*proxy_side.getsockname())
        accepted, _ = await loop.sock_accept(proxy_side)
        piped = asyncio.create_task(pipe(accepted, "127.0.0.1", outside_port, 5, idle_s=1.0))
        # Bytes every 0.1 s for twice the idle time: the pipe stays.
        for n in range(20):
            writer.write(b"%d;" % n)
            assert await asyncio.wait_for(reader.readuntil(b";"), 5) == b"%d;" % n
            await asyncio.sleep(0.1)
        assert not piped.done()
        # Then silence: cut, and pipe() returns.
        await asyncio.wait_for(piped, 10)
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            rest = b""
        assert rest == b""  # the container's side ended too
        writer.close()
    finally:
        proxy_side.close()
        outside.close()
