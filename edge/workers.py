"""`portside edge --workers N`: N edge processes serving one port (SO_REUSEPORT: the kernel
spreads connections across them), each a whole edge that rebuilds everything it needs from the
control plane (routes, pools, its certificate), sharing nothing with the others.

The first process supervises: it starts the workers, passes SIGINT/SIGTERM on, and starts again
a worker that dies (backoff 1 s doubling to 30 s). A worker that fails as the edge starts (exits
with an error within 5 s: a bad flag, a port taken) stops them all with its exit code: a mistake
is reported, not retried forever.
Worker i serves /metrics on the --metrics-listen port + i and reports demand as edge `<id>-w<i>`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Final

from portside.up import PARENT_ENV, StopRequest

log = logging.getLogger("portside.edge")

_STARTUP_S: Final = 5.0  # a worker that dies sooner failed to start
_BACKOFF_FIRST_S: Final = 1.0
_BACKOFF_MOST_S: Final = 30.0
_STOP_TIMEOUT_S: Final = 30.0


def worker_argv(argv: Sequence[str], index: int) -> list[str]:
    """The `portside` arguments of worker `index`: these (`edge` and its flags), without
    --workers."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [*out, "--worker", str(index)]


class _Worker:
    def __init__(self, index: int, argv: list[str]) -> None:
        self.index = index
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = _BACKOFF_FIRST_S
        self.restart_at = 0.0
        self.first_run = True

    def start(self) -> None:
        # Each worker stops if the supervisor dies (PR_SET_PDEATHSIG, asked for by the worker).
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        self.proc = subprocess.Popen([sys.executable, "-m", "portside", *self.argv], env=env)
        self.started = time.monotonic()


def supervise(argv: Sequence[str], workers: int) -> int:
    """Run `workers` edge processes with `argv` (the `portside` arguments) until told to
    stop; the exit code is 0, or that of a worker that failed to start."""
    stop = StopRequest()
    pool = [_Worker(i, worker_argv(argv, i)) for i in range(workers)]
    for worker in pool:
        worker.start()
    log.info("edge: %d workers started (pids %s)", workers, [w.proc.pid for w in pool if w.proc])
    code = 0
    try:
        while not stop.requested:
            now = time.monotonic()
            for worker in pool:
                proc = worker.proc
                if proc is None:
                    if now >= worker.restart_at:
                        worker.start()
                    continue
                if proc.poll() is None:
                    if now - worker.started > 10 * _BACKOFF_MOST_S:
                        worker.backoff = _BACKOFF_FIRST_S  # it has run well for a while
                    continue
                failed_to_start = (
                    worker.first_run and proc.returncode > 0 and now - worker.started < _STARTUP_S
                )
                if failed_to_start:
                    log.error(
                        "edge worker %d exited with code %s as it started; stopping the edge",
                        worker.index,
                        proc.returncode,
                    )
                    code = proc.returncode or 1
                    return code
                log.warning(
                    "edge worker %d exited with code %s; starting it again in %gs",
                    worker.index,
                    proc.returncode,
                    worker.backoff,
                )
                worker.proc = None
                worker.first_run = False
                worker.restart_at = now + worker.backoff
                worker.backoff = min(worker.backoff * 2, _BACKOFF_MOST_S)
            time.sleep(0.2)
        return code
    finally:
        _stop(pool)


def _stop(pool: list[_Worker]) -> None:
    running = [w.proc for w in pool if w.proc is not None and w.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
