"""The built-in storage backend: one SQLCipher 4 database file in WAL mode.

Threads
    * one **writer thread** owns the only read-write connection.  It does group commit: it
      takes every write job queued so far (up to ``max_batch``), runs them in one
      ``BEGIN IMMEDIATE`` … ``COMMIT``, each inside its own ``SAVEPOINT`` so a job that raises
      is undone alone, and resolves the jobs' futures only after ``COMMIT`` returned.
      Consecutive enqueue calls of a batch are written as one call (``_enqueue_merged``:
      one seq reservation per inbox, ``executemany`` for the rows), with the results they
      would have had one by one;
    * a pool of ``pool_size`` **reader connections** used from a ``ThreadPoolExecutor``
      (each read borrows one connection for its duration).

No SQLite call ever runs on the event-loop thread.  The observer is always called on the
event-loop thread that opened the store ("commit" per committed transaction, "read" per read).

Encryption
    SQLCipher 4 defaults; the passphrase is applied with ``PRAGMA key = '<passphrase>'`` as
    the first statement on every connection, so an operator can open the file with any
    SQLCipher 4 client (``PRAGMA key='${QPC_DB_KEY}'``).

Schema notes
    ``inboxes.next_seq`` is the next sequence number of an inbox (never reused) and
    ``inboxes.depth`` the number of rows in ``messages`` for it: ``enqueue`` adds to it,
    the ``messages_depth_delete`` trigger subtracts on every delete (so manual deletes by an
    operator keep it right), making the depth check of every enqueue O(1).
    ``messages`` is keyed by (recipient_key, channel_id, seq) in a WITHOUT ROWID table
    (migration 2): the inbox order is the table's own order, so an enqueue writes one
    b-tree instead of a table and a separate unique index (every page a commit touches is
    encrypted and authenticated once more; see bench/README.md).
    ``inboxes.epoch`` (migration 4) is drawn at random when an inbox row is created: it tells
    an inbox that DeleteAccount removed from the one a later enqueue created again, so a
    taken message is put back only where it was taken from (``restore``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, TypeVarTuple

import sqlcipher3  # type: ignore[import-untyped]

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
    WrongKey,
    prefix_end,
)
from qpc_core.storage.emptiness import EmptyInboxes
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
from qpc_core.threads import name_os_thread

if TYPE_CHECKING:
    # sqlcipher3 mirrors the stdlib DB-API module; borrow its type information.
    from sqlite3 import Connection as Conn

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqlCipherStorage"]

log = logging.getLogger("qpc.storage")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

APPLICATION_ID: Final = 0x51504331  # "QPC1"
BUSY_TIMEOUT_MS: Final = 10_000
PURGE_CHUNK: Final = 2_000  # rows per purge transaction, so purges never stall deliveries
IN_CHUNK: Final = 500  # bound parameters per IN (...) list
SYNCHRONOUS_MODES: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA", "0", "1", "2", "3"})

# sqlcipher3 sends ``bytes`` parameters through the adaptation protocol (a failed attribute
# lookup per parameter, ~3 µs each); an identity adapter turns that into one dict hit.
sqlcipher3.register_adapter(bytes, bytes)

# -- schema -------------------------------------------------------------------------------------

_V1 = """
CREATE TABLE inboxes (
    recipient_key BLOB NOT NULL,
    channel_id    BLOB NOT NULL,
    next_seq      INTEGER NOT NULL,
    depth         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (recipient_key, channel_id)
) WITHOUT ROWID;

CREATE TABLE messages (
    id            INTEGER PRIMARY KEY,
    recipient_key BLOB NOT NULL,
    channel_id    BLOB NOT NULL,
    seq           INTEGER NOT NULL,
    expires_at    REAL,
    created_at    REAL NOT NULL,
    payload       BLOB NOT NULL
);
CREATE UNIQUE INDEX messages_inbox_seq ON messages (recipient_key, channel_id, seq);
CREATE INDEX messages_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX messages_inbox_expiry ON messages (recipient_key, channel_id, expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TRIGGER messages_depth_delete AFTER DELETE ON messages BEGIN
    UPDATE inboxes SET depth = depth - 1
    WHERE recipient_key = OLD.recipient_key AND channel_id = OLD.channel_id;
END;

CREATE TABLE dedup (
    recipient_key BLOB NOT NULL,
    channel_id    BLOB NOT NULL,
    message_id    BLOB NOT NULL,
    seq           INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    PRIMARY KEY (recipient_key, channel_id, message_id)
) WITHOUT ROWID;
CREATE INDEX dedup_created ON dedup (created_at);

CREATE TABLE key_packages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_key BLOB NOT NULL,
    package      BLOB NOT NULL,
    fingerprint  BLOB NOT NULL,
    created_at   REAL NOT NULL
);
CREATE INDEX key_packages_identity ON key_packages (identity_key, id);

CREATE TABLE hybrid_keys (
    identity_key BLOB PRIMARY KEY,
    public_key   BLOB NOT NULL,
    updated_at   REAL NOT NULL
);

CREATE TABLE users (
    username     TEXT PRIMARY KEY,
    identity_key BLOB NOT NULL UNIQUE,
    created_at   REAL NOT NULL
);

CREATE TABLE channels (
    channel_id BLOB PRIMARY KEY,
    created_by BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE channel_members (
    channel_id   BLOB NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    identity_key BLOB NOT NULL,
    PRIMARY KEY (channel_id, identity_key)
) WITHOUT ROWID;
CREATE INDEX channel_members_identity ON channel_members (identity_key);

CREATE TABLE sessions (
    token_hash   BLOB PRIMARY KEY,
    identity_key BLOB NOT NULL,
    username     TEXT NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_identity ON sessions (identity_key);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE kv (
    namespace TEXT NOT NULL,
    key       BLOB NOT NULL,
    value     BLOB NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;

CREATE TABLE logs (
    log   TEXT NOT NULL,
    idx   INTEGER NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (log, idx)
) WITHOUT ROWID;
"""

# Messages in inbox order, without a rowid: one b-tree per table write instead of two.
_V2 = """
CREATE TABLE messages_v2 (
    recipient_key BLOB NOT NULL,
    channel_id    BLOB NOT NULL,
    seq           INTEGER NOT NULL,
    expires_at    REAL,
    created_at    REAL NOT NULL,
    payload       BLOB NOT NULL,
    PRIMARY KEY (recipient_key, channel_id, seq)
) WITHOUT ROWID;
INSERT INTO messages_v2 (recipient_key, channel_id, seq, expires_at, created_at, payload)
    SELECT recipient_key, channel_id, seq, expires_at, created_at, payload FROM messages;
DROP TRIGGER messages_depth_delete;
DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
CREATE INDEX messages_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX messages_inbox_expiry ON messages (recipient_key, channel_id, expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TRIGGER messages_depth_delete AFTER DELETE ON messages BEGIN
    UPDATE inboxes SET depth = depth - 1
    WHERE recipient_key = OLD.recipient_key AND channel_id = OLD.channel_id;
END;
"""

# Repair what an older restore could leave behind (a handed-over message put back after
# DeleteAccount removed its inbox): message rows without an inbox, and inboxes whose next seq
# or depth does not cover the rows stored under them.  Without this, every enqueue to such an
# inbox hit the row's primary key.
_V3 = """
DELETE FROM messages WHERE NOT EXISTS (
    SELECT 1 FROM inboxes AS i
    WHERE i.recipient_key = messages.recipient_key AND i.channel_id = messages.channel_id);
UPDATE inboxes SET
    next_seq = max(next_seq, 1 + coalesce((SELECT max(m.seq) FROM messages AS m
        WHERE m.recipient_key = inboxes.recipient_key AND m.channel_id = inboxes.channel_id),
        0)),
    depth = (SELECT count(*) FROM messages AS m
        WHERE m.recipient_key = inboxes.recipient_key AND m.channel_id = inboxes.channel_id);
"""

# Inbox incarnations: ``epoch`` is drawn when an inbox row is created (random 64-bit), so an
# inbox that DeleteAccount removed and a later enqueue created again is told apart from the
# old one: a message taken from the old one is never put back into the new one, whose seqs
# restarted (it could land on a seq the new inbox already delivered).  SQLite cannot add a
# column with a non-constant default, so the table is rebuilt (the trigger that names it
# first dropped, then created again).
_V4 = """
CREATE TABLE inboxes_v4 (
    recipient_key BLOB NOT NULL,
    channel_id    BLOB NOT NULL,
    next_seq      INTEGER NOT NULL,
    depth         INTEGER NOT NULL DEFAULT 0,
    epoch         INTEGER NOT NULL DEFAULT (random()),
    PRIMARY KEY (recipient_key, channel_id)
) WITHOUT ROWID;
INSERT INTO inboxes_v4 (recipient_key, channel_id, next_seq, depth)
    SELECT recipient_key, channel_id, next_seq, depth FROM inboxes;
DROP TRIGGER messages_depth_delete;
DROP TABLE inboxes;
ALTER TABLE inboxes_v4 RENAME TO inboxes;
CREATE TRIGGER messages_depth_delete AFTER DELETE ON messages BEGIN
    UPDATE inboxes SET depth = depth - 1
    WHERE recipient_key = OLD.recipient_key AND channel_id = OLD.channel_id;
END;
"""

#: Numbered migrations, applied in order, each in its own transaction.  Never edit a shipped
#: entry: append a new one.  ``PRAGMA user_version`` records the last one applied.
MIGRATIONS: Final[list[tuple[int, str]]] = [
    (1, _V1),
    (2, _V2),
    (3, _V3),
    (4, _V4),
]
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

# -- SQL ----------------------------------------------------------------------------------------

_DEDUP_FIND = (
    "SELECT seq FROM dedup WHERE recipient_key = ? AND channel_id = ? AND message_id = ?"
    " AND created_at >= ?"
)
# Reserve ?3 sequence numbers: returns (first reserved seq, depth before this enqueue).
_INBOX_RESERVE = (
    "INSERT INTO inboxes (recipient_key, channel_id, next_seq, depth) VALUES (?1, ?2, 1 + ?3, ?3)"
    " ON CONFLICT (recipient_key, channel_id) DO UPDATE"
    " SET next_seq = next_seq + ?3, depth = depth + ?3"
    " RETURNING next_seq - ?3, depth - ?3"
)
_INBOX_UNRESERVE = (
    "UPDATE inboxes SET next_seq = next_seq - ?3, depth = depth - ?4"
    " WHERE recipient_key = ?1 AND channel_id = ?2"
)
# The same for an inbox a reader waits on: when it is empty, the ?3 new messages are handed
# over instead of stored, so its depth stays 0.  Returns (first seq, depth after, epoch).
_INBOX_RESERVE_TAKE = (
    "INSERT INTO inboxes (recipient_key, channel_id, next_seq, depth) VALUES (?1, ?2, 1 + ?3, 0)"
    " ON CONFLICT (recipient_key, channel_id) DO UPDATE"
    " SET next_seq = next_seq + ?3, depth = CASE WHEN depth = 0 THEN 0 ELSE depth + ?3 END"
    " RETURNING next_seq - ?3, depth, epoch"
)
_INBOX_RESTORE_DEPTH = (
    "UPDATE inboxes SET depth = depth + 1 WHERE recipient_key = ? AND channel_id = ?"
)
_COUNT_EXPIRED = (
    "SELECT count(*) FROM messages WHERE recipient_key = ? AND channel_id = ?"
    " AND expires_at <= ?"
)
_MESSAGE_INSERT = (
    "INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at, payload)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
# A taken message put back (restore), only into the incarnation of its inbox that took it
# (?7) if that still exists and gave out that seq, and not over a stored message.
_MESSAGE_RESTORE = (
    "INSERT INTO messages (recipient_key, channel_id, seq, expires_at, created_at, payload)"
    " SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM inboxes"
    " WHERE recipient_key = ?1 AND channel_id = ?2 AND next_seq > ?3 AND epoch = ?7)"
    " ON CONFLICT (recipient_key, channel_id, seq) DO NOTHING"
)
# Claim a message id for an inbox: inserts, or replaces a record older than the window
# (?6); changes() == 0 means a record inside the window exists, i.e. a duplicate.
_DEDUP_CLAIM = (
    "INSERT INTO dedup (recipient_key, channel_id, message_id, seq, created_at)"
    " VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (recipient_key, channel_id, message_id) DO UPDATE"
    " SET seq = excluded.seq, created_at = excluded.created_at WHERE dedup.created_at < ?6"
)
_DEDUP_DELETE = (
    "DELETE FROM dedup WHERE recipient_key = ? AND channel_id = ? AND message_id = ?"
)
# Only the record of the incarnation (?5) that took the message: a new inbox of the same
# name may have given the same id the same seq.
_DEDUP_FORGET = (
    "DELETE FROM dedup WHERE recipient_key = ?1 AND channel_id = ?2 AND message_id = ?3"
    " AND seq = ?4 AND EXISTS (SELECT 1 FROM inboxes"
    " WHERE recipient_key = ?1 AND channel_id = ?2 AND epoch = ?5)"
)
_DEDUP_UPSERT = (
    "INSERT INTO dedup (recipient_key, channel_id, message_id, seq, created_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (recipient_key, channel_id, message_id) DO UPDATE"
    " SET seq = excluded.seq, created_at = excluded.created_at"
)
# No ``LIMIT ?``: SQLite 3.51 (sqlcipher3) re-prepares a statement on every execution whose
# LIMIT is a bound parameter (~15 us each, more than the lookup itself); the caller stops
# stepping the cursor after ``limit`` rows instead, which reads no further.
_SELECT_LIVE = (
    "SELECT seq, payload FROM messages WHERE recipient_key = ? AND channel_id = ?"
    " AND (expires_at IS NULL OR expires_at > ?) ORDER BY seq"
)
_DELETE_UP_TO = "DELETE FROM messages WHERE recipient_key = ? AND channel_id = ? AND seq <= ?"
_INBOX_DEPTH = "SELECT depth FROM inboxes WHERE recipient_key = ? AND channel_id = ?"


# -- connections ---------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _open_keyed(path: Path, key: str, **connect_kw: Any) -> Conn:
    """A connection to ``path`` keyed with ``key`` and checked (:class:`WrongKey` when the
    key does not decrypt it), with no other settings (blocking)."""
    try:
        conn: Conn = sqlcipher3.connect(
            str(path), isolation_level=None, check_same_thread=False, **connect_kw
        )
    except sqlcipher3.Error as e:
        raise StorageError(f"cannot open {path}: {e}") from e
    try:
        conn.execute(f"PRAGMA key = {_quote(key)}")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except sqlcipher3.DatabaseError as e:
        conn.close()
        raise WrongKey(f"cannot open {path}: wrong database key or not a qpc database") from e
    except sqlcipher3.Error as e:
        conn.close()
        raise StorageError(f"cannot open {path}: {e}") from e
    return conn


def _connect(
    path: Path, key: str, *, synchronous: str, wal_autocheckpoint: int, reader: bool
) -> Conn:
    """Open, key and configure one connection (blocking: never call on the event loop)."""
    conn = _open_keyed(path, key, cached_statements=256)
    try:
        conn.execute("PRAGMA journal_mode = WAL").fetchall()
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_autocheckpoint)}").fetchall()
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}").fetchall()
        conn.execute("PRAGMA temp_store = MEMORY")
        if reader:
            conn.execute("PRAGMA cache_size = -8000")
            conn.execute("PRAGMA query_only = ON")
        else:
            conn.execute("PRAGMA cache_size = -16000")
            conn.execute("PRAGMA journal_size_limit = 67108864").fetchall()
    except StorageError:
        conn.close()
        raise
    except sqlcipher3.Error as e:
        conn.close()
        raise StorageError(f"cannot open {path}: {e}") from e
    return conn


def _split_sql(script: str) -> list[str]:
    """Split a script into complete statements (trigger bodies keep their inner ``;``)."""
    statements: list[str] = []
    buf = ""
    for part in script.split(";"):
        buf += part + ";"
        if sqlcipher3.complete_statement(buf):
            stmt = buf.strip()
            if stmt.strip(";").strip():
                statements.append(stmt)
            buf = ""
    if buf.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:60]!r}")
    return statements


def _migrate(conn: Conn, path: Path) -> None:
    version: int = conn.execute("PRAGMA user_version").fetchall()[0][0]
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"cannot open {path}: database schema version {version} is newer than this qpc "
            f"supports (schema version {SCHEMA_VERSION}); upgrade qpc"
        )
    tables: int = conn.execute("SELECT count(*) FROM sqlite_master").fetchall()[0][0]
    app_id: int = conn.execute("PRAGMA application_id").fetchall()[0][0]
    if tables and app_id != APPLICATION_ID:
        raise StorageError(f"cannot open {path}: not a qpc database (application_id {app_id})")
    for target, script in MIGRATIONS:
        if target <= version:
            continue
        statements = _split_sql(script)
        conn.execute("BEGIN IMMEDIATE")
        try:
            current: int = conn.execute("PRAGMA user_version").fetchall()[0][0]
            if current < target:  # another process may have migrated meanwhile
                for stmt in statements:
                    conn.execute(stmt)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {int(target)}")
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlcipher3.Error):
                raise StorageError(f"{path}: schema migration {target} failed: {e}") from e
            raise
        version = target


def _storage_error(e: BaseException) -> BaseException:
    """Map a job's exception to what its caller sees (SQLite errors → StorageError)."""
    if isinstance(e, sqlcipher3.Error):
        err = StorageError(f"database error: {e}")
        err.__cause__ = e
        return err
    return e


# -- jobs (run on a worker thread with a connection) ---------------------------------------------


def _enqueue_one(
    conn: Conn, m: NewMessage, max_depth: int, dedup_since: float, take_it: bool
) -> EnqueueOutcome:
    """One message (Enqueue, the hot path): two or three statements instead of four.

    The seq is reserved first and the dedup record claimed with one conditional upsert
    (inserted, or a record older than the window replaced: ``changes() == 1``); a fresh
    record means a duplicate, and the reservation is undone.  Same results as the general
    path; nothing is left behind when it raises QueueFull."""
    now = time.time()
    execute = conn.execute
    recipient, channel, mid = m.recipient_key, m.channel_id, m.message_id
    epoch = 0
    if take_it:
        first, after, epoch = execute(_INBOX_RESERVE_TAKE, (recipient, channel, 1)).fetchall()[0]
        taken = after == 0
        depth = 0 if taken else after - 1
    else:
        first, depth = execute(_INBOX_RESERVE, (recipient, channel, 1)).fetchall()[0]
        taken = False
    added = 0 if taken else 1
    if mid and execute(_DEDUP_CLAIM, (recipient, channel, mid, first, now, dedup_since)
                       ).rowcount == 0:
        execute(_INBOX_UNRESERVE, (recipient, channel, 1, added))
        row = execute(_DEDUP_FIND, (recipient, channel, mid, dedup_since)).fetchone()
        return EnqueueOutcome(int(row[0]), True)
    if not taken and depth + 1 > max_depth:
        expired: int = execute(_COUNT_EXPIRED, (recipient, channel, now)).fetchone()[0]
        live = depth - expired
        if live + 1 > max_depth:
            execute(_INBOX_UNRESERVE, (recipient, channel, 1, 1))
            if mid:
                execute(_DEDUP_DELETE, (recipient, channel, mid))
            raise QueueFull(recipient, channel, live)
    if not taken:
        execute(_MESSAGE_INSERT, (recipient, channel, first, m.expires_at, now, m.payload))
    return EnqueueOutcome(first, False, True, epoch) if taken else EnqueueOutcome(first, False)


class _NotFresh(Exception):
    """A duplicate or a full inbox: ``_enqueue_fresh`` does not apply."""


def _enqueue_fresh(
    conn: Conn, msgs: Sequence[NewMessage], max_depth: int, dedup_since: float
) -> list[EnqueueOutcome] | None:
    """The common case of a many-message write, optimistically: no message is a duplicate and
    every inbox has room.  One seq reservation per inbox, then the message ids are claimed
    and the rows inserted with one ``executemany`` each (no lookup per message).  When the
    claims changed fewer rows than there are ids (a duplicate, within the call or stored) or
    an inbox would overflow, everything is rolled back to the savepoint and None sends the
    caller down the general path, which gives those cases their answers."""
    now = time.time()
    execute = conn.execute
    by_inbox: dict[tuple[bytes, bytes], list[int]] = {}
    for i, m in enumerate(msgs):
        idxs = by_inbox.get((m.recipient_key, m.channel_id))
        if idxs is None:
            by_inbox[(m.recipient_key, m.channel_id)] = [i]
        else:
            idxs.append(i)
    seqs = [0] * len(msgs)
    execute("SAVEPOINT fresh")
    try:
        for (recipient, channel), idxs in by_inbox.items():
            k = len(idxs)
            first, depth = execute(_INBOX_RESERVE, (recipient, channel, k)).fetchall()[0]
            if depth + k > max_depth:
                raise _NotFresh
            for off, i in enumerate(idxs):
                seqs[i] = first + off
        claims = [
            (m.recipient_key, m.channel_id, m.message_id, seq, now, dedup_since)
            for m, seq in zip(msgs, seqs, strict=True)
            if m.message_id
        ]
        if claims and conn.executemany(_DEDUP_CLAIM, claims).rowcount != len(claims):
            raise _NotFresh
    except _NotFresh:
        execute("ROLLBACK TO fresh")
        execute("RELEASE fresh")
        return None
    conn.executemany(_MESSAGE_INSERT, [
        (m.recipient_key, m.channel_id, seq, m.expires_at, now, m.payload)
        for m, seq in zip(msgs, seqs, strict=True)
    ])
    execute("RELEASE fresh")
    return [EnqueueOutcome(seq, False) for seq in seqs]


def _enqueue_tx(
    conn: Conn, msgs: Sequence[NewMessage], max_depth: int, dedup_since: float,
    take: Collection[tuple[bytes, bytes]] = (),
) -> list[EnqueueOutcome]:
    if len(msgs) == 1:
        m = msgs[0]
        take_it = bool(take) and (m.recipient_key, m.channel_id) in take
        return [_enqueue_one(conn, m, max_depth, dedup_since, take_it)]
    if not take:
        fresh_outcomes = _enqueue_fresh(conn, msgs, max_depth, dedup_since)
        if fresh_outcomes is not None:
            return fresh_outcomes
    now = time.time()
    execute = conn.execute
    n = len(msgs)
    seqs = [0] * n
    dup = [False] * n
    first_in_call: dict[tuple[bytes, bytes, bytes], int] = {}
    repeats: list[tuple[int, int]] = []  # (index, index of the first with the same id)
    fresh: dict[tuple[bytes, bytes], list[int]] = {}  # inbox → indexes to store
    for i, m in enumerate(msgs):
        mid = m.message_id
        if mid:
            ident = (m.recipient_key, m.channel_id, mid)
            j = first_in_call.get(ident)
            if j is not None:
                repeats.append((i, j))
                continue
            first_in_call[ident] = i
            row = execute(_DEDUP_FIND, (*ident, dedup_since)).fetchone()
            if row is not None:
                seqs[i] = row[0]
                dup[i] = True
                continue
        inbox = (m.recipient_key, m.channel_id)
        idxs = fresh.get(inbox)
        if idxs is None:
            fresh[inbox] = [i]
        else:
            idxs.append(i)

    taken: dict[tuple[bytes, bytes], int] = {}  # inbox -> its epoch
    reserved: list[tuple[bytes, bytes, int, int]] = []  # (recipient, channel, seqs, depth added)
    for inbox, idxs in fresh.items():
        recipient, channel = inbox
        k = len(idxs)
        if inbox in take:
            first, after, epoch = execute(
                _INBOX_RESERVE_TAKE, (recipient, channel, k)).fetchall()[0]
            if after == 0:
                # A reader is waiting on this empty inbox: the messages are handed over
                # instead of stored (seq and dedup are kept; the queue stays empty).
                taken[inbox] = epoch
                reserved.append((recipient, channel, k, 0))
                for off, i in enumerate(idxs):
                    seqs[i] = first + off
                continue
            depth = after - k
        else:
            first, depth = execute(_INBOX_RESERVE, (recipient, channel, k)).fetchall()[0]
        reserved.append((recipient, channel, k, k))
        if depth + k > max_depth:
            # Slow path: expired but not yet collected messages do not count.
            expired: int = execute(_COUNT_EXPIRED, (recipient, channel, now)).fetchone()[0]
            live = depth - expired
            if live + k > max_depth:
                # Undo this call's reservations (nothing else was written yet), so the job
                # leaves no trace without needing a savepoint of its own.
                for r, c, n_seq, n_depth in reserved:
                    execute(_INBOX_UNRESERVE, (r, c, n_seq, n_depth))
                raise QueueFull(recipient, channel, live)
        for off, i in enumerate(idxs):
            seqs[i] = first + off

    if fresh:
        stored = [(seqs[i], msgs[i]) for idxs in fresh.values() for i in idxs]
        rows = [
            (m.recipient_key, m.channel_id, seq, m.expires_at, now, m.payload)
            for seq, m in stored
            if (m.recipient_key, m.channel_id) not in taken
        ]
        if len(rows) == 1:
            execute(_MESSAGE_INSERT, rows[0])
        elif rows:
            conn.executemany(_MESSAGE_INSERT, rows)
        dedup_rows = [
            (m.recipient_key, m.channel_id, m.message_id, seq, now)
            for seq, m in stored
            if m.message_id
        ]
        if len(dedup_rows) == 1:
            execute(_DEDUP_UPSERT, dedup_rows[0])
        elif dedup_rows:
            conn.executemany(_DEDUP_UPSERT, dedup_rows)

    for i, j in repeats:
        seqs[i] = seqs[j]
        dup[i] = True
    if not taken:
        return [EnqueueOutcome(s, d) for s, d in zip(seqs, dup, strict=True)]
    outcomes = []
    for s_, d, m in zip(seqs, dup, msgs, strict=True):
        epoch = None if d else taken.get((m.recipient_key, m.channel_id))
        outcomes.append(EnqueueOutcome(s_, d) if epoch is None
                        else EnqueueOutcome(s_, False, True, epoch))
    return outcomes


def _restore_tx(conn: Conn, items: Sequence[tuple[NewMessage, EnqueueOutcome]]) -> None:
    """Put taken messages back; one whose inbox is gone (DeleteAccount meanwhile), is another
    incarnation (created again since), has not given out its seq or stores it already is not
    stored: a message row without its inbox would make every later enqueue to it fail, and
    one in a new incarnation could land on a seq that inbox already delivered."""
    now = time.time()
    dropped = 0
    for m, out in items:
        if conn.execute(
            _MESSAGE_RESTORE, (m.recipient_key, m.channel_id, out.seq, m.expires_at, now,
                               m.payload, out.inbox_epoch)
        ).rowcount == 1:
            conn.execute(_INBOX_RESTORE_DEPTH, (m.recipient_key, m.channel_id))
        else:
            dropped += 1
    if dropped:
        log.info("%d handed-over message(s) not put back: their inbox was deleted"
                 " (DeleteAccount) meanwhile", dropped)


def _forget_taken_tx(conn: Conn, items: Sequence[tuple[NewMessage, EnqueueOutcome]]) -> None:
    conn.executemany(
        _DEDUP_FORGET,
        [(m.recipient_key, m.channel_id, m.message_id, out.seq, out.inbox_epoch)
         for m, out in items if m.message_id],
    )


def _select_live(
    conn: Conn, recipient: bytes, channel: bytes, limit: int, now: float, max_bytes: int,
    per_message: int = 0,
) -> list[StoredMessage]:
    cur = conn.execute(_SELECT_LIVE, (recipient, channel, now))
    if limit <= 0 and max_bytes <= 0:
        return [StoredMessage(s, p) for s, p in cur]
    per_message = max(0, per_message)
    out: list[StoredMessage] = []
    total = 0
    for s, p in cur:
        total += len(p) + per_message
        if max_bytes > 0 and total > max_bytes and out:
            break
        out.append(StoredMessage(s, p))
        if len(out) == limit:
            break
    cur.close()
    return out


def _fetch_tx(
    conn: Conn, recipient: bytes, channel: bytes, limit: int, now: float, max_bytes: int,
    per_message: int = 0,
) -> tuple[list[StoredMessage], bool]:
    """Remove and return the oldest live messages; the flag says whether that drained every
    live message of the inbox (what is left, if anything, has expired)."""
    per_message = max(0, per_message)
    cur = conn.execute(_SELECT_LIVE, (recipient, channel, now))
    out: list[StoredMessage] = []
    total = 0
    drained = True
    for s, p in cur:
        total += len(p) + per_message
        if (max_bytes > 0 and total > max_bytes and out) or (limit > 0 and len(out) == limit):
            drained = False  # one more live message than this fetch takes
            break
        out.append(StoredMessage(s, p))
    cur.close()
    if out:
        # Everything up to the last returned seq goes: the returned messages plus expired
        # ones between them (nothing unexpired below the last returned seq is left out).
        conn.execute(_DELETE_UP_TO, (recipient, channel, out[-1].seq))
    return out, drained


def _has_messages(conn: Conn, recipient: bytes, channel: bytes) -> bool:
    row = conn.execute(_INBOX_DEPTH, (recipient, channel)).fetchone()
    return row is not None and row[0] > 0


def _ack_tx(conn: Conn, recipient: bytes, channel: bytes, seq_up_to: int) -> int:
    return conn.execute(_DELETE_UP_TO, (recipient, channel, seq_up_to)).rowcount


def _queue_depth(conn: Conn, recipient: bytes, channel: bytes) -> int:
    row = conn.execute(_INBOX_DEPTH, (recipient, channel)).fetchone()
    return 0 if row is None else int(row[0])


def _total_depth(conn: Conn) -> int:
    return int(conn.execute("SELECT coalesce(sum(depth), 0) FROM inboxes").fetchone()[0])


def _delete_chunk(conn: Conn, sql: str, bound: float) -> int:
    return conn.execute(sql, (bound, PURGE_CHUNK)).rowcount


_PURGE_MESSAGES = (
    "DELETE FROM messages WHERE (recipient_key, channel_id, seq) IN"
    " (SELECT recipient_key, channel_id, seq FROM messages WHERE expires_at <= ? LIMIT ?)"
)
_PURGE_DEDUP = (
    "DELETE FROM dedup WHERE (recipient_key, channel_id, message_id) IN"
    " (SELECT recipient_key, channel_id, message_id FROM dedup WHERE created_at < ? LIMIT ?)"
)
_PURGE_SESSIONS = (
    "DELETE FROM sessions WHERE token_hash IN"
    " (SELECT token_hash FROM sessions WHERE expires_at <= ? LIMIT ?)"
)


def _add_key_package(conn: Conn, identity: bytes, package: bytes, fingerprint: bytes) -> None:
    conn.execute(
        "INSERT INTO key_packages (identity_key, package, fingerprint, created_at)"
        " VALUES (?, ?, ?, ?)",
        (identity, package, fingerprint, time.time()),
    )


def _pop_key_package(conn: Conn, identity: bytes) -> bytes | None:
    rows = conn.execute(
        "DELETE FROM key_packages WHERE id ="
        " (SELECT id FROM key_packages WHERE identity_key = ? ORDER BY id LIMIT 1)"
        " RETURNING package",
        (identity,),
    ).fetchall()
    return bytes(rows[0][0]) if rows else None


def _count_key_packages(conn: Conn, identity: bytes) -> int:
    return int(
        conn.execute(
            "SELECT count(*) FROM key_packages WHERE identity_key = ?", (identity,)
        ).fetchone()[0]
    )


def _set_hybrid_key(conn: Conn, identity: bytes, public_key: bytes) -> None:
    conn.execute(
        "INSERT INTO hybrid_keys (identity_key, public_key, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (identity_key) DO UPDATE"
        " SET public_key = excluded.public_key, updated_at = excluded.updated_at",
        (identity, public_key, time.time()),
    )


def _get_hybrid_keys(conn: Conn, identities: list[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for start in range(0, len(identities), IN_CHUNK):
        chunk = identities[start : start + IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        for ident, pub in conn.execute(
            f"SELECT identity_key, public_key FROM hybrid_keys WHERE identity_key IN ({marks})",
            chunk,
        ):
            out[ident] = pub
    return out


def _create_user(conn: Conn, username: str, identity: bytes, now: float) -> None:
    try:
        conn.execute(
            "INSERT INTO users (username, identity_key, created_at) VALUES (?, ?, ?)",
            (username, identity, now),
        )
    except sqlcipher3.IntegrityError as e:
        if conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
            raise AlreadyExists(f"username {username!r} is already registered") from e
        raise AlreadyExists("this identity key is already registered") from e


_USER_COLUMNS = "SELECT username, identity_key, created_at FROM users"


def _get_user(conn: Conn, where: str, value: object) -> UserRecord | None:
    row = conn.execute(f"{_USER_COLUMNS} WHERE {where} = ?", (value,)).fetchone()
    return None if row is None else UserRecord(row[0], row[1], row[2])


def _create_channel(
    conn: Conn, channel: bytes, members: list[bytes], created_by: bytes, now: float
) -> bool:
    cur = conn.execute(
        "INSERT INTO channels (channel_id, created_by, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (channel_id) DO NOTHING",
        (channel, created_by, now),
    )
    # Members missing from an existing channel (removed by their DeleteAccount) are added
    # back: the same member set re-created is the same channel again.
    conn.executemany(
        "INSERT OR IGNORE INTO channel_members (channel_id, identity_key) VALUES (?, ?)",
        [(channel, m) for m in members],
    )
    return bool(cur.rowcount)


def _channel_members(conn: Conn, channel: bytes) -> list[bytes] | None:
    rows = conn.execute(
        "SELECT m.identity_key FROM channels AS c"
        " LEFT JOIN channel_members AS m ON m.channel_id = c.channel_id"
        " WHERE c.channel_id = ? ORDER BY m.identity_key",
        (channel,),
    ).fetchall()
    if not rows:
        return None
    return [r[0] for r in rows if r[0] is not None]


def _put_session(conn: Conn, r: SessionRecord) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO sessions"
        " (token_hash, identity_key, username, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
        (r.token_hash, r.identity_key, r.username, r.created_at, r.expires_at),
    )


def _get_session(conn: Conn, token_hash: bytes) -> SessionRecord | None:
    row = conn.execute(
        "SELECT token_hash, identity_key, username, created_at, expires_at FROM sessions"
        " WHERE token_hash = ?",
        (token_hash,),
    ).fetchone()
    return None if row is None else SessionRecord(row[0], row[1], row[2], row[3], row[4])


def _delete_session(conn: Conn, token_hash: bytes) -> bool:
    return conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,)).rowcount > 0


def _delete_account(conn: Conn, identity: bytes) -> str | None:
    p = (identity,)
    execute = conn.execute
    # Inboxes first, so the depth trigger has nothing to update for the deleted messages.
    execute("DELETE FROM inboxes WHERE recipient_key = ?", p)
    execute("DELETE FROM messages WHERE recipient_key = ?", p)
    execute("DELETE FROM dedup WHERE recipient_key = ?", p)
    execute("DELETE FROM key_packages WHERE identity_key = ?", p)
    execute("DELETE FROM hybrid_keys WHERE identity_key = ?", p)
    execute("DELETE FROM channel_members WHERE identity_key = ?", p)
    execute("DELETE FROM sessions WHERE identity_key = ?", p)
    rows = execute("DELETE FROM users WHERE identity_key = ? RETURNING username", p).fetchall()
    return str(rows[0][0]) if rows else None


def _kv_get(conn: Conn, namespace: str, key: bytes) -> bytes | None:
    row = conn.execute(
        "SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key)
    ).fetchone()
    return None if row is None else bytes(row[0])


_KV_PUT = (
    "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?)"
    " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value"
)


def _kv_put(conn: Conn, namespace: str, key: bytes, value: bytes) -> None:
    conn.execute(_KV_PUT, (namespace, key, value))


def _kv_put_if_absent(conn: Conn, namespace: str, key: bytes, value: bytes) -> bytes:
    conn.execute(
        "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?)"
        " ON CONFLICT (namespace, key) DO NOTHING",
        (namespace, key, value),
    )
    stored = _kv_get(conn, namespace, key)
    assert stored is not None
    return stored


def _kv_delete(conn: Conn, namespace: str, key: bytes) -> bool:
    return (
        conn.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key)).rowcount
        > 0
    )


def _kv_scan(conn: Conn, namespace: str, prefix: bytes, limit: int) -> list[tuple[bytes, bytes]]:
    lim = limit if limit > 0 else -1
    end = prefix_end(prefix)
    if end is None:
        cur = conn.execute(
            "SELECT key, value FROM kv WHERE namespace = ? AND key >= ? ORDER BY key LIMIT ?",
            (namespace, prefix, lim),
        )
    else:
        cur = conn.execute(
            "SELECT key, value FROM kv WHERE namespace = ? AND key >= ? AND key < ?"
            " ORDER BY key LIMIT ?",
            (namespace, prefix, end, lim),
        )
    return [(k, v) for k, v in cur]


def _log_size(conn: Conn, log_name: str) -> int:
    row = conn.execute(
        "SELECT idx FROM logs WHERE log = ? ORDER BY idx DESC LIMIT 1", (log_name,)
    ).fetchone()
    return 0 if row is None else int(row[0]) + 1


def _log_append(
    conn: Conn, log_name: str, entries: list[bytes], expected_first: int | None,
    kv_puts: list[tuple[str, bytes, bytes]] | None = None,
) -> int:
    first = _log_size(conn, log_name)
    if expected_first is not None and first != expected_first:
        raise LogMoved(log_name, expected_first, first)
    if entries:
        conn.executemany(
            "INSERT INTO logs (log, idx, entry) VALUES (?, ?, ?)",
            [(log_name, first + i, e) for i, e in enumerate(entries)],
        )
    if kv_puts:
        conn.executemany(_KV_PUT, kv_puts)
    return first


def _log_read(conn: Conn, log_name: str, start: int, end: int) -> list[bytes]:
    start = max(start, 0)
    if end <= start:
        return []
    return [
        r[0]
        for r in conn.execute(
            "SELECT entry FROM logs WHERE log = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (log_name, start, end),
        )
    ]


def _log_read_many(conn: Conn, log_name: str, indices: list[int]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for i in range(0, len(indices), IN_CHUNK):
        chunk = indices[i : i + IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        for idx, entry in conn.execute(
            f"SELECT idx, entry FROM logs WHERE log = ? AND idx IN ({marks})",
            (log_name, *chunk),
        ):
            out[int(idx)] = entry
    return out


# -- copying (qpc store copy) -------------------------------------------------------------------
# (table, key columns in dump order, other columns, record from a row of keys + others)
_DUMP_SPECS: Final[list[tuple[str, tuple[str, ...], tuple[str, ...], Callable[[Any], Record]]]] = [
    ("users", ("username",), ("identity_key", "created_at"),
     lambda r: UserRecord(r[0], r[1], r[2])),
    ("sessions", ("token_hash",), ("identity_key", "username", "created_at", "expires_at"),
     lambda r: SessionRecord(r[0], r[1], r[2], r[3], r[4])),
    ("hybrid_keys", ("identity_key",), ("public_key",), lambda r: HybridKeyRecord(r[0], r[1])),
    ("key_packages", ("identity_key", "id"), ("package", "fingerprint"),
     lambda r: KeyPackageRecord(r[0], r[2], r[3])),
    ("channels", ("channel_id",), ("created_by", "created_at"),
     lambda r: ChannelRecord(r[0], r[1], r[2])),
    ("channel_members", ("channel_id", "identity_key"), (),
     lambda r: ChannelMemberRecord(r[0], r[1])),
    ("inboxes", ("recipient_key", "channel_id"), ("next_seq",),
     lambda r: InboxRecord(r[0], r[1], r[2])),
    ("messages", ("recipient_key", "channel_id", "seq"), ("payload", "created_at", "expires_at"),
     lambda r: MessageRecord(r[0], r[1], r[2], r[3], r[4], r[5])),
    ("dedup", ("recipient_key", "channel_id", "message_id"), ("seq", "created_at"),
     lambda r: DedupRecord(r[0], r[1], r[2], r[3], r[4])),
    ("kv", ("namespace", "key"), ("value",), lambda r: KvRecord(r[0], r[1], r[2])),
    ("logs", ("log", "idx"), ("entry",), lambda r: LogRecord(r[0], r[1], r[2])),
]

# Record type -> (INSERT statement, row from record); ``now`` fills columns only SQLCipher has.
_LOAD_SQL: Final[dict[type, tuple[str, Callable[[Any, float], tuple[Any, ...]]]]] = {
    UserRecord: ("INSERT INTO users (username, identity_key, created_at) VALUES (?, ?, ?)",
                 lambda r, _now: (r.username, r.identity_key, r.created_at)),
    SessionRecord: ("INSERT INTO sessions (token_hash, identity_key, username, created_at,"
                    " expires_at) VALUES (?, ?, ?, ?, ?)",
                    lambda r, _now: (r.token_hash, r.identity_key, r.username, r.created_at,
                                     r.expires_at)),
    HybridKeyRecord: ("INSERT INTO hybrid_keys (identity_key, public_key, updated_at)"
                      " VALUES (?, ?, ?)", lambda r, now: (r.identity_key, r.public_key, now)),
    KeyPackageRecord: ("INSERT INTO key_packages (identity_key, package, fingerprint,"
                       " created_at) VALUES (?, ?, ?, ?)",
                       lambda r, now: (r.identity_key, r.package, r.fingerprint, now)),
    ChannelRecord: ("INSERT INTO channels (channel_id, created_by, created_at) VALUES (?, ?, ?)",
                    lambda r, _now: (r.channel_id, r.created_by, r.created_at)),
    ChannelMemberRecord: ("INSERT INTO channel_members (channel_id, identity_key) VALUES (?, ?)",
                          lambda r, _now: (r.channel_id, r.identity_key)),
    InboxRecord: ("INSERT INTO inboxes (recipient_key, channel_id, next_seq, depth)"
                  " VALUES (?, ?, ?, 0)", lambda r, _now: (r.recipient_key, r.channel_id,
                                                          r.next_seq)),
    MessageRecord: ("INSERT INTO messages (recipient_key, channel_id, seq, expires_at,"
                    " created_at, payload) VALUES (?, ?, ?, ?, ?, ?)",
                    lambda r, _now: (r.recipient_key, r.channel_id, r.seq, r.expires_at,
                                     r.created_at, r.payload)),
    DedupRecord: ("INSERT INTO dedup (recipient_key, channel_id, message_id, seq, created_at)"
                  " VALUES (?, ?, ?, ?, ?)", lambda r, _now: (r.recipient_key, r.channel_id,
                                                             r.message_id, r.seq, r.created_at)),
    KvRecord: ("INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?)",
               lambda r, _now: (r.namespace, r.key, r.value)),
    LogRecord: ("INSERT INTO logs (log, idx, entry) VALUES (?, ?, ?)",
                lambda r, _now: (r.log, r.idx, r.entry)),
}


def _dump_page(
    conn: Conn, table: str, keys: tuple[str, ...], others: tuple[str, ...],
    after: tuple[Any, ...] | None, limit: int,
) -> list[tuple[Any, ...]]:
    """One page of ``table`` in key order, after the key ``after`` (keyset pagination)."""
    cols = ", ".join(keys + others)
    order = ", ".join(keys)
    if after is None:
        sql = f"SELECT {cols} FROM {table} ORDER BY {order} LIMIT ?"
        return conn.execute(sql, (limit,)).fetchall()
    marks = ", ".join("?" * len(keys))
    sql = f"SELECT {cols} FROM {table} WHERE ({order}) > ({marks}) ORDER BY {order} LIMIT ?"
    return conn.execute(sql, (*after, limit)).fetchall()


def _is_empty(conn: Conn) -> bool:
    return not any(
        conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]
        for table, _k, _o, _m in _DUMP_SPECS
    )


def _load_batch(conn: Conn, batch: Sequence[Record], now: float) -> None:
    """Insert one batch (records of one type are contiguous, in dump order)."""
    i = 0
    while i < len(batch):
        t = type(batch[i])
        j = i
        while j < len(batch) and type(batch[j]) is t:
            j += 1
        sql, row = _LOAD_SQL[t]
        conn.executemany(sql, [row(r, now) for r in batch[i:j]])
        i = j


def _load_finish(conn: Conn) -> None:
    conn.execute(
        "UPDATE inboxes SET depth = (SELECT count(*) FROM messages AS m"
        " WHERE m.recipient_key = inboxes.recipient_key AND m.channel_id = inboxes.channel_id)"
    )
    conn.execute("COMMIT")


def _ping(conn: Conn) -> None:
    conn.execute("PRAGMA user_version").fetchall()


def _run_clean(conn: Conn, fn: Callable[..., Any], args: tuple[Any, ...],
               fut: asyncio.Future[Any]) -> _Outcome:
    """Run a job of ``_CLEAN_FAILING_JOBS`` without a savepoint."""
    try:
        return (fut, True, fn(conn, *args))
    except QueueFull as e:  # raised before, or after undoing, any write
        return (fut, False, e)


def _mergeable(job: _Job) -> bool:
    """An enqueue job that hands nothing over to a waiting reader (``take`` is empty)."""
    return job[0] is _enqueue_tx and not job[1][3]


def _enqueue_runs(batch: list[_Job]) -> Iterator[list[_Job]]:
    """Split a batch, in order, into single jobs and runs of consecutive mergeable enqueue
    jobs with the same depth limit (see ``_enqueue_merged``)."""
    run: list[_Job] = []
    for job in batch:
        if run and _mergeable(job) and job[1][1] == run[0][1][1]:
            run.append(job)
            continue
        if run:
            yield run
        run = [job]
        if not _mergeable(job):
            yield run
            run = []
    if run:
        yield run


def _enqueue_merged(conn: Conn, run: list[_Job]) -> list[_Outcome]:
    """Consecutive enqueue calls of one batch, written as one call.

    With one message per call (Enqueue), a batch of single calls costs three statements per
    message; merged, it costs one seq reservation per inbox and two ``executemany`` for the
    rows.  Results are what running the calls one after another gives: seqs in call order,
    a message id repeated by a later call is its duplicate.  Each call's dedup window is
    honoured in full (the earliest cut-off of the run is used, so a window may stretch by the
    milliseconds between the calls).  If any inbox is full, nothing was written and the
    calls run one by one, so only the calls that do not fit fail."""
    msgs = [m for _fn, args, _fut in run for m in args[0]]
    max_depth: int = run[0][1][1]
    dedup_since = min(args[2] for _fn, args, _fut in run)
    try:
        outs = _enqueue_tx(conn, msgs, max_depth, dedup_since)
    except QueueFull:
        return [_run_clean(conn, fn, args, fut) for fn, args, fut in run]
    outcomes: list[_Outcome] = []
    start = 0
    for _fn, args, fut in run:
        end = start + len(args[0])
        outcomes.append((fut, True, outs[start:end]))
        start = end
    return outcomes


# -- the store ------------------------------------------------------------------------------------

_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
_Outcome = tuple["asyncio.Future[Any]", bool, Any]  # (future, ok, result or exception)
_STOP: Final = None


def _in_savepoint(conn: Conn, fn: Callable[..., Any], args: tuple[Any, ...],
                  fut: asyncio.Future[Any]) -> _Outcome:
    """Run one job of a batch inside its own savepoint: its failure undoes only its writes."""
    execute = conn.execute
    execute("SAVEPOINT job")
    try:
        result = fn(conn, *args)
    except Exception as e:
        if not conn.in_transaction:
            # SQLite rolled the whole transaction back (e.g. disk full).
            raise StorageError(f"transaction aborted: {e}") from e
        execute("ROLLBACK TO job")
        execute("RELEASE job")
        return (fut, False, _storage_error(e))
    execute("RELEASE job")
    return (fut, True, result)


def _rollback(conn: Conn) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlcipher3.Error:
            log.exception("rollback after a failed transaction failed")


#: Write jobs whose only expected failure (QueueFull) leaves no writes behind, so a batch
#: needs no savepoint around them.
_CLEAN_FAILING_JOBS: Final[frozenset[Callable[..., Any]]] = frozenset(
    {_enqueue_tx, _fetch_tx, _ack_tx, _restore_tx}
)


def _lock_exclusively(path: Path) -> int:
    """Hold an exclusive lock on ``<database>.lock`` for as long as the storage is open.

    One server process per database file: two would each batch their own writes (fine for
    SQLite) but neither could trust what it remembers about the file (known-empty inboxes,
    the channel cache), and two servers on one data directory are a deployment mistake
    best reported at start-up.  Other SQLCipher clients (an operator's shell, backups)
    do not take this lock and are unaffected."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StorageError(f"cannot create the lock file {lock_path}: {e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StorageError(
            f"database {path} is in use by another qpc process (pid {holder}, lock file "
            f"{lock_path}); run one server per database file"
        ) from None
    except OSError as e:  # e.g. a file system without locks
        os.close(fd)
        raise StorageError(f"cannot lock {lock_path}: {e}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _create_private(path: Path) -> None:
    """Create a new database file with mode 0600 before SQLite does (SQLite would create it
    0644 under the usual umask).  SQLite gives the ``-wal`` and ``-shm`` files it creates the
    database file's mode, so they are 0600 too.  An existing database keeps its mode: a
    warning says so when other users may read it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            return  # opening it reports the problem
        if mode & 0o077:
            log.warning("database %s has mode %04o: other users may read it (encrypted) and "
                        "its -wal/-shm files; chmod 600 it and them", path, mode)
        return
    except OSError as e:
        raise StorageError(f"cannot create {path}: {e}") from None
    os.close(fd)


class SqlCipherStorage(Storage):
    """SQLCipher 4 storage with a group-committing writer thread and a reader pool."""

    name = "sqlcipher"

    def __init__(
        self,
        path: Path,
        key: str,
        *,
        synchronous: str = "NORMAL",
        wal_autocheckpoint: int = 1000,
        pool_size: int = 4,
        group_commit: bool = True,
        max_batch: int = 512,
        observer: Callable[[str, float], None] | None = None,
    ) -> None:
        """Prefer :meth:`open`, which also connects; this only validates and stores settings."""
        sync = str(synchronous).upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of OFF, NORMAL, FULL, EXTRA: {synchronous!r}"
            )
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if wal_autocheckpoint < 0:
            raise ValueError("wal_autocheckpoint must not be negative")
        self.path = Path(path)
        self._key = key
        self._synchronous = sync
        self._wal_autocheckpoint = int(wal_autocheckpoint)
        self._pool_size = pool_size
        self._group_commit = group_commit
        self._max_batch = max_batch
        self._observer = observer
        self._observer_failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True  # until open() finished
        self._closing: asyncio.Future[None] | None = None
        # Items are lists of jobs: the jobs queued during one event-loop turn travel (and
        # wake the writer) together; None stops the writer.
        self._jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._pending: list[_Job] = []
        self._flush_scheduled = False
        self._pending_reads: list[_Job] = []
        self._read_flush_scheduled = False
        self._writer: threading.Thread | None = None
        self._writer_conn: Conn | None = None
        self._writer_stopped: asyncio.Future[None] | None = None
        self._writer_error: BaseException | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: list[Conn] = []
        self._idle_readers: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        # This process is the file's only writer (see _lock_exclusively), so emptiness can be
        # remembered.
        self._empties = EmptyInboxes()
        # Write jobs that may add messages, with their inboxes, until the writer's outcome
        # for them arrives (see _adding); touched on the event loop only.
        self._adding_jobs: dict[asyncio.Future[Any], set[tuple[bytes, bytes]]] = {}
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        path: Path,
        key: str,
        *,
        synchronous: str = "NORMAL",
        wal_autocheckpoint: int = 1000,
        pool_size: int = 4,
        group_commit: bool = True,
        max_batch: int = 512,
        observer: Callable[[str, float], None] | None = None,
    ) -> SqlCipherStorage:
        """Open (creating and migrating if needed) the database at ``path``.

        :class:`WrongKey` when ``key`` does not decrypt it; :class:`StorageError` when its
        schema is newer than this code or it cannot be opened."""
        self = cls(
            path, key, synchronous=synchronous, wal_autocheckpoint=wal_autocheckpoint,
            pool_size=pool_size, group_commit=group_commit, max_batch=max_batch,
            observer=observer,
        )
        await self._start()
        return self

    async def _start(self) -> None:
        self._lock_fd = _lock_exclusively(self.path)
        try:
            _create_private(self.path)
            await self._start_locked()
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    async def _start_locked(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._writer_stopped = loop.create_future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name=f"qpc-db-writer:{self.path.name}",
            daemon=True,
        )
        self._writer.start()
        try:
            await ready  # the writer has keyed, verified and migrated the file
        except BaseException:
            self._jobs.put(_STOP)  # if open() was cancelled, the writer must not linger
            await asyncio.shield(self._writer_stopped)
            raise
        # Readers connect only now: keying an empty file before the writer wrote its header
        # would derive the key from a different salt.
        self._readers = ThreadPoolExecutor(
            max_workers=self._pool_size, thread_name_prefix=f"qpc-db-reader:{self.path.name}",
            initializer=name_os_thread, initargs=("qpc-db-reader",),
        )
        results = await asyncio.gather(
            *(loop.run_in_executor(self._readers, self._connect_reader)
              for _ in range(self._pool_size)),
            return_exceptions=True,
        )
        for r in results:
            if not isinstance(r, BaseException):
                self._reader_conns.append(r)
                self._idle_readers.put(r)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        self._closed = False
        if failure is not None:
            await self.close()
            raise failure

    def _connect_reader(self) -> Conn:
        return _connect(
            self.path, self._key, synchronous=self._synchronous,
            wal_autocheckpoint=self._wal_autocheckpoint, reader=True,
        )

    async def close(self) -> None:
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        if self._loop is None:  # never opened
            self._closed = True
            return
        loop = asyncio.get_running_loop()
        self._closing = loop.create_future()
        self._closed = True
        try:
            self._flush_pending()
            self._jobs.put(_STOP)  # queued writes before it still commit
            if self._writer_stopped is not None:
                await asyncio.shield(self._writer_stopped)
            await self._in_thread(self._close_readers)
        finally:
            self._unlock()
            self._closing.set_result(None)

    def _close_readers(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        for conn in self._reader_conns:
            try:
                conn.close()
            except sqlcipher3.Error:
                log.exception("closing a reader connection failed")
        self._reader_conns.clear()

    async def _in_thread(self, fn: Callable[[], None]) -> None:
        """Run blocking ``fn`` on a short-lived thread (the pools may be shut down)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            try:
                fn()
            except BaseException as e:
                loop.call_soon_threadsafe(_settle, done, False, e)
            else:
                loop.call_soon_threadsafe(_settle, done, True, None)

        threading.Thread(target=run, name="qpc-db-close", daemon=True).start()
        await done

    async def ping(self) -> None:
        self._check_open()
        if self._writer is None or not self._writer.is_alive():
            raise StorageError("storage writer thread is not running")
        await self._read(_ping)

    # -- plumbing ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("storage is closed")
        if self._writer_error is not None:
            raise StorageError(f"storage writer failed: {self._writer_error}")

    def _write(self, fn: Callable[[Conn, *Ts], T], *args: *Ts) -> asyncio.Future[T]:
        """Queue a write job for the writer thread; the future resolves after its COMMIT.

        Synchronous on purpose: the job is queued before the caller's first suspension."""
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if loop is not self._loop:  # another loop (or thread): hand over at once
            self._hand_to_writer([(fn, args, fut)])
            return fut
        self._pending.append((fn, args, fut))
        if not self._flush_scheduled:
            # One hand-over (and one writer wake-up) per loop turn, not per job: waking the
            # writer thread per job cost two context switches each on a busy core.
            self._flush_scheduled = True
            loop.call_soon(self._flush_pending)
        return fut

    def _flush_pending(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        jobs, self._pending = self._pending, []
        self._hand_to_writer(jobs)

    def _hand_to_writer(self, jobs: list[_Job]) -> None:
        self._jobs.put(jobs)
        if self._writer_error is not None:  # the writer died meanwhile: do not hang
            self._fail_queued(self._writer_error)

    async def _read(self, fn: Callable[[Conn, *Ts], T], *args: *Ts) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[float, T]] = loop.create_future()
        if loop is not self._loop:  # another loop (or thread): hand over at once
            self._hand_to_readers([(fn, args, fut)])
        else:
            self._pending_reads.append((fn, args, fut))
            if not self._read_flush_scheduled:  # one hand-over per loop turn, as for writes
                self._read_flush_scheduled = True
                loop.call_soon(self._flush_reads)
        seconds, result = await fut
        if self._observer is not None:
            self._observe("read", seconds)
        return result

    def _flush_reads(self) -> None:
        self._read_flush_scheduled = False
        reads, self._pending_reads = self._pending_reads, []
        if reads:
            self._hand_to_readers(reads)

    def _hand_to_readers(self, reads: list[_Job]) -> None:
        try:
            if self._readers is None:
                raise RuntimeError("no reader pool")
            self._readers.submit(self._run_reads, reads)
        except RuntimeError as e:  # pool shut down (closing)
            for _fn, _args, fut in reads:
                _settle(fut, False, StorageError(f"storage is closed: {e}"))

    def _run_reads(self, reads: list[_Job]) -> None:
        """Run the reads of one loop turn on one reader connection (a reader thread)."""
        outcomes: list[_Outcome] = []
        conn = self._idle_readers.get()
        try:
            for fn, args, fut in reads:
                t0 = time.perf_counter()
                try:
                    result = fn(conn, *args)
                except sqlcipher3.Error as e:
                    err = StorageError(f"database error: {e}")
                    err.__cause__ = e
                    outcomes.append((fut, False, err))
                except Exception as e:
                    outcomes.append((fut, False, e))
                else:
                    outcomes.append((fut, True, (time.perf_counter() - t0, result)))
        finally:
            self._idle_readers.put(conn)
            self._deliver(outcomes, None)  # to each future's own loop

    def _observe(self, operation: str, seconds: float) -> None:
        observer = self._observer
        if observer is None:
            return
        try:
            observer(operation, seconds)
        except Exception:
            if not self._observer_failed:  # log once, never break storage
                self._observer_failed = True
                log.exception("storage observer failed (further failures are not logged)")

    # -- writer thread -----------------------------------------------------------------------
    def _writer_main(self, ready: asyncio.Future[None]) -> None:
        name_os_thread("qpc-db-writer")
        loop = self._loop
        assert loop is not None and self._writer_stopped is not None
        try:
            conn = self._writer_conn = _connect(
                self.path, self._key, synchronous=self._synchronous,
                wal_autocheckpoint=self._wal_autocheckpoint, reader=False,
            )
            try:
                _migrate(conn, self.path)
            except BaseException:
                conn.close()
                raise
        except BaseException as e:
            loop.call_soon_threadsafe(_settle, ready, False, e)
            loop.call_soon_threadsafe(_settle, self._writer_stopped, True, None)
            return
        loop.call_soon_threadsafe(_settle, ready, True, None)
        try:
            self._writer_loop(conn)
        except BaseException as e:  # a bug: fail everything rather than hang callers
            self._writer_error = e
            log.exception("storage writer thread failed")
            self._fail_queued(e)
            try:
                loop.call_soon_threadsafe(self.report_failure, e)
            except RuntimeError:  # loop already closed
                pass
        finally:
            try:
                conn.close()
            except sqlcipher3.Error:
                log.exception("closing the writer connection failed")
            try:
                loop.call_soon_threadsafe(_settle, self._writer_stopped, True, None)
            except RuntimeError:  # loop already closed
                pass

    def _writer_loop(self, conn: Conn) -> None:
        jobs = self._jobs
        max_batch = self._max_batch if self._group_commit else 1
        backlog: collections.deque[_Job] = collections.deque()
        stop = False
        while True:
            if not backlog:
                if stop:
                    return
                item = jobs.get()
                if item is None:
                    return
                backlog.extend(item)
            while not stop and len(backlog) < max_batch:
                try:
                    item = jobs.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    backlog.extend(item)
            batch = [backlog.popleft() for _ in range(min(max_batch, len(backlog)))]
            try:
                self._run_batch(conn, batch)
            except BaseException as e:
                self._deliver(
                    [
                        (j[2], False, StorageError(f"storage writer failed: {e}"))
                        for j in (*batch, *backlog)
                    ],
                    None,
                )
                raise
            if stop and not backlog:
                return

    def _run_batch(self, conn: Conn, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        if len(batch) > 1:
            lean = self._run_lean(conn, batch)
            if lean is not None:
                self._deliver(lean, time.perf_counter() - t0)
                return
        self._run_savepoints(conn, batch, t0)

    def _run_lean(self, conn: Conn, batch: list[_Job]) -> list[_Outcome] | None:
        """One transaction for the batch with a savepoint only around jobs that are not known
        to fail cleanly (two statements fewer per delivery job).  None: something unexpected
        failed; everything was rolled back and the caller reruns the batch the careful way."""
        execute = conn.execute
        outcomes: list[_Outcome] = []
        try:
            execute("BEGIN IMMEDIATE")
            for run in _enqueue_runs(batch):
                if len(run) > 1:
                    outcomes.extend(_enqueue_merged(conn, run))
                    continue
                fn, args, fut = run[0]
                if fn in _CLEAN_FAILING_JOBS:
                    outcomes.append(_run_clean(conn, fn, args, fut))
                    continue
                outcomes.append(_in_savepoint(conn, fn, args, fut))
            execute("COMMIT")
        except Exception:
            _rollback(conn)
            return None
        return outcomes

    def _run_savepoints(self, conn: Conn, batch: list[_Job], t0: float) -> None:
        execute = conn.execute
        outcomes: list[_Outcome] = []
        committed = False
        try:
            execute("BEGIN IMMEDIATE")
            if len(batch) == 1:
                fn, args, fut = batch[0]
                try:
                    outcomes.append((fut, True, fn(conn, *args)))
                except Exception as e:
                    outcomes.append((fut, False, _storage_error(e)))
                    if conn.in_transaction:
                        execute("ROLLBACK")
                else:
                    execute("COMMIT")
                    committed = True
            else:
                outcomes = [_in_savepoint(conn, fn, args, fut) for fn, args, fut in batch]
                execute("COMMIT")
                committed = True
        except Exception as e:
            # BEGIN, a savepoint or COMMIT failed: the whole batch fails, nothing is kept.
            _rollback(conn)
            outcomes = []
            for _fn, _args, fut in batch:
                err = StorageError(f"transaction failed: {e}")
                err.__cause__ = e
                outcomes.append((fut, False, err))
        self._deliver(outcomes, time.perf_counter() - t0 if committed else None)

    def _deliver(self, outcomes: list[_Outcome], commit_seconds: float | None) -> None:
        """Hand results to the event loop(s): one callback per batch and loop."""
        loop = self._loop
        assert loop is not None
        mine: list[_Outcome] = []
        others: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for o in outcomes:
            lp = o[0].get_loop()
            if lp is loop:
                mine.append(o)
            else:
                others.setdefault(lp, []).append(o)
        try:
            loop.call_soon_threadsafe(self._resolve, mine, commit_seconds)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
        for lp, items in others.items():
            try:
                lp.call_soon_threadsafe(_settle_all, items)
            except RuntimeError:
                pass

    def _resolve(self, outcomes: list[_Outcome], commit_seconds: float | None) -> None:
        """Settle this loop's futures and end their "add in flight" marks (loop thread)."""
        adding = self._adding_jobs
        for fut, ok, value in outcomes:
            _settle(fut, ok, value)
            if adding:
                inboxes = adding.pop(fut, None)
                if inboxes is not None:
                    for inbox in inboxes:
                        self._empties.written(inbox)
        if commit_seconds is not None and self._observer is not None:
            self._observe("commit", commit_seconds)

    def _fail_queued(self, error: BaseException) -> None:
        outcomes: list[_Outcome] = []
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            for job in item or ():
                outcomes.append((job[2], False, StorageError(f"storage writer failed: {error}")))
        if outcomes:
            self._deliver(outcomes, None)

    # -- delivery ----------------------------------------------------------------------------
    async def enqueue(
        self, messages: Sequence[NewMessage], *, max_depth: int, dedup_since: float,
        take: Collection[tuple[bytes, bytes]] = (),
    ) -> list[EnqueueOutcome]:
        if not messages:
            self._check_open()
            return []
        take = frozenset(take)
        fut = self._write(_enqueue_tx, list(messages), max_depth, dedup_since, take)
        stamps = self._adding(fut, {(m.recipient_key, m.channel_id) for m in messages})
        outcomes = await fut
        if take and stamps:
            # Handed over from an empty inbox (an inbox's new messages are either all
            # handed over or all stored): still empty, unless written since.
            for m, o in zip(messages, outcomes, strict=True):
                if o.taken:
                    inbox = (m.recipient_key, m.channel_id)
                    self._empties.observed_empty(inbox, stamps[inbox])
        return outcomes

    async def restore(self, messages: Sequence[tuple[NewMessage, EnqueueOutcome]]) -> None:
        if messages:
            fut = self._write(_restore_tx, list(messages))
            self._adding(fut, {(m.recipient_key, m.channel_id) for m, _out in messages})
            await fut

    async def forget_taken(
        self, messages: Sequence[tuple[NewMessage, EnqueueOutcome]]
    ) -> None:
        if any(m.message_id for m, _out in messages):
            await self._write(_forget_taken_tx, list(messages))

    def _adding(
        self, job: asyncio.Future[Any], inboxes: set[tuple[bytes, bytes]]
    ) -> dict[tuple[bytes, bytes], int]:
        """``job`` (just queued) may add messages to ``inboxes``: they are "in flight" until
        the writer has run it (see emptiness.py).  That ends in :meth:`_resolve`, when the
        writer's outcome for the job arrives, not when ``job`` is done: a cancelled caller
        cancels ``job``, but the writer runs it and commits all the same."""
        empties = self._empties
        if asyncio.get_running_loop() is not self._loop:
            empties.disable()  # queued out of the loop's order: stop trusting the hint
            return {}
        self._adding_jobs[job] = inboxes
        return {inbox: empties.writing(inbox) for inbox in inboxes}

    async def fetch(
        self, recipient_key: bytes, channel_id: bytes, limit: int, *, now: float,
        max_bytes: int = 0, likely_nonempty: bool = False, per_message: int = 0,
    ) -> list[StoredMessage]:
        """Remove and return up to ``limit`` (0 = all) unexpired messages, oldest first.

        ``max_bytes`` (0 = no limit) caps the summed payload size plus ``per_message`` bytes
        per message; the first message is returned even when it alone is larger, so an
        inbox can never get stuck."""
        inbox = (recipient_key, channel_id)
        empties = self._empties
        on_loop = asyncio.get_running_loop() is self._loop
        if not likely_nonempty and not (on_loop and empties.in_flight(inbox)):
            # Idle long polls never reach the writer: an inbox seen drained (with nothing
            # added since) is answered from memory, otherwise a reader checks first.
            if on_loop and empties.is_empty(inbox):
                return []
            since = empties.stamp()
            if not await self._read(_has_messages, recipient_key, channel_id):
                if on_loop:
                    empties.observed_empty(inbox, since)
                return []
        # With an add in flight the writer (which runs jobs in order) sees it; a reader's
        # snapshot might not yet.
        since = self._empties.stamp()
        out, drained = await self._write(
            _fetch_tx, recipient_key, channel_id, limit, now, max_bytes, per_message
        )
        if drained and on_loop:
            empties.observed_empty(inbox, since)
        return out

    async def peek(
        self, recipient_key: bytes, channel_id: bytes, limit: int, *, now: float,
        max_bytes: int = 0, per_message: int = 0,
    ) -> list[StoredMessage]:
        """Like :meth:`fetch` without removing anything."""
        return await self._read(
            _select_live, recipient_key, channel_id, limit, now, max_bytes, per_message
        )

    async def ack(self, recipient_key: bytes, channel_id: bytes, seq_up_to: int) -> int:
        return await self._write(_ack_tx, recipient_key, channel_id, seq_up_to)

    async def queue_depth(self, recipient_key: bytes, channel_id: bytes) -> int:
        return await self._read(_queue_depth, recipient_key, channel_id)

    async def total_queue_depth(self) -> int:
        return await self._read(_total_depth)

    async def _purge(self, sql: str, bound: float) -> int:
        total = 0
        while True:  # bounded transactions: deliveries interleave with a large purge
            n = await self._write(_delete_chunk, sql, bound)
            total += n
            if n < PURGE_CHUNK:
                return total

    async def purge_expired(self, now: float) -> int:
        return await self._purge(_PURGE_MESSAGES, now)

    async def purge_dedup(self, older_than: float) -> int:
        return await self._purge(_PURGE_DEDUP, older_than)

    # -- key packages and hybrid keys ----------------------------------------------------------
    async def add_key_package(
        self, identity_key: bytes, package: bytes, fingerprint: bytes
    ) -> None:
        await self._write(_add_key_package, identity_key, package, fingerprint)

    async def pop_key_package(self, identity_key: bytes) -> bytes | None:
        return await self._write(_pop_key_package, identity_key)

    async def count_key_packages(self, identity_key: bytes) -> int:
        return await self._read(_count_key_packages, identity_key)

    async def set_hybrid_key(self, identity_key: bytes, public_key: bytes) -> None:
        await self._write(_set_hybrid_key, identity_key, public_key)

    async def get_hybrid_keys(self, identity_keys: Sequence[bytes]) -> dict[bytes, bytes]:
        unique = list(dict.fromkeys(identity_keys))
        if not unique:
            self._check_open()
            return {}
        return await self._read(_get_hybrid_keys, unique)

    # -- users, channels, sessions ------------------------------------------------------------
    async def create_user(self, username: str, identity_key: bytes, *, now: float) -> None:
        await self._write(_create_user, username, identity_key, now)

    async def get_user_by_name(self, username: str) -> UserRecord | None:
        return await self._read(_get_user, "username", username)

    async def get_user_by_identity(self, identity_key: bytes) -> UserRecord | None:
        return await self._read(_get_user, "identity_key", identity_key)

    async def create_channel(
        self, channel_id: bytes, members: Sequence[bytes], created_by: bytes, *, now: float
    ) -> bool:
        return await self._write(_create_channel, channel_id, list(members), created_by, now)

    async def channel_members(self, channel_id: bytes) -> list[bytes] | None:
        return await self._read(_channel_members, channel_id)

    async def put_session(self, record: SessionRecord) -> None:
        await self._write(_put_session, record)

    async def get_session(self, token_hash: bytes) -> SessionRecord | None:
        return await self._read(_get_session, token_hash)

    async def delete_session(self, token_hash: bytes) -> bool:
        return await self._write(_delete_session, token_hash)

    async def purge_sessions(self, now: float) -> int:
        return await self._purge(_PURGE_SESSIONS, now)

    async def delete_account(self, identity_key: bytes) -> str | None:
        return await self._write(_delete_account, identity_key)

    # -- plugin key/value and append-only logs -------------------------------------------------
    async def kv_get(self, namespace: str, key: bytes) -> bytes | None:
        return await self._read(_kv_get, namespace, key)

    async def kv_put(self, namespace: str, key: bytes, value: bytes) -> None:
        await self._write(_kv_put, namespace, key, value)

    async def kv_put_if_absent(self, namespace: str, key: bytes, value: bytes) -> bytes:
        return await self._write(_kv_put_if_absent, namespace, key, value)

    async def kv_delete(self, namespace: str, key: bytes) -> bool:
        return await self._write(_kv_delete, namespace, key)

    async def kv_scan(
        self, namespace: str, prefix: bytes = b"", limit: int = 0
    ) -> list[tuple[bytes, bytes]]:
        return await self._read(_kv_scan, namespace, prefix, limit)

    async def log_append(
        self, log: str, entries: Sequence[bytes], *, expected_first: int | None = None,
        kv_puts: Sequence[tuple[str, bytes, bytes]] = (),
    ) -> int:
        return await self._write(_log_append, log, list(entries), expected_first,
                                 list(kv_puts))

    async def log_read(self, log: str, start: int, end: int) -> list[bytes]:
        return await self._read(_log_read, log, start, end)

    async def log_size(self, log: str) -> int:
        return await self._read(_log_size, log)

    async def log_read_many(self, log: str, indices: Sequence[int]) -> dict[int, bytes]:
        wanted = [i for i in dict.fromkeys(indices) if i >= 0]
        if not wanted:
            self._check_open()
            return {}
        return await self._read(_log_read_many, log, wanted)

    # -- copying (qpc store copy) -------------------------------------------------------------
    async def dump(self) -> AsyncIterator[Sequence[Record]]:
        """Every record in dump order.  A consistent snapshot as long as nothing writes
        meanwhile; ``qpc store copy`` opens the file itself, and the file lock keeps a
        running server out."""
        for table, keys, others, make in _DUMP_SPECS:
            after: tuple[Any, ...] | None = None
            while True:
                rows = await self._read(_dump_page, table, keys, others, after, DUMP_BATCH)
                if rows:
                    yield [make(r) for r in rows]
                if len(rows) < DUMP_BATCH:
                    break
                after = tuple(rows[-1][: len(keys)])

    async def is_empty(self) -> bool:
        return await self._read(_is_empty)

    async def load(self, batches: AsyncIterable[Sequence[Record]]) -> None:
        """Insert everything in one transaction on a connection of its own (the writer
        thread's jobs each commit); rolled back on any failure or cancellation, so the
        store stays empty (unless the cancellation arrives during the final commit).

        Every step on that connection runs on one worker thread, in order: a rollback
        queued after a cancelled step runs after that step has finished, never between the
        rows of a batch."""
        self._check_open()
        loop = asyncio.get_running_loop()
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qpc-db-load")

        def step(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
            return loop.run_in_executor(worker, functools.partial(fn, *args))

        try:
            conn = await asyncio.shield(step(functools.partial(
                _connect, self.path, self._key, synchronous=self._synchronous,
                wal_autocheckpoint=self._wal_autocheckpoint, reader=False,
            )))
            try:
                await step(conn.execute, "BEGIN IMMEDIATE")
                if not await step(_is_empty, conn):
                    raise StorageError(
                        f"{self.path} is not empty: load only into a new store")
                now = time.time()
                async for batch in batches:
                    await step(_load_batch, conn, batch, now)
                await step(_load_finish, conn)
            except sqlcipher3.Error as e:
                await asyncio.shield(step(_rollback, conn))
                raise StorageError(
                    f"loading {self.path} failed (nothing written): {e}") from e
            except BaseException:
                await asyncio.shield(step(_rollback, conn))
                raise
            finally:
                await asyncio.shield(step(conn.close))
        finally:
            worker.shutdown(wait=False)  # its queue ends with the close above
        self._empties = EmptyInboxes()  # what it remembered as empty may hold messages now

@dataclass(frozen=True, slots=True)
class BackupReport:
    path: Path
    size_bytes: int
    seconds: float
    schema_version: int
    queued_messages: int


def online_backup(db_path: Path, key: str, out: Path) -> BackupReport:
    """Copy the database at ``db_path`` to the new file ``out``, encrypted with the same key,
    while a server may be using it (blocking: run it in a thread or a separate process).

    SQLite's backup API copies every page inside one read transaction, so the copy is a
    consistent snapshot: every transaction committed before it started, none after.  In WAL
    mode that read transaction does not block the server's writer (the WAL cannot be
    checkpointed past the snapshot meanwhile, so it grows by what is written during the
    backup).  The copy is written to a hidden temporary file beside ``out`` (mode 0600),
    checked (``PRAGMA quick_check``), fsynced and linked into place without replacing
    anything, so ``out`` only ever appears complete.  The file lock of a running server is
    not taken: backing up is what other SQLCipher clients may do."""
    if not db_path.is_file():
        raise StorageError(f"no database at {db_path}")
    if out.exists():
        raise StorageError(f"{out} exists: back up into a new file")
    t0 = time.monotonic()
    # A fixed hidden name beside the target: what a killed backup left is replaced (and
    # so cleaned up) by the next one to the same file.
    tmp = out.with_name(f".{out.name}.qpc-backup.tmp")
    leftovers = [tmp.with_name(tmp.name + sfx) for sfx in ("", "-journal", "-wal", "-shm")]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in leftovers:
            f.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise StorageError(f"cannot create {tmp}: {e}") from e
    try:
        version, queued = _backup_into(db_path, key, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _place_without_replacing(tmp, out)
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise StorageError(f"backup to {out} failed: {e}") from e
    finally:
        for f in leftovers:
            f.unlink(missing_ok=True)
    return BackupReport(out, out.stat().st_size, time.monotonic() - t0, version, queued)


def _place_without_replacing(tmp: Path, out: Path) -> None:
    """Give ``tmp`` the name ``out`` unless ``out`` exists.  A hard link cannot replace a
    file that appeared meanwhile (a rename could); on file systems without hard links
    (FAT, some network mounts) fall back to checking, then renaming."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise StorageError(f"{out} exists: back up into a new file") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        if out.exists():
            raise StorageError(f"{out} exists: back up into a new file") from None
        os.rename(tmp, out)


def _backup_into(db_path: Path, key: str, tmp: Path) -> tuple[int, int]:
    """The page copy and its check; returns (schema version, queued messages)."""
    # A plain keyed connection: no journal-mode or checkpoint settings of its own, so
    # backing up a non-WAL file (an earlier backup) leaves it as it is.
    src = _open_keyed(db_path, key)
    try:
        src.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}").fetchall()
        src.execute("PRAGMA query_only = ON")
        version = int(src.execute("PRAGMA user_version").fetchone()[0])
        dst: Conn = sqlcipher3.connect(str(tmp), isolation_level=None)
        try:
            dst.execute(f"PRAGMA key = {_quote(key)}")
            src.backup(dst)  # all pages in one step: one read transaction, one snapshot
            # One self-contained file (a server opening it switches it back to WAL).
            dst.execute("PRAGMA journal_mode = DELETE").fetchall()
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StorageError(f"the backup failed its integrity check: {check}")
            queued = int(dst.execute("SELECT count(*) FROM messages").fetchone()[0])
        finally:
            dst.close()
    except sqlcipher3.Error as e:
        raise StorageError(f"backup of {db_path} failed: {e}") from e
    finally:
        src.close()
    return version, queued



def _settle_all(outcomes: list[_Outcome]) -> None:
    """Settle futures of another event loop (on that loop's thread; nothing else to do)."""
    for fut, ok, value in outcomes:
        _settle(fut, ok, value)


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Complete ``fut`` unless its awaiting task was cancelled meanwhile (loop thread only)."""
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
