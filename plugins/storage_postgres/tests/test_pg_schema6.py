"""Schema 6: inbox incarnations (``inboxes.epoch``).  A message one node handed to a reader
that then left is put back only into the incarnation of the inbox that took it: not into
the inbox another node created again after DeleteAccount, whose seqs restarted and which
may already have delivered the same seq.  The upgrade from schema 5 gives every inbox its own
epoch, and a node still on schema 5 keeps working during a rolling upgrade."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from qpc_storage_postgres import schema
from qpc_storage_postgres.schema import SCHEMA_VERSION
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.storage.base import EnqueueOutcome, NewMessage, StoredMessage

BIG = 10**9
A, B = b"\x1a" * 32, b"\x1b" * 32


def msg(recipient: bytes, payload: bytes) -> NewMessage:
    return NewMessage(recipient, b"", payload, b"", None)


async def put(st: PostgresStorage, *ms: NewMessage,
              take: tuple[tuple[bytes, bytes], ...] = ()) -> list[EnqueueOutcome]:
    return await st.enqueue(list(ms), max_depth=BIG, dedup_since=0.0, take=take)


@pytest.fixture
async def two_nodes(pg_dsn: str) -> AsyncIterator[tuple[PostgresStorage, PostgresStorage]]:
    a = await PostgresStorage.open(pg_dsn, pool_max=4)
    b = await PostgresStorage.open(pg_dsn, pool_max=4)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_put_back_skips_an_inbox_another_node_created_again(
    two_nodes: tuple[PostgresStorage, PostgresStorage],
) -> None:
    """Node a hands seq 1 to a reader that leaves; before a's put-back runs, node b deletes
    the account, the inbox is created again and its seq 1 and 2 are delivered.  Schema 5
    stored the old message under seq 1 of the new inbox (the new inbox had given out seq 1,
    and nothing was stored there): its reader would get a seq it already had."""
    a, b = two_nodes
    handed = msg(A, b"for the old account")
    [old] = await put(a, handed, take=((A, b""),))
    assert (old.seq, old.taken) == (1, True)
    assert await b.delete_account(A) is None
    assert [o.seq for o in await put(b, msg(A, b"n1"), msg(A, b"n2"))] == [1, 2]
    now = time.time()
    assert await b.fetch(A, b"", 0, now=now) == [StoredMessage(1, b"n1"),
                                                  StoredMessage(2, b"n2")]
    await a.restore([(handed, old)])
    assert await a.peek(A, b"", 0, now=now) == []
    assert await a.queue_depth(A, b"") == 0
    assert [o.seq for o in await put(a, msg(A, b"n3"))] == [3]
    assert await b.fetch(A, b"", 0, now=now) == [StoredMessage(3, b"n3")]
    # The put-back of a hand-over from the current incarnation still works across nodes.
    [mine] = await put(a, msg(A, b"n4"), take=((A, b""),))
    assert (mine.seq, mine.taken) == (4, True) and mine.inbox_epoch != old.inbox_epoch
    await a.restore([(msg(A, b"n4"), mine)])
    assert await b.fetch(A, b"", 0, now=now) == [StoredMessage(4, b"n4")]


async def test_upgrade_from_schema_5_and_a_node_still_on_it(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inboxes written under schema 5 keep working (their epoch reads as 0: a hand-over from
    one goes back into it); afterwards a schema-5 node's statements (enqueue_calls_v4, the
    7-argument restore_messages, which still checks the seq was given out) run, and inboxes
    it creates get epochs."""
    import qpc_storage_postgres.store as store_mod

    enqueue_v5 = ("SELECT o_seq, o_taken FROM enqueue_calls_v4($1, $2, $3, $4, $5, $6, $7, $8,"
                  " $9, $10, $11, $12, $13)")

    async def enqueue_old(conn: asyncpg.Connection, recipient: bytes, payload: bytes,
                          take: bool = False) -> tuple[int, bool]:
        row = await conn.fetchrow(
            enqueue_v5, [1], [recipient], [b""], [b""], [payload], [None], time.time(),
            [0.0], [BIG], [1] if take else [], [recipient] if take else [],
            [b""] if take else [], "old-node")
        return int(row[0]), bool(row[1])

    conn = await asyncpg.connect(pg_dsn)
    try:
        monkeypatch.setattr(store_mod, "MIGRATIONS", schema.MIGRATIONS[:5])
        monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 5)
        assert await store_mod._migrate(conn, "qpc") == 5
        await conn.execute("SET search_path TO qpc")
        assert await enqueue_old(conn, A, b"a1") == (1, False)
        assert await enqueue_old(conn, B, b"b1") == (1, False)
        monkeypatch.undo()
        st = await PostgresStorage.open(pg_dsn)
        try:
            assert await conn.fetchval("SELECT max(version) FROM schema_version") == (
                SCHEMA_VERSION)
            epochs = dict(await conn.fetch("SELECT recipient_key, epoch FROM inboxes"))
            assert epochs == {A: None, B: None}  # added without rewriting the table
            now = time.time()
            assert await st.fetch(A, b"", 0, now=now) == [StoredMessage(1, b"a1")]
            [legacy] = await put(st, msg(A, b"a2"), take=((A, b""),))
            assert (legacy.seq, legacy.taken, legacy.inbox_epoch) == (2, True, 0)
            await st.restore([(msg(A, b"a2"), legacy)])
            assert await st.fetch(A, b"", 0, now=now) == [StoredMessage(2, b"a2")]
            # The old node, after the upgrade: its enqueue and its put-back still work.
            await st.delete_account(B)
            assert await enqueue_old(conn, B, b"b-new", take=True) == (1, True)
            new_b = await conn.fetchval("SELECT epoch FROM inboxes WHERE recipient_key = $1",
                                        B)
            assert new_b is not None and new_b != 0
            restore_v5 = "SELECT restore_messages($1, $2, $3, $4, $5, $6, $7)"
            assert await conn.fetchval(restore_v5, [B, B], [b"", b""], [1, 2], [None, None],
                                       [b"b-new", b"never given out"], time.time(),
                                       "old-node") == 1
            assert await st.fetch(B, b"", 0, now=now) == [StoredMessage(1, b"b-new")]
        finally:
            await st.close()
    finally:
        await conn.close()
