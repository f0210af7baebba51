"""Regenerate qpc_core/pb/*_pb2.py(i) from proto/qpc/v1/*.proto.

protoc emits ``from qpc.v1 import x_pb2``; the modules live in ``qpc_core.pb``, so imports are
rewritten.  ``tests/test_proto_sync.py`` runs this into a temporary directory and compares.
Usage: python scripts/gen_proto.py [OUT_DIR]
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "qpc_core" / "pb"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency only

    sources = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "qpc" / "v1").glob("*.proto")
    )
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", *sources]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((Path(tmp) / "qpc" / "v1").iterdir()):
            text = f.read_text()
            text = re.sub(r"^from qpc\.v1 import ", "from qpc_core.pb import ", text, flags=re.M)
            target = out / f.name
            target.write_text(text)
            written.append(target)
    init = out / "__init__.py"
    init.write_text('"""Generated protobuf modules (do not edit; run scripts/gen_proto.py)."""\n')
    written.append(init)
    return written


if __name__ == "__main__":
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for p in generate(dest):
        print(p)
