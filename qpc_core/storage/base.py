"""The typed async storage interface every backend implements.

Delivery logic talks only to this interface: no SQL and no backend detail leaks above it.
Every method that returns has finished durably (for writes: committed), so a caller may
acknowledge the client as soon as the awaitable completes.

Backends: the built-in SQLCipher store (``qpc_core.storage.sqlcipher``); a PostgreSQL backend
plugs in through the ``open_storage`` hook.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpc_core.errors import StorageError

if TYPE_CHECKING:
    from qpc_core.storage.records import Record

log = logging.getLogger("qpc.storage")


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key that starts with ``prefix`` (None: no such
    key, the scan is unbounded above).  For backends implementing ``kv_scan`` as a range."""
    stem = prefix.rstrip(b"\xff")
    if not stem:
        return None
    return stem[:-1] + bytes((stem[-1] + 1,))


class QueueFull(StorageError):
    """An enqueue would push ``recipient``'s queue past ``max_depth``; nothing was written."""

    def __init__(self, recipient_key: bytes, channel_id: bytes, depth: int) -> None:
        super().__init__(f"queue full ({depth} messages)")
        self.recipient_key = recipient_key
        self.channel_id = channel_id
        self.depth = depth


class AlreadyExists(StorageError):
    """A unique key (username, identity key) is taken; nothing was written."""


class LogMoved(StorageError):
    """``log_append(..., expected_first=n)``: the log's size was not ``n`` (another writer
    appended meanwhile); nothing was written."""

    def __init__(self, log: str, expected: int, actual: int) -> None:
        super().__init__(f"log {log!r} has {actual} entries, not the expected {expected}")
        self.log = log
        self.expected = expected
        self.actual = actual


class WrongKey(StorageError):
    """The database could not be opened with the configured key."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    recipient_key: bytes
    channel_id: bytes
    payload: bytes
    message_id: bytes = b""  # empty: no dedup
    expires_at: float | None = None  # unix seconds; None: never
    sender_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class EnqueueOutcome:
    seq: int
    duplicate: bool
    #: True when the message was handed straight to a waiting reader instead of being
    #: stored (see ``take`` in :meth:`Storage.enqueue`).
    taken: bool = False
    #: For a taken message: which incarnation of its inbox gave out ``seq`` (an opaque
    #: value of the backend; an inbox deleted by DeleteAccount and created again is another
    #: incarnation).  :meth:`Storage.restore` puts the message back only into that one.
    inbox_epoch: int = 0


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class UserRecord:
    username: str
    identity_key: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class SessionRecord:
    token_hash: bytes
    identity_key: bytes
    username: str
    created_at: float
    expires_at: float


class Storage(ABC):
    """Async storage.  Implementations must not block the event loop."""

    name: str = "storage"
    #: True when other servers write to the same store (a shared database): the core then
    #: keeps no cache of stored state that another server could change (channel
    #: memberships), and relies on :meth:`report_arrival` for messages stored elsewhere.
    shared: bool = False

    def exclusive(self, name: str) -> AbstractAsyncContextManager[Any]:
        """A lock named ``name`` held across every server that shares this store, for a
        writer whose next write depends on what it reads first (checked-then-appended log
        entries).  Sections holding the same name never overlap.  Meant for a small, fixed
        set of names (a backend may keep a connection per name), not one per record.

        This default is an in-process lock (a store that only this process writes);
        shared backends override it.  A backend may lose the lock with its connection, so
        correctness must still rest on conditional writes (``expected_first``): the lock
        is what keeps servers from refusing each other's writes over and over."""
        locks: dict[str, asyncio.Lock] = self.__dict__.setdefault("_exclusive_locks", {})
        return locks.setdefault(name, asyncio.Lock())

    # -- lifecycle --------------------------------------------------------------------------
    @abstractmethod
    async def close(self) -> None:
        """Finish every pending write, then release resources.  Idempotent."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StorageError` when the backend is unreachable (used by /readyz)."""

    def add_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(error)`` (on the event loop) if the backend fails for good.

        The core registers one at start-up: a store that can no longer serve anything stops
        the server with exit status 1, so a supervisor restarts it instead of it answering
        every call with an error.  Backends report such a failure with :meth:`report_failure`."""
        self.__dict__.setdefault("_failure_callbacks", []).append(callback)

    def report_failure(self, error: BaseException) -> None:
        """Report a permanent failure to every failure callback (call on the event loop)."""
        for callback in list(self.__dict__.get("_failure_callbacks", ())):
            try:
                callback(error)
            except Exception:
                log.exception("storage failure callback failed")

    def add_arrival_callback(
        self, callback: Callable[[tuple[bytes, bytes] | None, int], None]
    ) -> None:
        """Call ``callback((recipient, channel), seq)`` (on the event loop) when *another
        server* stored messages for that inbox (up to ``seq``), so this server can wake its
        long polls and push to its connections.  ``callback(None, 0)`` means arrivals may have
        been missed (e.g. the backend's notification channel reconnected): re-check every
        waiting inbox.  Only a :attr:`shared` backend reports arrivals; this server's own
        enqueues are not reported (the core already knows them)."""
        self.__dict__.setdefault("_arrival_callbacks", []).append(callback)

    def report_arrival(self, inbox: tuple[bytes, bytes] | None, seq: int = 0) -> None:
        """Report messages stored by another server to every arrival callback (on the
        event loop)."""
        for callback in list(self.__dict__.get("_arrival_callbacks", ())):
            try:
                callback(inbox, seq)
            except Exception:
                log.exception("storage arrival callback failed")

    # -- delivery ---------------------------------------------------------------------------
    @abstractmethod
    async def enqueue(
        self, messages: Sequence[NewMessage], *, max_depth: int, dedup_since: float,
        take: Collection[tuple[bytes, bytes]] = (),
    ) -> list[EnqueueOutcome]:
        """Append messages, all or nothing, in one transaction.

        Each (recipient, channel) inbox gets the next value of its own monotonically
        increasing u64 ``seq`` (starting at 1, never reused while the inbox exists, even after
        messages are removed; DeleteAccount removes the inbox and so restarts it).
        A non-empty ``message_id`` already stored for the same inbox at or after
        ``dedup_since`` (unix seconds) is a duplicate: its original seq is returned with
        ``duplicate=True`` and nothing is written for it.  :class:`QueueFull` when an inbox
        would hold more than ``max_depth`` unexpired messages (nothing is written at all).

        ``take`` names (recipient, channel) inboxes that a reader is waiting on.  When such an
        inbox holds no message at all, its new messages are not stored: they get their seq
        (and dedup record) as usual and come back with ``taken=True``, i.e. the append and a
        destructive fetch of exactly those messages happen in the same transaction.  The
        caller then owns them and must hand them out or give them back with :meth:`restore`.
        A taken outcome carries the ``inbox_epoch`` of the inbox it was taken from.
        """

    @abstractmethod
    async def restore(self, messages: Sequence[tuple[NewMessage, EnqueueOutcome]]) -> None:
        """Store messages that ``enqueue(take=...)`` returned as taken but that could not be
        handed out, each with the outcome ``enqueue`` gave it, under that outcome's seq
        (FIFO order is kept).  A message is not stored when its inbox is no longer the
        incarnation that took it (``inbox_epoch``: the account was deleted meanwhile, and
        maybe the inbox created again with its seqs restarted), nor over a stored seq."""

    @abstractmethod
    async def forget_taken(
        self, messages: Sequence[tuple[NewMessage, EnqueueOutcome]]
    ) -> None:
        """Remove the dedup records of taken messages that could be neither handed out nor
        restored (the restore failed), so a retry with the same ``message_id`` stores the
        message instead of being answered "duplicate" for a message that was never kept.
        Only a record that still maps the id to the outcome's seq, in the inbox incarnation
        the outcome names, is removed."""

    @abstractmethod
    async def fetch(
        self, recipient_key: bytes, channel_id: bytes, limit: int, *, now: float,
        max_bytes: int = 0, likely_nonempty: bool = False, per_message: int = 0,
    ) -> list[StoredMessage]:
        """Remove and return up to ``limit`` (0 = all) unexpired messages, oldest first.

        ``max_bytes`` (0 = no cap) stops before the payloads, plus ``per_message`` bytes for
        each message (its envelope in the answer), would exceed it, but the first message is
        always returned so an inbox can never get stuck.  ``likely_nonempty`` is a
        hint (messages were stored since the last fetch): a backend that checks for an empty
        inbox before starting a write may skip that check.  Results are the same either way."""

    @abstractmethod
    async def peek(
        self, recipient_key: bytes, channel_id: bytes, limit: int, *, now: float,
        max_bytes: int = 0, per_message: int = 0,
    ) -> list[StoredMessage]:
        """Like :meth:`fetch` without removing anything."""

    @abstractmethod
    async def ack(self, recipient_key: bytes, channel_id: bytes, seq_up_to: int) -> int:
        """Remove every message with ``seq <= seq_up_to``; return how many were removed."""

    @abstractmethod
    async def queue_depth(self, recipient_key: bytes, channel_id: bytes) -> int:
        """Messages currently stored for one inbox (expired but uncollected included)."""

    @abstractmethod
    async def total_queue_depth(self) -> int:
        """Messages stored across all inboxes."""

    @abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Delete messages whose ``expires_at <= now``; return how many."""

    @abstractmethod
    async def purge_dedup(self, older_than: float) -> int:
        """Forget dedup ids recorded before ``older_than``; return how many."""

    # -- key packages and hybrid keys ---------------------------------------------------------
    @abstractmethod
    async def add_key_package(
        self, identity_key: bytes, package: bytes, fingerprint: bytes
    ) -> None:
        """Queue a single-use key package for ``identity_key``."""

    @abstractmethod
    async def pop_key_package(self, identity_key: bytes) -> bytes | None:
        """Atomically remove and return the oldest key package, ``None`` when none is left."""

    @abstractmethod
    async def count_key_packages(self, identity_key: bytes) -> int: ...

    @abstractmethod
    async def set_hybrid_key(self, identity_key: bytes, public_key: bytes) -> None:
        """Store (replace) the identity's hybrid public key."""

    @abstractmethod
    async def get_hybrid_keys(self, identity_keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """Hybrid keys of the identities that have one."""

    # -- users, channels, sessions ------------------------------------------------------------
    @abstractmethod
    async def create_user(self, username: str, identity_key: bytes, *, now: float) -> None:
        """Bind username → identity key; :class:`AlreadyExists` when either is taken."""

    @abstractmethod
    async def get_user_by_name(self, username: str) -> UserRecord | None: ...

    @abstractmethod
    async def get_user_by_identity(self, identity_key: bytes) -> UserRecord | None: ...

    @abstractmethod
    async def create_channel(
        self, channel_id: bytes, members: Sequence[bytes], created_by: bytes, *, now: float
    ) -> bool:
        """Create a channel with these members; ``False`` if it existed, in which case only
        members it lacks are added (a member removed by DeleteAccount comes back when the
        same member set is created again; nothing is ever removed here)."""

    @abstractmethod
    async def channel_members(self, channel_id: bytes) -> list[bytes] | None:
        """Member identity keys, or ``None`` when no such channel was created."""

    @abstractmethod
    async def put_session(self, record: SessionRecord) -> None: ...

    @abstractmethod
    async def get_session(self, token_hash: bytes) -> SessionRecord | None: ...

    @abstractmethod
    async def delete_session(self, token_hash: bytes) -> bool: ...

    @abstractmethod
    async def purge_sessions(self, now: float) -> int:
        """Delete sessions that expired at or before ``now``."""

    @abstractmethod
    async def delete_account(self, identity_key: bytes) -> str | None:
        """In one transaction remove the identity's queues (every channel), dedup ids, key
        packages, hybrid key, channel memberships, sessions and user-directory entry.

        Returns the username that was bound (``None`` if none)."""

    # -- plugin key/value and append-only logs -------------------------------------------------
    @abstractmethod
    async def kv_get(self, namespace: str, key: bytes) -> bytes | None: ...

    @abstractmethod
    async def kv_put(self, namespace: str, key: bytes, value: bytes) -> None: ...

    @abstractmethod
    async def kv_put_if_absent(self, namespace: str, key: bytes, value: bytes) -> bytes:
        """Store ``value`` unless the key exists; return whichever value is stored."""

    @abstractmethod
    async def kv_delete(self, namespace: str, key: bytes) -> bool: ...

    @abstractmethod
    async def kv_scan(
        self, namespace: str, prefix: bytes = b"", limit: int = 0
    ) -> list[tuple[bytes, bytes]]:
        """Entries whose key starts with ``prefix``, in key order (``limit`` 0 = all)."""

    @abstractmethod
    async def log_append(
        self, log: str, entries: Sequence[bytes], *, expected_first: int | None = None,
        kv_puts: Sequence[tuple[str, bytes, bytes]] = (),
    ) -> int:
        """Append to the named append-only log; return the index of the first new entry.

        With ``expected_first``, the append happens only if the log has exactly that many
        entries, checked inside the writing transaction; otherwise :class:`LogMoved` and
        nothing is written (for writers whose entries depend on their position).

        ``kv_puts`` are ``(namespace, key, value)`` rows stored (as by :meth:`kv_put`) in
        the same transaction: with the entries, or not at all.  For indexes derived from the
        log that must never disagree with it, also across servers sharing the store.  With
        no entries and ``expected_first``, this is "write these rows if the log still has
        that size"."""

    @abstractmethod
    async def log_read(self, log: str, start: int, end: int) -> list[bytes]:
        """Entries ``start <= index < end`` (clamped to the log size)."""

    @abstractmethod
    async def log_size(self, log: str) -> int: ...

    async def log_read_many(self, log: str, indices: Sequence[int]) -> dict[int, bytes]:
        """Entries at the given (not necessarily contiguous) indices, as ``{index: entry}``.

        Indices outside the log are left out.  Backends should override this with a single
        query; this default reads one entry at a time."""
        out: dict[int, bytes] = {}
        for i in dict.fromkeys(indices):
            if i >= 0:
                got = await self.log_read(log, i, i + 1)
                if got:
                    out[i] = got[0]
        return out

    # -- copying between backends (``qpc store copy``; optional) ------------------------------
    def dump(self) -> AsyncIterator[Sequence[Record]]:
        """Every record of the store, in batches, in the order fixed by
        :mod:`qpc_core.storage.records`, consistent at least while nothing else writes
        (``qpc store copy`` makes sure of that for a file store).  Optional: a backend
        without it cannot be copied from."""
        raise StorageError(f"the {self.name} store cannot be copied from (no dump support)")

    async def load(self, batches: AsyncIterable[Sequence[Record]]) -> None:
        """Write every record of ``batches`` into this store, which must be empty, and
        rebuild derived state (inbox depths, log sizes).  All or nothing where the backend
        can: a failed load leaves the store empty.  Optional."""
        raise StorageError(f"the {self.name} store cannot be copied into (no load support)")

    async def is_empty(self) -> bool:
        """True when the store holds no record at all (see ``load``).  Optional."""
        raise StorageError(f"the {self.name} store cannot be copied into (no load support)")
