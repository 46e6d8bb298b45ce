"""Outbound decisions (issue 14): what a container's connection to a host may do, from its
instance's OutboundPolicy and whether the gateway module has a catch-all `outbound` handler.
Pure logic, shared by config validation and the node's egress proxy (docs/security.md).

The order, for a connection to `host` (a name, when the request says one) at `ip`:
 1. denied_hosts matches: blocked (403 `outbound-denied` for HTTP; other traffic dropped).
 2. outbound_by_host names the host: that gateway handler answers (HTTP only).
 3. allowed_hosts matches: it goes out.
 4. the module defines `outbound`: the catch-all handler answers (HTTP only).
 5. allowed_hosts is set: blocked. Otherwise enable_internet decides.
A pattern is a name glob (`*.example.com`: any name ending in .example.com; `api.example.com`:
that name only; names compare case-insensitively, without a trailing dot), an IP address, or a
CIDR. Name globs match only names; IPs and CIDRs match the destination address.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from portside.errors import InvalidArgument
from portside.spec import OutboundPolicy

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAME_GLOB = re.compile(
    r"(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)*"
)


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    HANDLER = "handler"  # a gateway handler answers (Decision.handler names it)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    handler: str = ""  # for HANDLER: the function's name in the gateway module
    reason: str = ""  # one line, for the 403 and the log


@dataclass(frozen=True)
class HostPattern:
    text: str
    network: IPNetwork | None = None  # an IP (as a /32 or /128) or CIDR; None: a name glob

    def matches(self, host: str, ip: IPAddress | None) -> bool:
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        name = normal_host(host)
        return bool(name) and fnmatch.fnmatchcase(name, self.text.lower())


def normal_host(host: str) -> str:
    """A Host header's name: lower case, without port or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def pattern_problem(text: str) -> str:
    """Why `text` is not a host pattern ("" if it is one)."""
    try:
        parse_pattern(text)
    except ValueError as exc:
        return str(exc)
    return ""


def parse_pattern(text: str) -> HostPattern:
    value = text.strip()
    if not value:
        raise ValueError("a host pattern must not be empty")
    try:
        return HostPattern(value, ipaddress.ip_network(value, strict=False))
    except ValueError:
        pass
    if not _NAME_GLOB.fullmatch(value.rstrip(".")):
        raise ValueError(
            f"{value!r} is not a host pattern; use a name (api.example.com), a glob of a name's"
            " leading labels (*.example.com), an IP address (192.0.2.7) or a CIDR (10.0.0.0/8)"
        )
    return HostPattern(value.rstrip(".").lower())


@dataclass(frozen=True)
class CompiledPolicy:
    """An OutboundPolicy with its patterns parsed, ready for `decide`."""

    policy: OutboundPolicy
    allowed: tuple[HostPattern, ...]
    denied: tuple[HostPattern, ...]
    handlers: tuple[tuple[HostPattern, str], ...]

    @staticmethod
    def of(policy: OutboundPolicy) -> CompiledPolicy:
        return CompiledPolicy(
            policy,
            tuple(parse_pattern(p) for p in policy.allowed_hosts),
            tuple(parse_pattern(p) for p in policy.denied_hosts),
            tuple((parse_pattern(h), f) for h, f in policy.outbound_by_host.items()),
        )

    def intercepts(self, host: str) -> bool:
        """Whether a handler answers HTTP to the name `host` (its DNS name is then answered by
        the node, whether or not it exists elsewhere)."""
        return any(p.network is None and p.matches(host, None) for p, _ in self.handlers)

    def decide(
        self, host: str, ip: IPAddress | None, *, http: bool, catch_all: bool = False
    ) -> Decision:
        """What a connection to `host` at `ip` may do (the module order above). `host` is ""
        when the connection names none (not HTTP, or no Host header); `catch_all`: the gateway
        module defines `outbound`."""
        shown = host or (str(ip) if ip is not None else "?")
        for p in self.denied:
            if p.matches(host, ip):
                return Decision(Verdict.DENY, reason=f"{shown} is denied by {p.text!r}")
        if http:
            for p, handler in self.handlers:
                if p.matches(host, ip):
                    return Decision(Verdict.HANDLER, handler)
        for p in self.allowed:
            if p.matches(host, ip):
                return Decision(Verdict.ALLOW)
        if http and catch_all:
            return Decision(Verdict.HANDLER, "outbound")
        if self.allowed:
            return Decision(Verdict.DENY, reason=f"{shown} is not in allowed_hosts")
        if self.policy.enable_internet:
            return Decision(Verdict.ALLOW)
        return Decision(Verdict.DENY, reason=f"{shown}: this class has no internet access")


def given_policy(
    *,
    allowed_hosts: Sequence[str] = (),
    denied_hosts: Sequence[str] = (),
    outbound_by_host: Mapping[str, str] | None = None,
    enable_internet: bool = False,
    intercept_https: bool = False,
) -> OutboundPolicy:
    """The policy that `set_outbound`'s keywords give (the SDK's and the gateway stubs'), whole:
    what is not given is the default. A single string for a list of hosts is refused, since it
    would be taken for a list of its characters."""
    for field, value in (("allowed_hosts", allowed_hosts), ("denied_hosts", denied_hosts)):
        if isinstance(value, str):
            raise InvalidArgument(f"{field} is a list of hosts, e.g. [{value!r}]")
    return OutboundPolicy(
        enable_internet=enable_internet,
        allowed_hosts=tuple(allowed_hosts),
        denied_hosts=tuple(denied_hosts),
        outbound_by_host=dict(outbound_by_host or {}),
        intercept_https=intercept_https,
    )


__all__ = [
    "CompiledPolicy",
    "Decision",
    "HostPattern",
    "Verdict",
    "given_policy",
    "normal_host",
    "parse_pattern",
    "pattern_problem",
]
