"""The SDK's rollout calls: the requests they build (over a fake stub: no control plane here),
the Rollout model from its message and back, and the arguments refused before any call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import portside
from portside import convert
from portside.api.v1 import controlplane_pb2 as cp
from portside.client import _models

MESSAGE = cp.Rollout(
    class_name="Echo",
    to_version=3,
    from_versions=[1, 2],
    mode="gradual",
    steps=[10, 100],
    step=1,
    state="waiting",
    reason="grace period",
    started_at=1000.0,
    step_started_at=1010.0,
    instances=10,
    updated=5,
    healthy=4,
)


class FakeStub:
    """Records each call's request and answers with MESSAGE as the rollout."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, method: str) -> Any:
        async def call(request: Any, **kwargs: Any) -> Any:
            self.calls.append((method, request))
            if method == "Deploy":
                return cp.DeployResponse(classes=1, routes=0, rollouts=[MESSAGE])
            return getattr(cp, f"{method}Response")(rollout=MESSAGE)

        return call


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[portside.Portside, FakeStub]:
    monkeypatch.chdir(tmp_path)  # no ./.portside/admin.token
    monkeypatch.delenv("PORTSIDE_TOKEN", raising=False)
    ps = portside.connect("127.0.0.1:1")
    stub = FakeStub()
    ps._stub_ = stub
    return ps, stub


def test_the_model_mirrors_the_message() -> None:
    r = convert.rollout_from_pb(MESSAGE)
    assert r == portside.Rollout(
        class_name="Echo",
        to_version=3,
        from_versions=(1, 2),
        mode="gradual",
        steps=(10, 100),
        step=1,
        state="waiting",
        reason="grace period",
        started_at=1000.0,
        step_started_at=1010.0,
        instances=10,
        updated=5,
        healthy=4,
    )
    assert convert.rollout_to_pb(r) == MESSAGE
    assert r.active and r.percentage == 100


@pytest.mark.parametrize(
    ("state", "active"),
    [
        ("rolling", True),
        ("waiting", True),
        ("paused", True),
        ("done", False),
        ("aborted", False),
        ("rolled_back", False),
    ],
)
def test_active_until_it_ends(state: str, active: bool) -> None:
    assert portside.Rollout("Echo", 3, state=state).active is active


def test_percentage_of_the_step_in_progress() -> None:
    assert portside.Rollout("E", 2, steps=(10, 50, 100), step=0).percentage == 10
    assert portside.Rollout("E", 2, steps=(10, 50, 100), step=1).percentage == 50
    # An empty message's steps read as one step of 100%.
    assert convert.rollout_from_pb(cp.Rollout(class_name="E")).steps == (100,)


async def test_rollout_calls_build_their_requests(
    client: tuple[portside.Portside, FakeStub],
) -> None:
    ps, stub = client
    assert (await ps.rollout("Echo")).updated == 5
    await ps.pause_rollout("Echo")
    await ps.resume_rollout("Echo")
    await ps.abort_rollout("Echo")
    await ps.rollback("Echo")
    await ps.rollback("Echo", 2, rollout="gradual")
    assert stub.calls == [
        ("GetRollout", cp.GetRolloutRequest(class_name="Echo")),
        ("ControlRollout", cp.ControlRolloutRequest(class_name="Echo", action="pause")),
        ("ControlRollout", cp.ControlRolloutRequest(class_name="Echo", action="resume")),
        ("ControlRollout", cp.ControlRolloutRequest(class_name="Echo", action="abort")),
        ("Rollback", cp.RollbackRequest(class_name="Echo", version=0, rollout="immediate")),
        ("Rollback", cp.RollbackRequest(class_name="Echo", version=2, rollout="gradual")),
    ]


@pytest.mark.parametrize("mode", ["gradual", "immediate", "none"])
async def test_deploy_sends_its_rollout_mode_and_returns_the_rollouts_started(
    client: tuple[portside.Portside, FakeStub], tmp_path: Path, mode: str
) -> None:
    ps, stub = client
    config = tmp_path / "portside.toml"
    config.write_text('[[containers]]\nclass_name = "Echo"\nimage = "echo:1"\n')
    result = await ps.deploy(config, rollout=mode)
    ((method, request),) = stub.calls
    assert (method, request.rollout) == ("Deploy", mode)
    assert request.config.classes[0].name == "Echo"
    assert result.rollouts == (convert.rollout_from_pb(MESSAGE),)


async def test_bad_modes_and_versions_are_refused_before_any_call(
    client: tuple[portside.Portside, FakeStub], tmp_path: Path
) -> None:
    ps, stub = client
    with pytest.raises(portside.InvalidArgument, match="gradual, immediate, none"):
        await ps.deploy(tmp_path / "portside.toml", rollout="fast")
    with pytest.raises(portside.InvalidArgument, match="immediate, gradual"):
        await ps.rollback("Echo", rollout="none")
    with pytest.raises(portside.InvalidArgument, match="version"):
        await ps.rollback("Echo", -1)
    assert stub.calls == []


def test_the_sync_client_makes_the_same_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PORTSIDE_TOKEN", raising=False)
    stub = FakeStub()
    with portside.connect_sync("127.0.0.1:1") as ps:
        ps._async._stub_ = stub
        assert ps.rollout("Echo") == convert.rollout_from_pb(MESSAGE)
        ps.pause_rollout("Echo")
        ps.resume_rollout("Echo")
        ps.abort_rollout("Echo")
        ps.rollback("Echo", 4, "gradual")
        config = tmp_path / "portside.toml"
        config.write_text('[[containers]]\nclass_name = "Echo"\nimage = "echo:1"\n')
        assert len(ps.deploy(config, rollout="none").rollouts) == 1
        ps._async._stub_ = None  # nothing to close
    assert [(m, getattr(r, "action", "")) for m, r in stub.calls[:4]] == [
        ("GetRollout", ""),
        ("ControlRollout", "pause"),
        ("ControlRollout", "resume"),
        ("ControlRollout", "abort"),
    ]
    assert stub.calls[4][1] == cp.RollbackRequest(class_name="Echo", version=4, rollout="gradual")
    assert (stub.calls[5][0], stub.calls[5][1].rollout) == ("Deploy", "none")


def test_exported() -> None:
    assert "Rollout" in portside.__all__ and portside.Rollout is _models.Rollout
