"""The SDK's pure parts: messages to models, defaults, and the CLI's argument parsing."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import AsyncIterator

import pytest

import portside
from portside import cli
from portside.api.v1 import types_pb2 as pb
from portside.client import _async


def test_public_surface_is_explicit_and_importable() -> None:
    for name in portside.__all__:
        assert hasattr(portside, name), name
    assert portside.NotFound is portside.errors.NotFound
    assert issubclass(portside.NotFound, portside.PortsideError)


@pytest.mark.parametrize(
    "model",
    [
        portside.InstanceInfo,
        portside.Event,
        portside.ExecResult,
        portside.ExecChunk,
        portside.LogChunk,
        portside.NodeInfo,
        portside.ContainerClass,
        portside.Response,
        portside.DeployResult,
        portside.Rollout,
        portside.Snapshot,
        portside.Usage,
    ],
)
def test_models_are_frozen_dataclasses_without_protobuf(model: type) -> None:
    assert dataclasses.is_dataclass(model)
    assert model.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for f in dataclasses.fields(model):
        assert "pb" not in str(f.type), (model, f.name, f.type)


def test_results_and_responses() -> None:
    r = portside.ExecResult(exit_code=0, stdout="héllo\n".encode())
    assert r.ok and r.text == "héllo\n"
    assert not portside.ExecResult(exit_code=3).ok
    resp = portside.Response(503, {"portside-error": "no-capacity"}, b'{"a": 1}')
    assert not resp.ok and resp.error == "no-capacity" and resp.json() == {"a": 1}
    assert portside.Response(200, {}, b"").error is None


def test_addresses_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTSIDE_CONTROLPLANE", raising=False)
    monkeypatch.delenv("PORTSIDE_EDGE", raising=False)
    assert _async.controlplane_address() == "127.0.0.1:7070"
    assert _async.edge_url() == "http://127.0.0.1:8787"
    monkeypatch.setenv("PORTSIDE_CONTROLPLANE", "127.0.1.1:7070,127.0.1.2:7070")
    monkeypatch.setenv("PORTSIDE_EDGE", "127.0.0.5:9000")
    ps = portside.connect()
    assert ps.address == "127.0.1.1:7070,127.0.1.2:7070"
    assert ps.edge == "http://127.0.0.5:9000"
    assert portside.connect("127.0.0.1:1", edge="https://edge.example/").edge == (
        "https://edge.example"
    )


def test_bad_arguments_fail_before_any_call() -> None:
    with pytest.raises(portside.InvalidArgument, match="not HOST:PORT"):
        portside.connect("nowhere")
    ps = portside.connect("127.0.0.1:1")
    with pytest.raises(portside.InvalidArgument, match="empty"):
        ps.container("Echo", "")
    with pytest.raises(portside.InvalidArgument, match="empty"):
        ps.container("", "a")


async def test_exec_rejects_a_string_command_without_calling() -> None:
    box = portside.connect("127.0.0.1:1").container("Echo", "a")
    with pytest.raises(portside.InvalidArgument, match="list of arguments"):
        await box.exec("echo hi")
    with pytest.raises(portside.InvalidArgument, match="empty"):
        await box.exec([])
    with pytest.raises(portside.InvalidArgument, match="start with"):
        await box.fetch("no-slash")


async def test_exec_requests_carry_start_then_stdin_then_close() -> None:
    start = pb.ExecStart(command=["cat"], stdin=True)
    big = b"x" * (64 * 1024 + 1)
    sent = [m async for m in _async._exec_requests(start, big)]
    kinds = [m.WhichOneof("message") for m in sent]
    assert kinds == ["start", "stdin", "stdin", "stdin_close"]
    assert b"".join(m.stdin for m in sent) == big

    async def pieces() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    sent = [m async for m in _async._exec_requests(start, pieces())]
    assert [m.WhichOneof("message") for m in sent] == ["start", "stdin", "stdin", "stdin_close"]
    sent = [m async for m in _async._exec_requests(start, None)]
    assert [m.WhichOneof("message") for m in sent] == ["start"]


@pytest.mark.parametrize(
    ("text", "number"),
    [("15", 15), ("TERM", 15), ("SIGTERM", 15), ("sighup", 1), ("kill", 9), ("USR1", 10)],
)
def test_parse_signal(text: str, number: int) -> None:
    assert cli.parse_signal(text) == number == int(signal.Signals(number))


@pytest.mark.parametrize("text", ["0", "99", "NOPE", "SIG", ""])
def test_parse_signal_rejects(text: str) -> None:
    with pytest.raises(portside.InvalidArgument):
        cli.parse_signal(text)


def test_parse_env_and_entrypoint() -> None:
    assert cli.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(portside.InvalidArgument, match="KEY=VALUE"):
        cli.parse_env(["A"])
    assert cli.parse_entrypoint(None) is None
    assert cli.parse_entrypoint('/bin/sh -c "exit 3"') == ["/bin/sh", "-c", "exit 3"]
    assert cli.parse_entrypoint('["/bin/sh", "-c", "exit 3"]') == ["/bin/sh", "-c", "exit 3"]
    for bad in ("", '["a", 1]', "[oops", "'unclosed"):
        with pytest.raises(portside.InvalidArgument):
            cli.parse_entrypoint(bad)


def test_exec_takes_everything_after_the_double_dash() -> None:
    args = cli.parse_args(
        ["exec", "Echo", "a", "--env", "X=1", "--", "sh", "-c", "echo $X", "--json"]
    )
    assert (args.class_name, args.name, args.env) == ("Echo", "a", ["X=1"])
    assert cli.exec_command(args.argv) == ["sh", "-c", "echo $X", "--json"]
    assert cli.exec_command(cli.parse_args(["exec", "Echo", "a", "ls", "/"]).argv) == ["ls", "/"]
    args = cli.parse_args(["--log-level", "debug", "exec", "E", "a", "--", "ls", "-l"])
    assert (args.log_level, cli.exec_command(args.argv)) == ("debug", ["ls", "-l"])
    # Another verb keeps its words, "exec" among them.
    assert cli.parse_args(["state", "put", "exec", "n", "k", "--", "-v"]).value == "-v"
    with pytest.raises(portside.InvalidArgument, match="no command"):
        cli.exec_command(cli.parse_args(["exec", "Echo", "a", "--"]).argv)


def test_client_verbs_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTSIDE_CONTROLPLANE", "127.0.0.9:7070")
    a = cli.parse_args(["start", "C", "n", "--env", "A=1", "--hint", "sin", "--no-wait"])
    assert (a.controlplane, a.env, a.hint, a.no_wait) == ("127.0.0.9:7070", ["A=1"], "sin", True)
    a = cli.parse_args(["stop", "C", "n", "--signal", "INT", "--grace", "2.5"])
    assert (a.signal, a.grace) == ("INT", 2.5)
    assert cli.parse_args(["signal", "C", "n", "HUP"]).signal == "HUP"
    a = cli.parse_args(["events", "C", "--after", "5", "--count", "2", "--json"])
    assert (a.class_name, a.name, a.after, a.count, a.json) == ("C", None, 5, 2, True)
    a = cli.parse_args(["state", "put", "C", "n", "k", "v"])
    assert (a.action, a.key, a.value) == ("put", "k", "v")
    a = cli.parse_args(["ps", "--class", "C", "--state", "healthy"])
    assert (a.class_name, a.state, a.node) == ("C", "healthy", None)
    a = cli.parse_args(["logs", "C", "n", "-f", "--tail", "10"])
    assert (a.follow, a.tail) == (True, 10)
    a = cli.parse_args(["snapshot", "create", "C", "n", "--name", "before"])
    assert (a.class_name, a.name, a.snapshot_name) == ("C", "n", "before")
    a = cli.parse_args(["snapshot", "list", "C"])
    assert (a.snapshot_action, a.class_name, a.name) == ("list", "C", "")
    assert cli.parse_args(["start", "C", "fork", "--snapshot", "before"]).snapshot == "before"


def test_age_and_event_lines() -> None:
    assert cli.age(0) == "-"
    assert cli.age(100, now=112) == "12s"
    assert cli.age(100, now=100 + 5 * 60 + 3) == "5m"
    assert cli.age(100, now=100 + 3 * 86400) == "3d"
    line = cli.format_event(
        portside.Event(
            revision=9,
            time=0.0,
            kind=portside.EventKind.EXITED,
            class_name="C",
            name="n",
            node_id="nd",
            exit_code=143,
            signal=15,
        )
    )
    assert "exited" in line and "C/n" in line and "exit code 143" in line and "signal 15" in line


def test_usage_cost_at_default_and_given_prices() -> None:
    from portside import Usage

    u = Usage(
        "C",
        "2026-11-27",
        running_ms=10_000,
        vcpu_seconds=2.5,
        memory_gib_seconds=10.0,
        disk_gb_seconds=40.0,
    )
    assert u.cost() == pytest.approx(2.5 * 0.000020 + 10.0 * 0.0000025 + 40.0 * 0.00000007)
    assert u.cost(1.0, 0.0, 0.0) == pytest.approx(2.5)
