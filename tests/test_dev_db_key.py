"""The development database key file (``data/db.key``): a bad file is a clear error, a new
key is written atomically, and no key is ever generated beside an existing database."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from qpc_core import cli
from qpc_core.builtin.sqlcipher import (
    DEV_KEY_FILE,
    database_without_key,
    dev_db_key,
    settings_db_key,
)
from qpc_core.errors import ConfigError
from qpc_core.testing import make_settings


@pytest.fixture
def qpc_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``qpc run --data-dir DIR`` in-process (no config file, no QPC_* environment):
    (exit status, stderr)."""
    for name in list(os.environ):
        if name.startswith("QPC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_setup_logging", lambda level: None)

    def run(data: Path) -> tuple[int, str]:
        capsys.readouterr()
        rc = cli.main(["run", "--data-dir", str(data), "--listen", "127.0.0.1:0",
                       "--metrics-listen", "127.0.0.1:0"])
        return rc, capsys.readouterr().err

    return run


def _dir_listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_empty_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DEV_KEY_FILE).write_text("")
    with pytest.raises(ConfigError, match=r"db\.key is empty or unreadable: the file is empty"):
        dev_db_key(tmp_path)
    (tmp_path / DEV_KEY_FILE).write_text(" \n")  # whitespace only: no key either
    with pytest.raises(ConfigError, match="is empty or unreadable"):
        dev_db_key(tmp_path)
    assert (tmp_path / DEV_KEY_FILE).read_text() == " \n"  # left for the operator to look at


def test_key_file_that_is_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DEV_KEY_FILE).mkdir()
    with pytest.raises(ConfigError, match="is empty or unreadable: it is a directory"):
        dev_db_key(tmp_path)


def test_empty_key_file_through_qpc_run(qpc_run, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DEV_KEY_FILE).write_text("")
    rc, err = qpc_run(data)
    assert rc == 1
    assert err.startswith("qpc: error: ") and "db.key is empty or unreadable" in err
    assert "Traceback" not in err
    assert not (data / "qpc.db").exists()  # nothing created with some other key


def test_new_key_is_whole_0600_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    key = dev_db_key(data)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    path = data / DEV_KEY_FILE
    assert path.read_text() == key + "\n"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert _dir_listing(data) == [DEV_KEY_FILE]
    assert dev_db_key(data) == key  # read back, not regenerated


def test_interrupted_key_write_leaves_no_key_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure (standing in for a crash) before the key is on disk leaves no db.key, so
    the next start generates a whole key instead of finding an empty or partial one."""
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        dev_db_key(tmp_path)
    assert _dir_listing(tmp_path) == []  # neither db.key nor a temporary file
    monkeypatch.undo()
    key = dev_db_key(tmp_path)
    assert (tmp_path / DEV_KEY_FILE).read_text() == key + "\n"


def test_key_created_concurrently_is_used_not_replaced(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process writing db.key between our check and our write wins: its key is
    kept (the database may already be encrypted with it) and returned."""
    real_link = os.link

    def link_after_another_process(src: str | os.PathLike[str],
                                   dst: str | os.PathLike[str]) -> None:
        Path(dst).write_text("the-other-processes-key\n")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_another_process)
    assert dev_db_key(tmp_path) == "the-other-processes-key"
    assert (tmp_path / DEV_KEY_FILE).read_text() == "the-other-processes-key\n"
    assert _dir_listing(tmp_path) == [DEV_KEY_FILE]


async def test_no_key_is_generated_beside_an_existing_database(app_factory,
                                                               tmp_path: Path) -> None:
    data = tmp_path / "keyed"
    app = await app_factory(data_dir=data, db_key="operator-key")
    await app.stop()
    assert (data / "qpc.db").is_file()
    settings = make_settings(data, db_key=None)
    assert database_without_key(settings) == data / "qpc.db"
    with pytest.raises(ConfigError, match=r"no database key for the existing database .*qpc\.db"):
        settings_db_key(settings)
    assert not (data / DEV_KEY_FILE).exists()
    # With its key configured, or with a development key file, it is not "without key".
    assert database_without_key(make_settings(data, db_key="operator-key")) is None
    (data / DEV_KEY_FILE).write_text("operator-key\n")
    assert database_without_key(settings) is None
    assert settings_db_key(settings) == "operator-key"


def test_qpc_run_refuses_to_generate_a_key_for_an_existing_database(
    qpc_run, tmp_path: Path
) -> None:
    from qpc_core.storage.sqlcipher import SqlCipherStorage

    data = tmp_path / "data"

    async def create_database() -> None:
        store = await SqlCipherStorage.open(data / "qpc.db", "operator-key", pool_size=1)
        await store.close()

    asyncio.run(create_database())
    before = _dir_listing(data)
    rc, err = qpc_run(data)
    assert rc == 1
    assert "qpc: error: config: db_key: no database key for the existing database" in err
    assert "Traceback" not in err
    assert not (data / DEV_KEY_FILE).exists()
    assert _dir_listing(data) == before


def test_new_data_dir_still_gets_a_generated_key(tmp_path: Path) -> None:
    data = tmp_path / "new"
    settings = make_settings(data, db_key=None)
    assert database_without_key(settings) is None
    key = settings_db_key(settings)
    assert (data / DEV_KEY_FILE).read_text() == key + "\n"
    # An empty database file (nothing written with any key) does not block a new key.
    other = tmp_path / "other"
    other.mkdir()
    (other / "qpc.db").touch()
    assert database_without_key(make_settings(other, db_key=None)) is None
