"""The SQLCipher database and its -wal / -shm files are created mode 0600, like the key
files: encrypted, but nobody else's business."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpc_core.storage.sqlcipher import SqlCipherStorage


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The common umask 022, under which SQLite on its own creates files 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


async def test_new_database_wal_and_shm_are_0600(tmp_path: Path, usual_umask: None) -> None:
    db = tmp_path / "qpc.db"
    store = await SqlCipherStorage.open(db, "k", pool_size=1)
    try:
        await store.kv_put("test", b"k", b"v")  # a write: the WAL has frames
        assert await store.kv_get("test", b"k") == b"v"
        files = {p.name: _mode(p) for p in tmp_path.iterdir()}
        assert {"qpc.db", "qpc.db-wal", "qpc.db-shm"} <= set(files), files
        assert files["qpc.db"] == 0o600
        assert files["qpc.db-wal"] == 0o600
        assert files["qpc.db-shm"] == 0o600
        assert all(mode & 0o077 == 0 for mode in files.values()), files
    finally:
        await store.close()


async def test_existing_database_keeps_its_mode_with_a_warning(
    tmp_path: Path, usual_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "qpc.db"
    store = await SqlCipherStorage.open(db, "k", pool_size=1)
    await store.close()
    assert "other users may read it" not in caplog.text
    os.chmod(db, 0o644)  # e.g. created by an older qpc
    caplog.set_level(logging.WARNING, logger="qpc.storage")
    store = await SqlCipherStorage.open(db, "k", pool_size=1)
    try:
        assert _mode(db) == 0o644  # not changed behind the operator's back...
        assert "has mode 0644: other users may read it" in caplog.text  # ...but reported
        assert "chmod 600" in caplog.text
    finally:
        await store.close()
