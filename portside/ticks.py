"""Sleeping to wall-clock boundaries, so that processes on different hosts (agents sampling CPU,
the autoscaler deciding on the samples) act on the same instants, NTP keeping them together."""

from __future__ import annotations

import time


def until_next(period_s: float, offset_s: float = 0.0, now: float | None = None) -> float:
    """Seconds until the wall clock next reaches a multiple of `period_s` (plus `offset_s`).
    A boundary less than a tenth of a period away counts as reached: a timer may fire a little
    early (uvloop's has millisecond resolution), and sleeping the sliver left would take a
    second sample a millisecond after the first, a CPU reading over nothing (a busy pool
    member read 0%, and the pool scaled down under load), or make a second autoscaler decision
    on the same samples."""
    now = time.time() if now is None else now
    left = (offset_s - now) % period_s
    return left if left >= period_s / 10 else left + period_s
