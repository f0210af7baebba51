"""Crash safety on PostgreSQL: a real `qpc run` process is SIGKILLed with enqueues in flight
and restarted; every acknowledged message is fetched once, in seq order."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpc_core.testing import ServerProcess, sigkill_loses_nothing

pytestmark = pytest.mark.timeout(240)


async def test_sigkill_loses_no_acknowledged_message_on_postgres(tmp_path: Path,
                                                                   pg_dsn: str) -> None:
    srv = ServerProcess(tmp_path / "data", args=["--plugins", "postgres"],
                        env={"QPC_STORAGE": "postgres", "QPC_POSTGRES_DSN": pg_dsn})
    await srv.start()
    assert any("storage: PostgreSQL" in line for line in srv.log)
    assert await sigkill_loses_nothing(srv, target=1000) >= 1000
    assert await srv.terminate() == 0
    assert not (tmp_path / "data" / "qpc.db").exists()  # nothing went to SQLCipher
