"""Schema 4 and start-up: the isolation level the functions rely on, a role restricted to its
own schema, restore after DeleteAccount, one failing enqueue call among others, functions
and triggers independent of the caller's search_path, and the upgrade from schema 3."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from qpc_storage_postgres import schema
from qpc_storage_postgres.schema import SCHEMA_VERSION
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.errors import StorageError
from qpc_core.storage.base import EnqueueOutcome, NewMessage, StoredMessage

BIG = 10**9
R1, R2, R3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
WAIT_SECS = 20.0


def msg(recipient: bytes, payload: bytes, channel: bytes = b"",
        expires_at: float | None = None) -> NewMessage:
    return NewMessage(recipient, channel, payload, b"", expires_at)


async def put(st: PostgresStorage, *ms: NewMessage,
              take: tuple[tuple[bytes, bytes], ...] = ()) -> list[EnqueueOutcome]:
    return await st.enqueue(list(ms), max_depth=BIG, dedup_since=0.0, take=take)


async def admin_execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


# -- isolation level -------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
async def test_the_pool_runs_read_committed_whatever_the_database_default(
    pg_dsn: str, level: str
) -> None:
    db = urlsplit(pg_dsn).path.lstrip("/")
    await admin_execute(pg_dsn, f"ALTER DATABASE {db} SET default_transaction_isolation"
                                f" = '{level}'")
    st = await PostgresStorage.open(pg_dsn, pool_min=2, pool_max=2)
    try:
        async with st._pool.acquire() as c1, st._pool.acquire() as c2:
            for conn in (c1, c2):
                assert await conn.fetchval("SHOW transaction_isolation") == "read committed"
        assert await put(st, msg(R1, b"x")) == [EnqueueOutcome(1, False, False)]
    finally:
        await st.close()


async def test_a_server_starting_while_another_migrates_sees_its_schema(pg_dsn: str) -> None:
    """With a database default of repeatable read, a server that waited for the migration
    lock used to read the schema version from a snapshot taken before the other server's
    migration committed, and applied schema 1 again ("relation already exists")."""
    from qpc_storage_postgres.store import _migrate

    db = urlsplit(pg_dsn).path.lstrip("/")
    await admin_execute(pg_dsn, f"ALTER DATABASE {db} SET default_transaction_isolation"
                                " = 'repeatable read'")
    first = await asyncpg.connect(pg_dsn)  # the server that migrates first
    probe = await asyncpg.connect(pg_dsn)
    try:
        async with first.transaction(isolation="read_committed"):
            await first.execute("SELECT pg_advisory_xact_lock(hashtext('qpc-migrate:qpc'))")
            opening = asyncio.ensure_future(PostgresStorage.open(pg_dsn))
            deadline = time.monotonic() + WAIT_SECS
            while not await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event = 'advisory'"
            ):
                assert not opening.done(), opening.result()
                assert time.monotonic() < deadline, "open() never waited for the lock"
                await asyncio.sleep(0.01)  # polling pg_stat_activity, not synchronising
            assert await _migrate(first, "qpc") == SCHEMA_VERSION
        st = await opening
        try:
            assert await put(st, msg(R1, b"x")) == [EnqueueOutcome(1, False, False)]
        finally:
            await st.close()
    finally:
        await first.close()
        await probe.close()


# -- a role restricted to its schema ---------------------------------------------------------

async def test_a_role_with_only_its_own_schema_can_start(pg_dsn: str) -> None:
    """README (Security): restrict the qpc role to its schema.  A DBA creates the schema for
    a role without CREATE on the database; start-up used to run CREATE SCHEMA IF NOT EXISTS,
    which needs that privilege even when the schema exists."""
    role = f"qpc_restricted_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    db = urlsplit(pg_dsn).path.lstrip("/")
    await admin_execute(
        pg_dsn, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
        f"CREATE SCHEMA qpc AUTHORIZATION {role}",
        f"REVOKE CREATE ON DATABASE {db} FROM PUBLIC",
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    )
    u = urlsplit(pg_dsn)
    try:
        st = await PostgresStorage.open(
            f"postgresql://{role}:{password}@{u.hostname}:{u.port}{u.path}", connect_timeout=5)
        try:
            assert await put(st, msg(R1, b"x")) == [EnqueueOutcome(1, False, False)]
            assert await st.fetch(R1, b"", 0, now=time.time()) == [StoredMessage(1, b"x")]
        finally:
            await st.close()
    finally:
        await admin_execute(pg_dsn, "DROP SCHEMA qpc CASCADE", f"DROP OWNED BY {role}",
                            f"DROP ROLE {role}")


# -- restore after DeleteAccount, one failing call among others --------------------------------

async def test_restore_after_delete_account_leaves_the_turns_enqueues_working(
    pg_dsn: str,
) -> None:
    """take -> DeleteAccount -> restore used to store a message without an inbox; then every
    enqueue to that inbox hit messages_pkey and failed the whole turn's statement, unrelated
    calls included."""
    st = await PostgresStorage.open(pg_dsn, pool_max=4)
    try:
        handed = msg(R1, b"handed to a FetchWait")
        [o] = await put(st, handed, take=((R1, b""),))
        assert o.taken
        await st.delete_account(R1)
        await st.restore([(handed, o)])
        assert await st._pool.fetchval("SELECT count(*) FROM messages") == 0
        outs = await asyncio.gather(put(st, msg(R1, b"new")), put(st, msg(R2, b"unrelated")))
        assert list(outs) == [[EnqueueOutcome(1, False, False)], [EnqueueOutcome(1, False, False)]]
        now = time.time()
        assert await st.fetch(R1, b"", 0, now=now) == [StoredMessage(1, b"new")]
        assert await st.fetch(R2, b"", 0, now=now) == [StoredMessage(1, b"unrelated")]
    finally:
        await st.close()


async def test_an_unexpected_error_fails_only_its_own_enqueue_call(pg_dsn: str) -> None:
    """A call that fails in the database for another reason than a full inbox (here a
    test-only trigger refusing one payload) is rolled back alone; the call batched with it
    in the same statement commits."""
    st = await PostgresStorage.open(pg_dsn, pool_max=4)
    batches: list[int] = []
    write_calls = st._write_calls

    async def spy(calls: Any) -> None:
        batches.append(len(calls))
        await write_calls(calls)

    st._write_calls = spy  # type: ignore[method-assign]
    try:
        await st._pool.execute(
            "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'test refuses this payload'; END $$")
        await st._pool.execute(
            "CREATE TRIGGER test_refuse BEFORE INSERT ON messages FOR EACH ROW"
            " WHEN (NEW.payload = '\\x706f69736f6e'::bytea) EXECUTE FUNCTION test_refuse()")
        bad, good = await asyncio.gather(
            put(st, msg(R1, b"fine"), msg(R1, b"poison")), put(st, msg(R2, b"unrelated")),
            return_exceptions=True)
        assert batches == [2]  # one statement for both calls
        assert isinstance(bad, StorageError) and "test refuses this payload" in str(bad)
        assert good == [EnqueueOutcome(1, False, False)]
        now = time.time()
        assert await st.peek(R1, b"", 0, now=now) == []  # all or nothing: "fine" too
        assert await put(st, msg(R1, b"again")) == [EnqueueOutcome(1, False, False)]
        assert await st.fetch(R2, b"", 0, now=now) == [StoredMessage(1, b"unrelated")]
        assert await st.total_queue_depth() == 1
    finally:
        await st.close()


# -- search_path -----------------------------------------------------------------------------

async def test_trigger_and_functions_work_with_any_search_path(pg_dsn: str) -> None:
    """An operator's DELETE on the messages table (its depth trigger) and a call of a
    function, schema-qualified, from a session with the default search_path."""
    st = await PostgresStorage.open(pg_dsn, schema="chat")
    try:
        await put(st, msg(R1, b"old", expires_at=time.time() - 5), msg(R1, b"a"), msg(R1, b"b"))
        conn = await asyncpg.connect(pg_dsn)  # search_path "$user", public
        try:
            assert await conn.execute(
                "DELETE FROM chat.messages WHERE expires_at < $1", time.time()) == "DELETE 1"
            assert await conn.fetchval("SELECT chat.ack_messages($1, $2, 2)", R1, b"") == 1
            rows = await conn.fetch("SELECT o_seq FROM chat.take_calls($1, $2, $3, $4, $5, $6,"
                                    " $7)", [R1], [b""], [0], [time.time()], [0], [True], [0])
            assert [r[0] for r in rows] == [3]
            unset = await conn.fetch(
                "SELECT p.oid::regprocedure::text FROM pg_proc AS p"
                " WHERE p.pronamespace = 'chat'::regnamespace AND NOT EXISTS ("
                "SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%')")
            assert [r[0] for r in unset] == []
        finally:
            await conn.close()
        assert await st.total_queue_depth() == 0
    finally:
        await st.close()


# -- upgrade ---------------------------------------------------------------------------------

async def test_upgrade_from_schema_3_keeps_messages_and_repairs_put_back_leftovers(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema-3 database with queued messages, plus what a schema-3 restore could leave: a
    message without an inbox (R2) and one above its re-created inbox's next seq (R3).  After
    the upgrade the messages are read in order, the leftovers no longer break enqueues, and a
    schema-3 node's calls still answer until it is stopped."""
    import qpc_storage_postgres.store as store_mod

    monkeypatch.setattr(store_mod, "MIGRATIONS", schema.MIGRATIONS[:3])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 3)
    enqueue_v3 = ("SELECT o_seq FROM enqueue_calls($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
                  " $11, $12, $13)")

    async def enqueue_as_v3(conn: asyncpg.Connection, recipient: bytes, *payloads: bytes
                            ) -> list[int]:
        n = len(payloads)
        rows = await conn.fetch(enqueue_v3, [1], [recipient] * n, [b""] * n, [b""] * n,
                                list(payloads), [None] * n, time.time(), [0.0], [BIG], [], [],
                                [], "v3-node")
        return [r[0] for r in rows]

    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await store_mod._migrate(conn, "qpc") == 3
        await conn.execute("SET search_path TO qpc")
        assert await enqueue_as_v3(conn, R1, b"a", b"b", b"c") == [1, 2, 3]
        assert await enqueue_as_v3(conn, R3, b"r3") == [1]
        # Schema 3's restore after DeleteAccount: rows put back without an inbox / over it.
        await conn.executemany(
            "INSERT INTO messages (recipient_key, channel_id, seq, created_at, payload)"
            " VALUES ($1, '', $2, 0, $3)", [(R2, 1, b"orphan"), (R3, 5, b"stale")])
        await conn.execute("UPDATE inboxes SET depth = depth + 1 WHERE recipient_key = $1", R3)
    finally:
        await conn.close()
    monkeypatch.undo()

    st = await PostgresStorage.open(pg_dsn)
    try:
        now = time.time()
        assert [m.payload for m in await st.peek(R1, b"", 0, now=now)] == [b"a", b"b", b"c"]
        assert await put(st, msg(R2, b"new")) == [EnqueueOutcome(1, False, False)]
        assert await put(st, msg(R3, b"r3 next")) == [EnqueueOutcome(6, False, False)]
        assert await st.fetch(R3, b"", 0, now=now) == [
            StoredMessage(1, b"r3"), StoredMessage(5, b"stale"), StoredMessage(6, b"r3 next")]
        assert await st.fetch(R1, b"", 2, now=now) == [StoredMessage(1, b"a"),
                                                        StoredMessage(2, b"b")]
        conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": "qpc"})
        try:
            assert await conn.fetchval("SELECT max(version) FROM schema_version") == SCHEMA_VERSION
            assert await enqueue_as_v3(conn, R1, b"d") == [4]  # a schema-3 node's calls
            rows = await conn.fetch("SELECT o_seq FROM take_calls($1, $2, $3, $4, $5, $6, $7)",
                                    [R1], [b""], [0], [now], [0], [True], [0])
            assert [r[0] for r in rows] == [3, 4]
        finally:
            await conn.close()
        assert await st.total_queue_depth() == 1  # R2's new message
    finally:
        await st.close()
