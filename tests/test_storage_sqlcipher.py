"""The built-in SQLCipher storage backend (qpc_core.storage.sqlcipher)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import sqlcipher3  # type: ignore[import-untyped]

from qpc_core.errors import StorageError
from qpc_core.storage import sqlcipher as sqlcipher_mod
from qpc_core.storage.base import (
    EnqueueOutcome,
    NewMessage,
    QueueFull,
    SessionRecord,
    StoredMessage,
    WrongKey,
    prefix_end,
)
from qpc_core.storage.contract import StorageContract
from qpc_core.storage.sqlcipher import SCHEMA_VERSION, SqlCipherStorage

pytestmark = pytest.mark.asyncio

KEY = "test 'db' key"  # a quote on purpose: PRAGMA key escaping
OPERATOR_KEY_SQL = "PRAGMA key='test ''db'' key'"
ALICE = b"A" * 32
BOB = b"B" * 32
CAROL = b"C" * 32
CHAN = b"chan-1"
BIG = 1_000_000


def msg(recipient: bytes, payload: bytes, channel: bytes = b"", message_id: bytes = b"",
        expires_at: float | None = None) -> NewMessage:
    return NewMessage(recipient, channel, payload, message_id, expires_at, BOB)


class Commits:
    """Observer counting reported operations."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, float]] = []

    def __call__(self, op: str, seconds: float) -> None:
        assert seconds >= 0
        self.ops.append((op, seconds))

    def count(self, op: str = "commit") -> int:
        return sum(1 for o, _ in self.ops if o == op)


async def open_store(path: Path, key: str = KEY, **kw: Any) -> SqlCipherStorage:
    kw.setdefault("pool_size", 2)
    return await SqlCipherStorage.open(path, key, **kw)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "qpc.db"


@pytest.fixture
def commits() -> Commits:
    return Commits()


@pytest_asyncio.fixture
async def store(db_path: Path, commits: Commits) -> AsyncIterator[SqlCipherStorage]:
    st = await open_store(db_path, observer=commits)
    yield st
    await st.close()


async def enqueue_one(st: SqlCipherStorage, m: NewMessage, *, max_depth: int = BIG,
                      dedup_since: float = 0.0) -> EnqueueOutcome:
    (out,) = await st.enqueue([m], max_depth=max_depth, dedup_since=dedup_since)
    return out


async def hold_writer(st: SqlCipherStorage) -> threading.Event:
    """Park the writer thread inside a job until the returned event is set."""
    entered, gate = threading.Event(), threading.Event()

    def job(conn: Any) -> None:
        entered.set()
        gate.wait(30)

    held = st._write(job)
    await asyncio.to_thread(entered.wait, 30)
    held.add_done_callback(lambda f: f.exception())
    return gate


# -- delivery --------------------------------------------------------------------------------------


async def test_enqueue_peek_fetch_ack(store: SqlCipherStorage) -> None:
    now = time.time()
    outs = await store.enqueue([msg(ALICE, b"m1"), msg(ALICE, b"m2"), msg(ALICE, b"m3"),
                                msg(BOB, b"b1"), msg(ALICE, b"c1", CHAN)],
                               max_depth=BIG, dedup_since=0)
    assert outs == [EnqueueOutcome(1, False), EnqueueOutcome(2, False), EnqueueOutcome(3, False),
                    EnqueueOutcome(1, False), EnqueueOutcome(1, False)]
    assert await store.queue_depth(ALICE, b"") == 3
    assert await store.queue_depth(ALICE, CHAN) == 1
    assert await store.queue_depth(CAROL, b"") == 0
    assert await store.total_queue_depth() == 5

    assert await store.peek(ALICE, b"", 2, now=now) == [StoredMessage(1, b"m1"),
                                                        StoredMessage(2, b"m2")]
    assert await store.peek(ALICE, b"", 0, now=now) == [StoredMessage(1, b"m1"),
                                                        StoredMessage(2, b"m2"),
                                                        StoredMessage(3, b"m3")]
    # peek then ack
    assert await store.ack(ALICE, b"", 2) == 2
    assert await store.ack(ALICE, b"", 2) == 0
    assert await store.peek(ALICE, b"", 0, now=now) == [StoredMessage(3, b"m3")]

    # fetch removes, honours the limit, oldest first
    await store.enqueue([msg(ALICE, b"m4"), msg(ALICE, b"m5")], max_depth=BIG, dedup_since=0)
    assert await store.fetch(ALICE, b"", 2, now=now) == [StoredMessage(3, b"m3"),
                                                         StoredMessage(4, b"m4")]
    assert await store.fetch(ALICE, b"", 0, now=now) == [StoredMessage(5, b"m5")]
    assert await store.fetch(ALICE, b"", 0, now=now) == []
    assert await store.fetch(CAROL, b"", 0, now=now) == []
    assert await store.queue_depth(ALICE, b"") == 0
    assert await store.fetch(ALICE, CHAN, 0, now=now) == [StoredMessage(1, b"c1")]
    assert await store.total_queue_depth() == 1
    assert await store.enqueue([], max_depth=BIG, dedup_since=0) == []


async def test_seq_is_never_reused(db_path: Path) -> None:
    st = await open_store(db_path)
    assert [o.seq for o in await st.enqueue([msg(ALICE, b"1"), msg(ALICE, b"2")],
                                            max_depth=BIG, dedup_since=0)] == [1, 2]
    assert (await enqueue_one(st, msg(ALICE, b"3"))).seq == 3
    assert await st.ack(ALICE, b"", 3) == 3
    assert (await enqueue_one(st, msg(ALICE, b"4"))).seq == 4
    assert len(await st.fetch(ALICE, b"", 0, now=time.time())) == 1
    assert await st.queue_depth(ALICE, b"") == 0
    await st.close()

    st = await open_store(db_path)
    try:
        assert (await enqueue_one(st, msg(ALICE, b"5"))).seq == 5
        assert (await enqueue_one(st, msg(BOB, b"x"))).seq == 1
    finally:
        await st.close()


async def test_fetch_max_bytes(store: SqlCipherStorage) -> None:
    await store.enqueue([msg(ALICE, b"x" * 100) for _ in range(5)], max_depth=BIG,
                        dedup_since=0)
    now = time.time()
    assert [m.seq for m in await store.peek(ALICE, b"", 0, now=now, max_bytes=250)] == [1, 2]
    assert [m.seq for m in await store.fetch(ALICE, b"", 0, now=now, max_bytes=300)] == [1, 2, 3]
    # a message larger than the budget still comes out alone: the inbox cannot get stuck
    assert [m.seq for m in await store.fetch(ALICE, b"", 0, now=now, max_bytes=10)] == [4]
    assert [m.seq for m in await store.fetch(ALICE, b"", 1, now=now, max_bytes=10_000)] == [5]


async def test_dedup_within_and_outside_window(store: SqlCipherStorage) -> None:
    mid = b"m" * 16
    now = time.time()
    first = await enqueue_one(store, msg(ALICE, b"hello", message_id=mid), dedup_since=now - 60)
    assert first == EnqueueOutcome(1, False)
    again = await enqueue_one(store, msg(ALICE, b"hello", message_id=mid), dedup_since=now - 60)
    assert again == EnqueueOutcome(1, True)
    assert await store.queue_depth(ALICE, b"") == 1
    # still a duplicate after the original was fetched
    assert len(await store.fetch(ALICE, b"", 0, now=time.time())) == 1
    assert await enqueue_one(store, msg(ALICE, b"hello", message_id=mid),
                             dedup_since=now - 60) == EnqueueOutcome(1, True)
    # the same id in another inbox (other recipient or other channel) is not a duplicate
    assert await enqueue_one(store, msg(BOB, b"hello", message_id=mid)) == EnqueueOutcome(1, False)
    assert await enqueue_one(store, msg(ALICE, b"hello", CHAN, mid)) == EnqueueOutcome(1, False)
    # outside the window: stored again with a new seq, and that seq is remembered
    later = time.time() + 3600
    assert await enqueue_one(store, msg(ALICE, b"hello", message_id=mid),
                             dedup_since=later) == EnqueueOutcome(2, False)
    assert await enqueue_one(store, msg(ALICE, b"hello", message_id=mid),
                             dedup_since=now - 60) == EnqueueOutcome(2, True)
    # empty message ids never dedup
    assert (await enqueue_one(store, msg(ALICE, b"hello"))).duplicate is False
    assert (await enqueue_one(store, msg(ALICE, b"hello"))).duplicate is False


async def test_dedup_within_one_call(store: SqlCipherStorage) -> None:
    a, b = b"a" * 16, b"b" * 16
    outs = await store.enqueue(
        [msg(ALICE, b"1", message_id=a), msg(ALICE, b"2", message_id=b),
         msg(ALICE, b"1", message_id=a), msg(BOB, b"1", message_id=a)],
        max_depth=BIG, dedup_since=0,
    )
    assert outs == [EnqueueOutcome(1, False), EnqueueOutcome(2, False), EnqueueOutcome(1, True),
                    EnqueueOutcome(1, False)]
    assert await store.queue_depth(ALICE, b"") == 2
    outs = await store.enqueue([msg(ALICE, b"1", message_id=a), msg(ALICE, b"1", message_id=a)],
                               max_depth=BIG, dedup_since=0)
    assert outs == [EnqueueOutcome(1, True), EnqueueOutcome(1, True)]


async def test_purge_dedup(store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlcipher_mod, "PURGE_CHUNK", 3)
    ids = [bytes([i]) * 16 for i in range(7)]
    await store.enqueue([msg(ALICE, b"p", message_id=i) for i in ids], max_depth=BIG,
                        dedup_since=0)
    assert await store.purge_dedup(time.time() - 3600) == 0
    assert await store.purge_dedup(time.time() + 1) == 7  # in several chunks
    out = await enqueue_one(store, msg(ALICE, b"p", message_id=ids[0]))
    assert out == EnqueueOutcome(8, False)


async def test_queue_full_is_all_or_nothing(store: SqlCipherStorage) -> None:
    await store.enqueue([msg(ALICE, b"1"), msg(ALICE, b"2")], max_depth=2, dedup_since=0)
    with pytest.raises(QueueFull) as info:
        await store.enqueue([msg(BOB, b"to bob", message_id=b"i" * 16), msg(ALICE, b"3")],
                            max_depth=2, dedup_since=0)
    assert info.value.recipient_key == ALICE
    assert info.value.channel_id == b""
    assert info.value.depth == 2
    assert isinstance(info.value, StorageError)
    assert await store.queue_depth(BOB, b"") == 0  # nothing written for the other recipient
    assert await store.peek(BOB, b"", 0, now=time.time()) == []
    # the rejected message id was not recorded, the seq was not consumed
    assert await enqueue_one(store, msg(BOB, b"to bob", message_id=b"i" * 16),
                             max_depth=2) == EnqueueOutcome(1, False)
    await store.ack(ALICE, b"", 1)
    assert (await enqueue_one(store, msg(ALICE, b"3"), max_depth=2)).seq == 3
    # a batch that alone exceeds the limit
    with pytest.raises(QueueFull):
        await store.enqueue([msg(CAROL, b"x")] * 3, max_depth=2, dedup_since=0)
    assert await store.queue_depth(CAROL, b"") == 0


async def test_single_enqueue_queue_full_and_duplicates(store: SqlCipherStorage) -> None:
    """The one-message path (reserve, then claim the id): a full queue leaves neither the id
    nor the seq behind, and a retry of an already stored message is a duplicate even when
    the queue is full."""
    mid, other = b"d" * 16, b"e" * 16
    kept = await enqueue_one(store, msg(ALICE, b"1", message_id=mid), max_depth=1)
    assert kept == EnqueueOutcome(1, False)
    with pytest.raises(QueueFull) as info:
        await enqueue_one(store, msg(ALICE, b"2", message_id=other), max_depth=1)
    assert info.value.depth == 1
    # the retry of the stored one: its original seq, not "queue full"
    assert await enqueue_one(store, msg(ALICE, b"1", message_id=mid),
                             max_depth=1) == EnqueueOutcome(1, True)
    assert await store.queue_depth(ALICE, b"") == 1
    await store.ack(ALICE, b"", 1)
    # the refused one was not remembered and did not use up a seq
    assert await enqueue_one(store, msg(ALICE, b"2", message_id=other),
                             max_depth=1) == EnqueueOutcome(2, False)
    # a duplicate offered to a waiting reader is still a duplicate (and nothing is taken)
    (t,) = await store.enqueue([msg(ALICE, b"2", message_id=other)], max_depth=BIG,
                               dedup_since=0.0, take=[(ALICE, b"")])
    assert (t.seq, t.duplicate, t.taken) == (2, True, False)
    assert (await enqueue_one(store, msg(ALICE, b"3"))).seq == 3


async def test_queue_full_ignores_expired_messages(store: SqlCipherStorage) -> None:
    past = time.time() - 10
    await store.enqueue([msg(ALICE, b"old", expires_at=past)] * 2, max_depth=2, dedup_since=0)
    assert await store.queue_depth(ALICE, b"") == 2  # expired but uncollected still counted
    out = await enqueue_one(store, msg(ALICE, b"new"), max_depth=2)
    assert out.seq == 3
    with pytest.raises(QueueFull) as info:
        await store.enqueue([msg(ALICE, b"x")] * 2, max_depth=2, dedup_since=0)
    assert info.value.depth == 1


async def test_expiry(store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    await store.enqueue([
        msg(ALICE, b"gone", expires_at=now - 1),
        msg(ALICE, b"keep", expires_at=now + 3600),
        msg(ALICE, b"edge", expires_at=now),
        msg(ALICE, b"forever"),
        msg(BOB, b"gone too", expires_at=now - 5),
    ], max_depth=BIG, dedup_since=0)
    assert await store.peek(ALICE, b"", 0, now=now) == [StoredMessage(2, b"keep"),
                                                        StoredMessage(4, b"forever")]
    assert await store.peek(ALICE, b"", 1, now=now) == [StoredMessage(2, b"keep")]
    assert await store.queue_depth(ALICE, b"") == 4
    monkeypatch.setattr(sqlcipher_mod, "PURGE_CHUNK", 2)
    assert await store.purge_expired(now) == 3
    assert await store.purge_expired(now) == 0
    assert await store.queue_depth(ALICE, b"") == 2
    assert await store.queue_depth(BOB, b"") == 0
    assert await store.total_queue_depth() == 2
    # a later "now" makes more messages invisible to fetch, which also drops the expired ones
    # it skipped on the way
    assert await store.fetch(ALICE, b"", 0, now=now + 7200) == [StoredMessage(4, b"forever")]
    assert await store.total_queue_depth() == 0
    assert await store.purge_expired(now + 7200) == 0


# -- accounts (the rest of keys, users, channels, sessions, kv and logs: the contract) ------


async def test_delete_account(store: SqlCipherStorage) -> None:
    now = time.time()
    for ident, name in ((ALICE, "alice"), (BOB, "bob")):
        await store.create_user(name, ident, now=now)
        await store.enqueue([msg(ident, b"p", message_id=b"d" * 16), msg(ident, b"q", CHAN)],
                            max_depth=BIG, dedup_since=0)
        await store.add_key_package(ident, b"kp", b"fp")
        await store.set_hybrid_key(ident, b"hk")
        await store.put_session(SessionRecord(b"tok" + ident, ident, name, now, now + 60))
    await store.create_channel(CHAN, [ALICE, BOB], ALICE, now=now)

    assert await store.delete_account(ALICE) == "alice"

    assert await store.get_user_by_name("alice") is None
    assert await store.get_user_by_identity(ALICE) is None
    assert await store.queue_depth(ALICE, b"") == 0
    assert await store.queue_depth(ALICE, CHAN) == 0
    assert await store.peek(ALICE, CHAN, 0, now=now) == []
    assert await store.count_key_packages(ALICE) == 0
    assert await store.get_hybrid_keys([ALICE, BOB]) == {BOB: b"hk"}
    assert await store.get_session(b"tok" + ALICE) is None
    assert await store.channel_members(CHAN) == [BOB]
    # the dedup id is forgotten too
    assert (await enqueue_one(store, msg(ALICE, b"p", message_id=b"d" * 16))).duplicate is False
    # Bob is untouched
    assert await store.get_user_by_name("bob") is not None
    assert await store.queue_depth(BOB, b"") == 1
    assert await store.queue_depth(BOB, CHAN) == 1
    assert await store.count_key_packages(BOB) == 1
    assert await store.get_session(b"tok" + BOB) is not None
    assert (await enqueue_one(store, msg(BOB, b"p", message_id=b"d" * 16))).duplicate is True
    assert await store.total_queue_depth() == 3

    assert await store.delete_account(CAROL) is None


async def test_prefix_end() -> None:
    assert prefix_end(b"") is None
    assert prefix_end(b"\xff\xff") is None
    assert prefix_end(b"a") == b"b"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\x00\xfe\xff") == b"\x00\xff"


# -- lifecycle, durability, encryption --------------------------------------------------------


async def test_durable_across_close_and_reopen(db_path: Path) -> None:
    st = await open_store(db_path)
    await st.enqueue([msg(ALICE, b"persist")], max_depth=BIG, dedup_since=0)
    await st.create_user("alice", ALICE, now=1.0)
    await st.kv_put("ns", b"k", b"v")
    await st.log_append("log", [b"e"])
    await st.close()
    st = await open_store(db_path)
    try:
        assert await st.peek(ALICE, b"", 0, now=time.time()) == [StoredMessage(1, b"persist")]
        assert await st.get_user_by_identity(ALICE) is not None
        assert await st.kv_get("ns", b"k") == b"v"
        assert await st.log_read("log", 0, 1) == [b"e"]
    finally:
        await st.close()


async def test_close_drains_queued_writes(db_path: Path) -> None:
    st = await open_store(db_path)
    tasks = [asyncio.create_task(enqueue_one(st, msg(ALICE, b"%d" % i))) for i in range(50)]
    closer = asyncio.create_task(st.close())  # scheduled after every enqueue has queued
    outs = await asyncio.gather(*tasks)
    await closer
    assert [o.seq for o in outs] == list(range(1, 51))
    st = await open_store(db_path)
    try:
        assert await st.queue_depth(ALICE, b"") == 50
    finally:
        await st.close()


async def test_calls_after_close_fail(db_path: Path) -> None:
    st = await open_store(db_path)
    await st.ping()
    await asyncio.gather(st.close(), st.close())
    await st.close()  # idempotent
    for call in (st.ping(), st.queue_depth(ALICE, b""), st.kv_put("n", b"k", b"v"),
                 st.enqueue([msg(ALICE, b"x")], max_depth=BIG, dedup_since=0),
                 st.fetch(ALICE, b"", 0, now=0.0)):
        with pytest.raises(StorageError, match="storage is closed"):
            await call


async def test_encrypted_on_disk(db_path: Path) -> None:
    st = await open_store(db_path)
    await st.enqueue([msg(ALICE, b"secret payload")] * 3, max_depth=BIG, dedup_since=0)
    await st.close()
    raw = await asyncio.to_thread(db_path.read_bytes)
    assert b"secret payload" not in raw
    assert not raw.startswith(b"SQLite format 3")
    with closing(sqlite3.connect(db_path)) as plain, pytest.raises(sqlite3.DatabaseError):
        plain.execute("SELECT count(*) FROM sqlite_master").fetchall()
    with pytest.raises(WrongKey, match="wrong database key or not a qpc database"):
        await open_store(db_path, "not the key")
    # an operator with any SQLCipher 4 client and the passphrase
    with closing(sqlcipher3.connect(str(db_path))) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        conn.execute("PRAGMA wal_autocheckpoint=2000")
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
    # and the store still opens with the right key afterwards
    st = await open_store(db_path)
    assert await st.queue_depth(ALICE, b"") == 3
    await st.close()


async def test_plain_sqlite_file_is_wrong_key(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as plain:
        plain.execute("CREATE TABLE t (x)")
        plain.commit()
    with pytest.raises(WrongKey):
        await open_store(db_path)


async def test_newer_schema_is_refused(db_path: Path) -> None:
    st = await open_store(db_path)
    await st.close()
    with closing(sqlcipher3.connect(str(db_path))) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
        conn.commit()
    with pytest.raises(StorageError) as info:
        await open_store(db_path)
    assert f"version {SCHEMA_VERSION + 7}" in str(info.value)
    assert f"schema version {SCHEMA_VERSION}" in str(info.value)


async def test_migrations_record_version(db_path: Path) -> None:
    st = await open_store(db_path)
    await st.close()
    with closing(sqlcipher3.connect(str(db_path))) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert {"inboxes", "messages", "dedup", "key_packages", "hybrid_keys", "users",
                "channels", "channel_members", "sessions", "kv", "logs"} <= names
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    st = await open_store(db_path)  # reopening an up-to-date file changes nothing
    await st.close()


async def test_migration_2_keeps_messages_of_a_version_1_file(db_path: Path) -> None:
    """A file written by schema 1 (messages with a rowid) opens under the current schema
    with every message, seq, expiry and depth intact, and the depth trigger still works."""
    v1 = dict(sqlcipher_mod.MIGRATIONS)[1]
    with closing(sqlcipher3.connect(str(db_path), isolation_level=None)) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        for stmt in sqlcipher_mod._split_sql(v1):
            conn.execute(stmt)
        conn.execute(f"PRAGMA application_id = {sqlcipher_mod.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO inboxes VALUES (?, x'', 4, 3)", (ALICE,))
        far = time.time() + 3600
        for seq, exp in ((1, None), (2, far), (3, None)):
            conn.execute(
                "INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at,"
                " payload) VALUES (?, x'', ?, ?, 0, ?)", (ALICE, seq, exp, b"m%d" % seq))
    st = await open_store(db_path)
    try:
        assert await st.queue_depth(ALICE, b"") == 3
        got = await st.fetch(ALICE, b"", 2, now=time.time())
        assert [(m.seq, m.payload) for m in got] == [(1, b"m1"), (2, b"m2")]
        assert await st.queue_depth(ALICE, b"") == 1  # the recreated trigger counted down
        out = await enqueue_one(st, msg(ALICE, b"m4"))
        assert out.seq == 4  # next_seq carried over
        assert [m.seq for m in await st.fetch(ALICE, b"", 0, now=time.time())] == [3, 4]
    finally:
        await st.close()
    with closing(sqlcipher3.connect(str(db_path))) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
        assert "WITHOUT ROWID" in sql


async def test_migration_3_repairs_rows_left_by_an_old_restore(db_path: Path) -> None:
    """A schema-2 file with what the old restore could leave: a message of a deleted inbox,
    and a re-created inbox whose next seq and depth do not cover a stored row.  After the
    upgrade, enqueues to both inboxes work and every count is right."""
    scripts = dict(sqlcipher_mod.MIGRATIONS)
    with closing(sqlcipher3.connect(str(db_path), isolation_level=None)) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        for v in (1, 2):
            for stmt in sqlcipher_mod._split_sql(scripts[v]):
                conn.execute(stmt)
        conn.execute(f"PRAGMA application_id = {sqlcipher_mod.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 2")
        ins = ("INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at,"
               " payload) VALUES (?, x'', ?, NULL, 0, ?)")
        conn.execute(ins, (ALICE, 1, b"orphan"))  # its inbox was deleted
        conn.execute("INSERT INTO inboxes VALUES (?, x'', 2, 1)", (BOB,))
        conn.execute(ins, (BOB, 1, b"b1"))
        conn.execute(ins, (BOB, 3, b"put back late"))  # beyond next_seq, not in depth
    st = await open_store(db_path)
    try:
        assert await st.queue_depth(ALICE, b"") == 0
        assert (await enqueue_one(st, msg(ALICE, b"new"))).seq == 1
        assert [m.payload for m in await st.fetch(ALICE, b"", 0, now=time.time())] == [b"new"]
        assert await st.queue_depth(BOB, b"") == 2
        assert (await enqueue_one(st, msg(BOB, b"b4"))).seq == 4
        got = await st.fetch(BOB, b"", 0, now=time.time())
        assert [(m.seq, m.payload) for m in got] == [(1, b"b1"), (3, b"put back late"),
                                                     (4, b"b4")]
        assert await st.queue_depth(BOB, b"") == 0
    finally:
        await st.close()


async def test_migration_4_gives_every_inbox_an_epoch(db_path: Path) -> None:
    """A schema-3 file opens with its inboxes rebuilt around an ``epoch`` column: messages,
    seqs and depths intact, the depth trigger working, each inbox its own epoch, and a new
    inbox of the same name (after DeleteAccount) another one."""
    scripts = dict(sqlcipher_mod.MIGRATIONS)
    with closing(sqlcipher3.connect(str(db_path), isolation_level=None)) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        for v in (1, 2, 3):
            for stmt in sqlcipher_mod._split_sql(scripts[v]):
                conn.execute(stmt)
        conn.execute(f"PRAGMA application_id = {sqlcipher_mod.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 3")
        conn.execute("INSERT INTO inboxes VALUES (?, x'', 3, 2)", (ALICE,))
        conn.execute("INSERT INTO inboxes VALUES (?, x'', 5, 0)", (BOB,))
        for seq in (1, 2):
            conn.execute(
                "INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at,"
                " payload) VALUES (?, x'', ?, NULL, 0, ?)", (ALICE, seq, b"a%d" % seq))

    def epochs() -> dict[bytes, int]:
        with closing(sqlcipher3.connect(str(db_path))) as conn:
            conn.execute(OPERATOR_KEY_SQL)
            return dict(conn.execute("SELECT recipient_key, epoch FROM inboxes").fetchall())

    st = await open_store(db_path)
    try:
        assert await st.queue_depth(ALICE, b"") == 2
        got = await st.fetch(ALICE, b"", 1, now=time.time())
        assert [(m.seq, m.payload) for m in got] == [(1, b"a1")]
        assert await st.queue_depth(ALICE, b"") == 1  # the trigger, created again, counts
        (t,) = await st.enqueue([msg(BOB, b"b5")], max_depth=BIG, dedup_since=0.0,
                                take=[(BOB, b"")])
        assert (t.seq, t.taken) == (5, True)  # next_seq carried over
        before = epochs()
        assert before[BOB] == t.inbox_epoch and before[ALICE] != before[BOB]
        assert await st.delete_account(BOB) is None
        assert (await enqueue_one(st, msg(BOB, b"again"))).seq == 1
        assert epochs()[BOB] != before[BOB]  # another incarnation
    finally:
        await st.close()
    with closing(sqlcipher3.connect(str(db_path))) as conn:
        conn.execute(OPERATOR_KEY_SQL)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


# -- group commit ---------------------------------------------------------------------------------


async def test_group_commit_batches_concurrent_writes(store: SqlCipherStorage,
                                                      commits: Commits) -> None:
    before = commits.count()
    outs = await asyncio.gather(*(enqueue_one(store, msg(ALICE, b"%d" % i)) for i in range(200)))
    seqs = [o.seq for o in outs]
    assert seqs == list(range(1, 201))  # distinct and increasing in submission order
    used = commits.count() - before
    assert 1 <= used <= 50, used
    assert await store.queue_depth(ALICE, b"") == 200
    assert commits.count("read") >= 1


async def test_without_group_commit_each_job_commits(db_path: Path, commits: Commits) -> None:
    st = await open_store(db_path, group_commit=False, observer=commits)
    try:
        outs = await asyncio.gather(*(enqueue_one(st, msg(ALICE, b"x")) for _ in range(20)))
        assert sorted(o.seq for o in outs) == list(range(1, 21))
        assert commits.count() == 20
    finally:
        await st.close()


async def test_failing_job_does_not_fail_its_group(store: SqlCipherStorage,
                                                   commits: Commits) -> None:
    await enqueue_one(store, msg(CAROL, b"fills the queue"), max_depth=1)
    gate = await hold_writer(store)
    before = commits.count()
    good = [asyncio.create_task(enqueue_one(store, msg(ALICE, b"%d" % i))) for i in range(10)]
    full = asyncio.create_task(enqueue_one(store, msg(CAROL, b"no room"), max_depth=1))
    more = [asyncio.create_task(enqueue_one(store, msg(BOB, b"%d" % i))) for i in range(3)]
    asyncio.get_running_loop().call_soon(gate.set)  # after every task above has queued
    results = await asyncio.gather(*good, full, *more, return_exceptions=True)
    # all 14 jobs ran in one transaction (after the one holding the writer)
    assert commits.count() - before == 2
    assert isinstance(results[10], QueueFull)
    ok = [r for i, r in enumerate(results) if i != 10]
    assert all(isinstance(r, EnqueueOutcome) for r in ok)
    assert [r.seq for r in ok if isinstance(r, EnqueueOutcome)] == [*range(1, 11), 1, 2, 3]
    assert await store.queue_depth(ALICE, b"") == 10
    assert await store.queue_depth(CAROL, b"") == 1
    assert await store.queue_depth(BOB, b"") == 3
    # The refused enqueue left no trace: its seq reservation was undone.
    assert (await enqueue_one(store, msg(CAROL, b"later"))).seq == 2


class MergedRuns:
    """Records the sizes of the enqueue runs the writer merged into one call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = sqlcipher_mod._enqueue_merged

        def spy(conn: Any, run: list[Any]) -> Any:
            self.sizes.append(len(run))
            return real(conn, run)

        monkeypatch.setattr(sqlcipher_mod, "_enqueue_merged", spy)


async def test_concurrent_enqueues_are_merged_with_one_by_one_results(
    store: SqlCipherStorage, commits: Commits, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = MergedRuns(monkeypatch)
    await enqueue_one(store, msg(ALICE, b"old", message_id=b"seen"))  # seq 1, before the batch
    gate = await hold_writer(store)
    before = commits.count()
    calls = [
        store.enqueue([msg(ALICE, b"a", message_id=b"m1")], max_depth=BIG, dedup_since=0),
        store.enqueue([msg(BOB, b"b", message_id=b"m1")], max_depth=BIG, dedup_since=0),
        store.enqueue([msg(ALICE, b"again", message_id=b"m1")], max_depth=BIG, dedup_since=0),
        store.enqueue([msg(ALICE, b"stored", message_id=b"seen")], max_depth=BIG,
                      dedup_since=0),
        store.enqueue([msg(ALICE, b"c"), msg(BOB, b"d"), msg(ALICE, b"e", CHAN)],
                      max_depth=BIG, dedup_since=0),
        store.enqueue([msg(ALICE, b"f")], max_depth=BIG, dedup_since=0),
    ]
    tasks = [asyncio.ensure_future(c) for c in calls]
    asyncio.get_running_loop().call_soon(gate.set)
    results = await asyncio.gather(*tasks)
    assert merged.sizes == [6]
    assert commits.count() - before == 2  # the holder, then the whole batch
    got = [[(o.seq, o.duplicate) for o in r] for r in results]
    assert got == [
        [(2, False)],
        [(1, False)],
        [(2, True)],  # the same id as an earlier call of the batch: its duplicate
        [(1, True)],  # the same id as a committed message
        [(3, False), (2, False), (1, False)],
        [(4, False)],
    ]
    now = time.time()
    assert [m.payload for m in await store.peek(ALICE, b"", 0, now=now)] == [
        b"old", b"a", b"c", b"f"]
    assert [m.payload for m in await store.peek(BOB, b"", 0, now=now)] == [b"b", b"d"]
    assert await store.queue_depth(ALICE, CHAN) == 1


async def test_a_full_inbox_in_a_merged_run_fails_only_its_calls(
    store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = MergedRuns(monkeypatch)
    for i in range(2):
        await enqueue_one(store, msg(CAROL, b"%d" % i), max_depth=3)
    gate = await hold_writer(store)
    tasks = [
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"a1"), max_depth=3)),
        asyncio.ensure_future(enqueue_one(store, msg(CAROL, b"fits"), max_depth=3)),
        asyncio.ensure_future(enqueue_one(store, msg(CAROL, b"full", message_id=b"x"),
                                          max_depth=3)),
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"a2"), max_depth=3)),
    ]
    asyncio.get_running_loop().call_soon(gate.set)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert merged.sizes == [4]
    assert isinstance(results[2], QueueFull), results[2]
    assert [(r.seq, r.duplicate) for r in results if isinstance(r, EnqueueOutcome)] == [
        (1, False), (3, False), (2, False)]
    assert await store.queue_depth(CAROL, b"") == 3
    assert await store.queue_depth(ALICE, b"") == 2
    # The refused call left nothing behind: no seq used, no dedup record.
    await store.ack(CAROL, b"", 3)
    again = await enqueue_one(store, msg(CAROL, b"retry", message_id=b"x"), max_depth=3)
    assert (again.seq, again.duplicate) == (4, False)


async def test_merged_batches_match_one_call_at_a_time(tmp_path: Path) -> None:
    """Differential check: random mixes of single and batch calls (repeated ids, channels,
    inboxes near their depth limit) give the same answers and the same stored inboxes
    whether the writer merges them into one transaction or runs them one by one."""
    rng = random.Random(20261129)
    inboxes = [(ALICE, b""), (BOB, b""), (ALICE, CHAN), (CAROL, b"")]
    merged_st = await open_store(tmp_path / "merged.db")
    serial_st = await open_store(tmp_path / "serial.db")
    try:
        for rnd in range(12):
            calls = []
            for _ in range(rng.randint(2, 25)):
                size = 1 if rng.random() < 0.7 else rng.randint(2, 4)
                call = []
                for _ in range(size):
                    r, c = rng.choice(inboxes)
                    mid = b"" if rng.random() < 0.3 else b"id-%02d-%d" % (rnd, rng.randint(0, 9))
                    call.append(msg(r, b"p%d" % rng.randint(0, 999), c, mid.ljust(16, b".")
                                    if mid else b""))
                calls.append(call)
            depth = rng.randint(4, 12)

            async def one(st: SqlCipherStorage, call: list[NewMessage],
                          depth: int = depth) -> Any:
                try:
                    outs = await st.enqueue(call, max_depth=depth, dedup_since=0)
                except QueueFull:
                    return "full"
                return [(o.seq, o.duplicate) for o in outs]

            gate = await hold_writer(merged_st)
            tasks = [asyncio.ensure_future(one(merged_st, c)) for c in calls]
            asyncio.get_running_loop().call_soon(gate.set)
            merged = await asyncio.gather(*tasks)
            serial = [await one(serial_st, c) for c in calls]
            assert merged == serial, (rnd, calls)
            now = time.time()
            for r, c in inboxes:
                a = [(m.seq, m.payload) for m in await merged_st.peek(r, c, 0, now=now)]
                b = [(m.seq, m.payload) for m in await serial_st.peek(r, c, 0, now=now)]
                assert a == b, (rnd, r, c)
                if rng.random() < 0.5 and a:  # make room sometimes
                    upto = rng.choice(a)[0]
                    assert await merged_st.ack(r, c, upto) == await serial_st.ack(r, c, upto)
    finally:
        await merged_st.close()
        await serial_st.close()


async def test_only_compatible_enqueues_are_merged(
    store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls that hand messages over to a waiting reader, calls with another depth limit and
    other jobs between calls split the runs; order is kept across the splits."""
    merged = MergedRuns(monkeypatch)
    gate = await hold_writer(store)
    tasks = [
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"1"))),
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"2"))),
        asyncio.ensure_future(store.enqueue([msg(BOB, b"taken")], max_depth=BIG,
                                            dedup_since=0, take={(BOB, b"")})),
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"3"))),
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"4"), max_depth=BIG - 1)),
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"5"))),
        asyncio.ensure_future(store.ack(ALICE, b"", 1)),
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"6"))),
        asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"7"))),
    ]
    asyncio.get_running_loop().call_soon(gate.set)
    results = await asyncio.gather(*tasks)
    assert merged.sizes == [2, 2]  # 1+2, then 6+7; the others ran alone
    taken = results[2]
    assert isinstance(taken, list) and taken[0].taken
    seqs = [r.seq for i, r in enumerate(results) if i not in (2, 6)]
    assert seqs == [1, 2, 3, 4, 5, 6, 7]
    assert [m.payload for m in await store.peek(ALICE, b"", 0, now=time.time())] == [
        b"2", b"3", b"4", b"5", b"6", b"7"]


async def test_unexpected_error_in_a_batch_reruns_it_job_by_job(
    store: SqlCipherStorage, commits: Commits
) -> None:
    """A delivery job that fails in an unexpected way mid-transaction (here: a payload SQLite
    cannot bind, after its seq was reserved) must not take its batch down or leave writes."""
    gate = await hold_writer(store)
    before = commits.count()
    good = [asyncio.create_task(enqueue_one(store, msg(ALICE, b"%d" % i))) for i in range(3)]
    bad = asyncio.create_task(enqueue_one(store, msg(BOB, object())))  # type: ignore[arg-type]
    last = asyncio.create_task(enqueue_one(store, msg(ALICE, b"last")))
    asyncio.get_running_loop().call_soon(gate.set)
    results = await asyncio.gather(*good, bad, last, return_exceptions=True)
    assert isinstance(results[3], StorageError), results[3]
    assert [r.seq for r in results if isinstance(r, EnqueueOutcome)] == [1, 2, 3, 4]
    assert commits.count() - before == 2  # the holder, then the batch (rerun once)
    assert await store.queue_depth(ALICE, b"") == 4
    assert await store.queue_depth(BOB, b"") == 0
    assert (await enqueue_one(store, msg(BOB, b"ok"))).seq == 1


async def test_failed_commit_fails_the_whole_batch(store: SqlCipherStorage) -> None:
    def violates_at_commit(conn: Any) -> None:
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute("INSERT INTO channel_members (channel_id, identity_key) VALUES (?, ?)",
                     (b"no such channel", ALICE))

    gate = await hold_writer(store)
    ok_task = asyncio.create_task(enqueue_one(store, msg(ALICE, b"x")))
    bad = store._write(violates_at_commit)
    asyncio.get_running_loop().call_soon(gate.set)
    results = await asyncio.gather(ok_task, bad, return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results), results
    assert await store.queue_depth(ALICE, b"") == 0
    assert await store.peek(ALICE, b"", 0, now=time.time()) == []
    assert (await enqueue_one(store, msg(ALICE, b"y"))).seq == 1  # the store carries on


async def test_cancelled_caller_does_not_break_the_writer(store: SqlCipherStorage) -> None:
    gate = await hold_writer(store)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(enqueue_one(store, msg(ALICE, b"x")))
    loop.call_soon(task.cancel)  # runs after the task queued its job
    loop.call_soon(gate.set)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await enqueue_one(store, msg(ALICE, b"y"))).seq == 2  # the first one committed


async def test_writer_failure_fails_calls_instead_of_hanging(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = await open_store(db_path)

    def crash(conn: Any, batch: Any) -> None:
        raise RuntimeError("writer bug")

    monkeypatch.setattr(st, "_run_batch", crash)
    with pytest.raises(StorageError, match="storage writer failed"):
        await enqueue_one(st, msg(ALICE, b"x"))
    with pytest.raises(StorageError, match="storage writer failed"):
        await st.kv_put("ns", b"k", b"v")
    with pytest.raises(StorageError):
        await st.ping()
    await st.close()


async def test_writer_failure_is_reported_to_failure_callbacks(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = await open_store(db_path)
    reported: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def broken_callback(error: BaseException) -> None:
        raise RuntimeError("a failing callback must not stop the others")

    st.add_failure_callback(broken_callback)
    st.add_failure_callback(reported.set_result)

    def crash(conn: Any, batch: Any) -> None:
        raise RuntimeError("writer bug")

    monkeypatch.setattr(st, "_run_batch", crash)
    with pytest.raises(StorageError, match="storage writer failed"):
        await enqueue_one(st, msg(ALICE, b"x"))
    error = await asyncio.wait_for(reported, 30)
    assert isinstance(error, RuntimeError) and str(error) == "writer bug"
    await st.close()


async def test_observer_errors_are_contained(db_path: Path) -> None:
    def broken(op: str, seconds: float) -> None:
        raise RuntimeError("observer bug")

    st = await open_store(db_path, observer=broken)
    try:
        assert (await enqueue_one(st, msg(ALICE, b"x"))).seq == 1
        assert await st.queue_depth(ALICE, b"") == 1
    finally:
        await st.close()


async def test_no_sqlite_call_on_the_event_loop_thread(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[int] = set()
    original: Callable[..., Any] = sqlcipher_mod._connect

    def traced(*args: Any, **kw: Any) -> Any:
        threads.add(threading.get_ident())
        conn = original(*args, **kw)
        conn.set_trace_callback(lambda _sql: threads.add(threading.get_ident()))
        return conn

    monkeypatch.setattr(sqlcipher_mod, "_connect", traced)
    st = await open_store(db_path)
    now = time.time()
    await st.enqueue([msg(ALICE, b"x", message_id=b"i" * 16)], max_depth=BIG, dedup_since=0)
    await st.peek(ALICE, b"", 0, now=now)
    await st.fetch(ALICE, b"", 0, now=now)
    await st.ack(ALICE, b"", 5)
    await st.create_user("alice", ALICE, now=now)
    await st.get_user_by_name("alice")
    await st.kv_put_if_absent("ns", b"k", b"v")
    await st.kv_scan("ns")
    await st.log_append("l", [b"e"])
    await st.purge_expired(now)
    await st.delete_account(ALICE)
    await st.ping()
    await st.close()
    assert len(threads) >= 2  # the writer and at least one reader
    assert threading.get_ident() not in threads


# -- hand-off to a waiting reader (enqueue take=...) ----------------------------------------------


async def test_take_hands_over_only_from_an_empty_inbox(store: SqlCipherStorage) -> None:
    mid = b"\x07" * 16
    (t,) = await store.enqueue([msg(ALICE, b"direct", message_id=mid)], max_depth=BIG,
                               dedup_since=0.0, take=[(ALICE, b"")])
    assert (t.seq, t.duplicate, t.taken) == (1, False, True)
    # Taken means not stored: the queue stays empty, the seq is used up, dedup remembers it.
    assert await store.queue_depth(ALICE, b"") == 0
    assert await store.fetch(ALICE, b"", 0, now=time.time()) == []
    again = await enqueue_one(store, msg(ALICE, b"direct", message_id=mid))
    assert (again.seq, again.duplicate, again.taken) == (1, True, False)
    stored = await enqueue_one(store, msg(ALICE, b"queued"))
    assert stored.seq == 2 and not stored.taken
    # A non-empty inbox is never taken from (FIFO: the older message must come out first);
    # inboxes not named in `take` are stored as usual.
    outs = await store.enqueue([msg(ALICE, b"behind"), msg(BOB, b"bob")], max_depth=BIG,
                               dedup_since=0.0, take=[(ALICE, b"")])
    assert [(o.seq, o.taken) for o in outs] == [(3, False), (1, False)]
    got = await store.fetch(ALICE, b"", 0, now=time.time())
    assert [(m.seq, m.payload) for m in got] == [(2, b"queued"), (3, b"behind")]


async def test_restore_puts_a_taken_message_back_in_order(store: SqlCipherStorage) -> None:
    m = msg(ALICE, b"undelivered", CHAN)
    (t,) = await store.enqueue([m], max_depth=BIG, dedup_since=0.0, take=[(ALICE, CHAN)])
    assert t.taken
    later = await enqueue_one(store, msg(ALICE, b"later", CHAN))
    await store.restore([(m, t)])
    assert await store.queue_depth(ALICE, CHAN) == 2
    got = await store.fetch(ALICE, CHAN, 0, now=time.time())
    assert [(x.seq, x.payload) for x in got] == [(t.seq, b"undelivered"), (later.seq, b"later")]
    assert await store.queue_depth(ALICE, CHAN) == 0


async def test_calls_from_another_event_loop_thread(store: SqlCipherStorage) -> None:
    """Calls are batched per turn of the storage's own loop; a call from another loop (in
    another thread) is handed over directly and answered on that loop."""

    def other_thread() -> tuple[EnqueueOutcome, int]:
        async def work() -> tuple[EnqueueOutcome, int]:
            out = await enqueue_one(store, msg(BOB, b"from elsewhere"))
            return out, await store.queue_depth(BOB, b"")

        return asyncio.run(work())

    mine = await enqueue_one(store, msg(ALICE, b"here"))
    theirs, depth = await asyncio.to_thread(other_thread)
    assert (mine.seq, theirs.seq, depth) == (1, 1, 1)
    assert [m.payload for m in await store.fetch(BOB, b"", 0, now=time.time())] == [
        b"from elsewhere"]


# -- known-empty inboxes (fetch answered from memory) ---------------------------------------------


class ReadCounter:
    """Counts jobs handed to the reader pool."""

    def __init__(self, store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.jobs: list[str] = []
        real = store._hand_to_readers

        def counting(reads: list[Any]) -> None:
            self.jobs.extend(fn.__name__ for fn, _args, _fut in reads)
            real(reads)

        monkeypatch.setattr(store, "_hand_to_readers", counting)


async def test_drained_inbox_is_answered_from_memory_until_something_is_added(
    store: SqlCipherStorage, commits: Commits, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = ReadCounter(store, monkeypatch)
    assert await store.fetch(ALICE, b"", 0, now=time.time()) == []
    assert reads.jobs == ["_has_messages"]  # never seen: a reader looks
    before = commits.count()
    for _ in range(3):
        assert await store.fetch(ALICE, b"", 0, now=time.time()) == []
    assert reads.jobs == ["_has_messages"] and commits.count() == before  # from memory
    await enqueue_one(store, msg(ALICE, b"one"))
    await enqueue_one(store, msg(ALICE, b"two"))
    # A fetch that leaves a message behind does not make the inbox "empty"...
    got = await store.fetch(ALICE, b"", 1, now=time.time())
    assert [m.payload for m in got] == [b"one"]
    got = await store.fetch(ALICE, b"", 1, now=time.time())
    assert [m.payload for m in got] == [b"two"]
    # ...the one that took the last message does.
    n_reads = len(reads.jobs)
    assert await store.fetch(ALICE, b"", 0, now=time.time()) == []
    assert len(reads.jobs) == n_reads
    # Other inboxes (same recipient, other channel) are not affected.
    await enqueue_one(store, msg(ALICE, b"chan", CHAN))
    assert [m.payload for m in await store.fetch(ALICE, CHAN, 0, now=time.time())] == [b"chan"]


async def test_a_fetch_with_an_enqueue_in_flight_sees_its_message(
    store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader's snapshot may predate an enqueue that was queued but has not committed; a
    fetch queued after it goes to the writer (which runs jobs in order) instead."""
    assert await store.fetch(ALICE, b"", 0, now=time.time()) == []  # known empty now
    reads = ReadCounter(store, monkeypatch)
    for i in range(3):
        out, got = await asyncio.gather(
            enqueue_one(store, msg(ALICE, b"m%d" % i)),  # queued first (tasks start in order)
            store.fetch(ALICE, b"", 0, now=time.time()),
        )
        assert [(m.seq, m.payload) for m in got] == [(out.seq, b"m%d" % i)]
    assert reads.jobs == []


async def test_a_reader_that_found_the_inbox_empty_does_not_hide_a_later_enqueue(
    store: SqlCipherStorage,
) -> None:
    """Fetch first, enqueue second in the same turn: the fetch's (empty) observation is older
    than the enqueue, so the next fetch must not trust it."""
    got, out = await asyncio.gather(
        store.fetch(ALICE, b"", 0, now=time.time()),
        enqueue_one(store, msg(ALICE, b"late")),
    )
    assert got in ([], [StoredMessage(out.seq, b"late")])
    if not got:
        assert await store.fetch(ALICE, b"", 0, now=time.time()) == [
            StoredMessage(out.seq, b"late")]


async def test_taken_messages_leave_the_inbox_known_empty_until_restored(
    store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = ReadCounter(store, monkeypatch)
    m = msg(ALICE, b"handed over")
    (t,) = await store.enqueue([m], max_depth=BIG, dedup_since=0.0, take=[(ALICE, b"")])
    assert t.taken
    assert await store.fetch(ALICE, b"", 0, now=time.time()) == []
    assert reads.jobs == []  # the hand-over proved the inbox empty
    await store.restore([(m, t)])
    got = await store.fetch(ALICE, b"", 0, now=time.time())
    assert got == [StoredMessage(t.seq, b"handed over")]


async def test_writes_from_another_loop_turn_the_hint_off(
    store: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs from another loop jump this loop's queue, so their order is unknown."""
    assert await store.fetch(BOB, b"", 0, now=time.time()) == []

    def other_thread() -> None:
        asyncio.run(enqueue_one(store, msg(BOB, b"from elsewhere")))

    await asyncio.to_thread(other_thread)
    reads = ReadCounter(store, monkeypatch)
    got = await store.fetch(BOB, b"", 0, now=time.time())
    assert [m.payload for m in got] == [b"from elsewhere"]
    assert await store.fetch(BOB, b"", 0, now=time.time()) == []
    assert reads.jobs == ["_has_messages", "_has_messages"]  # asked each time, not remembered


async def test_one_open_storage_per_database_file(db_path: Path) -> None:
    first = await open_store(db_path)
    try:
        with pytest.raises(StorageError, match=r"in use by another qpc process \(pid \d+"):
            await open_store(db_path)
        # The refused open changed nothing: the first storage still works.
        assert (await enqueue_one(first, msg(ALICE, b"still mine"))).seq == 1
    finally:
        await first.close()
    second = await open_store(db_path)  # released on close
    try:
        got = await second.fetch(ALICE, b"", 0, now=time.time())
        assert [m.payload for m in got] == [b"still mine"]
    finally:
        await second.close()
    # A refused open with a wrong key does not keep the lock either.
    with pytest.raises(WrongKey):
        await open_store(db_path, key="not the key")
    await (await open_store(db_path)).close()


async def test_forget_taken_removes_only_that_seqs_dedup_record(store: SqlCipherStorage) -> None:
    mid = b"\x09" * 16
    m = msg(ALICE, b"handed over", message_id=mid)
    (t,) = await store.enqueue([m], max_depth=BIG, dedup_since=0.0, take=[(ALICE, b"")])
    assert t.taken
    await store.forget_taken([(m, replace(t, seq=t.seq + 1))])  # not its seq: the record stays
    assert (await enqueue_one(store, m)).duplicate
    await store.forget_taken([(m, t)])
    again = await enqueue_one(store, m)
    assert (again.duplicate, again.taken) == (False, False) and again.seq > t.seq
    assert [x.payload for x in await store.fetch(ALICE, b"", 0, now=time.time())] == [
        b"handed over"]


async def test_a_cancelled_enqueue_still_counts_as_in_flight_until_it_commits(
    store: SqlCipherStorage,
) -> None:
    """The caller of an enqueue goes away (its task cancelled) after the job was queued: the
    job still commits, so until then the inbox must count as "an add in flight" (else a
    reader that looks meanwhile would record it as empty, and it would stay "empty" with
    the message in it)."""
    inbox = (ALICE, b"")
    assert await store.fetch(*inbox, 0, now=time.time()) == []  # known empty
    gate = threading.Event()

    def hold(conn: Any) -> None:
        gate.wait(30)

    held = store._write(hold)  # the writer is busy until the gate opens
    try:
        task = asyncio.ensure_future(enqueue_one(store, msg(ALICE, b"orphaned")))

        async def cancel_after_it_queued() -> None:
            task.cancel()  # runs after the task's first step (tasks start in order)

        await asyncio.ensure_future(cancel_after_it_queued())
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store._empties.in_flight(inbox) and not store._empties.is_empty(inbox)
    finally:
        gate.set()
    await held
    await store.kv_put("barrier", b"k", b"v")  # a later write: the enqueue has committed
    assert not store._empties.in_flight(inbox)
    got = await store.fetch(*inbox, 0, now=time.time())
    assert [m.payload for m in got] == [b"orphaned"]


async def test_unlockable_database_is_a_clear_storage_error(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(sqlcipher_mod.fcntl, "flock", no_locks)
    with pytest.raises(StorageError, match=r"cannot lock .*qpc\.db\.lock: .*not supported"):
        await open_store(db_path)
    monkeypatch.undo()
    other = db_path.parent / "other" / "qpc.db"
    (other.parent / "qpc.db.lock").mkdir(parents=True)  # the lock file's name is a directory
    with pytest.raises(StorageError, match="cannot create the lock file"):
        await open_store(other)


# -- operations ------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="OS thread names are read from /proc (Linux)")
async def test_storage_threads_carry_os_names(store: SqlCipherStorage) -> None:
    """`top -H` / `ps -L` tell the writer and the reader threads apart from the loop."""
    names = [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]
    assert names.count("qpc-db-writer") == 1
    assert names.count("qpc-db-reader") == 2  # pool_size=2 in these tests
    await store.close()
    names = [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]
    assert "qpc-db-writer" not in names


class TestSqlCipherContract(StorageContract):
    """The behaviour every backend shares (qpc_core.storage.contract)."""

    @pytest_asyncio.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqlCipherStorage]:
        st = await open_store(tmp_path / "contract.db")
        yield st
        await st.close()
