"""PostgresStorage against a real PostgreSQL server: the Storage contract, concurrency across
two stores (two "servers") on one database, notifications, and failures."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
import qpc_storage_postgres.store as pg_store_module
from qpc_storage_postgres.schema import SCHEMA_VERSION
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.errors import StorageError
from qpc_core.storage.base import (
    EnqueueOutcome,
    NewMessage,
    QueueFull,
    SessionRecord,
    StoredMessage,
)
from qpc_core.storage.contract import StorageContract

BIG = 10**9
R1, R2 = b"\x01" * 32, b"\x02" * 32


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStorage]:
    st = await PostgresStorage.open(pg_dsn, pool_min=1, pool_max=4)
    yield st
    await st.close()


def msg(recipient: bytes = R1, payload: bytes = b"x", mid: bytes = b"", channel: bytes = b"",
        expires_at: float | None = None) -> NewMessage:
    return NewMessage(recipient, channel, payload, mid, expires_at)


async def put(st: PostgresStorage, *ms: NewMessage, max_depth: int = BIG,
              since: float = 0.0) -> list[EnqueueOutcome]:
    return await st.enqueue(list(ms), max_depth=max_depth, dedup_since=since)


# -- delivery --------------------------------------------------------------------------------

async def test_enqueue_peek_fetch_ack(store: PostgresStorage) -> None:
    out = await put(store, msg(payload=b"a"), msg(payload=b"b"), msg(R2, b"c"))
    assert [o.seq for o in out] == [1, 2, 1]  # per-inbox seqs
    assert await store.queue_depth(R1, b"") == 2
    now = time.time()
    assert await store.peek(R1, b"", 0, now=now) == [StoredMessage(1, b"a"), StoredMessage(2, b"b")]
    assert await store.fetch(R1, b"", 1, now=now) == [StoredMessage(1, b"a")]
    assert await store.queue_depth(R1, b"") == 1
    assert await store.ack(R1, b"", 2) == 1
    assert await store.fetch(R1, b"", 0, now=now) == []
    assert await store.total_queue_depth() == 1  # R2's message
    (o,) = await put(store, msg(payload=b"d"))
    assert o.seq == 3  # never reused after removal


async def test_fetch_byte_cap_always_returns_the_first(store: PostgresStorage) -> None:
    await put(store, msg(payload=b"1" * 100), msg(payload=b"2" * 100), msg(payload=b"3"))
    got = await store.fetch(R1, b"", 0, now=time.time(), max_bytes=150)
    assert [m.seq for m in got] == [1]  # 200 bytes would exceed 150
    got = await store.fetch(R1, b"", 0, now=time.time(), max_bytes=10)
    assert [m.seq for m in got] == [2]  # over the cap on its own, but first: returned
    assert [m.seq for m in await store.fetch(R1, b"", 0, now=time.time())] == [3]


async def test_dedup_window_and_within_one_call(store: PostgresStorage) -> None:
    mid = os.urandom(16)
    a, b = await put(store, msg(payload=b"a", mid=mid), msg(payload=b"b", mid=mid))
    assert (a.seq, a.duplicate, b.seq, b.duplicate) == (1, False, 1, True)
    (c,) = await put(store, msg(payload=b"c", mid=mid), since=time.time() - 60)
    assert (c.seq, c.duplicate) == (1, True)
    assert await store.queue_depth(R1, b"") == 1  # nothing stored for duplicates
    (d,) = await put(store, msg(payload=b"d", mid=mid), since=time.time() + 1)
    assert (d.seq, d.duplicate) == (2, False)  # the record is older than the window
    assert await store.purge_dedup(time.time() + 10) == 1


async def test_queue_full_is_all_or_nothing(store: PostgresStorage) -> None:
    await put(store, msg(payload=b"a"), max_depth=2)
    with pytest.raises(QueueFull) as e:
        await put(store, msg(R2, b"other"), msg(payload=b"b"), msg(payload=b"c"), max_depth=2)
    assert (e.value.recipient_key, e.value.depth) == (R1, 2)
    assert await store.queue_depth(R1, b"") == 1 and await store.queue_depth(R2, b"") == 0
    (o,) = await put(store, msg(payload=b"b"), max_depth=2)
    assert o.seq == 2  # the failed call reserved nothing


async def test_calls_of_one_turn_share_a_statement_yet_stay_all_or_nothing(
    store: PostgresStorage,
) -> None:
    statements: list[int] = []
    write = store._write_calls

    async def counting(calls):  # type: ignore[no-untyped-def]
        statements.append(len(calls))
        await write(calls)

    store._write_calls = counting  # type: ignore[method-assign]
    await put(store, msg(R2, b"r2-first"), msg(R2, b"r2-second"))
    mid = os.urandom(16)
    results = await asyncio.gather(
        put(store, msg(payload=b"a", mid=mid), max_depth=5),
        put(store, msg(R2, b"x"), max_depth=2),  # R2 would hold 3 > 2
        put(store, msg(payload=b"b", mid=mid), max_depth=5),  # same id as the first call
        put(store, msg(payload=b"c"), max_depth=5),
        return_exceptions=True,
    )
    assert statements == [1, 4]  # the four calls of one turn: one statement
    a, full, dup, c = results
    assert isinstance(full, QueueFull) and (full.recipient_key, full.depth) == (R2, 2)
    assert [(o.seq, o.duplicate) for o in a] == [(1, False)]
    assert [(o.seq, o.duplicate) for o in dup] == [(1, True)]
    assert [(o.seq, o.duplicate) for o in c] == [(2, False)]
    assert await store.queue_depth(R2, b"") == 2  # the full call wrote nothing
    assert [m.payload for m in await store.peek(R1, b"", 0, now=time.time())] == [b"a", b"c"]
    (o,) = await put(store, msg(R2, b"z"))
    assert o.seq == 3  # and reserved no seq


async def test_reads_of_one_turn_share_a_statement_and_keep_call_order(
    store: PostgresStorage,
) -> None:
    statements: list[int] = []
    take = store._take_calls

    async def counting(takes):  # type: ignore[no-untyped-def]
        statements.append(len(takes))
        await take(takes)

    store._take_calls = counting  # type: ignore[method-assign]
    await put(store, msg(payload=b"a"), msg(payload=b"b"), msg(R2, b"c"), msg(R2, b"d"))
    now = time.time()
    r1_first, r2_peek, r2_fetch, r1_again, r3, r2_after = await asyncio.gather(
        store.fetch(R1, b"", 1, now=now),
        store.peek(R2, b"", 0, now=now),
        store.fetch(R2, b"", 0, now=now),
        store.fetch(R1, b"", 0, now=now),
        store.fetch(b"\x03" * 32, b"", 0, now=now),
        store.peek(R2, b"", 0, now=now),
    )
    assert statements == [6]  # one statement for the turn
    # Calls on one inbox run in the order they were made.
    assert r1_first == [StoredMessage(1, b"a")]
    assert r1_again == [StoredMessage(2, b"b")]
    assert [m.seq for m in r2_peek] == [m.seq for m in r2_fetch] == [1, 2]
    assert r3 == [] and r2_after == []
    assert await store.total_queue_depth() == 0


async def test_each_read_of_a_turn_keeps_its_own_now_and_limit(store: PostgresStorage) -> None:
    """Reads batched into one statement still use their own clock and limits: a later `now`
    of one caller must not expire another's message, and a huge limit (beyond int4) from a
    plugin must not fail the whole turn."""
    t = time.time() + 100
    await put(store, msg(R1, b"expires at t", expires_at=t), msg(R2, b"r2"))
    early, late = await asyncio.gather(
        store.fetch(R1, b"", 0, now=t - 1),  # still live at its caller's now
        store.fetch(R2, b"", 2**40, now=t + 1),
    )
    assert early == [StoredMessage(1, b"expires at t")]
    assert late == [StoredMessage(1, b"r2")]


async def test_crossing_reads_and_writes_of_two_servers_do_not_deadlock(pg_dsn: str) -> None:
    """Fetches naming many inboxes in one statement, in different orders, from two servers
    while both enqueue to those inboxes: every message is fetched exactly once."""
    a = await PostgresStorage.open(pg_dsn, pool_max=8)
    b = await PostgresStorage.open(pg_dsn, pool_max=8)
    keys = [bytes([i]) * 32 for i in range(1, 7)]
    got: dict[bytes, list[int]] = {k: [] for k in keys}
    try:
        for _ in range(15):
            calls = []
            for i in range(12):
                st = a if i % 2 else b
                order = keys if i % 3 else list(reversed(keys))
                calls.append(st.enqueue([msg(k, b"m") for k in order], max_depth=BIG,
                                        dedup_since=0))
                calls.extend(st.fetch(k, b"", 0, now=time.time()) for k in order)
            outs = await asyncio.gather(*calls, return_exceptions=True)
            assert not [o for o in outs if isinstance(o, BaseException)]
            results = iter(outs)
            for i in range(12):  # walk the results in call order: an enqueue, then fetches
                next(results)
                for key in keys if i % 3 else list(reversed(keys)):
                    got[key].extend(m.seq for m in next(results))
        for key in keys:
            got[key].extend(m.seq for m in await a.fetch(key, b"", 0, now=time.time()))
            assert sorted(got[key]) == list(range(1, 15 * 12 + 1))  # each exactly once
    finally:
        await a.close()
        await b.close()


async def test_removals_from_two_servers_never_deadlock(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched fetches (several inboxes per transaction, in opposite orders), acks and
    expiry purges (expired messages spread over the same inboxes) from two servers at once.
    Retries are off: a single deadlock fails the test instead of costing a second."""
    import qpc_storage_postgres.store as pg_store

    monkeypatch.setattr(pg_store, "_RETRIES", 1)
    a = await PostgresStorage.open(pg_dsn, pool_max=8)
    b = await PostgresStorage.open(pg_dsn, pool_max=8)
    keys = [bytes([i]) * 32 for i in range(1, 9)]
    try:
        for _ in range(20):
            past = time.time() - 1
            await put(a, *[msg(k, b"old", expires_at=past) for k in keys for _ in range(3)])
            await put(b, *[msg(k, b"live") for k in keys])
            await put(a, *[msg(k, b"old", expires_at=past) for k in reversed(keys)])
            now = time.time()
            calls = [a.purge_expired(now), b.purge_expired(now)]
            for i, st in enumerate((a, b, a, b)):
                order = keys if i % 2 else list(reversed(keys))
                calls.extend(st.fetch(k, b"", 1, now=now) for k in order)
                calls.append(st.ack(order[i], b"", 10**9))  # removes what it finds
            outs = await asyncio.gather(*calls, return_exceptions=True)
            assert not [o for o in outs if isinstance(o, BaseException)], outs
            fetched = [m for o in outs if isinstance(o, list) for m in o]
            assert fetched and all(m.payload == b"live" for m in fetched)  # never an expired one
            for k in keys:
                rest = await a.fetch(k, b"", 0, now=time.time())
                assert all(m.payload == b"live" for m in rest)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("operation", ["fetch", "ack", "purge_expired"])
async def test_removals_lock_the_inbox_before_its_messages(
    store: PostgresStorage, pg_dsn: str, operation: str
) -> None:
    """The lock order that keeps multi-inbox removals deadlock-free: inbox row first, then
    message rows.  With another transaction holding the inbox, the removal must wait there,
    holding no message row yet."""
    past = time.time() - 1
    await put(store, msg(payload=b"a", expires_at=past if operation == "purge_expired" else None))
    holder = await asyncpg.connect(pg_dsn, server_settings={"search_path": "qpc"})
    probe = await asyncpg.connect(pg_dsn, server_settings={"search_path": "qpc"})
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM inboxes WHERE recipient_key = $1 FOR UPDATE", R1)
        now = time.time()
        removal = asyncio.ensure_future(
            store.fetch(R1, b"", 0, now=now) if operation == "fetch"
            else store.ack(R1, b"", 10) if operation == "ack"
            else store.purge_expired(now))
        for _ in range(20_000):  # bounded: ask PostgreSQL until the removal waits for a lock
            waiting = await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()")
            if waiting or removal.done():
                break
        assert waiting, "the removal never waited for the inbox lock"
        # It holds no message row: another transaction can lock them all without waiting.
        rows = await probe.fetch(
            "SELECT seq FROM messages WHERE recipient_key = $1 FOR UPDATE NOWAIT", R1)
        assert [r[0] for r in rows] == [1]
        await tx.rollback()
        await removal
    finally:
        await holder.close()
        await probe.close()
    assert await store.total_queue_depth() == 0


async def test_a_fetch_of_an_empty_inbox_takes_no_lock(
    store: PostgresStorage, pg_dsn: str
) -> None:
    """Idle long polls look at empty inboxes all the time: that must stay a read (no row
    lock, no write), so it neither waits for nor blocks the inbox's writers."""
    await put(store, msg(payload=b"a"))
    assert len(await store.fetch(R1, b"", 0, now=time.time())) == 1  # the inbox row stays
    holder = await asyncpg.connect(pg_dsn, server_settings={"search_path": "qpc"})
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM inboxes WHERE recipient_key = $1 FOR UPDATE",
                                 R1)
            assert await asyncio.wait_for(store.fetch(R1, b"", 0, now=time.time()), 10) == []
    finally:
        await holder.close()


async def test_expired_messages_are_skipped_purged_and_not_counted(
    store: PostgresStorage,
) -> None:
    past = time.time() - 1
    await put(store, msg(payload=b"old", expires_at=past), msg(payload=b"new"), max_depth=1)
    assert [m.payload for m in await store.peek(R1, b"", 0, now=time.time())] == [b"new"]
    assert await store.purge_expired(time.time()) == 1
    assert await store.queue_depth(R1, b"") == 1


async def test_take_hands_over_from_an_empty_inbox_only(store: PostgresStorage) -> None:
    out = await store.enqueue([msg(payload=b"a"), msg(payload=b"b")], max_depth=BIG,
                              dedup_since=0, take=[(R1, b"")])
    assert [(o.seq, o.taken) for o in out] == [(1, True), (2, True)]
    assert await store.queue_depth(R1, b"") == 0
    await put(store, msg(payload=b"stored"))
    (o,) = await store.enqueue([msg(payload=b"c")], max_depth=BIG, dedup_since=0,
                               take=[(R1, b"")])
    assert (o.seq, o.taken) == (4, False)  # not empty: stored, FIFO kept
    await store.restore([(msg(payload=b"a"), out[0])])
    assert [m.seq for m in await store.fetch(R1, b"", 0, now=time.time())] == [1, 3, 4]


async def test_forget_taken_removes_only_matching_records(store: PostgresStorage) -> None:
    mid = os.urandom(16)
    (o,) = await store.enqueue([msg(mid=mid)], max_depth=BIG, dedup_since=0, take=[(R1, b"")])
    assert o.taken
    await store.forget_taken([(msg(mid=mid), replace(o, seq=o.seq + 1))])  # wrong seq: kept
    (dup,) = await put(store, msg(mid=mid))
    assert dup.duplicate
    await store.forget_taken([(msg(mid=mid), o)])
    (again,) = await put(store, msg(mid=mid))
    assert not again.duplicate


async def test_two_servers_share_seqs_and_dedup(pg_dsn: str) -> None:
    a = await PostgresStorage.open(pg_dsn, pool_max=8)
    b = await PostgresStorage.open(pg_dsn, pool_max=8)
    try:
        mids = [os.urandom(16) for _ in range(40)]
        calls = [(a if i % 2 else b).enqueue([msg(payload=bytes([i]), mid=mids[i])],
                                             max_depth=BIG, dedup_since=0)
                 for i in range(40)]
        calls += [(b if i % 2 else a).enqueue([msg(payload=bytes([i]), mid=mids[i])],
                                              max_depth=BIG, dedup_since=0)
                  for i in range(40)]  # every id again, from the other server
        results = [o for r in await asyncio.gather(*calls) for o in r]
        fresh = sorted(o.seq for o in results if not o.duplicate)
        assert fresh == list(range(1, 41))  # 40 stored, gap-free, unique across servers
        assert sum(o.duplicate for o in results) == 40
        stored = await a.fetch(R1, b"", 0, now=time.time())
        assert [m.seq for m in stored] == list(range(1, 41))
    finally:
        await a.close()
        await b.close()


async def test_crossing_multi_inbox_writes_do_not_deadlock(pg_dsn: str) -> None:
    """Calls naming the same inboxes in opposite orders, from two servers at once (the
    shape that deadlocked before inboxes were locked in key order)."""
    a = await PostgresStorage.open(pg_dsn, pool_max=8)
    b = await PostgresStorage.open(pg_dsn, pool_max=8)
    keys = [bytes([i]) * 32 for i in range(1, 7)]
    try:
        for _ in range(15):
            calls = []
            for i in range(24):
                st = a if i % 2 else b
                order = keys if i % 3 else list(reversed(keys))
                calls.append(st.enqueue([msg(k, b"m") for k in order], max_depth=BIG,
                                        dedup_since=0))
            outs = await asyncio.gather(*calls, return_exceptions=True)
            assert not [o for o in outs if isinstance(o, BaseException)]
        for k in keys:
            assert [m.seq for m in await a.fetch(k, b"", 0, now=time.time())] == \
                list(range(1, 15 * 24 + 1))
    finally:
        await a.close()
        await b.close()


# -- notifications -----------------------------------------------------------------------------

async def test_arrivals_are_reported_to_other_servers_only(pg_dsn: str) -> None:
    a = await PostgresStorage.open(pg_dsn)
    b = await PostgresStorage.open(pg_dsn)
    heard_a: asyncio.Queue[object] = asyncio.Queue()
    heard_b: asyncio.Queue[object] = asyncio.Queue()
    a.add_arrival_callback(lambda inbox, seq: heard_a.put_nowait((inbox, seq)))
    b.add_arrival_callback(lambda inbox, seq: heard_b.put_nowait((inbox, seq)))
    try:
        await put(a, msg(payload=b"1"), msg(payload=b"2"), msg(R2, b"3", channel=b"ch"))
        # Handed over to a waiting reader: nothing stored, so nothing to announce.
        await a.enqueue([msg(R2, b"taken")], max_depth=BIG, dedup_since=0, take=[(R2, b"")])
        first = {await asyncio.wait_for(heard_b.get(), 10) for _ in range(2)}
        assert first == {((R1, b""), 2), ((R2, b"ch"), 1)}  # one per inbox, its last seq
        # Notifications arrive in commit order, so once a hears b's marker it would have
        # heard its own earlier ones; and b hears a's later one right after a's first two.
        await put(b, msg(payload=b"marker"))
        assert await asyncio.wait_for(heard_a.get(), 10) == ((R1, b""), 3)
        await put(a, msg(R2, b"x", channel=b"x"))
        assert await asyncio.wait_for(heard_b.get(), 10) == ((R2, b"x"), 1)
        assert heard_a.empty()
    finally:
        await a.close()
        await b.close()


async def test_listener_reconnects_and_reports_a_resync(pg_server, pg_dsn: str) -> None:
    a = await PostgresStorage.open(pg_dsn, connect_timeout=60)
    b = await PostgresStorage.open(pg_dsn, connect_timeout=60)
    events: asyncio.Queue[object] = asyncio.Queue()
    b.add_arrival_callback(lambda inbox, seq: events.put_nowait(inbox))
    try:
        await asyncio.to_thread(pg_server.restart)
        assert await asyncio.wait_for(events.get(), 30) is None  # "re-check everything"
        for _ in range(50):  # the pool reconnects per call; bounded retries
            try:
                await put(a, msg(payload=b"after restart"))
                break
            except StorageError:
                await asyncio.sleep(0.2)  # waiting for the restarted server, not a race
        assert await asyncio.wait_for(events.get(), 10) == (R1, b"")
    finally:
        await a.close()
        await b.close()


# -- keys, users, channels, sessions -----------------------------------------------------------


async def test_delete_account_removes_everything_in_one_go(store: PostgresStorage) -> None:
    await store.create_user("alice", R1, now=1.0)
    await put(store, msg(payload=b"a", mid=os.urandom(16)), msg(payload=b"b", channel=b"ch"))
    await store.add_key_package(R1, b"kp", b"f" * 32)
    await store.set_hybrid_key(R1, b"hk")
    await store.create_channel(b"ch", [R1, R2], R2, now=1.0)
    await store.put_session(SessionRecord(b"t" * 32, R1, "alice", 1.0, time.time() + 60))
    assert await store.delete_account(R1) == "alice"
    assert await store.total_queue_depth() == 0
    assert await store.count_key_packages(R1) == 0
    assert await store.get_hybrid_keys([R1]) == {}
    assert await store.channel_members(b"ch") == [R2]
    assert await store.get_session(b"t" * 32) is None
    assert await store.get_user_by_name("alice") is None
    (o,) = await put(store, msg(payload=b"new"))
    assert o.seq == 1  # the inbox is gone, its seqs restart


# -- kv and logs ---------------------------------------------------------------------------------


async def test_logs_append_concurrently_without_gaps(pg_dsn: str) -> None:
    a = await PostgresStorage.open(pg_dsn)
    b = await PostgresStorage.open(pg_dsn)
    try:
        firsts = await asyncio.gather(*((a if i % 2 else b).log_append("kt", [bytes([i])] * 3)
                                        for i in range(10)))
        assert sorted(firsts) == list(range(0, 30, 3))
        assert await a.log_size("kt") == 30
        entries = await b.log_read("kt", 0, 100)
        assert len(entries) == 30
        for f in firsts:  # each append's entries are contiguous
            assert len(set(entries[f:f + 3])) == 1
        assert await a.log_read_many("kt", [29, 0, 31, -1]) == {29: entries[29], 0: entries[0]}
    finally:
        await a.close()
        await b.close()


async def test_exclusive_sections_never_overlap_across_servers(pg_dsn: str) -> None:
    """Two stores (two servers) on one database: sections with the same name take turns,
    other names and other schemas do not wait, a cancelled waiter leaves nothing held, and a
    server whose lock connection died no longer holds the lock (PostgreSQL released it)."""
    a = await PostgresStorage.open(pg_dsn, pool_max=1)  # a section needs no pool connection
    b = await PostgresStorage.open(pg_dsn)
    other = await PostgresStorage.open(pg_dsn, schema="other")
    inside: list[str] = []
    overlaps = 0

    async def section(st: PostgresStorage, who: str, name: str = "log") -> None:
        nonlocal overlaps
        async with st.exclusive(name):
            overlaps += bool(inside)
            inside.append(who)
            await st.log_append("x", [who.encode()])  # usable inside; others run meanwhile
            inside.remove(who)

    try:
        await asyncio.gather(*(section((a, b)[i % 2], f"s{i}") for i in range(20)))
        assert overlaps == 0 and await a.log_size("x") == 20
        async with a.exclusive("log"):
            # Another name, or the same name in another schema, does not wait.
            await asyncio.wait_for(section(b, "b", name="other-log"), 10)
            await asyncio.wait_for(section(other, "o"), 10)
            waiter = asyncio.ensure_future(section(b, "late"))
            for _ in range(500):  # bounded: until b waits in PostgreSQL for a's lock
                n = await a._pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                if n:
                    break
                await asyncio.sleep(0.01)
            assert n == 1 and not waiter.done()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with b.exclusive("log"):  # the cancelled waiter left nothing held
            pass
        # A lock connection that dies mid-section releases the lock in PostgreSQL.
        async with a.exclusive("log"):
            a._lock_conns["log"].terminate()
            await asyncio.wait_for(section(b, "after-loss"), 10)
        async with a.exclusive("log"):  # a reconnects for its next section
            pass
    finally:
        for st in (a, b, other):
            await st.close()


async def test_waiting_for_an_exclusive_section_is_bounded_by_the_command_timeout(
    pg_dsn: str,
) -> None:
    """A holder that hangs (a stopped process, a partition TCP has not noticed) must not
    stall every other server's appends for ever."""
    a = await PostgresStorage.open(pg_dsn, command_timeout=0.5)
    b = await PostgresStorage.open(pg_dsn, command_timeout=0.5)
    try:
        async with a.exclusive("log"):
            with pytest.raises(StorageError, match="taking a lock"):
                async with b.exclusive("log"):
                    pass
        async with b.exclusive("log"):  # and b's next section works once a is done
            pass
    finally:
        await a.close()
        await b.close()


async def test_close_while_a_lock_connection_opens_runs_no_section_and_leaks_nothing(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = await PostgresStorage.open(pg_dsn, pool_min=1, pool_max=2)
    entered, release = asyncio.Event(), asyncio.Event()
    real = pg_store_module._connect_with_retry
    opened: list[Any] = []

    async def slow_connect(*args: Any, **kw: Any) -> Any:
        entered.set()
        await asyncio.wait_for(release.wait(), 30)
        conn = await real(*args, **kw)
        opened.append(conn)
        return conn

    monkeypatch.setattr(pg_store_module, "_connect_with_retry", slow_connect)
    ran: list[bool] = []

    async def section() -> None:
        async with st.exclusive("log"):
            ran.append(True)

    task = asyncio.ensure_future(section())
    await asyncio.wait_for(entered.wait(), 10)
    await st.close()
    release.set()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(outcome, StorageError) and not ran
    assert len(opened) == 1 and opened[0].is_closed()


# -- start-up and failures ---------------------------------------------------------------------

async def test_reopening_keeps_data_and_schema_version(pg_dsn: str) -> None:
    st = await PostgresStorage.open(pg_dsn)
    await put(st, msg(payload=b"kept"))
    await st.close()
    await st.close()  # idempotent
    st = await PostgresStorage.open(pg_dsn)
    try:
        assert [m.payload for m in await st.peek(R1, b"", 0, now=time.time())] == [b"kept"]
        conn = await asyncpg.connect(pg_dsn)
        try:
            version = await conn.fetchval("SELECT max(version) FROM qpc.schema_version")
            assert version == SCHEMA_VERSION == 6
        finally:
            await conn.close()
    finally:
        await st.close()


async def test_upgrade_from_schema_2_keeps_messages_and_old_reads(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema-2 database with queued messages migrates to 3: the messages are read with
    per-message envelope bytes counted, and a schema-2 node's 6-argument take_calls still
    answers until it is stopped."""
    import qpc_storage_postgres.store as store_mod
    from qpc_storage_postgres import schema

    monkeypatch.setattr(store_mod, "MIGRATIONS", schema.MIGRATIONS[:2])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 2)
    conn = await asyncpg.connect(pg_dsn)
    try:  # written as a schema-2 node does (this code needs the newest schema)
        assert await store_mod._migrate(conn, "qpc") == 2
        await conn.execute("SET search_path TO qpc")
        await conn.fetch(
            "SELECT * FROM enqueue_calls($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            [1], [R1] * 3, [b""] * 3, [b""] * 3, [b"p" * 100] * 3, [None] * 3, time.time(),
            [0.0], [BIG], [], [], [], "old-node")
    finally:
        await conn.close()
    monkeypatch.undo()
    st = await PostgresStorage.open(pg_dsn)
    try:
        now = time.time()
        assert [m.seq for m in await st.peek(R1, b"", 0, now=now, max_bytes=240,
                                             per_message=24)] == [1]  # 2 x 124 > 240
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("SET search_path TO qpc")
            assert await conn.fetchval("SELECT max(version) FROM schema_version") == (
                SCHEMA_VERSION)
            old = await conn.fetch("SELECT o_seq FROM take_calls($1, $2, $3, $4, $5, $6)",
                                   [R1], [b""], [0], [now], [240], [False])
            assert [r["o_seq"] for r in old] == [1, 2]  # schema-2 reads: payload bytes only
        finally:
            await conn.close()
    finally:
        await st.close()


async def test_newer_schema_is_refused(pg_dsn: str) -> None:
    await (await PostgresStorage.open(pg_dsn)).close()  # creates the schema
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO qpc.schema_version VALUES (99)")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="version 99, newer"):
        await PostgresStorage.open(pg_dsn)


async def test_wrong_password_is_a_clear_error(pg_server, pg_dsn: str) -> None:
    bad = pg_dsn.replace(pg_server.password, "wrong")
    with pytest.raises(StorageError, match=r"cannot connect to PostgreSQL.*password"):
        await PostgresStorage.open(bad, connect_timeout=5)


async def test_unreachable_database_fails_after_the_connect_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL"):
        await PostgresStorage.open("postgresql://qpc:x@127.0.0.1:1/none", connect_timeout=1)
    assert time.monotonic() - t0 < 30


class TestPostgresContract(StorageContract):
    """The behaviour every backend shares (qpc_core.storage.contract)."""

    @pytest.fixture
    async def store(self, pg_dsn: str) -> AsyncIterator[PostgresStorage]:
        st = await PostgresStorage.open(pg_dsn, pool_min=1, pool_max=4)
        yield st
        await st.close()
