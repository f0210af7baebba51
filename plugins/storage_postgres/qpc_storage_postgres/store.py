"""``PostgresStorage``: the :class:`~qpc_core.storage.base.Storage` interface on a shared
PostgreSQL database (asyncpg), so several qpc servers can serve one user base.

* Every call is one statement or one transaction on a pooled connection; an awaited write
  has committed.  Enqueue calls of one event-loop turn share one statement and one commit
  (group commit), each still all or nothing.
* Seqs stay unique and in commit order per inbox across servers: ``enqueue_batch`` reserves
  them with an upsert that holds the inbox row lock until commit.
* Messages stored by one server are announced to the others with ``NOTIFY`` (sent at
  commit); each server LISTENs on a dedicated connection and reports them to the core with
  :meth:`Storage.report_arrival`, which wakes long polls and pushes NEW_MESSAGE.  If that
  connection drops, it reconnects with back-off and reports ``None`` (re-check everything).
* Transient database errors fail the call with :class:`StorageError` (the RPC answers an
  internal error, nothing acknowledged is lost); the server keeps running and recovers when
  the database is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import groupby
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from qpc_core.errors import StorageError
from qpc_core.storage.base import (
    AlreadyExists,
    EnqueueOutcome,
    LogMoved,
    NewMessage,
    QueueFull,
    SessionRecord,
    Storage,
    StoredMessage,
    UserRecord,
    prefix_end,
)
from qpc_core.storage.records import (
    DUMP_BATCH,
    ChannelMemberRecord,
    ChannelRecord,
    DedupRecord,
    HybridKeyRecord,
    InboxRecord,
    KeyPackageRecord,
    KvRecord,
    LogRecord,
    MessageRecord,
    Record,
)
from qpc_storage_postgres.schema import (
    MIGRATIONS,
    NOTIFY_CHANNEL,
    SCHEMA_VERSION,
)

log = logging.getLogger("qpc.storage.postgres")

PURGE_CHUNK = 5000
_RETRIES = 3  # a statement PostgreSQL aborted for a deadlock or serialization conflict
_INT4_MAX = 2**31 - 1
T = TypeVar("T")
_LOAD_STATEMENT_TIMEOUT = 3600.0  # seconds per statement of a `qpc store copy` load
_RECONNECT_MAX_SECS = 10.0
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# The PL/pgSQL functions rely on READ COMMITTED (each statement sees what was committed
# before it, e.g. after waiting for an inbox lock), whatever the database's default is.
_KV_PUT = ("INSERT INTO kv (namespace, key, value) VALUES ($1, $2, $3)"
           " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value")
_SESSION_SETTINGS = {"default_transaction_isolation": "read committed"}


def _count(status: str) -> int:
    """Rows affected, from a command status such as ``DELETE 3``."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0


@asynccontextmanager
async def _errors(what: str) -> AsyncIterator[None]:
    try:
        yield
    except StorageError:
        raise
    except _DB_ERRORS as e:
        raise StorageError(f"database error ({what}): {e}") from e


async def _rerun_if_rolled_back(call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call``; when PostgreSQL aborted it for a deadlock or a serialization conflict
    (its transaction was rolled back whole, so running it again is safe), try again, up
    to ``_RETRIES`` times in all."""
    for attempt in range(_RETRIES - 1):
        try:
            return await call()
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            log.debug("rolled back by PostgreSQL (attempt %d), running again", attempt + 1)
    return await call()


async def _connect_with_retry(dsn: str, timeout: float, **kw: Any) -> asyncpg.Connection:
    """One connection, retrying refused/unavailable for up to ``timeout`` seconds (the
    database may be starting with qpc); bad credentials or a bad DSN fail at once."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            return await asyncpg.connect(dsn, timeout=min(10.0, timeout), **kw)
        except (OSError, asyncpg.CannotConnectNowError, TimeoutError) as e:
            if time.monotonic() + delay > deadline:
                raise StorageError(f"cannot connect to PostgreSQL: {e}") from e
            await asyncio.sleep(delay)  # back-off between connection attempts
            delay = min(delay * 2, 2.0)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
            raise StorageError(f"cannot connect to PostgreSQL: {e}") from e


async def _migrate(conn: asyncpg.Connection, schema: str) -> int:
    """Create the schema and apply pending migrations under an advisory lock (several
    servers may start at once).  Returns the schema version now in place.

    ``conn`` must run at READ COMMITTED (:data:`_SESSION_SETTINGS`): each statement after
    the lock then sees what a server that migrated first committed."""
    async with conn.transaction(isolation="read_committed"):
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"qpc-migrate:{schema}")
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
        # exists: a role given only its own schema (README, Security) could not start.
        if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET LOCAL search_path = "{schema}"')
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version int NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"database schema {schema!r} is at version {version}, newer than this plugin "
                f"supports ({SCHEMA_VERSION}); upgrade qpc-storage-postgres"
            )
        for target, script in MIGRATIONS:
            if target > version:
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", target)
                version = target
    return int(version)


# -- copying (qpc store copy) -------------------------------------------------------------------
# Dump queries in the order fixed by qpc_core.storage.records (text keys in byte order, as
# SQLite compares them), with the record each row becomes.
_DUMP: list[tuple[str, Callable[[Any], Record]]] = [
    ('SELECT username, identity_key, created_at FROM users ORDER BY username COLLATE "C"',
     lambda r: UserRecord(r[0], r[1], r[2])),
    ("SELECT token_hash, identity_key, username, created_at, expires_at FROM sessions"
     " ORDER BY token_hash", lambda r: SessionRecord(r[0], r[1], r[2], r[3], r[4])),
    ("SELECT identity_key, public_key FROM hybrid_keys ORDER BY identity_key",
     lambda r: HybridKeyRecord(r[0], r[1])),
    ("SELECT identity_key, package, fingerprint FROM key_packages ORDER BY identity_key, id",
     lambda r: KeyPackageRecord(r[0], r[1], r[2])),
    ("SELECT channel_id, created_by, created_at FROM channels ORDER BY channel_id",
     lambda r: ChannelRecord(r[0], r[1], r[2])),
    ("SELECT channel_id, identity_key FROM channel_members ORDER BY channel_id, identity_key",
     lambda r: ChannelMemberRecord(r[0], r[1])),
    ("SELECT recipient_key, channel_id, next_seq FROM inboxes ORDER BY recipient_key, channel_id",
     lambda r: InboxRecord(r[0], r[1], r[2])),
    ("SELECT recipient_key, channel_id, seq, payload, created_at, expires_at FROM messages"
     " ORDER BY recipient_key, channel_id, seq",
     lambda r: MessageRecord(r[0], r[1], r[2], r[3], r[4], r[5])),
    ("SELECT recipient_key, channel_id, message_id, seq, created_at FROM dedup"
     " ORDER BY recipient_key, channel_id, message_id",
     lambda r: DedupRecord(r[0], r[1], r[2], r[3], r[4])),
    ('SELECT namespace, key, value FROM kv ORDER BY namespace COLLATE "C", key',
     lambda r: KvRecord(r[0], r[1], r[2])),
    ('SELECT log, idx, entry FROM logs ORDER BY log COLLATE "C", idx',
     lambda r: LogRecord(r[0], r[1], r[2])),
]

# Record type -> (table, COPY columns, row from record).
_LOAD: dict[type, tuple[str, tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {
    UserRecord: ("users", ("username", "identity_key", "created_at"),
                 lambda r: (r.username, r.identity_key, r.created_at)),
    SessionRecord: ("sessions",
                    ("token_hash", "identity_key", "username", "created_at", "expires_at"),
                    lambda r: (r.token_hash, r.identity_key, r.username, r.created_at,
                               r.expires_at)),
    HybridKeyRecord: ("hybrid_keys", ("identity_key", "public_key"),
                      lambda r: (r.identity_key, r.public_key)),
    KeyPackageRecord: ("key_packages", ("identity_key", "package", "fingerprint"),
                       lambda r: (r.identity_key, r.package, r.fingerprint)),
    ChannelRecord: ("channels", ("channel_id", "created_by", "created_at"),
                    lambda r: (r.channel_id, r.created_by, r.created_at)),
    ChannelMemberRecord: ("channel_members", ("channel_id", "identity_key"),
                          lambda r: (r.channel_id, r.identity_key)),
    InboxRecord: ("inboxes", ("recipient_key", "channel_id", "next_seq", "depth"),
                  lambda r: (r.recipient_key, r.channel_id, r.next_seq, 0)),
    MessageRecord: ("messages",
                    ("recipient_key", "channel_id", "seq", "payload", "created_at", "expires_at"),
                    lambda r: (r.recipient_key, r.channel_id, r.seq, r.payload, r.created_at,
                               r.expires_at)),
    DedupRecord: ("dedup", ("recipient_key", "channel_id", "message_id", "seq", "created_at"),
                  lambda r: (r.recipient_key, r.channel_id, r.message_id, r.seq,
                             r.created_at)),
    KvRecord: ("kv", ("namespace", "key", "value"), lambda r: (r.namespace, r.key, r.value)),
    LogRecord: ("logs", ("log", "idx", "entry"), lambda r: (r.log, r.idx, r.entry)),
}

_TABLES = ("users", "sessions", "hybrid_keys", "key_packages", "channels", "channel_members",
           "inboxes", "messages", "dedup", "kv", "logs", "log_heads")


class _SourceFailed(Exception):
    """An error of the records' source during ``load`` (not a database error here)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


async def _from_source(
    batches: AsyncIterable[Sequence[Record]],
) -> AsyncIterator[Sequence[Record]]:
    try:
        async for batch in batches:
            yield batch
    except Exception as e:
        raise _SourceFailed(e) from e


async def _is_empty(conn: asyncpg.Connection) -> bool:
    sql = " OR ".join(f"EXISTS (SELECT 1 FROM {t})" for t in _TABLES)
    return not await conn.fetchval(f"SELECT {sql}")


@dataclass(slots=True)
class _Call:
    """One enqueue call waiting for its loop turn's statement."""

    messages: list[NewMessage]
    max_depth: int
    dedup_since: float
    take: list[tuple[bytes, bytes]]
    fut: asyncio.Future[list[EnqueueOutcome]]


@dataclass(slots=True)
class _Take:
    """One Fetch/FetchWait/Peek read waiting for its loop turn's statement."""

    recipient: bytes
    channel: bytes
    limit: int
    now: float
    max_bytes: int
    remove: bool
    fut: asyncio.Future[list[StoredMessage]]
    per_message: int = 0


class PostgresStorage(Storage):
    name = "postgres"
    shared = True

    def __init__(self, pool: asyncpg.Pool, dsn: str, schema: str, connect_timeout: float,
                 command_timeout: float = 30.0) -> None:
        self._pool = pool
        self._command_timeout = command_timeout
        self._dsn = dsn
        self.schema = schema
        self._connect_timeout = connect_timeout
        # Tells this server's own notifications apart from other servers'.
        self.node_id = secrets.token_hex(8)
        self._listener: asyncpg.Connection | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._closed = False
        self._pending: list[_Call] = []
        self._flush_scheduled = False
        self._writes: set[asyncio.Task[None]] = set()
        self._pending_takes: list[_Take] = []
        self._takes_scheduled = False
        # exclusive(): per name, an advisory lock on a dedicated connection (opened when
        # first needed), so a section's own queries never wait for a pool connection it
        # holds; this process's sections of one name queue on an asyncio.Lock first.
        self._lock_conns: dict[str, asyncpg.Connection] = {}
        self._lock_guards: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(
        cls, dsn: str, *, schema: str = "qpc", pool_min: int = 2, pool_max: int = 16,
        command_timeout: float = 30.0, connect_timeout: float = 30.0,
    ) -> PostgresStorage:
        conn = await _connect_with_retry(dsn, connect_timeout,
                                         server_settings=dict(_SESSION_SETTINGS))
        try:
            async with _errors("migrating"):
                await _migrate(conn, schema)
        finally:
            await conn.close()
        settings = {"search_path": f'"{schema}"', "application_name": "qpc",
                    **_SESSION_SETTINGS}
        async with _errors("opening the pool"):
            pool = await asyncpg.create_pool(
                dsn, min_size=min(pool_min, pool_max), max_size=pool_max,
                command_timeout=command_timeout, server_settings=settings,
            )
        store = cls(pool, dsn, schema, connect_timeout, command_timeout)
        try:
            await store._listen()
        except BaseException:
            await pool.close()
            raise
        return store

    # -- lifecycle --------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush()  # calls queued this turn still go out
        self._flush_takes()
        if self._writes:  # finish every pending write before the pool closes
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._listener is not None:
            try:
                await self._listener.close(timeout=5)
            except _DB_ERRORS:
                self._listener.terminate()
        for name in list(self._lock_conns):
            self._drop_lock_conn(name)  # its session's advisory locks go with it
        try:
            await asyncio.wait_for(self._pool.close(), 30)
        except (TimeoutError, *_DB_ERRORS):
            self._pool.terminate()

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """A PostgreSQL advisory lock (session level, keyed by schema and name), taken and
        released on this name's lock connection; this process's sections of the name queue
        on an :class:`asyncio.Lock` first.  Waiting counts against
        ``command_timeout_secs``.  If anything goes wrong with the connection (or the wait
        is cancelled) it is closed, which releases whatever it held."""
        digest = hashlib.sha256(f"qpc\0{self.schema}\0{name}".encode()).digest()
        lock_key = int.from_bytes(digest[:8], "big", signed=True)
        async with self._lock_guards.setdefault(name, asyncio.Lock()):
            if self._closed:
                raise StorageError("storage is closed")
            try:
                async with _errors("taking a lock"):
                    conn = self._lock_conns.get(name)
                    if conn is None or conn.is_closed():
                        conn = await _connect_with_retry(
                            self._dsn, self._connect_timeout,
                            server_settings=dict(_SESSION_SETTINGS))
                        if self._closed:  # close() ran while this connected
                            conn.terminate()
                            raise StorageError("storage is closed")
                        self._lock_conns[name] = conn
                    await conn.execute("SELECT pg_advisory_lock($1)", lock_key,
                                       timeout=self._command_timeout)
            except BaseException:
                self._drop_lock_conn(name)
                raise
            try:
                yield
            finally:
                # The section's work is done: a failed unlock is not its caller's error.
                # Closing the connection releases the lock as surely as the unlock would.
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)
                except _DB_ERRORS as e:
                    log.warning("lock %r: unlock failed (%s); closing the lock connection, "
                                "which releases it", name, e)
                    self._drop_lock_conn(name)
                except BaseException:
                    self._drop_lock_conn(name)
                    raise

    def _drop_lock_conn(self, name: str) -> None:
        conn = self._lock_conns.pop(name, None)
        if conn is not None:
            conn.terminate()

    async def ping(self) -> None:
        async with _errors("ping"):
            await self._pool.fetchval("SELECT 1")

    # -- arrivals from other servers --------------------------------------------------------
    async def _listen(self) -> None:
        conn = await _connect_with_retry(self._dsn, self._connect_timeout)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except _DB_ERRORS as e:
            await conn.close()
            raise StorageError(f"cannot LISTEN on PostgreSQL: {e}") from e
        conn.add_termination_listener(self._on_listener_lost)
        self._listener = conn

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            node, recipient, channel, seq = payload.split(" ")
            if node == self.node_id:
                return
            inbox = (bytes.fromhex(recipient), bytes.fromhex(channel))
            last = int(seq)
        except ValueError:
            log.warning("ignoring a malformed %s notification: %.100r", NOTIFY_CHANNEL, payload)
            return
        self.report_arrival(inbox, last)

    def _on_listener_lost(self, _conn: Any) -> None:
        self._listener = None
        if not self._closed and (self._reconnect is None or self._reconnect.done()):
            log.warning("PostgreSQL notification connection lost: reconnecting")
            self._reconnect = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.2
        while not self._closed:
            try:
                await self._listen()
            except StorageError as e:
                log.warning("PostgreSQL notifications still unavailable: %s", e)
                await asyncio.sleep(delay)  # back-off between reconnection attempts
                delay = min(delay * 2, _RECONNECT_MAX_SECS)
                continue
            log.info("PostgreSQL notification connection restored")
            self.report_arrival(None)  # arrivals may have been missed meanwhile
            return

    # -- delivery ---------------------------------------------------------------------------
    async def enqueue(
        self, messages: Sequence[NewMessage], *, max_depth: int, dedup_since: float,
        take: Collection[tuple[bytes, bytes]] = (),
    ) -> list[EnqueueOutcome]:
        """Queued for this event-loop turn: the turn's calls are written with one statement
        and one commit (group commit; each call stays all or nothing)."""
        if self._closed:
            raise StorageError("storage is closed")
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[EnqueueOutcome]] = loop.create_future()
        self._pending.append(_Call(list(messages), max_depth, dedup_since, list(take), fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        calls, self._pending = self._pending, []
        if calls:
            task = asyncio.get_running_loop().create_task(self._write_calls(calls))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write_calls(self, calls: list[_Call]) -> None:
        """One ``enqueue_calls`` statement for ``calls``; every future gets its outcome (a
        cancelled caller's write still happens: its future is just left alone)."""
        bounds: list[int] = []
        flat: list[NewMessage] = []
        take_call: list[int] = []
        take_r: list[bytes] = []
        take_c: list[bytes] = []
        for k, call in enumerate(calls, 1):
            bounds.append(len(flat) + 1)
            flat.extend(call.messages)
            for recipient, channel in call.take:
                take_call.append(k)
                take_r.append(recipient)
                take_c.append(channel)
        args = (bounds, [m.recipient_key for m in flat], [m.channel_id for m in flat],
                [m.message_id for m in flat], [m.payload for m in flat],
                [m.expires_at for m in flat], time.time(), [c.dedup_since for c in calls],
                [c.max_depth for c in calls], take_call, take_r, take_c, self.node_id)
        try:
            rows = await _rerun_if_rolled_back(lambda: self._pool.fetch(
                "SELECT o_call, o_seq, o_duplicate, o_taken, o_full, o_full_inbox, o_error,"
                " o_epoch FROM enqueue_calls_v6($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
                " $12, $13)",
                *args,
            ))
        except _DB_ERRORS as e:
            err = StorageError(f"database error (enqueue): {e}")
            err.__cause__ = e
            for call in calls:
                if not call.fut.done():
                    call.fut.set_exception(err)
            return
        except BaseException as e:  # cancelled (closing): nobody may hang
            for call in calls:
                if not call.fut.done():
                    call.fut.set_exception(StorageError(f"enqueue interrupted: {e!r}"))
            raise
        results: list[list[EnqueueOutcome] | BaseException] = [[] for _ in calls]
        for r in rows:
            k = int(r[0]) - 1
            if r[6] is not None:  # this call alone failed (rolled back); the others stand
                log.error("enqueue call failed in the database: %s", r[6])
                results[k] = StorageError(f"database error (enqueue): {r[6]}")
            elif r[4] is not None:
                recipient, channel = (bytes.fromhex(x) for x in (r[5] or " ").split(" "))
                results[k] = QueueFull(recipient, channel, int(r[4]))
            else:
                out = results[k]
                assert isinstance(out, list)
                out.append(EnqueueOutcome(int(r[1]), bool(r[2]), True, int(r[7])) if r[3]
                           else EnqueueOutcome(int(r[1]), bool(r[2])))
        for call, result in zip(calls, results, strict=True):
            if call.fut.done():
                continue
            if isinstance(result, BaseException):
                call.fut.set_exception(result)
            else:
                call.fut.set_result(result)

    async def restore(self, messages: Sequence[tuple[NewMessage, EnqueueOutcome]]) -> None:
        if not messages:
            return
        # One statement (restore_messages): the inboxes are locked before anything is
        # written, and a message whose inbox was deleted meanwhile (and maybe created again:
        # another epoch) is not stored.
        args = ([m.recipient_key for m, _ in messages], [m.channel_id for m, _ in messages],
                [out.seq for _, out in messages], [m.expires_at for m, _ in messages],
                [m.payload for m, _ in messages], time.time(), self.node_id,
                [out.inbox_epoch for _, out in messages])
        async with _errors("restore"):
            stored = await _rerun_if_rolled_back(lambda: self._pool.fetchval(
                "SELECT restore_messages($1, $2, $3, $4, $5, $6, $7, $8)", *args))
        if int(stored) < len(messages):
            log.info("%d handed-over message(s) not put back: their inbox was deleted"
                     " (DeleteAccount) meanwhile", len(messages) - stored)

    async def forget_taken(
        self, messages: Sequence[tuple[NewMessage, EnqueueOutcome]]
    ) -> None:
        rows = [(m.recipient_key, m.channel_id, m.message_id, out.seq, out.inbox_epoch)
                for m, out in messages if m.message_id]
        if rows:
            async with _errors("forget_taken"):
                await self._pool.executemany(
                    # Only in the incarnation that took it (see restore).
                    "DELETE FROM dedup WHERE recipient_key = $1 AND channel_id = $2"
                    " AND message_id = $3 AND seq = $4 AND EXISTS (SELECT 1 FROM inboxes"
                    " WHERE recipient_key = $1 AND channel_id = $2"
                    " AND coalesce(epoch, 0) = $5)", rows,
                )

    async def _take(self, recipient: bytes, channel: bytes, limit: int, now: float,
                    max_bytes: int, remove: bool, per_message: int = 0) -> list[StoredMessage]:
        """Queued for this event-loop turn: the turn's reads go out as one ``take_calls``
        statement (one round trip, and one commit for all their removals)."""
        if self._closed:
            raise StorageError("storage is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[StoredMessage]] = loop.create_future()
        self._pending_takes.append(
            _Take(recipient, channel, min(max(0, limit), _INT4_MAX), now, max(0, max_bytes),
                  remove, fut, min(max(0, per_message), _INT4_MAX)))
        if not self._takes_scheduled:
            self._takes_scheduled = True
            loop.call_soon(self._flush_takes)
        return await fut

    def _flush_takes(self) -> None:
        self._takes_scheduled = False
        takes, self._pending_takes = self._pending_takes, []
        if takes:
            task = asyncio.get_running_loop().create_task(self._take_calls(takes))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _take_calls(self, takes: list[_Take]) -> None:
        args = ([t.recipient for t in takes], [t.channel for t in takes],
                [t.limit for t in takes], [t.now for t in takes], [t.max_bytes for t in takes],
                [t.remove for t in takes], [t.per_message for t in takes])
        what = "fetch" if any(t.remove for t in takes) else "peek"
        try:
            rows = await _rerun_if_rolled_back(lambda: self._pool.fetch(
                "SELECT o_call, o_seq, o_payload FROM take_calls($1, $2, $3, $4, $5, $6, $7)",
                *args,
            ))
        except _DB_ERRORS as e:
            err = StorageError(f"database error ({what}): {e}")
            err.__cause__ = e
            for t in takes:
                if not t.fut.done():
                    t.fut.set_exception(err)
            return
        except BaseException as e:  # cancelled (closing): nobody may hang
            for t in takes:
                if not t.fut.done():
                    t.fut.set_exception(StorageError(f"{what} interrupted: {e!r}"))
            raise
        results: list[list[StoredMessage]] = [[] for _ in takes]
        for r in rows:
            results[int(r[0]) - 1].append(StoredMessage(int(r[1]), bytes(r[2])))
        for t, got in zip(takes, results, strict=True):
            if not t.fut.done():
                got.sort(key=lambda m: m.seq)
                t.fut.set_result(got)

    async def fetch(
        self, recipient_key: bytes, channel_id: bytes, limit: int, *, now: float,
        max_bytes: int = 0, likely_nonempty: bool = False, per_message: int = 0,
    ) -> list[StoredMessage]:
        return await self._take(recipient_key, channel_id, limit, now, max_bytes, True,
                                per_message)

    async def peek(
        self, recipient_key: bytes, channel_id: bytes, limit: int, *, now: float,
        max_bytes: int = 0, per_message: int = 0,
    ) -> list[StoredMessage]:
        return await self._take(recipient_key, channel_id, limit, now, max_bytes, False,
                                per_message)

    async def ack(self, recipient_key: bytes, channel_id: bytes, seq_up_to: int) -> int:
        async with _errors("ack"):
            n = await _rerun_if_rolled_back(lambda: self._pool.fetchval(
                "SELECT ack_messages($1, $2, $3)", recipient_key, channel_id, seq_up_to))
        return int(n)

    async def queue_depth(self, recipient_key: bytes, channel_id: bytes) -> int:
        async with _errors("queue_depth"):
            depth = await self._pool.fetchval(
                "SELECT depth FROM inboxes WHERE recipient_key = $1 AND channel_id = $2",
                recipient_key, channel_id,
            )
        return int(depth or 0)

    async def total_queue_depth(self) -> int:
        async with _errors("total_queue_depth"):
            return int(await self._pool.fetchval("SELECT coalesce(sum(depth), 0) FROM inboxes"))

    async def _purge(self, what: str, sql: str, bound: float) -> int:
        """Delete in chunks (short transactions, no long lock on a busy table); a chunk that
        PostgreSQL aborted for a deadlock was rolled back whole and is tried again."""
        total = 0
        async with _errors(what):
            while True:
                status = await _rerun_if_rolled_back(
                    lambda: self._pool.execute(sql, bound, PURGE_CHUNK))
                n = _count(status)
                total += n
                if n < PURGE_CHUNK:
                    return total

    async def purge_expired(self, now: float) -> int:
        total = 0
        async with _errors("purge_expired"):
            while True:
                row = await _rerun_if_rolled_back(lambda: self._pool.fetchrow(
                    "SELECT o_chosen, o_deleted FROM purge_expired_chunk($1, $2)",
                    now, PURGE_CHUNK))
                total += int(row[1])
                if int(row[0]) < PURGE_CHUNK:
                    return total

    async def purge_dedup(self, older_than: float) -> int:
        return await self._purge(
            "purge_dedup",
            "DELETE FROM dedup WHERE (recipient_key, channel_id, message_id) IN ("
            "SELECT recipient_key, channel_id, message_id FROM dedup"
            " WHERE created_at < $1 LIMIT $2)", older_than,
        )

    # -- key packages and hybrid keys ---------------------------------------------------------
    async def add_key_package(
        self, identity_key: bytes, package: bytes, fingerprint: bytes
    ) -> None:
        async with _errors("add_key_package"):
            await self._pool.execute(
                "INSERT INTO key_packages (identity_key, package, fingerprint)"
                " VALUES ($1, $2, $3)", identity_key, package, fingerprint,
            )

    async def pop_key_package(self, identity_key: bytes) -> bytes | None:
        # SKIP LOCKED: two concurrent pops (on any servers) never get the same package.
        async with _errors("pop_key_package"):
            package = await self._pool.fetchval(
                "DELETE FROM key_packages WHERE id = ("
                "SELECT id FROM key_packages WHERE identity_key = $1 ORDER BY id LIMIT 1"
                " FOR UPDATE SKIP LOCKED) RETURNING package", identity_key,
            )
        return bytes(package) if package is not None else None

    async def count_key_packages(self, identity_key: bytes) -> int:
        async with _errors("count_key_packages"):
            return int(await self._pool.fetchval(
                "SELECT count(*) FROM key_packages WHERE identity_key = $1", identity_key))

    async def set_hybrid_key(self, identity_key: bytes, public_key: bytes) -> None:
        async with _errors("set_hybrid_key"):
            await self._pool.execute(
                "INSERT INTO hybrid_keys (identity_key, public_key) VALUES ($1, $2)"
                " ON CONFLICT (identity_key) DO UPDATE SET public_key = excluded.public_key",
                identity_key, public_key,
            )

    async def get_hybrid_keys(self, identity_keys: Sequence[bytes]) -> dict[bytes, bytes]:
        if not identity_keys:
            return {}
        async with _errors("get_hybrid_keys"):
            rows = await self._pool.fetch(
                "SELECT identity_key, public_key FROM hybrid_keys"
                " WHERE identity_key = ANY ($1)", list(dict.fromkeys(identity_keys)),
            )
        return {bytes(r[0]): bytes(r[1]) for r in rows}

    # -- users, channels, sessions ------------------------------------------------------------
    async def create_user(self, username: str, identity_key: bytes, *, now: float) -> None:
        try:
            async with _errors("create_user"):
                await self._pool.execute(
                    "INSERT INTO users (username, identity_key, created_at) VALUES ($1, $2, $3)",
                    username, identity_key, now,
                )
        except StorageError as e:
            if isinstance(e.__cause__, asyncpg.UniqueViolationError):
                raise AlreadyExists("username or identity key already registered") from None
            raise

    async def _get_user(self, column: str, value: object) -> UserRecord | None:
        async with _errors("get_user"):
            row = await self._pool.fetchrow(
                f"SELECT username, identity_key, created_at FROM users WHERE {column} = $1",
                value)
        return None if row is None else UserRecord(str(row[0]), bytes(row[1]), float(row[2]))

    async def get_user_by_name(self, username: str) -> UserRecord | None:
        return await self._get_user("username", username)

    async def get_user_by_identity(self, identity_key: bytes) -> UserRecord | None:
        return await self._get_user("identity_key", identity_key)

    async def create_channel(
        self, channel_id: bytes, members: Sequence[bytes], created_by: bytes, *, now: float
    ) -> bool:
        async with _errors("create_channel"), self._pool.acquire() as conn, conn.transaction():
            created = await conn.fetchval(
                "INSERT INTO channels (channel_id, created_by, created_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (channel_id) DO NOTHING RETURNING true",
                channel_id, created_by, now,
            )
            # Members missing from an existing channel (removed by their DeleteAccount) are
            # added back: the same member set re-created is the same channel again.
            await conn.executemany(
                "INSERT INTO channel_members (channel_id, identity_key) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                [(channel_id, m) for m in dict.fromkeys(members)],
            )
            return bool(created)

    async def channel_members(self, channel_id: bytes) -> list[bytes] | None:
        async with _errors("channel_members"):
            rows = await self._pool.fetch(
                "SELECT m.identity_key FROM channels AS c LEFT JOIN channel_members AS m"
                " ON m.channel_id = c.channel_id WHERE c.channel_id = $1"
                " ORDER BY m.identity_key", channel_id,
            )
        if not rows:
            return None
        return [bytes(r[0]) for r in rows if r[0] is not None]

    async def put_session(self, record: SessionRecord) -> None:
        async with _errors("put_session"):
            await self._pool.execute(
                "INSERT INTO sessions (token_hash, identity_key, username, created_at,"
                " expires_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (token_hash) DO UPDATE"
                " SET identity_key = excluded.identity_key, username = excluded.username,"
                " created_at = excluded.created_at, expires_at = excluded.expires_at",
                record.token_hash, record.identity_key, record.username, record.created_at,
                record.expires_at,
            )

    async def get_session(self, token_hash: bytes) -> SessionRecord | None:
        async with _errors("get_session"):
            row = await self._pool.fetchrow(
                "SELECT token_hash, identity_key, username, created_at, expires_at"
                " FROM sessions WHERE token_hash = $1", token_hash,
            )
        if row is None:
            return None
        return SessionRecord(bytes(row[0]), bytes(row[1]), str(row[2]), float(row[3]),
                             float(row[4]))

    async def delete_session(self, token_hash: bytes) -> bool:
        async with _errors("delete_session"):
            status = await self._pool.execute(
                "DELETE FROM sessions WHERE token_hash = $1", token_hash)
        return _count(status) > 0

    async def purge_sessions(self, now: float) -> int:
        async with _errors("purge_sessions"):
            return _count(await self._pool.execute(
                "DELETE FROM sessions WHERE expires_at <= $1", now))

    async def delete_account(self, identity_key: bytes) -> str | None:
        async with _errors("delete_account"):
            return await _rerun_if_rolled_back(lambda: self._delete_account(identity_key))

    async def _delete_account(self, identity_key: bytes) -> str | None:
        async with self._pool.acquire() as conn, conn.transaction(isolation="read_committed"):
            # The inbox rows first, in key order like every other remover, then delete
            # exactly those (before the messages, so the depth trigger has nothing to
            # update).  An inbox created after the lock statement is left alone: deleting it
            # too would lock it out of key order (an enqueue holding it while waiting for one
            # locked here: a deadlock), and it is what an enqueue running after the deletion
            # leaves.  Messages and dedup records go only where no inbox is (left): such an
            # enqueue keeps its message, its dedup record and its inbox together (a deleted
            # inbox cannot be created again before this commits).
            locked = [r[0] for r in await conn.fetch(
                "SELECT channel_id FROM inboxes WHERE recipient_key = $1"
                " ORDER BY channel_id FOR UPDATE", identity_key)]
            await conn.execute("DELETE FROM inboxes WHERE recipient_key = $1"
                               " AND channel_id = ANY ($2::bytea[])", identity_key, locked)
            for sql in (
                "DELETE FROM messages AS m WHERE m.recipient_key = $1 AND NOT EXISTS ("
                "SELECT 1 FROM inboxes AS i WHERE i.recipient_key = m.recipient_key"
                " AND i.channel_id = m.channel_id)",
                "DELETE FROM dedup AS d WHERE d.recipient_key = $1 AND NOT EXISTS ("
                "SELECT 1 FROM inboxes AS i WHERE i.recipient_key = d.recipient_key"
                " AND i.channel_id = d.channel_id)",
                "DELETE FROM key_packages WHERE identity_key = $1",
                "DELETE FROM hybrid_keys WHERE identity_key = $1",
                "DELETE FROM channel_members WHERE identity_key = $1",
                "DELETE FROM sessions WHERE identity_key = $1",
            ):
                await conn.execute(sql, identity_key)
            username = await conn.fetchval(
                "DELETE FROM users WHERE identity_key = $1 RETURNING username", identity_key)
        return str(username) if username is not None else None

    # -- plugin key/value and append-only logs -------------------------------------------------
    async def kv_get(self, namespace: str, key: bytes) -> bytes | None:
        async with _errors("kv_get"):
            value = await self._pool.fetchval(
                "SELECT value FROM kv WHERE namespace = $1 AND key = $2", namespace, key)
        return bytes(value) if value is not None else None

    async def kv_put(self, namespace: str, key: bytes, value: bytes) -> None:
        async with _errors("kv_put"):
            await self._pool.execute(_KV_PUT, namespace, key, value)

    async def kv_put_if_absent(self, namespace: str, key: bytes, value: bytes) -> bytes:
        # One statement: inserts, or locks the stored row and returns its value (a no-op
        # update), so a delete on another server cannot fall between a write and a read.
        async with _errors("kv_put_if_absent"):
            stored = await self._pool.fetchval(
                "INSERT INTO kv AS k (namespace, key, value) VALUES ($1, $2, $3)"
                " ON CONFLICT (namespace, key) DO UPDATE SET value = k.value RETURNING value",
                namespace, key, value,
            )
        return bytes(stored)

    async def kv_delete(self, namespace: str, key: bytes) -> bool:
        async with _errors("kv_delete"):
            status = await self._pool.execute(
                "DELETE FROM kv WHERE namespace = $1 AND key = $2", namespace, key)
        return _count(status) > 0

    async def kv_scan(
        self, namespace: str, prefix: bytes = b"", limit: int = 0
    ) -> list[tuple[bytes, bytes]]:
        end = prefix_end(prefix)
        lim = limit if limit > 0 else None
        async with _errors("kv_scan"):
            if end is None:
                rows = await self._pool.fetch(
                    "SELECT key, value FROM kv WHERE namespace = $1 AND key >= $2"
                    " ORDER BY key LIMIT $3", namespace, prefix, lim)
            else:
                rows = await self._pool.fetch(
                    "SELECT key, value FROM kv WHERE namespace = $1 AND key >= $2 AND key < $3"
                    " ORDER BY key LIMIT $4", namespace, prefix, end, lim)
        return [(bytes(r[0]), bytes(r[1])) for r in rows]

    async def log_append(
        self, log: str, entries: Sequence[bytes], *, expected_first: int | None = None,
        kv_puts: Sequence[tuple[str, bytes, bytes]] = (),
    ) -> int:
        async with _errors("log_append"), self._pool.acquire() as conn, conn.transaction():
            # The head row serialises appends to one log (across servers too).
            first = int(await conn.fetchval(
                "INSERT INTO log_heads AS h (log, size) VALUES ($1, $2)"
                " ON CONFLICT (log) DO UPDATE SET size = h.size + $2"
                " RETURNING h.size - $2", log, len(entries),
            ))
            if expected_first is not None and first != expected_first:
                raise LogMoved(log, expected_first, first)  # rolls the head update back
            if entries:
                await conn.executemany(
                    "INSERT INTO logs (log, idx, entry) VALUES ($1, $2, $3)",
                    [(log, first + i, e) for i, e in enumerate(entries)],
                )
            if kv_puts:
                # After the head row's lock: rows derived from the log commit in log order.
                await conn.executemany(_KV_PUT, list(kv_puts))
        return first

    async def log_read(self, log: str, start: int, end: int) -> list[bytes]:
        start = max(start, 0)
        if end <= start:
            return []
        async with _errors("log_read"):
            rows = await self._pool.fetch(
                "SELECT entry FROM logs WHERE log = $1 AND idx >= $2 AND idx < $3"
                " ORDER BY idx", log, start, end)
        return [bytes(r[0]) for r in rows]

    async def log_size(self, log: str) -> int:
        async with _errors("log_size"):
            size = await self._pool.fetchval("SELECT size FROM log_heads WHERE log = $1", log)
        return int(size or 0)

    async def log_read_many(self, log: str, indices: Sequence[int]) -> dict[int, bytes]:
        wanted = [i for i in dict.fromkeys(indices) if i >= 0]
        if not wanted:
            return {}
        async with _errors("log_read_many"):
            rows = await self._pool.fetch(
                "SELECT idx, entry FROM logs WHERE log = $1 AND idx = ANY ($2)", log, wanted)
        return {int(r[0]): bytes(r[1]) for r in rows}

    # -- copying (qpc store copy) -----------------------------------------------------------
    async def dump(self) -> AsyncIterator[Sequence[Record]]:
        """Every record in dump order, from one REPEATABLE READ snapshot (servers may keep
        writing meanwhile; the dump is the state at its start)."""
        async with _errors("dump"), self._pool.acquire() as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
            for sql, make in _DUMP:
                batch: list[Record] = []
                async for row in conn.cursor(sql, prefetch=DUMP_BATCH):
                    batch.append(make(row))
                    if len(batch) >= DUMP_BATCH:
                        yield batch
                        batch = []
                if batch:
                    yield batch

    async def is_empty(self) -> bool:
        async with _errors("is_empty"), self._pool.acquire() as conn:
            return await _is_empty(conn)

    async def load(self, batches: AsyncIterable[Sequence[Record]]) -> None:
        """COPY everything in one transaction (nothing is left behind if anything fails),
        then rebuild inbox depths and log sizes."""
        try:
            await self._load(batches)
        except _SourceFailed as e:  # the source's own error, unchanged; nothing was written
            raise e.error from None

    async def _load(self, batches: AsyncIterable[Sequence[Record]]) -> None:
        # A whole store in one transaction: its statements may take longer than the pool's
        # command timeout (meant for a server's calls), so each gets a bound of its own.
        t = _LOAD_STATEMENT_TIMEOUT
        async with _errors("load"), self._pool.acquire() as conn, conn.transaction():
            # Nothing else may load or write meanwhile: take every table's write lock, or
            # fail soon if a running server keeps the tables busy.
            await conn.execute("SET LOCAL lock_timeout = '30s'")
            await conn.execute(f"LOCK TABLE {', '.join(_TABLES)} IN EXCLUSIVE MODE", timeout=t)
            await conn.execute("SET LOCAL lock_timeout = 0")
            sql = " OR ".join(f"EXISTS (SELECT 1 FROM {table})" for table in _TABLES)
            if await conn.fetchval(f"SELECT {sql}", timeout=t):
                raise StorageError(f"schema {self.schema!r} is not empty: load only into a new"
                                   " store")
            async for batch in _from_source(batches):
                for rt, group in groupby(batch, key=type):
                    table, columns, row = _LOAD[rt]
                    await conn.copy_records_to_table(
                        table, records=[row(r) for r in group], columns=columns,
                        schema_name=self.schema, timeout=t,
                    )
            await conn.execute(
                "UPDATE inboxes AS i SET depth = m.n FROM (SELECT recipient_key, channel_id,"
                " count(*) AS n FROM messages GROUP BY recipient_key, channel_id) AS m"
                " WHERE i.recipient_key = m.recipient_key AND i.channel_id = m.channel_id",
                timeout=t,
            )
            await conn.execute(
                "INSERT INTO log_heads (log, size) SELECT log, max(idx) + 1 FROM logs GROUP BY log",
                timeout=t,
            )
