"""Host isolation: packet-filter rules that keep containers on Portside's networks from reaching
anything on their own host. The rules are built here as pure text; `HostFirewall` runs iptables.

Docker filters only what it forwards. A packet from a container to any of the host's own
addresses (its network's gateway, or any other) is delivered to the host and meets INPUT, so
every Portside bridge gets one rule at the top of INPUT, all sharing one chain that lets only
replies to the host's own connections through:

    -I INPUT 1 -i br-<12 hex of the network id> -j PORTSIDE-HOST
    -A PORTSIDE-HOST -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
    -A PORTSIDE-HOST -m conntrack --ctstate DNAT -j RETURN
    -A PORTSIDE-HOST -p tcp -j REJECT --reject-with tcp-reset
    -A PORTSIDE-HOST -j REJECT --reject-with icmp-port-unreachable

The DNAT rule lets in what a nat rule redirected to the host: only the egress rules
(nodeagent/egress/rules.py) do, sending a container's connections and DNS to its agent's egress
proxy and DNS responder; nothing else on Portside's bridges is DNATed to a local address.

IPv6 (ip6tables, the same chain plus neighbour discovery) only for networks with IPv6 enabled:
Docker turns IPv6 off inside containers of networks without it. Each change is one
`iptables-restore --noflush` transaction computed from the current rules under a host-wide lock,
so a restart or a second agent on the host adds nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from nodeagent.runtime.docker_engine import NetworkBridge
from portside.errors import FailedPrecondition

log = logging.getLogger(__name__)

CHAIN = "PORTSIDE-HOST"
# Seconds iptables waits for the xtables lock, and a command for iptables; agents on one host
# take turns with LOCK_PATH for the seconds of LOCK_WAIT_S.
XTABLES_WAIT_S = 10
COMMAND_TIMEOUT_S = 30.0
LOCK_WAIT_S = 30.0
LOCK_PATH = os.path.join(tempfile.gettempdir(), "portside-firewall.lock")

_INTERFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")  # Linux: at most 15 characters
_REPLIES = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
_TCP_RESET = "-p tcp -j REJECT --reject-with tcp-reset"
_REDIRECTED = "-m conntrack --ctstate DNAT -j RETURN"  # to the egress proxy and DNS responder


@dataclass(frozen=True)
class Family:
    """One address family's tools and the rules of CHAIN, written exactly as `-S` prints them
    (so that a listing compares equal to what was installed)."""

    name: str
    iptables: str
    restore: str
    chain_rules: tuple[str, ...]


IPV4 = Family(
    "IPv4",
    "iptables",
    "iptables-restore",
    (_REPLIES, _REDIRECTED, _TCP_RESET, "-j REJECT --reject-with icmp-port-unreachable"),
)
IPV6 = Family(
    "IPv6",
    "ip6tables",
    "ip6tables-restore",
    (
        _REPLIES,
        # Neighbour solicitations and advertisements are not tracked by conntrack, and the
        # host's own IPv6 connections to containers need the containers' answers.
        "-p ipv6-icmp -m icmp6 --icmpv6-type 135 -j RETURN",
        "-p ipv6-icmp -m icmp6 --icmpv6-type 136 -j RETURN",
        _TCP_RESET,
        "-j REJECT --reject-with icmp6-port-unreachable",
    ),
)


@dataclass(frozen=True)
class Listing:
    """The filter table as `iptables -S` prints it: chain names, and each chain's rules
    without their `-A CHAIN ` prefix."""

    chains: frozenset[str] = frozenset()
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def of(self, chain: str) -> tuple[str, ...]:
        return self.rules.get(chain, ())


def parse_listing(text: str) -> Listing:
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("-P", "-N"):
            chains.add(rest.split(" ", 1)[0])
        elif word == "-A":
            chain, _, rule = rest.partition(" ")
            rules.setdefault(chain, []).append(rule)
    return Listing(frozenset(chains), {c: tuple(r) for c, r in rules.items()})


def jump(interface: str) -> str:
    """The INPUT rule that sends what arrives from `interface` to CHAIN."""
    if not _INTERFACE.fullmatch(interface):
        raise FailedPrecondition(f"cannot filter the bridge interface {interface!r}")
    return f"-i {interface} -j {CHAIN}"


def families(bridges: Iterable[NetworkBridge]) -> list[tuple[Family, tuple[str, ...]]]:
    """Which bridge interfaces each family filters: all for IPv4, those with IPv6 for IPv6."""
    bridges = list(bridges)
    plan = [
        (IPV4, tuple(dict.fromkeys(b.interface for b in bridges))),
        (IPV6, tuple(dict.fromkeys(b.interface for b in bridges if b.ipv6))),
    ]
    return [(family, interfaces) for family, interfaces in plan if interfaces]


def problems(listing: Listing, family: Family, interfaces: Iterable[str]) -> list[str]:
    """What is not in place for `interfaces`, one line each; empty when all is."""
    found = []
    if CHAIN not in listing.chains:
        found.append(f"{family.iptables}: no chain {CHAIN}")
    elif listing.of(CHAIN) != family.chain_rules:
        found.append(f"{family.iptables}: chain {CHAIN} holds other rules than Portside's")
    for interface in interfaces:
        if jump(interface) not in listing.of("INPUT"):
            found.append(f"{family.iptables}: INPUT does not send {interface}'s packets to {CHAIN}")
    return found


def install_script(listing: Listing, family: Family, interfaces: Iterable[str]) -> str | None:
    """The `iptables-restore --noflush` input that puts the rules in place, None if they are.
    Declaring CHAIN empties it (or creates it) in the same transaction that refills it."""
    lines = []
    if CHAIN not in listing.chains or listing.of(CHAIN) != family.chain_rules:
        lines.append(f":{CHAIN} - [0:0]")
        lines += [f"-A {CHAIN} {rule}" for rule in family.chain_rules]
    lines += [
        f"-I INPUT 1 {jump(i)}"
        for i in dict.fromkeys(interfaces)
        if jump(i) not in listing.of("INPUT")
    ]
    return _script(lines)


def removal_script(listing: Listing, family: Family, interfaces: Iterable[str]) -> str | None:
    """The input that takes `interfaces`' jumps out of INPUT (every copy), and CHAIN too once no
    rule jumps to it any more; None if there is nothing to remove."""
    leaving = {jump(i) for i in interfaces}
    lines = [f"-D INPUT {rule}" for rule in listing.of("INPUT") if rule in leaving]
    still_used = any(
        rule.split()[-2:] == ["-j", CHAIN] and not (chain == "INPUT" and rule in leaving)
        for chain, rules in listing.rules.items()
        for rule in rules
    )
    if CHAIN in listing.chains and not still_used:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    return _script(lines)


def _script(lines: Sequence[str]) -> str | None:
    return "*filter\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n" if lines else None


# -- running the commands -------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


CommandRunner = Callable[[Sequence[str], str | None], Awaitable[Completed]]


async def run_command(argv: Sequence[str], stdin: str | None = None) -> Completed:
    """Run one command to its end, within COMMAND_TIMEOUT_S. A command that cannot run at all
    raises FailedPrecondition; one that fails returns its code and output."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"{argv[0]} is not installed") from exc
    except PermissionError as exc:
        raise FailedPrecondition(f"{argv[0]} cannot be run: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(None if stdin is None else stdin.encode()), COMMAND_TIMEOUT_S
        )
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise FailedPrecondition(
            f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT_S:g}s"
        ) from exc
    code = proc.returncode or 0
    return Completed(code, out.decode(errors="replace"), err.decode(errors="replace"))


class FileLock:
    """An flock on a file: the host's firewall lock, which every agent on the host takes around
    read-then-change, so two agents starting at once cannot both find a rule missing and both
    add it; and an agent's claim on its own egress chain (nodeagent/egress/rules.py). The
    kernel lets go of it when its process ends, however it ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def try_acquire(self) -> bool:
        if self._file is None:
            self._file = open(self.path, "a")  # held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class HostFirewall:
    """Installs, checks and removes the rules for a set of bridges. `run` is the one place a
    command runs (a fake in unit tests); every failure is a FailedPrecondition whose message
    says which command failed and what it said."""

    def __init__(self, run: CommandRunner = run_command, lock_path: str = LOCK_PATH) -> None:
        self._run = run
        self._lock_path = lock_path

    async def enforce(self, bridges: Sequence[NetworkBridge]) -> None:
        """Install, then check that everything is in place: the agent's guard on its networks."""
        await self.install(bridges)
        missing = await self.check(bridges)
        if missing:
            raise FailedPrecondition("; ".join(missing))
        log.info(
            "host isolation: containers on %s reach nothing on this host",
            ", ".join(f"{b.network} ({b.interface})" for b in bridges),
        )

    async def install(self, bridges: Sequence[NetworkBridge]) -> None:
        await self._change(bridges, install_script)

    async def check(self, bridges: Sequence[NetworkBridge]) -> list[str]:
        """What is missing, one line each; empty when the rules are in place."""
        found = []
        for family, interfaces in families(bridges):
            found += problems(await self.listing(family), family, interfaces)
        return found

    async def remove(self, bridges: Sequence[NetworkBridge]) -> None:
        await self._change(bridges, removal_script)

    async def version(self, family: Family = IPV4) -> str:
        return (await self._checked([family.iptables, "--version"])).strip()

    async def listing(self, family: Family) -> Listing:
        return parse_listing(
            await self._checked([family.iptables, "-w", str(XTABLES_WAIT_S), "-S"])
        )

    async def _change(
        self,
        bridges: Sequence[NetworkBridge],
        script_for: Callable[[Listing, Family, Sequence[str]], str | None],
    ) -> None:
        """Read the rules, build the change, apply it: under the host's lock, per family."""
        async with self._locked():
            for family, interfaces in families(bridges):
                script = script_for(await self.listing(family), family, interfaces)
                if script is not None:
                    restore = [family.restore, "-w", str(XTABLES_WAIT_S), "--noflush"]
                    await self._checked(restore, script)

    async def _checked(self, argv: Sequence[str], stdin: str | None = None) -> str:
        done = await self._run(argv, stdin)
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise FailedPrecondition(f"{' '.join(argv)} failed ({done.returncode}): {said}")
        return done.stdout

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        lock = FileLock(self._lock_path)
        deadline = asyncio.get_running_loop().time() + LOCK_WAIT_S
        try:
            while not lock.try_acquire():
                if asyncio.get_running_loop().time() > deadline:
                    raise FailedPrecondition(
                        f"{self._lock_path} stayed locked for {LOCK_WAIT_S:g}s"
                    )
                await asyncio.sleep(0.05)
            yield
        finally:
            lock.release()


class GuardedRuntime(Protocol):
    async def guard_networks(
        self, guard: Callable[[list[NetworkBridge]], Awaitable[None]]
    ) -> None: ...


Guard = Callable[[list[NetworkBridge]], Awaitable[None]]


async def _unguarded(bridges: list[NetworkBridge]) -> None:
    pass


async def isolate_host(
    runtime: GuardedRuntime,
    *,
    allow_host_access: bool,
    firewall: HostFirewall | None = None,
    egress: Guard | None = None,
) -> None:
    """At the agent's start: put the rules in place for Portside's networks and check them, now
    and whenever the runtime makes the networks anew, or refuse to start with one line.
    `egress` (the outbound control's guard, nodeagent/egress) runs after them."""
    if allow_host_access:
        log.warning(
            "--allow-host-access: containers on Portside's networks can reach every service on "
            "this host (this agent, a control plane, etcd ...); for development only"
        )
        if egress is not None:
            try:
                await runtime.guard_networks(egress)
            except FailedPrecondition as exc:
                log.warning("--allow-host-access: and outbound control is off: %s", exc)
                await runtime.guard_networks(_unguarded)
        return
    host = (firewall or HostFirewall()).enforce

    async def guard(bridges: list[NetworkBridge]) -> None:
        await host(bridges)
        if egress is not None:
            await egress(bridges)

    try:
        await runtime.guard_networks(guard)
    except FailedPrecondition as exc:
        raise SystemExit(
            f"portside agent: cannot keep containers away from this host: {exc}; run the agent "
            "as root with iptables (apt-get install iptables), or pass --allow-host-access "
            "(development only)"
        ) from exc


__all__ = [
    "CHAIN",
    "IPV4",
    "IPV6",
    "CommandRunner",
    "Completed",
    "Family",
    "HostFirewall",
    "Listing",
    "families",
    "install_script",
    "isolate_host",
    "jump",
    "parse_listing",
    "problems",
    "removal_script",
    "run_command",
]
