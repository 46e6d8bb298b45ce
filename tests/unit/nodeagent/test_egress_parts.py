"""The pure parts of outbound control: the rules as text, what a connection's first bytes are,
DNS questions and intercepted answers, and the table of containers and their policies.
tests/integration/test_egress.py runs the real thing."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest

from nodeagent.egress.dns import failure, intercepted_answer, question
from nodeagent.egress.policies import Occupant, OutboundPolicies, egress_occupants, lets_out
from nodeagent.egress.rules import (
    EgressPorts,
    chain_for,
    chain_rules,
    redirect,
    removal_filter,
    removal_nat,
    sync_filter,
    sync_nat,
)
from nodeagent.egress.sniff import Kind, sniff
from nodeagent.firewall import parse_listing
from nodeagent.instances import InstanceSnapshot, Upstream
from portside.errors import FailedPrecondition
from portside.outbound import Verdict
from portside.spec import ContainerClass, OutboundPolicy
from portside.states import InstanceState

PORTS = EgressPorts(proxy=15001, dns=15053)
CHAIN = chain_for("node-1")
BRIDGE = "br-9e572d514125"

NAT = f"""-P PREROUTING ACCEPT
-N DOCKER
-N {CHAIN}
-A PREROUTING -s 192.0.2.2/32 -i {BRIDGE} -j {CHAIN}
-A PREROUTING -s 192.0.2.3/32 -i {BRIDGE} -j PORTSIDE-EG-otheragent00
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
""" + "".join(f"-A {CHAIN} {rule}\n" for rule in chain_rules(PORTS))
FILTER = f"""-P FORWARD DROP
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -i {BRIDGE} -j DROP
-A DOCKER-USER -j RETURN
"""


def test_the_chain_redirects_dns_to_the_responder_and_all_other_tcp_to_the_proxy() -> None:
    assert chain_rules(PORTS) == (
        "-p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "-p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-p tcp -j REDIRECT --to-ports 15001",
    )
    assert len(CHAIN) <= 28 and CHAIN == chain_for("node-1") != chain_for("node-2")
    assert redirect("192.0.2.4", BRIDGE, CHAIN) == f"-s 192.0.2.4/32 -i {BRIDGE} -j {CHAIN}"
    with pytest.raises(ValueError):
        redirect("192.0.2.4/32 -j ACCEPT", BRIDGE, CHAIN)


def test_a_fresh_host_gets_the_chain_one_jump_per_container_and_the_drop() -> None:
    nat = sync_nat(parse_listing("-P PREROUTING ACCEPT\n"), CHAIN, PORTS, BRIDGE, ["192.0.2.2"])
    assert nat == [
        f":{CHAIN} - [0:0]",
        *(f"-A {CHAIN} {rule}" for rule in chain_rules(PORTS)),
        f"-I PREROUTING 1 -s 192.0.2.2/32 -i {BRIDGE} -j {CHAIN}",
    ]
    fresh = parse_listing("-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n")
    assert sync_filter(fresh, BRIDGE) == [f"-I DOCKER-USER 1 -i {BRIDGE} -j DROP"]
    with pytest.raises(FailedPrecondition, match="DOCKER-USER"):
        sync_filter(parse_listing("-P FORWARD DROP\n"), BRIDGE)


def test_a_sync_changes_only_this_agents_jumps_and_new_ports_refill_the_chain() -> None:
    nat = parse_listing(NAT)
    assert sync_nat(nat, CHAIN, PORTS, BRIDGE, ["192.0.2.2"]) == []
    assert sync_filter(parse_listing(FILTER), BRIDGE) == []
    assert sync_nat(nat, CHAIN, PORTS, BRIDGE, ["192.0.2.5"]) == [
        f"-D PREROUTING -s 192.0.2.2/32 -i {BRIDGE} -j {CHAIN}",
        f"-I PREROUTING 1 -s 192.0.2.5/32 -i {BRIDGE} -j {CHAIN}",
    ]  # the other agent's 192.0.2.3 is left alone
    moved = sync_nat(nat, CHAIN, EgressPorts(proxy=16001, dns=16053), BRIDGE, ["192.0.2.2"])
    assert moved[0] == f":{CHAIN} - [0:0]" and moved[-1].endswith("--to-ports 16001")


def test_removal_takes_the_chain_its_jumps_and_the_drop() -> None:
    assert removal_nat(parse_listing(NAT), CHAIN) == [
        f"-D PREROUTING -s 192.0.2.2/32 -i {BRIDGE} -j {CHAIN}",
        f"-F {CHAIN}",
        f"-X {CHAIN}",
    ]
    assert removal_filter(parse_listing(FILTER), BRIDGE) == [f"-D DOCKER-USER -i {BRIDGE} -j DROP"]
    assert removal_nat(parse_listing("-P PREROUTING ACCEPT\n"), CHAIN) == []


def _client_hello(server_name: str | None) -> bytes:
    """A real ClientHello, from an in-memory TLS client."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    ("data", "kind", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Kind.HTTP, ""),
        (b"POST /x HTTP/1.0\r\n", Kind.HTTP, ""),
        (b"PO", Kind.MORE, ""),
        (b"", Kind.MORE, ""),
        (b"SSH-2.0-OpenSSH_9.2\r\n", Kind.OTHER, ""),
        (b"CONNECT a:443 HTTP/1.1\r\n", Kind.OTHER, ""),
        (b"\x16\x03", Kind.MORE, ""),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", Kind.OTHER, ""),  # not a ClientHello
    ],
)
def test_first_bytes(data: bytes, kind: Kind, host: str) -> None:
    found = sniff(data)
    assert (found.kind, found.host) == (kind, host)


def test_a_client_hello_gives_its_server_name_once_it_is_whole() -> None:
    hello = _client_hello("API.Example.com")
    assert sniff(hello).kind is Kind.TLS and sniff(hello).host == "api.example.com"
    assert sniff(hello[: len(hello) // 2]).kind is Kind.MORE
    nameless = _client_hello(None)
    assert sniff(nameless).kind is Kind.TLS and sniff(nameless).host == ""


def _query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def test_an_intercepted_name_is_answered_with_the_nodes_address() -> None:
    query = _query("Billing.Internal")
    asked = question(query)
    assert asked is not None and (asked.name, asked.qtype) == ("billing.internal", 1)
    answer = intercepted_answer(query, asked, "172.30.0.1")
    ident, flags, qd, an, _, _ = struct.unpack_from("!HHHHHH", answer)
    assert (ident, qd, an) == (0x1234, 1, 1) and flags & 0x8000 and flags & 0x0F == 0
    assert answer.endswith(socket.inet_aton("172.30.0.1"))
    aaaa = _query("billing.internal", qtype=28)
    asked6 = question(aaaa)
    assert asked6 is not None
    assert struct.unpack_from("!HHHHHH", intercepted_answer(aaaa, asked6, "172.30.0.1"))[3] == 0
    assert struct.unpack_from("!HH", failure(query, asked))[1] & 0x0F == 2  # SERVFAIL
    assert question(answer) is None and question(b"\x00\x01") is None


def test_what_lets_a_class_out() -> None:
    assert not lets_out(OutboundPolicy())
    assert not lets_out(OutboundPolicy(denied_hosts=("*.example.com",)))
    assert lets_out(OutboundPolicy(enable_internet=True))
    assert lets_out(OutboundPolicy(allowed_hosts=("203.0.113.0/24",)))
    assert lets_out(OutboundPolicy(outbound_by_host={"billing.internal": "bill"}))


def test_the_table_follows_containers_and_set_policy_overrides_the_class() -> None:
    open_ = ContainerClass("open", "img", enable_internet=True)
    closed = ContainerClass("closed", "img")
    classes = {c.name: c for c in (open_, closed)}
    snaps = [
        InstanceSnapshot(
            "1", "a", "open", InstanceState.RUNNING, "c1", Upstream("192.0.2.2", 8080), 0, 0.0, None
        ),
        InstanceSnapshot(
            "2",
            "b",
            "closed",
            InstanceState.RUNNING,
            "c2",
            Upstream("198.51.100.2", 8080),
            0,
            0.0,
            None,
        ),
        InstanceSnapshot("3", "c", "open", InstanceState.STOPPED, None, None, 0, 0.0, 0),
    ]
    table = OutboundPolicies(classes.get)
    assert table.replace(egress_occupants(snaps, classes.get))
    assert table.addresses == {"192.0.2.2"} and not table.replace(
        egress_occupants(snaps, classes.get)
    )
    occupant = table.occupant("192.0.2.2")
    assert occupant == Occupant("open", "a", "c1")
    assert table.policy_of(occupant).decide("x.test", None, http=True).verdict is Verdict.ALLOW
    table.set_policy("open", "a", OutboundPolicy(enable_internet=True, denied_hosts=("x.test",)))
    assert table.policy_of(occupant).decide("x.test", None, http=True).verdict is Verdict.DENY
    table.set_policy("open", "a", None)
    assert table.policy_of(occupant).decide("x.test", None, http=True).verdict is Verdict.ALLOW
    classes.pop("open")  # undeployed: reaches nothing
    assert table.policy_of(occupant).decide("x.test", None, http=True).verdict is Verdict.DENY
    with pytest.raises(ValueError):
        table.set_policy("open", "a", OutboundPolicy(allowed_hosts=("not a pattern",)))
