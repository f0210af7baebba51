"""The committed generated modules match what protoc makes from proto/qpc/v1/*.proto."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_generated_modules_match_sources(tmp_path: Path) -> None:
    gen = _load_generator()
    written = gen.generate(tmp_path)
    committed = ROOT / "qpc_core" / "pb"
    names = sorted(p.name for p in written)
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in {".py", ".pyi"})
    stale = [n for n in names if (tmp_path / n).read_text() != (committed / n).read_text()]
    assert not stale, f"regenerate with `make proto`: stale {stale}"


def test_every_request_reserves_field_15_for_auth() -> None:
    from google.protobuf import descriptor_pool

    from qpc_core.pb import auth_pb2, blobs_pb2, common_pb2, delivery_pb2, directory_pb2, keys_pb2

    modules = [auth_pb2, blobs_pb2, common_pb2, delivery_pb2, directory_pb2, keys_pb2]
    pool = descriptor_pool.Default()
    checked = 0
    for m in modules:
        for name in m.DESCRIPTOR.message_types_by_name:
            if name.endswith("Request"):
                desc = pool.FindMessageTypeByName(f"qpc.v1.{name}")
                field = desc.fields_by_number.get(15)
                assert field is not None and field.message_type.full_name == "qpc.v1.Auth", name
                checked += 1
    assert checked > 20
