"""Schema 5: a writer whose inbox lock found no row (the inbox was deleted, perhaps created
again, while it waited) writes nothing; DeleteAccount deletes only the inboxes it locked (no
lock out of key order); the upgrade from schema 4 repairs depths and the rows schema 4's
restore could leave.

The interleavings are forced: a test transaction holds the inbox row while the call under
test waits for it (seen in pg_stat_activity), or an asyncio gate stops DeleteAccount between
two statements."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from qpc_storage_postgres import schema
from qpc_storage_postgres.schema import SCHEMA_VERSION
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.storage.base import EnqueueOutcome, NewMessage, StoredMessage

BIG = 10**9
A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
WAIT_SECS = 20.0


def msg(recipient: bytes, payload: bytes, channel: bytes = b"") -> NewMessage:
    return NewMessage(recipient, channel, payload, b"", None)


async def put(st: PostgresStorage, *ms: NewMessage,
              take: tuple[tuple[bytes, bytes], ...] = ()) -> list[EnqueueOutcome]:
    return await st.enqueue(list(ms), max_depth=BIG, dedup_since=0.0, take=take)


async def wait_for_lock_wait(probe: asyncpg.Connection, fut: asyncio.Future[Any],
                             event: str) -> None:
    """Until some session of this database waits for a lock of kind ``event``."""
    deadline = time.monotonic() + WAIT_SECS
    while not await probe.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND wait_event = $1", event
    ):
        assert not fut.done(), fut.result()
        assert time.monotonic() < deadline, "the call never waited for the lock"
        await asyncio.sleep(0.01)  # polling pg_stat_activity, not synchronising


@asynccontextmanager
async def inbox_replaced(dsn: str, recipient: bytes, *, next_seq: int,
                         new_payloads: tuple[bytes, ...] = ()) -> AsyncIterator[None]:
    """A transaction that deletes ``recipient``'s inbox and its messages and creates it again
    (what a DeleteAccount followed by new enqueues leaves), committed when the block ends."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "qpc"})
    try:
        async with conn.transaction():
            await conn.execute("DELETE FROM inboxes WHERE recipient_key = $1", recipient)
            await conn.execute("DELETE FROM messages WHERE recipient_key = $1", recipient)
            await conn.execute("INSERT INTO inboxes VALUES ($1, '', $2, $3)", recipient,
                               next_seq, len(new_payloads))
            await conn.executemany(
                "INSERT INTO messages (recipient_key, channel_id, seq, created_at, payload)"
                " VALUES ($1, '', $2, 0, $3)",
                [(recipient, i, p) for i, p in enumerate(new_payloads, 1)])
            yield
    finally:
        await conn.close()


@pytest.fixture
async def st(pg_dsn: str) -> AsyncIterator[PostgresStorage]:
    store = await PostgresStorage.open(pg_dsn, pool_max=4)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def probe(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


# -- a lock that found no row ----------------------------------------------------------------

async def test_a_fetch_whose_inbox_was_replaced_while_it_waited_takes_nothing(
    pg_dsn: str, st: PostgresStorage, probe: asyncpg.Connection
) -> None:
    """Schema 4 went on after its lock found no row: it deleted (and returned) the messages
    of the new inbox, which it had never locked (its depth trigger locked the inbox after the
    delete, the reverse of every other writer's order: deadlocks with DeleteAccount/ack)."""
    await put(st, msg(A, b"old 1"), msg(A, b"old 2"))
    async with inbox_replaced(pg_dsn, A, next_seq=2, new_payloads=(b"new",)):
        fetching = asyncio.ensure_future(st.fetch(A, b"", 0, now=time.time()))
        await wait_for_lock_wait(probe, fetching, "transactionid")
    assert await fetching == []
    assert await st.peek(A, b"", 0, now=time.time()) == [StoredMessage(1, b"new")]
    assert await st.queue_depth(A, b"") == 1
    assert await st.fetch(A, b"", 0, now=time.time()) == [StoredMessage(1, b"new")]
    assert await st.queue_depth(A, b"") == 0


async def test_an_ack_whose_inbox_was_replaced_while_it_waited_removes_nothing(
    pg_dsn: str, st: PostgresStorage, probe: asyncpg.Connection
) -> None:
    await put(st, msg(A, b"old 1"), msg(A, b"old 2"))
    async with inbox_replaced(pg_dsn, A, next_seq=2, new_payloads=(b"new",)):
        acking = asyncio.ensure_future(st.ack(A, b"", 5))
        await wait_for_lock_wait(probe, acking, "transactionid")
    assert await acking == 0
    assert await st.peek(A, b"", 0, now=time.time()) == [StoredMessage(1, b"new")]
    assert await st.queue_depth(A, b"") == 1


async def test_a_restore_whose_inbox_was_replaced_while_it_waited_stores_nothing(
    pg_dsn: str, st: PostgresStorage, probe: asyncpg.Connection
) -> None:
    """Schema 4 stored the message into the new inbox, unlocked: a DeleteAccount running
    meanwhile left it without an inbox (enqueues to it then failed on messages_pkey); and
    seq 3 of the new inbox is another message than seq 3 of the old one."""
    await put(st, msg(A, b"m1"), msg(A, b"m2"))
    assert len(await st.fetch(A, b"", 0, now=time.time())) == 2
    handed = msg(A, b"handed to a waiting reader")
    [o] = await put(st, handed, take=((A, b""),))
    assert o.taken and o.seq == 3
    async with inbox_replaced(pg_dsn, A, next_seq=5):
        restoring = asyncio.ensure_future(st.restore([(handed, o)]))
        await wait_for_lock_wait(probe, restoring, "transactionid")
    await restoring
    assert await st._pool.fetchval("SELECT count(*) FROM messages") == 0
    assert await st.queue_depth(A, b"") == 0
    assert await put(st, msg(A, b"next")) == [EnqueueOutcome(5, False, False)]
    assert await st.fetch(A, b"", 0, now=time.time()) == [StoredMessage(5, b"next")]


async def test_a_restore_stores_into_the_inboxes_it_locked(st: PostgresStorage) -> None:
    """Several inboxes in one restore, one of them deleted before: the others get theirs."""
    handed = [msg(A, b"for a"), msg(B, b"for b"), msg(C, b"for c")]
    outs = [(await put(st, m, take=((m.recipient_key, b""),)))[0] for m in handed]
    assert all(o.taken and o.seq == 1 for o in outs)
    await st.delete_account(B)
    await st.restore(list(zip(handed, outs, strict=True)))
    now = time.time()
    assert await st.peek(A, b"", 0, now=now) == [StoredMessage(1, b"for a")]
    assert await st.peek(B, b"", 0, now=now) == []
    assert await st.peek(C, b"", 0, now=now) == [StoredMessage(1, b"for c")]
    assert [await st.queue_depth(r, b"") for r in (A, B, C)] == [1, 0, 1]


# -- DeleteAccount's lock order --------------------------------------------------------------

class _GatedConn:
    """A pooled connection that stops after its first FOR UPDATE statement until released."""

    def __init__(self, conn: Any, reached: asyncio.Event, release: asyncio.Event) -> None:
        self._conn, self._reached, self._release = conn, reached, release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def _gate(self, sql: str) -> None:
        if "FOR UPDATE" in sql and not self._reached.is_set():
            self._reached.set()
            await self._release.wait()

    async def execute(self, sql: str, *args: Any) -> Any:
        result = await self._conn.execute(sql, *args)
        await self._gate(sql)
        return result

    async def fetch(self, sql: str, *args: Any) -> Any:
        result = await self._conn.fetch(sql, *args)
        await self._gate(sql)
        return result


class _GatedPool:
    def __init__(self, pool: Any, reached: asyncio.Event, release: asyncio.Event) -> None:
        self._pool, self._reached, self._release = pool, reached, release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[_GatedConn]:
        async with self._pool.acquire() as conn:
            yield _GatedConn(conn, self._reached, self._release)


async def test_delete_account_locks_no_inbox_out_of_key_order(
    pg_dsn: str, st: PostgresStorage, probe: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DeleteAccount locks A's inboxes ("d") in key order; an inbox "c" created and committed
    after that, then held by an enqueue to "c" and "d" (waiting for "d", as key order
    says).  Deleting "c" too locked it out of order: a deadlock, rolled back and run again
    (schema 4 code).  Now "c" is left, as if created after the deletion."""
    caplog.set_level(logging.DEBUG, logger="qpc.storage.postgres")
    await put(st, msg(A, b"old", channel=b"d"))
    reached, release = asyncio.Event(), asyncio.Event()
    deleter = await PostgresStorage.open(pg_dsn, pool_max=2)
    deleter._pool = _GatedPool(deleter._pool, reached, release)  # type: ignore[assignment]
    try:
        deleting = asyncio.ensure_future(deleter.delete_account(A))
        await reached.wait()  # A's inbox "d" is locked
        assert await put(st, msg(A, b"c1", channel=b"c")) == [EnqueueOutcome(1, False, False)]
        both = asyncio.ensure_future(put(st, msg(A, b"c2", channel=b"c"),
                                         msg(A, b"d1", channel=b"d")))
        await wait_for_lock_wait(probe, both, "transactionid")  # holds "c", waits for "d"
        release.set()
        await deleting
        assert await both == [EnqueueOutcome(2, False, False), EnqueueOutcome(1, False, False)]
    finally:
        release.set()
        deleter._pool = deleter._pool._pool  # type: ignore[attr-defined]
        await deleter.close()
    assert not [r for r in caplog.records if "rolled back by PostgreSQL" in r.getMessage()]
    now = time.time()
    assert [m.payload for m in await st.peek(A, b"c", 0, now=now)] == [b"c1", b"c2"]
    assert await st.peek(A, b"d", 0, now=now) == [StoredMessage(1, b"d1")]
    assert [await st.queue_depth(A, c) for c in (b"c", b"d")] == [2, 1]


# -- upgrade ---------------------------------------------------------------------------------

async def test_upgrade_from_schema_4_repairs_depths_and_put_back_leftovers(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A: a row the schema-3 restore put back after DeleteAccount (seq 3, no inbox), adopted
    when A's inbox was created again (seqs 1, 2); schema 4 moved next_seq past it but left
    depth at 2 for 3 rows.  B: a row schema 4's restore left without an inbox.  C: queued
    messages and a consistent inbox, which must stay as they are."""
    import qpc_storage_postgres.store as store_mod

    enqueue_v3 = ("SELECT o_seq FROM enqueue_calls($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
                  " $11, $12, $13)")

    async def enqueue_old(conn: asyncpg.Connection, recipient: bytes, *payloads: bytes
                          ) -> list[int]:
        n = len(payloads)
        rows = await conn.fetch(enqueue_v3, [1], [recipient] * n, [b""] * n, [b""] * n,
                                list(payloads), [None] * n, time.time(), [0.0], [BIG], [], [],
                                [], "old-node")
        return [r[0] for r in rows]

    conn = await asyncpg.connect(pg_dsn)
    try:
        for version in (3, 4):
            monkeypatch.setattr(store_mod, "MIGRATIONS", schema.MIGRATIONS[:version])
            monkeypatch.setattr(store_mod, "SCHEMA_VERSION", version)
            assert await store_mod._migrate(conn, "qpc") == version
            await conn.execute("SET search_path TO qpc")
            if version == 3:
                await conn.execute(
                    "INSERT INTO messages (recipient_key, channel_id, seq, created_at, payload)"
                    " VALUES ($1, '', 3, 0, 'put back')", A)
                assert await enqueue_old(conn, A, b"n1", b"n2") == [1, 2]
                assert await enqueue_old(conn, C, b"c1", b"c2") == [1, 2]
        inbox = await conn.fetchrow("SELECT next_seq, depth FROM inboxes WHERE"
                                    " recipient_key = $1", A)
        assert tuple(inbox) == (4, 2)  # what schema 4 left: 3 rows, depth 2
        await conn.execute(
            "INSERT INTO messages (recipient_key, channel_id, seq, created_at, payload)"
            " VALUES ($1, '', 7, 0, 'orphan')", B)
    finally:
        await conn.close()
    monkeypatch.undo()

    st = await PostgresStorage.open(pg_dsn)
    try:
        async with st._pool.acquire() as c:
            assert await c.fetchval("SELECT max(version) FROM schema_version") == SCHEMA_VERSION
            bad = await c.fetch(
                "SELECT i.recipient_key FROM inboxes AS i LEFT JOIN messages AS m"
                " USING (recipient_key, channel_id) GROUP BY i.recipient_key, i.depth"
                " HAVING i.depth <> count(m.seq)")
            assert bad == []
            assert await c.fetchval("SELECT count(*) FROM messages WHERE recipient_key = $1",
                                    B) == 0
        assert [await st.queue_depth(r, b"") for r in (A, B, C)] == [3, 0, 2]
        now = time.time()
        assert await st.fetch(A, b"", 2, now=now) == [StoredMessage(1, b"n1"),
                                                       StoredMessage(2, b"n2")]
        # A waiting reader is handed a new message only when nothing is stored: seq 3 is.
        [o] = await put(st, msg(A, b"newest"), take=((A, b""),))
        assert o == EnqueueOutcome(4, False, False)
        assert await st.fetch(A, b"", 0, now=now) == [StoredMessage(3, b"put back"),
                                                       StoredMessage(4, b"newest")]
        assert await st.queue_depth(A, b"") == 0
        assert await put(st, msg(B, b"new")) == [EnqueueOutcome(1, False, False)]
        assert [m.payload for m in await st.peek(C, b"", 0, now=now)] == [b"c1", b"c2"]
        assert await st.total_queue_depth() == 3  # B's new one, C's two
    finally:
        await st.close()
