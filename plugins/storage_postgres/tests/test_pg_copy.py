"""Copying a whole store between backends (``qpc store copy``), on real SQLCipher files and
a real PostgreSQL server: everything arrives, seqs keep increasing, derived state (queue
depths, log sizes, key package order) is rebuilt, and a failed or refused copy writes
nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.errors import StorageError
from qpc_core.storage.base import NewMessage, SessionRecord, Storage
from qpc_core.storage.records import (
    ChannelRecord,
    Record,
    UserRecord,
    copy_store,
    tally,
)
from qpc_core.storage.sqlcipher import SqlCipherStorage

pytestmark = pytest.mark.timeout(120)

A, B, C, D = (bytes([i]) * 32 for i in (1, 2, 3, 4))
CH = b"group-1"
NOW = 1_700_000_000.0


async def populate(s: Storage) -> None:
    """Some of everything a server stores, including the awkward cases."""
    for name, ident in (("alice", A), ("Bob", B), ("zoë", C)):  # mixed case and non-ASCII
        await s.create_user(name, ident, now=NOW)
    await s.put_session(SessionRecord(b"t" * 32, A, "alice", NOW, NOW + 3600))
    await s.put_session(SessionRecord(b"u" * 32, B, "Bob", NOW, NOW + 7200))
    await s.set_hybrid_key(A, b"hybrid-a" * 10)
    await s.set_hybrid_key(B, b"hybrid-b" * 10)
    for i in range(3):  # FIFO order must survive the copy
        await s.add_key_package(A, f"kp-a-{i}".encode(), bytes([i]) * 32)
    await s.add_key_package(B, b"kp-b-0", b"\x09" * 32)
    assert await s.create_channel(CH, [A, B], A, now=NOW)
    day = 86_400

    async def put(recipient: bytes, channel: bytes, payload: bytes, mid: bytes,
                  ttl: float | None = None) -> int:
        (out,) = await s.enqueue(
            [NewMessage(recipient, channel, payload, mid, ttl)], max_depth=1000,
            dedup_since=time.time() - day)
        return out.seq

    for i in range(5):
        await put(B, b"", f"to-b-{i}".encode(), f"mid-b-{i}".encode().ljust(16, b"."),
                  time.time() + day if i == 4 else None)
    for i in range(2):
        await put(A, CH, f"to-a-{i}".encode(), b"")
    for i in range(3):  # an inbox emptied by a fetch: its next seq must still be 4
        await put(D, b"", f"to-d-{i}".encode(), f"mid-d-{i}".encode().ljust(16, b"."))
    assert len(await s.fetch(D, b"", 0, now=time.time())) == 3
    await s.kv_put("core", b"ed25519:delivery", b"k" * 32)
    await s.kv_put("blobs", b"\x00meta", b"v1")
    await s.kv_put("blobs", b"\xffmeta", b"v2")
    await s.log_append("kt", [f"leaf-{i}".encode() for i in range(5)])
    await s.log_append("audit", [b"x"])


EXPECTED = {"user": 3, "session": 2, "hybrid_key": 2, "key_package": 4, "channel": 1,
            "channel_member": 2, "inbox": 3, "message": 7, "dedup": 8, "kv": 3, "log": 6}


async def check_contents(s: Storage) -> None:
    """What a server would see on the copied store."""
    now = time.time()
    assert await s.queue_depth(B, b"") == 5
    assert await s.queue_depth(A, CH) == 2
    assert await s.total_queue_depth() == 7
    got = await s.peek(B, b"", 0, now=now)
    assert [(m.seq, m.payload) for m in got] == [(i + 1, f"to-b-{i}".encode()) for i in range(5)]
    # Seqs continue where the source stopped, also for the emptied inbox.
    (out,) = await s.enqueue([NewMessage(D, b"", b"after", b"")], max_depth=1000,
                             dedup_since=now - 60)
    assert out.seq == 4
    # A repeated message id is still recognised (dedup records came along).
    (dup,) = await s.enqueue([NewMessage(B, b"", b"again", b"mid-b-2".ljust(16, b"."))],
                             max_depth=1000, dedup_since=now - 86_400)
    assert dup.duplicate and dup.seq == 3
    assert [await s.pop_key_package(A) for _ in range(4)] == [b"kp-a-0", b"kp-a-1", b"kp-a-2",
                                                             None]
    assert await s.get_hybrid_keys([A, B, C]) == {A: b"hybrid-a" * 10, B: b"hybrid-b" * 10}
    assert sorted(await s.channel_members(CH) or []) == [A, B]
    sess = await s.get_session(b"t" * 32)
    assert sess is not None and sess.identity_key == A and sess.expires_at == NOW + 3600
    user = await s.get_user_by_name("zoë")
    assert user == UserRecord("zoë", C, NOW)
    assert await s.kv_get("core", b"ed25519:delivery") == b"k" * 32
    assert await s.log_size("kt") == 5
    assert await s.log_read("kt", 0, 5) == [f"leaf-{i}".encode() for i in range(5)]
    assert await s.log_append("kt", [b"leaf-5"]) == 5  # appends continue at the end


@pytest.fixture
async def sqlcipher(tmp_path: Path) -> AsyncIterator[SqlCipherStorage]:
    s = await SqlCipherStorage.open(tmp_path / "src.db", "source-key")
    yield s
    await s.close()


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[PostgresStorage]:
    s = await PostgresStorage.open(pg_dsn)
    yield s
    await s.close()


async def test_sqlcipher_to_postgres_and_back(tmp_path: Path, sqlcipher: SqlCipherStorage,
                                              pg: PostgresStorage) -> None:
    await populate(sqlcipher)
    before = await tally(sqlcipher)
    assert dict(before.counts) == EXPECTED

    report = await copy_store(sqlcipher, pg)
    assert report.verified and report.counts == EXPECTED and report.digest == before.digest
    assert (await tally(pg)).digest == before.digest

    # ... and back into a new SQLCipher file: the same records again.
    back = await SqlCipherStorage.open(tmp_path / "back.db", "other-key")
    try:
        assert (await copy_store(pg, back)).digest == before.digest
        await check_contents(back)
    finally:
        await back.close()
    await check_contents(pg)


async def test_copy_into_a_non_empty_store_is_refused_and_writes_nothing(
    sqlcipher: SqlCipherStorage, pg: PostgresStorage
) -> None:
    await populate(sqlcipher)
    await pg.create_user("existing", B, now=NOW)
    before = await tally(pg)
    with pytest.raises(StorageError, match="not empty"):
        await copy_store(sqlcipher, pg)
    after = await tally(pg)
    assert after.digest == before.digest and after.total == 1
    # load() itself checks too (inside its transaction), not only copy_store.
    with pytest.raises(StorageError, match="not empty"):
        await pg.load(sqlcipher.dump())
    assert (await tally(pg)).digest == before.digest


class FailingSource:
    """A source whose dump breaks after some records (a lost connection, a bad disk).
    ``copy_store`` only ever dumps a source, so that is all this implements."""

    name = "failing"

    def __init__(self, batches: list[list[Record]], error: Exception) -> None:
        self.batches = batches
        self.error = error

    async def dump(self) -> AsyncIterator[Sequence[Record]]:
        for b in self.batches:
            yield b
        raise self.error


def failing(batches: list[list[Record]], error: Exception) -> Storage:
    return cast(Storage, FailingSource(batches, error))


@pytest.mark.parametrize("target_kind", ["postgres", "sqlcipher"])
async def test_a_failed_copy_leaves_the_target_empty(
    target_kind: str, tmp_path: Path, pg: PostgresStorage
) -> None:
    source = failing(
        [[UserRecord("a", A, NOW), UserRecord("b", B, NOW)], [ChannelRecord(CH, A, NOW)]],
        OSError("disk went away"))
    target: Storage = pg
    if target_kind == "sqlcipher":
        target = await SqlCipherStorage.open(tmp_path / "t.db", "k")
    try:
        with pytest.raises(OSError, match="disk went away"):
            await copy_store(source, target)
        assert await target.is_empty()
        assert (await tally(target)).total == 0
    finally:
        if target is not pg:
            await target.close()


class FailingTarget:
    """A target that takes one batch and then fails (a full disk)."""

    name = "failing-target"

    async def is_empty(self) -> bool:
        return True

    async def load(self, batches: AsyncIterator[Sequence[Record]]) -> None:
        async for _batch in batches:
            raise OSError("target disk full")


async def test_a_failed_load_releases_the_source_snapshot(pg_dsn: str) -> None:
    """The PostgreSQL dump holds a pooled connection in a REPEATABLE READ transaction; a
    copy that fails in the target must end it at once, so closing the source while the
    error is being handled (as `qpc store copy` does) does not wait for that connection."""
    source = await PostgresStorage.open(pg_dsn)
    await populate(source)
    try:
        await copy_store(source, cast(Storage, FailingTarget()))
    except OSError as e:
        assert "target disk full" in str(e)
        await asyncio.wait_for(source.close(), 10)  # the pool waits 30 s for a held one
    else:
        raise AssertionError("the copy must fail")


async def test_records_out_of_order_are_rejected(pg: PostgresStorage) -> None:
    source = failing([[ChannelRecord(CH, A, NOW), UserRecord("a", A, NOW)]],
                     OSError("unreachable"))
    with pytest.raises(StorageError, match="after later types"):
        await copy_store(source, pg)
    assert await pg.is_empty()


async def test_a_cancelled_load_into_sqlcipher_leaves_it_empty(tmp_path: Path) -> None:
    """Ctrl-C during `qpc store copy --to sqlcipher`: the batch being written still finishes
    on its thread, then everything is rolled back (not committed row by row after a rollback
    that landed mid-batch)."""
    from qpc_core.storage.records import InboxRecord, MessageRecord

    second_batch = asyncio.Event()

    class Source:
        name = "slow"

        async def dump(self) -> AsyncIterator[Sequence[Record]]:
            yield [InboxRecord(A, b"", 50_001)]
            second_batch.set()
            yield [MessageRecord(A, b"", i, b"p" * 200, NOW, None) for i in range(1, 50_001)]

    target = await SqlCipherStorage.open(tmp_path / "t.db", "k")
    try:
        copy = asyncio.ensure_future(copy_store(cast(Storage, Source()), target))
        await second_batch.wait()
        copy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await copy
        assert await target.is_empty()
        assert (await tally(target)).total == 0
    finally:
        await target.close()
