"""Health checks of running instances: what one check's answer means, the run of failures that
makes an instance unhealthy, when each instance is due, and the HTTP GET that checks a container.

The pure parts (`outcome`, `judge`, `due`) know no sockets; `http_check` is the one I/O function,
and the instance manager's loop (nodeagent.instances) joins them to the lifecycle table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

from nodeagent.lifecycle import CheckFailed, CheckPassed
from portside.states import InstanceState

USER_AGENT = "portside-health/1"
# The status line of any answer fits in this; a longer first line is not HTTP.
_STATUS_LINE_MOST = 8192


@dataclass(frozen=True)
class CheckResult:
    """One check: whether it passed, the HTTP status when the container answered, and why it
    failed ("answered 503", "no answer within 2s", "connection refused")."""

    passed: bool
    status: int | None = None
    reason: str = ""


def outcome(status: int) -> CheckResult:
    """A check that got an HTTP answer: any status below 500 passes, so an image without the
    path (404), or one that wants another Host (400) or a login (401), is healthy; a 5xx fails."""
    if status < 500:
        return CheckResult(True, status)
    return CheckResult(False, status, f"answered {status}")


@dataclass(frozen=True)
class Streak:
    """Checks that failed in a row since the last one that passed (or since its boot)."""

    failures: int = 0
    reason: str = ""  # the last failure's


Verdict: TypeAlias = CheckFailed | CheckPassed | None


def judge(
    streak: Streak, result: CheckResult, threshold: int, state: InstanceState
) -> tuple[Streak, Verdict]:
    """The streak after `result`, and what to tell the lifecycle table of an instance in `state`:
    CheckFailed once `threshold` checks in a row failed while it was healthy; CheckPassed when one
    passes while it is running but not healthy; None otherwise (the state stays)."""
    if result.passed:
        return Streak(), CheckPassed() if state is InstanceState.RUNNING else None
    failed = Streak(streak.failures + 1, result.reason)
    if failed.failures >= threshold and state is InstanceState.HEALTHY:
        n = failed.failures
        if n == 1:
            return failed, CheckFailed(f"its health check failed: {result.reason}")
        return failed, CheckFailed(f"{n} health checks in a row failed; the last: {result.reason}")
    return failed, None


def due(next_at: float | None, now: float) -> bool:
    """Whether a check scheduled at `next_at` (None: not scheduled yet) is due at `now`."""
    return next_at is not None and now >= next_at


def soonest(next_ats: Iterable[float | None], now: float, most: float) -> float:
    """Seconds to sleep until the next check is due, at least a millisecond and at most `most`
    (new instances are noticed within it)."""
    upcoming = [at for at in next_ats if at is not None]
    wait = min(upcoming, default=now + most) - now
    return min(max(wait, 0.001), most)


HealthCheck: TypeAlias = Callable[[str, int, str, float], Awaitable[CheckResult]]


async def http_check(host: str, port: int, path: str, timeout_s: float) -> CheckResult:
    """GET `path` from `host:port` within `timeout_s`, over a connection of its own that is closed
    once the status line is read (HTTP/1.1, `Connection: close`). Fails on a 5xx, no answer in
    time, a refused or reset connection, or an answer that is not HTTP."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=_STATUS_LINE_MOST)
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return CheckResult(False, reason=f"no answer within {timeout_s:g}s")
    except ConnectionRefusedError:
        return CheckResult(False, reason=f"connection to port {port} refused")
    except (ConnectionResetError, BrokenPipeError):
        return CheckResult(False, reason="connection reset")
    except ValueError:  # StreamReader's limit: a first line longer than any status line
        return CheckResult(False, reason="answered something that is not HTTP")
    except OSError as exc:
        return CheckResult(False, reason=f"cannot connect to port {port}: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 0.1)
    status = parse_status_line(line)
    if status is None:
        if not line:
            return CheckResult(False, reason="closed the connection without answering")
        return CheckResult(False, reason="answered something that is not HTTP")
    return outcome(status)


def parse_status_line(line: bytes) -> int | None:
    """The status of `HTTP/1.1 200 OK`; None for anything else."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None
    code = parts[1]
    if len(code) != 3 or not code.isdigit() or code[:1] == b"0":
        return None
    return int(code)


__all__ = [
    "USER_AGENT",
    "CheckResult",
    "HealthCheck",
    "Streak",
    "Verdict",
    "due",
    "http_check",
    "judge",
    "outcome",
    "parse_status_line",
    "soonest",
]
