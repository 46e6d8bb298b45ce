"""`portside doctor` against real things: the real Docker engine (its version and cgroup limits),
real listeners on loopback holding the agent's ports, and real HTTP servers as the control plane
whose clock is compared — the control plane's own /healthz app, and one whose clock is set off by
a few seconds."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate

import docker
import pytest
from aiohttp import web

from nodeagent.doctor import AgentPort, agent_ports, check_host, port_check
from portside.daemon import metrics_app
from portside.net import free_port, start_http_server

pytestmark = pytest.mark.integration


@pytest.fixture
def taken() -> Iterator[str]:
    """A port on loopback that this test process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def controlplane_metrics() -> AsyncIterator[str]:
    """The control plane's metrics app (the same /healthz every daemon serves) on loopback."""
    address = f"127.0.0.1:{free_port()}"
    runner = await start_http_server(metrics_app(), address)
    yield address
    await runner.cleanup()


async def server_with_clock_off_by(seconds: float) -> tuple[web.AppRunner, str]:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(
            text="ok", headers={"Date": formatdate(time.time() + seconds, usegmt=True)}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    address = f"127.0.0.1:{free_port()}"
    return await start_http_server(app, address), address


async def test_engine_version_and_cgroup_limits_of_the_real_engine(
    docker_client: docker.DockerClient,
) -> None:
    checks = {c.name: c for c in await check_host(())}
    version = docker_client.version()
    engine = checks["docker engine"]
    assert engine.ok, engine
    assert engine.detail == f"Docker {version['Version']} (API {version['ApiVersion']})"
    cgroups = checks["cgroup limits"]
    info = docker_client.info()
    assert cgroups.detail.startswith(f"cgroup v{info.get('CgroupVersion') or '1'}, driver ")
    # This project's machines enforce memory, CPU quota and pids limits (docs: ENVIRONMENT).
    assert cgroups.ok, cgroups
    assert "memory, CPU quota and pids limits enforceable" in cgroups.detail


def test_a_taken_port_is_reported_with_its_holder(taken: str) -> None:
    check = port_check(AgentPort("data", taken))
    assert not check.ok
    assert check.name == f"data port {taken}"
    assert check.detail.startswith(f"in use by pid {os.getpid()} (")  # this very process
    assert "pytest" in check.detail or sys.executable in check.detail
    assert check.fix.startswith(f"stop pid {os.getpid()}, or give the agent another port")
    assert "--listen" in check.fix


def test_a_taken_port_on_every_address_blocks_loopback_too() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", free_port()))
        sock.listen()
        port = sock.getsockname()[1]
        check = port_check(AgentPort("metrics", f"127.0.0.1:{port}"))
    assert not check.ok and "--metrics-listen" in check.fix
    assert port_check(AgentPort("metrics", f"127.0.0.1:{port}")).ok  # closed: free again


async def test_ports_and_clock_in_one_run(taken: str, controlplane_metrics: str) -> None:
    host, port = taken.rsplit(":", 1)
    # The listener holds the data port: the API and metrics ports (+ 1, + 2) are free.
    ports = agent_ports(taken, f"{host}:{free_port()}", f"{host}:{free_port()}")
    checks = await check_host((), ports=ports, controlplane_clock=controlplane_metrics)
    by_name = {c.name: c for c in checks}
    assert [c.name for c in checks][-4:] == [
        f"data port {taken}",
        f"API port {ports[1].address}",
        f"metrics port {ports[2].address}",
        f"clock against {controlplane_metrics}",
    ]
    assert not by_name[f"data port {taken}"].ok
    assert by_name[f"API port {ports[1].address}"].ok
    clock = by_name[f"clock against {controlplane_metrics}"]
    assert clock.ok and not clock.warning, clock  # the same host's clock
    assert "resolution 1 s" in clock.detail


@pytest.mark.parametrize(("off_by", "ok", "warning"), [(3.5, True, True), (-20, False, False)])
async def test_a_control_plane_clock_off_is_reported(
    off_by: float, ok: bool, warning: bool
) -> None:
    runner, address = await server_with_clock_off_by(off_by)
    try:
        clock = (await check_host((), controlplane_clock=address))[-1]
    finally:
        await runner.cleanup()
    assert (clock.ok, clock.warning) == (ok, warning), clock
    assert ("ahead of" if off_by > 0 else "behind") in clock.fix


async def test_an_unreachable_control_plane_fails_the_clock_check() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens
    clock = (await check_host((), controlplane_clock=address))[-1]
    assert not clock.ok and "cannot reach the control plane's metrics port" in clock.detail
    assert "--controlplane" in clock.fix


async def test_portside_doctor_reports_a_taken_port_and_exits_non_zero(
    taken: str, controlplane_metrics: str
) -> None:
    argv = [sys.executable, "-m", "portside", "doctor", "--listen", taken]
    argv += ["--controlplane-metrics", controlplane_metrics]
    for as_json in (True, False):
        proc = await asyncio.create_subprocess_exec(
            *argv, *(["--json"] if as_json else []), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        if as_json:
            report = json.loads(out)
            failed = {c["name"]: c for c in report["checks"] if not c["ok"]}
            assert not report["ok"] and f"data port {taken}" in failed
            assert failed[f"data port {taken}"]["fix"].startswith("stop pid")
            clock = [c for c in report["checks"] if c["name"].startswith("clock against")]
            assert clock and clock[0]["ok"], clock
        else:
            line = next(x for x in out.decode().splitlines() if f"data port {taken}" in x)
            assert line.startswith("FAILED  ") and " — stop pid " in line
