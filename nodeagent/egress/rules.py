"""The packet-filter rules that force a container's traffic through its agent: built here as pure
text (as nodeagent/firewall.py does for host isolation); `EgressFirewall` runs iptables.

Several agents may share one host and its egress network, each with its own proxy, so each
agent redirects only its own containers, by their addresses, into a nat chain of its own:

    *nat  (one chain per agent, named from its node id)
    -A PORTSIDE-EG-<hash> -p udp -m udp --dport 53 -j REDIRECT --to-ports <dns port>
    -A PORTSIDE-EG-<hash> -p tcp -m tcp --dport 53 -j REDIRECT --to-ports <dns port>
    -A PORTSIDE-EG-<hash> -p tcp -j REDIRECT --to-ports <proxy port>
    -I PREROUTING 1 -s <container ip>/32 -i <egress bridge> -j PORTSIDE-EG-<hash>   (each)
    *filter  (shared by the agents of the host)
    -I DOCKER-USER 1 -i <egress bridge> -j DROP

An agent holds an flock on a file named after its chain while it runs (`owner_lock_path`). An
agent that was killed cannot take its chain away; the next agent on the host to change its
rules finds the chain's file unlocked and takes the chain and its jumps away for it.

Redirected packets are delivered to the host, where PORTSIDE-HOST lets connections in that nat
redirected (`--ctstate DNAT`; nothing else on Portside's bridges is DNATed to the host). What is
not redirected — UDP other than DNS, ICMP, other protocols, and anything from a container whose
rule is not (yet) in place — would be forwarded, and DOCKER-USER drops it. IPv4 only: Docker
turns IPv6 off inside containers of a network without it, and Portside's networks have none.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nodeagent.firewall import (
    IPV4,
    LOCK_PATH,
    XTABLES_WAIT_S,
    CommandRunner,
    FileLock,
    HostFirewall,
    Listing,
    parse_listing,
    run_command,
)
from nodeagent.runtime.docker_engine import NetworkBridge
from portside.errors import FailedPrecondition

log = logging.getLogger(__name__)

CHAIN_PREFIX = "PORTSIDE-EG-"
FORWARD_CHAIN = "DOCKER-USER"  # Docker's own chain for user rules, first in FORWARD
DNS_PORT = 53


def chain_for(node_id: str) -> str:
    """The nat chain of one agent: stable across its restarts, within iptables' 28 characters."""
    return CHAIN_PREFIX + hashlib.sha256(node_id.encode()).hexdigest()[:12]


def owner_lock_path(chain: str, directory: str | None = None) -> str:
    """The file whose flock says that the agent of `chain` is running."""
    return os.path.join(directory or tempfile.gettempdir(), f"portside-{chain.lower()}.lock")


def agent_chains(listing: Listing) -> list[str]:
    return sorted(c for c in listing.chains if c.startswith(CHAIN_PREFIX))


@dataclass(frozen=True)
class EgressPorts:
    """Where the agent listens on the egress bridge's gateway address."""

    proxy: int  # TCP: the egress proxy
    dns: int  # UDP and TCP: the DNS responder


def chain_rules(ports: EgressPorts) -> tuple[str, ...]:
    """The agent chain's rules, written exactly as `iptables -t nat -S` prints them."""
    return (
        f"-p udp -m udp --dport {DNS_PORT} -j REDIRECT --to-ports {ports.dns}",
        f"-p tcp -m tcp --dport {DNS_PORT} -j REDIRECT --to-ports {ports.dns}",
        f"-p tcp -j REDIRECT --to-ports {ports.proxy}",
    )


def redirect(ip: str, interface: str, chain: str) -> str:
    """The PREROUTING rule that sends one container's packets to its agent's chain."""
    address = ipaddress.IPv4Address(ip)  # raises ValueError for anything else
    return f"-s {address}/32 -i {interface} -j {chain}"


def drop_forwarded(interface: str) -> str:
    return f"-i {interface} -j DROP"


def sync_nat(
    listing: Listing,
    chain: str,
    ports: EgressPorts,
    interface: str,
    addresses: Iterable[str],
) -> list[str]:
    """The nat-table lines that make `chain` hold `ports`' rules and PREROUTING send exactly
    `addresses` (this agent's containers) to it; empty when all is in place."""
    lines = []
    wanted = chain_rules(ports)
    if chain not in listing.chains or listing.of(chain) != wanted:
        lines.append(f":{chain} - [0:0]")
        lines += [f"-A {chain} {rule}" for rule in wanted]
    jumps = {redirect(ip, interface, chain) for ip in addresses}
    present = listing.of("PREROUTING")
    lines += [
        f"-D PREROUTING {rule}" for rule in present if _jumps_to(rule, chain) and rule not in jumps
    ]
    lines += [f"-I PREROUTING 1 {rule}" for rule in sorted(jumps) if rule not in present]
    return lines


def sync_filter(listing: Listing, interface: str) -> list[str]:
    if FORWARD_CHAIN not in listing.chains:
        raise FailedPrecondition(
            f"iptables has no {FORWARD_CHAIN} chain: is the Docker engine running on this host?"
        )
    rule = drop_forwarded(interface)
    return [] if rule in listing.of(FORWARD_CHAIN) else [f"-I {FORWARD_CHAIN} 1 {rule}"]


def removal_nat(listing: Listing, chain: str) -> list[str]:
    """Lines that take the agent's chain and every jump to it away."""
    lines = [f"-D PREROUTING {rule}" for rule in listing.of("PREROUTING") if _jumps_to(rule, chain)]
    if chain in listing.chains:
        lines += [f"-F {chain}", f"-X {chain}"]
    return lines


def removal_filter(listing: Listing, interface: str) -> list[str]:
    rule = drop_forwarded(interface)
    return [f"-D {FORWARD_CHAIN} {r}" for r in listing.of(FORWARD_CHAIN) if r == rule]


def problems(nat: Listing, filtered: Listing, chain: str, interface: str) -> list[str]:
    """What of the bridge-wide part is missing, one line each (the doctor's and tests' check)."""
    found = []
    if chain not in nat.chains:
        found.append(f"iptables -t nat: no chain {chain}")
    if drop_forwarded(interface) not in filtered.of(FORWARD_CHAIN):
        found.append(f"iptables: {FORWARD_CHAIN} does not drop what {interface} forwards")
    return found


def script(table: str, lines: Sequence[str]) -> str:
    return f"*{table}\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"


def _jumps_to(rule: str, chain: str) -> bool:
    return rule.split()[-2:] == ["-j", chain]


class EgressFirewall(HostFirewall):
    """Applies the rules of one agent (`chain`) for one egress bridge, each change one
    `iptables-restore --noflush` per table under the host's firewall lock."""

    def __init__(
        self, chain: str, run: CommandRunner = run_command, lock_path: str = LOCK_PATH
    ) -> None:
        super().__init__(run, lock_path)
        self.chain = chain
        self._owner = FileLock(owner_lock_path(chain, os.path.dirname(lock_path)))
        self._owned = False

    async def table(self, name: str) -> Listing:
        argv = [IPV4.iptables, "-w", str(XTABLES_WAIT_S), "-t", name, "-S"]
        return parse_listing(await self._checked(argv))

    async def sync(
        self, bridge: NetworkBridge, ports: EgressPorts, addresses: Iterable[str]
    ) -> None:
        """Make the rules say: these containers' traffic goes to these ports, the rest of what
        the bridge forwards is dropped."""
        if bridge.ipv6:
            raise FailedPrecondition(
                f"network {bridge.network} has IPv6 enabled; Portside's egress control covers "
                "IPv4 only: remove the network so that the agent creates it again"
            )
        addresses = list(addresses)
        async with self._locked():
            self._claim()
            await self._apply("filter", sync_filter(await self.table("filter"), bridge.interface))
            nat = await self.table("nat")
            lines = [line for c in self._abandoned(nat) for line in removal_nat(nat, c)]
            lines += sync_nat(nat, self.chain, ports, bridge.interface, addresses)
            await self._apply("nat", lines)

    def _claim(self) -> None:
        """Hold this chain's owner lock from the first change on. While an earlier process of
        this agent still holds it (a stopped one not yet gone), try again at the next change:
        the chain is not taken for abandoned while either holds it."""
        if not self._owned:
            self._owned = self._owner.try_acquire()

    def _abandoned(self, nat: Listing) -> list[str]:
        """Other agents' chains whose agent is gone (their owner lock is free)."""
        found = []
        for chain in agent_chains(nat):
            if chain == self.chain:
                continue
            owner = FileLock(owner_lock_path(chain, os.path.dirname(self._lock_path)))
            if owner.try_acquire():
                os.unlink(owner.path)  # under the host lock, where a claim is made too
                owner.release()
                found.append(chain)
        if found:
            log.info("outbound control: removing the rules of %d stopped agents", len(found))
        return found

    async def check(self, bridges: Sequence[NetworkBridge]) -> list[str]:
        nat, filtered = await self.table("nat"), await self.table("filter")
        return [line for b in bridges for line in problems(nat, filtered, self.chain, b.interface)]

    async def leave(self) -> None:
        """Take this agent's chain and jumps away, keep the bridge's drop: its containers'
        traffic is dropped until an agent redirects it again."""
        async with self._locked():
            await self._apply("nat", removal_nat(await self.table("nat"), self.chain))
        self._release()

    def _release(self) -> None:
        if self._owned:
            self._owner.release()
            self._owned = False

    async def remove(self, bridges: Sequence[NetworkBridge]) -> None:
        """Everything: this agent's rules and the bridges' drops (tests, uninstalling)."""
        async with self._locked():
            filtered = await self.table("filter")
            for bridge in bridges:
                await self._apply("filter", removal_filter(filtered, bridge.interface))
            await self._apply("nat", removal_nat(await self.table("nat"), self.chain))
        self._release()

    async def _apply(self, table: str, lines: Sequence[str]) -> None:
        if lines:
            argv = [IPV4.restore, "-w", str(XTABLES_WAIT_S), "--noflush"]
            await self._checked(argv, script(table, lines))


__all__ = [
    "CHAIN_PREFIX",
    "FORWARD_CHAIN",
    "EgressFirewall",
    "EgressPorts",
    "chain_for",
    "chain_rules",
    "drop_forwarded",
    "problems",
    "redirect",
    "removal_filter",
    "removal_nat",
    "sync_filter",
    "sync_nat",
]
