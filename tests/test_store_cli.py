"""`qpc store copy|stats` on the embedded store (the PostgreSQL direction is tested with the
plugin): real SQLCipher files, the real command line."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from qpc_core.cli import main
from qpc_core.storage.base import NewMessage
from qpc_core.storage.records import tally
from qpc_core.storage.sqlcipher import SqlCipherStorage

KEY = "store-cli-key"
R = b"\x07" * 32


@pytest.fixture(autouse=True)
def db_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPC_DB_KEY", KEY)
    monkeypatch.delenv("QPC_STORAGE", raising=False)


def populate(data: Path, n: int) -> str:
    async def go() -> str:
        s = await SqlCipherStorage.open(data / "qpc.db", KEY)
        try:
            await s.create_user("carol", R, now=1.0)
            await s.enqueue([NewMessage(R, b"", f"m{i}".encode(), f"id{i}".encode().ljust(16))
                             for i in range(n)], max_depth=10_000, dedup_since=0)
            await s.log_append("kt", [b"a", b"b"])
            return (await tally(s)).digest
        finally:
            await s.close()

    return asyncio.run(go())


def test_stats_counts_every_record_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digest = populate(tmp_path / "data", 30)
    assert main(["store", "stats", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "sqlcipher: 64 records" in out  # 1 user, 1 inbox, 30 messages, 30 dedup ids, 2 log
    assert re.search(r"^\s+message\s+30$", out, re.M)
    assert re.search(r"^\s+key_package\s+0$", out, re.M)
    assert f"sha256 {digest}" in out


def test_copy_to_another_sqlcipher_file_via_to_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = populate(tmp_path / "data", 10)
    other = tmp_path / "other.toml"
    other.write_text(f'data_dir = "{tmp_path / "moved"}"\n')
    assert main(["store", "copy", "--to", "sqlcipher", "--to-config", str(other),
                 "--data-dir", str(tmp_path / "data")]) == 1  # --data-dir applies to both
    assert "same sqlcipher store" in capsys.readouterr().err
    assert main(["store", "copy", "--to", "sqlcipher", "--to-config", str(other),
                 "--config", str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and f"sha256 {digest}" in out

    async def read_back() -> str:
        s = await SqlCipherStorage.open(tmp_path / "moved" / "qpc.db", KEY)
        try:
            assert await s.queue_depth(R, b"") == 10
            return (await tally(s)).digest
        finally:
            await s.close()

    assert asyncio.run(read_back()) == digest


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "source.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    return cfg


def test_copy_refusals_are_clear_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = populate(tmp_path / "data", 3)
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["store", "copy", "--to", "sqlcipher", *data]) == 1
    assert "source and target are the same sqlcipher store" in capsys.readouterr().err
    assert main(["store", "copy", "--to", "nosuch", *data]) == 1
    assert "no plugin opened storage 'nosuch'" in capsys.readouterr().err
    # Into a store that already holds data: refused, the target unchanged.
    populate(tmp_path / "full", 1)
    other = tmp_path / "full.toml"
    other.write_text(f'data_dir = "{tmp_path / "full"}"\n')
    assert main(["store", "copy", "--to", "sqlcipher", "--to-config", str(other),
                 "--config", str(_config(tmp_path))]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["store", "stats", "--data-dir", str(tmp_path / "full")]) == 0
    assert "sqlcipher: 6 records" in capsys.readouterr().out
    assert main(["store", "stats", *data]) == 0
    assert f"sha256 {digest}" in capsys.readouterr().out


def test_a_missing_source_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    typo = tmp_path / "dtaa"
    source = tmp_path / "typo.toml"
    source.write_text(f'data_dir = "{typo}"\n')
    target = tmp_path / "target.toml"
    target.write_text(f'data_dir = "{tmp_path / "t"}"\n')
    for cmd in (["store", "stats"], ["store", "copy", "--to", "sqlcipher", "--to-config",
                                     str(target)]):
        assert main([*cmd, "--config", str(source)]) == 1
        assert "no database at" in capsys.readouterr().err
    assert not typo.exists() or not any(typo.iterdir())  # no empty database, no key
    # An existing database without its key: refused, and no development key is made up.
    populate(tmp_path / "data", 1)
    monkeypatch.delenv("QPC_DB_KEY")
    assert main(["store", "stats", "--data-dir", str(tmp_path / "data")]) == 1
    assert "no database key" in capsys.readouterr().err
    assert not (tmp_path / "data" / "db.key").exists()
