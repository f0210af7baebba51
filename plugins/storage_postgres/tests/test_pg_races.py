"""Races between two servers ("nodes") on one database, made deterministic: the test holds a
row lock or an advisory lock on its own connection, waits (bounded) until the calls under
test are blocked on it in PostgreSQL, then lets them go in a known order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import pytest
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.storage.base import EnqueueOutcome, NewMessage, StoredMessage

BIG = 10**9
R1 = b"\x01" * 32
WAIT_SECS = 20.0  # bound on waiting for a call to block (it takes milliseconds)


def msg(payload: bytes, channel: bytes = b"", mid: bytes = b"") -> NewMessage:
    return NewMessage(R1, channel, payload, mid, None)


async def put(st: PostgresStorage, *ms: NewMessage, since: float = 0.0,
              take: tuple[tuple[bytes, bytes], ...] = ()) -> list[EnqueueOutcome]:
    return await st.enqueue(list(ms), max_depth=BIG, dedup_since=since, take=take)


async def blocked(probe: asyncpg.Connection, n: int, *calls: asyncio.Future[Any],
                  wait_event: str | None = None) -> None:
    """Until ``n`` backends of this database wait for a lock (of kind ``wait_event``, any if
    None); fails if one of ``calls`` finished instead, or after WAIT_SECS."""
    deadline = time.monotonic() + WAIT_SECS
    while True:
        waiting = await probe.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND ($1::text IS NULL OR wait_event = $1)",
            wait_event)
        if waiting >= n:
            return
        for call in calls:
            if call.done():
                call.result()  # its error, if any
                raise AssertionError("the call finished instead of waiting for the lock")
        assert time.monotonic() < deadline, f"{waiting} of {n} calls blocked after {WAIT_SECS}s"
        await asyncio.sleep(0.01)  # polling pg_stat_activity, not synchronising


Nodes = tuple[PostgresStorage, PostgresStorage, asyncpg.Connection, asyncpg.Connection]


@pytest.fixture
async def nodes(pg_dsn: str) -> AsyncIterator[Nodes]:
    """Two stores (two servers), a connection for the test's locks, one for probing."""
    a = await PostgresStorage.open(pg_dsn, pool_max=4)
    b = await PostgresStorage.open(pg_dsn, pool_max=4)
    holder = await asyncpg.connect(pg_dsn, server_settings={"search_path": "qpc"})
    probe = await asyncpg.connect(pg_dsn)
    try:
        yield a, b, holder, probe
    finally:
        for conn in (holder, probe):
            await conn.close()
        await a.close()
        await b.close()


def start(call: Awaitable[Any]) -> asyncio.Future[Any]:
    return asyncio.ensure_future(call)


async def test_a_message_put_back_while_another_node_fetches_is_not_lost(nodes: Nodes) -> None:
    """restore() (a FetchWait that was handed seq 1 left) and a Fetch on another node meet
    at the inbox lock: seq 1 must be delivered by that Fetch or stay stored.  Before
    schema 4 the Fetch chose seq 2 before the lock, then deleted every seq <= 2, seq 1 too,
    and returned only seq 2: an acknowledged message lost."""
    a, b, holder, probe = nodes
    handed = msg(b"handed over, then put back")
    [taken] = await put(a, handed, take=((R1, b""),))
    assert (taken.seq, taken.duplicate, taken.taken) == (1, False, True)
    assert await put(b, msg(b"second")) == [EnqueueOutcome(2, False, False)]
    async with holder.transaction():
        await holder.execute("SELECT 1 FROM inboxes WHERE recipient_key = $1 FOR UPDATE", R1)
        restore = start(a.restore([(handed, taken)]))
        await blocked(probe, 1, restore)
        fetch = start(b.fetch(R1, b"", 0, now=time.time()))
        await blocked(probe, 2, restore, fetch)
    await restore
    got = await fetch
    rest = await a.fetch(R1, b"", 0, now=time.time())
    assert sorted(got + rest, key=lambda m: m.seq) == [
        StoredMessage(1, b"handed over, then put back"), StoredMessage(2, b"second")]
    assert await a.queue_depth(R1, b"") == 0


async def test_two_nodes_fetching_one_inbox_get_different_messages(nodes: Nodes) -> None:
    """Two Fetches (limit 3) of one inbox on two nodes at once: the one that waited for the
    other's lock chooses from what is left (it used to choose the same seqs 1-3 before the
    lock, find them gone and answer nothing while seqs 4-10 waited)."""
    a, b, holder, probe = nodes
    await put(a, *(msg(b"m%d" % i) for i in range(1, 11)))
    async with holder.transaction():
        await holder.execute("SELECT 1 FROM inboxes WHERE recipient_key = $1 FOR UPDATE", R1)
        fa = start(a.fetch(R1, b"", 3, now=time.time()))
        await blocked(probe, 1, fa)
        fb = start(b.fetch(R1, b"", 3, now=time.time()))
        await blocked(probe, 2, fa, fb)
    got_a, got_b = await fa, await fb
    assert len(got_a) == len(got_b) == 3
    assert sorted(m.seq for m in got_a + got_b) == [1, 2, 3, 4, 5, 6]
    assert [m.payload for m in got_a + got_b] == [b"m%d" % m.seq for m in got_a + got_b]
    assert await a.queue_depth(R1, b"") == 4


async def test_delete_account_and_an_enqueue_creating_an_inbox_stay_consistent(
    nodes: Nodes,
) -> None:
    """An enqueue on another node that creates a new inbox of the identity and commits while
    DeleteAccount runs (held between its statements by a test-only trigger waiting for the
    test's advisory lock) keeps its message, dedup record and inbox together, as if it ran
    after the deletion; it used to keep the inbox and lose the acknowledged message."""
    a, b, holder, probe = nodes
    await holder.execute(
        "CREATE FUNCTION test_hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " PERFORM pg_advisory_xact_lock_shared(4242); RETURN NULL; END $$")
    await holder.execute("CREATE TRIGGER test_hold AFTER DELETE ON inboxes"
                         " FOR EACH STATEMENT EXECUTE FUNCTION test_hold()")
    await put(a, msg(b"a1", channel=b"chan-a"))
    mid = b"m" * 16
    await holder.execute("SELECT pg_advisory_lock(4242)")
    try:
        deleting = start(a.delete_account(R1))
        await blocked(probe, 1, deleting, wait_event="advisory")
        assert await put(b, msg(b"b1", channel=b"chan-b", mid=mid), since=time.time() - 60) == [
            EnqueueOutcome(1, False, False)]
    finally:
        await holder.execute("SELECT pg_advisory_unlock(4242)")
    await deleting
    await holder.execute("DROP TRIGGER test_hold ON inboxes")
    now = time.time()
    assert await a.peek(R1, b"chan-a", 0, now=now) == []  # deleted
    # The enqueue's inbox, message and message id survived together.
    assert await a.queue_depth(R1, b"chan-b") == 1
    assert await put(a, msg(b"b1", channel=b"chan-b", mid=mid), since=now - 60) == [
        EnqueueOutcome(1, True, False)]
    assert await a.fetch(R1, b"chan-b", 0, now=now) == [StoredMessage(1, b"b1")]
    assert await put(a, msg(b"b2", channel=b"chan-b")) == [EnqueueOutcome(2, False, False)]


async def test_put_if_absent_returns_a_value_though_another_node_deletes_the_key(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another node deletes the key right after each statement kv_put_if_absent sends (it
    used to insert-or-nothing, then read: None, and fail with TypeError)."""
    a, b, _holder, _probe = nodes
    await a.kv_put("ns", b"k", b"old")
    deleted: list[bool] = []
    originals = {name: getattr(asyncpg.connection.Connection, name)
                 for name in ("execute", "fetch", "fetchrow", "fetchval")}

    def hooked(name: str) -> Any:
        original = originals[name]

        async def call(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
            out = await original(self, query, *args, **kw)
            if "INTO kv" in query and args[:2] == ("ns", b"k"):
                deleted.append(await b.kv_delete("ns", b"k"))
            return out
        return call

    for name in originals:
        monkeypatch.setattr(asyncpg.connection.Connection, name, hooked(name))
    value = await a.kv_put_if_absent("ns", b"k", b"new")
    monkeypatch.undo()
    assert deleted and deleted[0]  # the other node's delete happened in between
    assert value == b"old"  # the value stored when it ran (the delete came after)
    assert await a.kv_put_if_absent("ns", b"k", b"new") == b"new"
    assert await b.kv_get("ns", b"k") == b"new"
