"""Selecting the PostgreSQL store: clear start-up errors for missing or bad settings."""

from __future__ import annotations

import logging

import pytest

from qpc_core.app import App
from qpc_core.errors import ConfigError, PluginError, StorageError
from qpc_core.testing import make_settings


async def start(tmp_path, monkeypatch, **overrides) -> App:
    monkeypatch.delenv("QPC_POSTGRES_DSN", raising=False)
    app = App(make_settings(tmp_path / "data", **overrides))
    await app.start()
    return app


async def test_missing_dsn_names_both_ways_to_set_it(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"QPC_POSTGRES_DSN or \[postgres\] dsn"):
        await start(tmp_path, monkeypatch, plugins=["postgres"], storage="postgres")


async def test_storage_postgres_without_the_plugin_is_refused(tmp_path, monkeypatch) -> None:
    with pytest.raises(PluginError, match="no plugin opened storage 'postgres'"):
        await start(tmp_path, monkeypatch, storage="postgres")


async def test_bad_schema_name_is_a_config_error(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="schema"):
        await start(tmp_path, monkeypatch, plugins=["postgres"], storage="postgres",
                    postgres={"dsn": "postgresql://x@127.0.0.1:1/x", "schema": "qpc; drop"})


async def test_environment_dsn_wins_over_the_file(tmp_path, monkeypatch, pg_dsn) -> None:
    monkeypatch.setenv("QPC_POSTGRES_DSN", pg_dsn)
    app = App(make_settings(tmp_path / "data", plugins=["postgres"], storage="postgres",
                            postgres={"dsn": "postgresql://nobody@127.0.0.1:1/none"}))
    await app.start()
    try:
        await app.storage.ping()
    finally:
        await app.stop()


async def test_unreachable_database_fails_start_up(tmp_path, monkeypatch) -> None:
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL"):
        await start(tmp_path, monkeypatch, plugins=["postgres"], storage="postgres",
                    postgres={"dsn": "postgresql://qpc:x@127.0.0.1:1/qpc",
                              "connect_timeout_secs": 0.5})


async def test_kt_log_runs_on_a_shared_store_and_sole_writer_is_deprecated(
    tmp_path, monkeypatch, pg_dsn, caplog
) -> None:
    app = await start(tmp_path, monkeypatch, plugins=["postgres", "kt_log"], storage="postgres",
                      postgres={"dsn": pg_dsn})
    try:
        assert "kt_log" in app.state and app.state["kt_log"].shared
    finally:
        await app.stop()
    with caplog.at_level(logging.WARNING, "qpc.kt_log"):  # old files still load
        app = await start(tmp_path, monkeypatch, plugins=["postgres", "kt_log"],
                          storage="postgres", postgres={"dsn": pg_dsn},
                          kt_log={"sole_writer": True})
    try:
        assert "sole_writer is no longer needed" in caplog.text
    finally:
        await app.stop()


async def test_blobs_need_a_sole_node_on_a_shared_store(tmp_path, monkeypatch, pg_dsn) -> None:
    with pytest.raises(PluginError, match=r"blobs.*sole_node = true"):
        await start(tmp_path, monkeypatch, plugins=["postgres", "blobs"], storage="postgres",
                    postgres={"dsn": pg_dsn})
    app = await start(tmp_path, monkeypatch, plugins=["postgres", "blobs"],
                      storage="postgres", postgres={"dsn": pg_dsn},
                      blobs={"sole_node": True})
    try:
        assert "blobs" in app.state
    finally:
        await app.stop()
