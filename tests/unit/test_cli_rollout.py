"""`portside deploy --rollout`, `rollout status|pause|resume|abort` and `rollback`: their
arguments, and what they print from Rollout values (a bar in a terminal, plain lines otherwise,
JSON), over a fake client (no control plane here)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from types import TracebackType

import pytest

from portside import cli
from portside.client import Rollout

WAITING = Rollout(
    class_name="Echo",
    to_version=3,
    from_versions=(1,),
    mode="gradual",
    steps=(10, 100),
    step=0,
    state="waiting",
    reason="grace period, 12s left",
    started_at=1000.0,
    instances=10,
    updated=5,
    healthy=5,
)


def test_deploy_rollout_defaults_to_gradual_and_takes_the_three_modes() -> None:
    assert cli.parse_args(["deploy", "portside.toml"]).rollout == "gradual"
    for mode in ("gradual", "immediate", "none"):
        assert cli.parse_args(["deploy", "p.toml", "--rollout", mode]).rollout == mode


def test_bad_words_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["deploy", "p.toml", "--rollout", "fast"],
        ["rollback", "Echo", "--rollout", "none"],
        ["rollback", "Echo", "0"],
        ["rollback", "Echo", "three"],
        ["rollout", "restart", "Echo"],
        ["rollout", "status"],
    ):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_rollout_and_rollback_parse() -> None:
    a = cli.parse_args(["rollout", "status", "Echo", "--watch", "--json"])
    assert (a.command, a.rollout_action, a.class_name, a.watch, a.json) == (
        "rollout",
        "status",
        "Echo",
        True,
        True,
    )
    for action in ("pause", "resume", "abort"):
        a = cli.parse_args(["rollout", action, "Echo"])
        assert (a.rollout_action, a.class_name, a.json) == (action, "Echo", False)
    a = cli.parse_args(["rollback", "Echo"])
    assert (a.command, a.class_name, a.version, a.rollout) == ("rollback", "Echo", 0, "immediate")
    a = cli.parse_args(["rollback", "Echo", "v2", "--rollout", "gradual"])
    assert (a.version, a.rollout) == (2, "gradual")
    assert cli.parse_args(["rollback", "Echo", "7"]).version == 7
    assert set(cli._CLIENT_VERBS) >= {"rollout", "rollback"}


@pytest.mark.parametrize(
    ("updated", "instances", "state", "bar"),
    [
        (5, 10, "waiting", "[#####.....]"),
        (0, 10, "rolling", "[..........]"),
        (1, 3, "rolling", "[###.......]"),
        (10, 10, "done", "[##########]"),
        (0, 0, "done", "[##########]"),  # nothing to replace: done is all of it
        (0, 0, "rolling", "[..........]"),
    ],
)
def test_the_bar_is_the_share_on_the_new_version(
    updated: int, instances: int, state: str, bar: str
) -> None:
    r = Rollout("Echo", 3, instances=instances, updated=updated, state=state)
    assert cli.rollout_bar(r) == bar


def test_progress_says_counts_step_and_state() -> None:
    assert cli.rollout_progress(WAITING) == (
        "5/10 on v3, step 1 of 2 (10%), waiting: grace period, 12s left"
    )
    r = Rollout("Echo", 3, steps=(10, 50, 100), step=1, state="rolling", instances=10, updated=4)
    r = Rollout(**{**r.__dict__, "healthy": 2})
    assert cli.rollout_progress(r) == "4/10 on v3 (2 healthy), step 2 of 3 (50%), rolling"
    quiet = Rollout("Echo", 3, state="waiting", instances=1, updated=1, healthy=0)
    assert cli.rollout_progress(quiet) == (
        "1/1 on v3 (0 healthy), step 1 of 1 (100%), waiting: grace period, then health checks"
    )
    back = Rollout("Echo", 3, state="rolled_back", reason="v3 unhealthy after 5m", updated=1)
    assert cli.rollout_progress(back).endswith("rolled back: v3 unhealthy after 5m")


def test_a_terminal_gets_the_bar_a_pipe_plain_text() -> None:
    assert cli.rollout_line(WAITING, tty=True) == (
        "[#####.....] 5/10 on v3, step 1 of 2 (10%), waiting: grace period, 12s left"
    )
    plain = cli.rollout_line(WAITING, tty=False)
    assert plain.startswith("Echo v3: 5/10 on v3,") and "#" not in plain


def test_heading_and_the_line_deploy_prints() -> None:
    assert cli.rollout_heading(WAITING, now=1120.0) == (
        "Echo: gradual rollout to v3 from v1 (steps 10%, 100%), started 2m ago"
    )
    assert cli.rollout_started_line(WAITING) == (
        "Echo: rolling out (gradual) to v3 over 10 instances, steps 10%, 100%; follow it with: "
        "portside rollout status Echo --watch"
    )
    back = Rollout("Echo", 2, from_versions=(3,), mode="rollback", instances=4)
    assert cli.rollout_started_line(back).startswith("Echo: rolling back to v2 over 4 instances")
    assert cli.rollout_heading(back, now=0).startswith("Echo: rollback to v2 from v3")


def test_json_row_is_the_model_and_two_derived_fields() -> None:
    row = json.loads(json.dumps(cli.rollout_row(WAITING), default=list))
    assert row["class_name"] == "Echo" and row["steps"] == [10, 100]
    assert (row["active"], row["percentage"], row["updated"]) == (True, 10, 5)


class FakeClient:
    """Answers `rollout` with the next of `answers` (the last again when they run out)."""

    def __init__(self, answers: list[Rollout]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def rollout(self, class_name: str) -> Rollout:
        self.calls.append(("rollout", class_name))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    async def pause_rollout(self, class_name: str) -> Rollout:
        self.calls.append(("pause", class_name))
        return Rollout(**{**WAITING.__dict__, "state": "paused", "reason": "paused by a user"})

    async def resume_rollout(self, class_name: str) -> Rollout:
        self.calls.append(("resume", class_name))
        return WAITING

    async def abort_rollout(self, class_name: str) -> Rollout:
        self.calls.append(("abort", class_name))
        return Rollout(**{**WAITING.__dict__, "state": "aborted", "reason": "aborted by a user"})

    async def rollback(self, class_name: str, version: int, rollout: str) -> Rollout:
        self.calls.append(("rollback", f"{class_name} {version} {rollout}"))
        return Rollout(class_name, 2, from_versions=(3,), mode="rollback", instances=4)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClient]:
    client = FakeClient([WAITING])
    monkeypatch.setattr(cli, "_connect", lambda args: client)
    monkeypatch.setattr(cli, "ROLLOUT_WATCH_INTERVAL_S", 0.0)
    yield client


def run(argv: list[str]) -> int:
    args: argparse.Namespace = cli.parse_args(argv)
    args.api_token = None
    return int(asyncio.run(cli._CLIENT_VERBS[args.command](args)))


def steps_of(states: list[tuple[str, int]]) -> list[Rollout]:
    return [
        Rollout(**{**WAITING.__dict__, "state": s, "updated": n, "healthy": n}) for s, n in states
    ]


def test_status_once_plain(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["rollout", "status", "Echo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Echo: gradual rollout to v3 from v1 (steps 10%, 100%)")
    assert lines[1] == "Echo v3: 5/10 on v3, step 1 of 2 (10%), waiting: grace period, 12s left"
    assert fake.calls == [("rollout", "Echo")]


def test_status_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["rollout", "status", "Echo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reason"] == "grace period, 12s left"


def test_watch_prints_a_line_per_change_until_done(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.answers = steps_of([("rolling", 0), ("rolling", 0), ("rolling", 1), ("done", 10)])
    assert run(["rollout", "status", "Echo", "--watch"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split(": ", 1)[1].split(",")[0] for line in lines] == [
        "0/10 on v3",
        "1/10 on v3",
        "10/10 on v3",
    ]
    assert lines[-1].endswith("done: grace period, 12s left")
    assert len(fake.calls) == 4  # one more poll after each unchanged answer


@pytest.mark.parametrize("end", ["aborted", "rolled_back"])
def test_watch_fails_when_it_does_not_finish(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], end: str
) -> None:
    fake.answers = steps_of([("rolling", 1), (end, 1)])
    assert run(["rollout", "status", "Echo", "--watch", "--json"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["state"] for line in out] == ["rolling", end]


def test_watch_in_a_terminal_redraws_one_line(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    fake.answers = steps_of([("rolling", 5), ("done", 10)])
    assert run(["rollout", "status", "Echo", "-w"]) == 0
    out = capsys.readouterr().out
    heading, bars = out.split("\n", 1)
    assert heading.startswith("Echo: gradual rollout")
    assert bars.count("\r\033[K") == 2 and bars.endswith("\n") and bars.count("\n") == 1
    assert "[#####.....] 5/10" in bars and "[##########] 10/10" in bars


def test_pause_and_rollback_print_what_they_did(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["rollout", "pause", "Echo"]) == 0
    assert "paused: paused by a user" in capsys.readouterr().out
    assert run(["rollout", "resume", "Echo"]) == 0
    assert "waiting: grace period" in capsys.readouterr().out
    assert run(["rollout", "abort", "Echo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] is False
    assert run(["rollback", "Echo", "2", "--rollout", "gradual", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "rollback"
    assert run(["rollback", "Echo"]) == 0
    assert capsys.readouterr().out.startswith("Echo: rolling back to v2 over 4 instances")
    assert fake.calls == [
        ("pause", "Echo"),
        ("resume", "Echo"),
        ("abort", "Echo"),
        ("rollback", "Echo 2 gradual"),
        ("rollback", "Echo 0 immediate"),
    ]


def test_deploy_prints_a_line_per_rollout_it_started(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from portside.client import DeployResult

    sent: list[str] = []

    async def deploy_file(file: str, controlplane: str, token: str | None, **kw: object) -> object:
        sent.append(str(kw["rollout"]))
        other = Rollout("Other", 2, mode="immediate", instances=1)
        return DeployResult(classes=2, routes=1, rollouts=(WAITING, other))

    monkeypatch.setattr(cli, "deploy_file", deploy_file)
    assert asyncio.run(cli._deploy("p.toml", "127.0.0.1:1", None, "immediate")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sent == ["immediate"]
    assert lines[0] == "deployed 2 classes and 1 routes from p.toml to 127.0.0.1:1"
    assert lines[1].startswith("Echo: rolling out (gradual) to v3 over 10 instances")
    assert lines[2].startswith("Other: rolling out (immediate) to v2 over 1 instances")
    assert len(lines) == 3
