"""Portable records: every row a store holds, in a backend-neutral form.

``qpc store copy`` moves a whole store from one backend to another (the scaling guide's
"migrate from SQLCipher to a shared PostgreSQL instance") through two optional
:class:`~qpc_core.storage.base.Storage` methods: ``dump`` yields these records in batches,
``load`` writes them into an empty store.  Derived state is not a record: each backend
rebuilds it in ``load`` (inbox depths from the messages, log sizes from the entries, key
package ids from the order).

The dump order is fixed (``RECORD_TYPES`` order, then each type's key order as documented
on the class), so two stores holding the same data produce the same sequence, and
:func:`copy_store` can verify a copy by comparing digests of both dumps.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING

from qpc_core.errors import StorageError
from qpc_core.storage.base import SessionRecord, UserRecord

if TYPE_CHECKING:
    from qpc_core.storage.base import Storage

log = logging.getLogger("qpc.storage")

#: Records per batch a backend's ``dump`` should yield (a hint, not a limit).
DUMP_BATCH = 1000


@dataclass(frozen=True, slots=True)
class HybridKeyRecord:
    """Ordered by identity_key."""

    identity_key: bytes
    public_key: bytes


@dataclass(frozen=True, slots=True)
class KeyPackageRecord:
    """Ordered by identity_key, then upload order (the FIFO order FetchKeyPackage pops)."""

    identity_key: bytes
    package: bytes
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """Ordered by channel_id."""

    channel_id: bytes
    created_by: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class ChannelMemberRecord:
    """Ordered by channel_id, identity_key; always after every ChannelRecord."""

    channel_id: bytes
    identity_key: bytes


@dataclass(frozen=True, slots=True)
class InboxRecord:
    """Ordered by recipient_key, channel_id.  ``next_seq`` is the seq the inbox's next
    message gets: copying it keeps seqs increasing across the move even for an inbox whose
    messages were all fetched."""

    recipient_key: bytes
    channel_id: bytes
    next_seq: int


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """Ordered by recipient_key, channel_id, seq."""

    recipient_key: bytes
    channel_id: bytes
    seq: int
    payload: bytes
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class DedupRecord:
    """Ordered by recipient_key, channel_id, message_id."""

    recipient_key: bytes
    channel_id: bytes
    message_id: bytes
    seq: int
    created_at: float


@dataclass(frozen=True, slots=True)
class KvRecord:
    """Ordered by namespace (UTF-8 bytes), key."""

    namespace: str
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class LogRecord:
    """Ordered by log (UTF-8 bytes), idx."""

    log: str
    idx: int
    entry: bytes


Record = (
    UserRecord | SessionRecord | HybridKeyRecord | KeyPackageRecord | ChannelRecord
    | ChannelMemberRecord | InboxRecord | MessageRecord | DedupRecord | KvRecord | LogRecord
)

#: Every record type, in dump (and load) order.  UserRecord is ordered by username (UTF-8
#: bytes), SessionRecord by token_hash.
RECORD_TYPES: tuple[type[Record], ...] = (
    UserRecord, SessionRecord, HybridKeyRecord, KeyPackageRecord, ChannelRecord,
    ChannelMemberRecord, InboxRecord, MessageRecord, DedupRecord, KvRecord, LogRecord,
)

# UserRecord -> "user", KeyPackageRecord -> "key_package", ...
_KIND = {
    t: re.sub(r"(?<!^)(?=[A-Z])", "_", t.__name__.removesuffix("Record")).lower()
    for t in RECORD_TYPES
}


def kind(record: Record) -> str:
    """Short name of a record's type (``user``, ``message``, ...)."""
    return _KIND[type(record)]


def kind_name(record_type: type[Record]) -> str:
    """Short name of a record type (``user``, ``message``, ...)."""
    return _KIND[record_type]


def _encode_field(value: object) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bytes):
        return b"B" + struct.pack(">I", len(value)) + value
    if isinstance(value, str):
        raw = value.encode()
        return b"S" + struct.pack(">I", len(raw)) + raw
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"unexpected field type {type(value).__name__}")
    if isinstance(value, int):
        return b"I" + struct.pack(">q", value)
    return b"F" + struct.pack(">d", value)


def encode_record(record: Record) -> bytes:
    """Canonical bytes of one record (type and every field, length-prefixed)."""
    name = kind(record).encode()
    return bytes((len(name),)) + name + b"".join(_encode_field(v) for v in astuple(record))


class Tally:
    """Counts per record kind and a running SHA-256 over the records' canonical bytes."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._hash = hashlib.sha256()

    def add(self, records: Sequence[Record]) -> None:
        for r in records:
            self.counts[kind(r)] += 1
            self._hash.update(encode_record(r))

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def check_order(batches: AsyncIterable[Sequence[Record]]) -> AsyncIterator[Sequence[Record]]:
    """Pass ``batches`` through, failing if record types come out of ``RECORD_TYPES`` order
    (a backend bug that would break foreign keys on load)."""
    rank = {t: i for i, t in enumerate(RECORD_TYPES)}

    async def gen() -> AsyncIterator[Sequence[Record]]:
        last = 0
        async for batch in batches:
            for r in batch:
                i = rank[type(r)]
                if i < last:
                    raise StorageError(f"dump yielded a {kind(r)} record after later types")
                last = i
            yield batch

    return gen()


@dataclass
class CopyReport:
    counts: dict[str, int]
    digest: str
    seconds: float
    verified: bool
    per_kind: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def tally(store: Storage) -> Tally:
    """Counts and digest of everything ``store`` holds (reads the whole store)."""
    t = Tally()
    async for batch in store.dump():
        t.add(batch)
    return t


async def copy_store(
    source: Storage, target: Storage, *, verify: bool = True,
    progress: Callable[[Tally], None] | None = None,
) -> CopyReport:
    """Copy every record of ``source`` into the empty ``target``.

    The target must be empty (:class:`StorageError` otherwise, nothing written).  With
    ``verify`` the target is read back afterwards and its digest compared with the
    source's: a mismatch is a :class:`StorageError` (the loaded records stay in the
    target).  ``progress`` is called after each batch with the running tally."""
    if not await target.is_empty():
        raise StorageError(
            f"the target {target.name} store is not empty: copy only into a new, empty store"
        )
    t0 = time.monotonic()
    src = Tally()
    dump = source.dump()
    ordered = check_order(dump)

    async def counting() -> AsyncIterator[Sequence[Record]]:
        async for batch in ordered:
            src.add(batch)
            if progress is not None:
                progress(src)
            yield batch

    counted = counting()
    try:
        await target.load(counted)
    finally:
        # A load that stopped early leaves the generators suspended; close them now, so the
        # source's snapshot (a pooled connection, a transaction) is released before the
        # caller closes the source, not whenever they are garbage-collected.
        for gen in (counted, ordered, dump):
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # never hide the load's own outcome behind a cleanup error
                    log.warning("closing the %s store's dump failed", source.name,
                                exc_info=True)
    if verify:
        dst = await tally(target)
        if dst.digest != src.digest or dst.counts != src.counts:
            raise StorageError(
                "the copy differs from the source (source "
                f"{dict(sorted(src.counts.items()))}, target {dict(sorted(dst.counts.items()))})"
                f"; the target holds the copy: empty it (or use a new one) before copying again"
            )
    return CopyReport(
        counts=dict(src.counts), digest=src.digest, seconds=time.monotonic() - t0,
        verified=verify,
        per_kind=[(kind_name(t), src.counts.get(kind_name(t), 0)) for t in RECORD_TYPES],
    )


__all__ = [
    "DUMP_BATCH",
    "RECORD_TYPES",
    "ChannelMemberRecord",
    "ChannelRecord",
    "CopyReport",
    "DedupRecord",
    "HybridKeyRecord",
    "InboxRecord",
    "KeyPackageRecord",
    "KvRecord",
    "LogRecord",
    "MessageRecord",
    "Record",
    "SessionRecord",
    "Tally",
    "UserRecord",
    "check_order",
    "copy_store",
    "encode_record",
    "kind",
    "kind_name",
    "tally",
]
