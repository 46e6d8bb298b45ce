"""The committed generated code must equal a fresh generation from proto/ with the pinned tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check", str(tmp_path)],
        check=True,
    )
    committed = ROOT / "portside" / "api" / "v1"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    current = {p.name: p.read_text() for p in committed.iterdir() if p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(current), "generated file set differs: run scripts/gen_proto.py"
    stale = [name for name in fresh if fresh[name] != current[name]]
    assert not stale, f"stale generated code {stale}: run scripts/gen_proto.py and commit"
