"""`qpc store backup`: an online backup of a live server's SQLCipher database (real `qpc run`
process under load, real files), restored into a new data directory and served again."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from qpc_core.errors import RpcError
from qpc_core.storage.sqlcipher import SqlCipherStorage
from qpc_core.testing import BIN, ServerProcess, process_client

pytestmark = pytest.mark.timeout(180)

KEY = "proc-test-key"  # ServerProcess's database key


async def qpc(*args: str, key: str = KEY) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "qpc"), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", ""), "QPC_DB_KEY": key})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_online_backup_of_a_live_server_restores_every_acknowledged_message(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    srv = ServerProcess(data)
    await srv.start()
    sender = await process_client(srv)
    receiver = await process_client(srv)
    rid, rkey = receiver.identity, receiver.identity_key
    assert rid is not None and rkey is not None
    await receiver.close()
    acked: dict[int, bytes] = {}
    errors: list[BaseException] = []
    backup_done = asyncio.Event()
    first_acks = asyncio.Event()

    async def keep_sending(worker: int) -> None:
        for i in range(5000):  # bounded; stops when the backup is done
            if backup_done.is_set():
                return
            payload = f"w{worker}-{i}".encode()
            try:
                acked[(await sender.enqueue(rkey, payload, verify=False)).seq] = payload
            except (RpcError, ConnectionError) as e:
                errors.append(e)
                return
            if len(acked) >= 300:
                first_acks.set()

    senders = [asyncio.ensure_future(keep_sending(w)) for w in range(8)]
    await asyncio.wait_for(first_acks.wait(), 60)
    before = dict(acked)  # acknowledged before the backup started: must all be in it
    out = tmp_path / "backups" / "qpc-1.db"
    rc, stdout, stderr = await qpc("store", "backup", str(out), "--data-dir", str(data))
    during = len(acked) - len(before)
    backup_done.set()
    await asyncio.gather(*senders)
    await sender.close()
    assert rc == 0, stderr
    assert "integrity check ok" in stdout
    assert not errors, errors  # the server kept answering during the backup
    assert during > 0, "enqueues must have gone on while the backup ran"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert not list(out.parent.glob("*.tmp*"))

    # Encrypted with the server's key: plain SQLite cannot read it.
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(out).execute("SELECT count(*) FROM sqlite_master").fetchall()
    # A second backup to the same name is refused and leaves the first alone.
    size = out.stat().st_size
    rc, _o, stderr = await qpc("store", "backup", str(out), "--data-dir", str(data))
    assert rc == 1 and "exists" in stderr and out.stat().st_size == size
    assert await srv.terminate() == 0

    # Restore: the backup becomes qpc.db of a new data directory; a server serves it.
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(out, restored / "qpc.db")
    srv2 = ServerProcess(restored)
    await srv2.start()
    try:
        receiver = await process_client(srv2, identity=rid)
        got: list[tuple[int, bytes]] = []
        for _ in range(1000):  # bounded drain
            batch = await receiver.fetch(limit=500)
            if not batch:
                break
            got.extend((m.seq, m.data) for m in batch)
        await receiver.close()
    finally:
        assert await srv2.terminate() == 0
    seqs = [s for s, _ in got]
    # A snapshot: a gap-free prefix of the commits, holding everything acknowledged before.
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= len(before)
    stored = dict(got)
    assert all(stored[s] == p for s, p in before.items())
    assert all(acked[s] == p for s, p in got)  # nothing that was not acknowledged


async def test_backup_refusals(tmp_path: Path) -> None:
    rc, _o, err = await qpc("store", "backup", str(tmp_path / "b.db"), "--data-dir",
                            str(tmp_path / "empty"))
    assert rc == 1 and "no database at" in err
    assert not (tmp_path / "empty" / "db.key").exists()  # no key generated for nothing
    assert not (tmp_path / "b.db").exists()
    db = await SqlCipherStorage.open(tmp_path / "data" / "qpc.db", KEY)
    await db.close()
    rc, _o, err = await qpc("store", "backup", str(tmp_path / "b.db"), "--data-dir",
                            str(tmp_path / "data"), key="not-the-key")
    assert rc == 1 and "wrong database key" in err
    assert not list(tmp_path.glob("b.db*"))


async def test_backing_up_a_backup_leaves_the_source_as_it_is(tmp_path: Path) -> None:
    """A backup is a single rollback-journal file; backing it up again (e.g. to move it)
    must not switch it to WAL or leave -wal/-shm files beside it."""
    db = await SqlCipherStorage.open(tmp_path / "data" / "qpc.db", KEY)
    await db.close()
    first, second = tmp_path / "b1.db", tmp_path / "b2.db"
    assert (await qpc("store", "backup", str(first), "--data-dir", str(tmp_path / "data")))[0] == 0
    backup_dir = tmp_path / "restore"
    backup_dir.mkdir()
    first.rename(backup_dir / "qpc.db")
    rc, _o, err = await qpc("store", "backup", str(second), "--data-dir", str(backup_dir))
    assert rc == 0, err
    assert sorted(p.name for p in backup_dir.iterdir()) == ["qpc.db"]

    def journal_mode(path: Path) -> str:
        import sqlcipher3

        conn = sqlcipher3.connect(str(path))
        try:
            conn.execute(f"PRAGMA key = '{KEY}'")
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
        finally:
            conn.close()

    assert await asyncio.to_thread(journal_mode, backup_dir / "qpc.db") == "delete"
    assert await asyncio.to_thread(journal_mode, second) == "delete"
