"""Generate portside/api/v1 from proto/portside/v1 with the pinned grpcio-tools.

`python scripts/gen_proto.py` writes the files; `--check DIR` writes them to DIR instead.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PINNED_TOOLS = "1.85.1"  # keep in step with pyproject.toml's dev extra


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if version != PINNED_TOOLS:
        sys.exit(f"grpcio-tools {version} is installed; generation is pinned to {PINNED_TOOLS}")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(tmp, "portside", "v1").iterdir()):
            text = src.read_text()
            # protoc names imports after the proto package path; the code lives in portside.api.
            text = re.sub(r"\bfrom portside\.v1 import\b", "from portside.api.v1 import", text)
            (out_dir / src.name).write_text(text)
    (out_dir / "__init__.py").write_text(
        '"""Generated gRPC code for portside.v1 (scripts/gen_proto.py)."""\n'
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        generate(Path(sys.argv[2]))
    else:
        generate(ROOT / "portside" / "api" / "v1")
