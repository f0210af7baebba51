"""The Merkle tree persisted through the storage interface, one log entry per leaf.

Layout: storage log ``kt_log``, entry ``i`` = leaf ``i``'s record plus the hashes of the
nodes completed by appending it (:func:`~qpc_kt_log.merkle.nodes_completed_by`), encoded by
:func:`~qpc_kt_log.records.encode_entry`.  Node ``(level, index)`` therefore lives in entry
:func:`~qpc_kt_log.merkle.completing_leaf` ``(level, index)`` at position ``level``.

* **Appends** compute the new entries from an in-memory :class:`~qpc_kt_log.merkle.Frontier`
  (no reads) and write them with one ``log_append``, i.e. one transaction: a leaf and its
  nodes become visible together or not at all.  Even a backend that kept only a prefix of a
  multi-entry append would leave a valid tree, since entry ``i`` depends only on leaves
  ``<= i``.
* **Proofs** plan the ``(level, index)`` nodes they need (O(log n)), fetch the entries that
  hold them with one ``log_read_many`` and compute.  Nothing reads whole levels or the log.
  Stored nodes never change, so a bounded LRU cache (``cache_nodes``) keeps recently read
  ones: the upper levels, shared by every proof, are then rarely read again.

Not safe for concurrent appends within a process: the caller serialises them (the service
holds one lock).  Other processes may append to the same log (servers sharing a store):
appends pass ``expected_first``, so a write built for a stale size is refused without
writing (:class:`~qpc_core.storage.base.LogMoved`), and :meth:`KtTreeStore.refresh` takes
in what others appended after checking it extends what this process holds.
An append is **cancellation-safe**: once its ``log_append`` is queued it is not abandoned.  If
the awaiting task is cancelled (a client resets its stream), :meth:`KtTreeStore.append` still
waits for the write to finish, takes the in-memory frontier from what was committed and only
then re-raises :class:`asyncio.CancelledError`, so the caller's lock is not released while a
write built from the current frontier is still queued.

Start-up (:meth:`KtTreeStore.load`) replays the newest ``verify_tail`` entries from the stored
frontier before them and checks that each entry holds exactly the nodes its append completes,
and that the result is the stored frontier: an entry written at the wrong index (the corruption
a stale frontier would cause) refuses to load.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from qpc_core.errors import StorageError
from qpc_core.storage.base import LogMoved, Storage
from qpc_kt_log.merkle import (
    Frontier,
    MissingNodeError,
    NodeId,
    ProofPlan,
    completing_leaf,
    frontier_ids,
    plan_consistency,
    plan_inclusion,
    plan_root,
)
from qpc_kt_log.records import (
    CorruptEntry,
    LeafRecord,
    decode_entry,
    encode_entry,
    entry_hashes,
)

log = logging.getLogger("qpc.kt_log")
LOG_NAME = "kt_log"
DEFAULT_CACHE_NODES = 16_384  # ~4 MB: every node from level 7 up at 10^6 leaves
DEFAULT_VERIFY_TAIL = 64  # newest entries replayed by load(): one extra read of ~10 KB

T = TypeVar("T")


class CorruptLog(StorageError):
    """The stored log's content is wrong (not a failed read): entries that do not decode or
    do not hold the nodes their append completes, missing nodes, a frontier that does not
    match."""


async def finish_despite_cancellation(fut: asyncio.Future[T]) -> T:
    """Await ``fut`` without ever cancelling it.

    If the calling task is cancelled meanwhile, keep waiting until ``fut`` is done and then
    re-raise the :class:`asyncio.CancelledError` (``fut``'s outcome is then known: read it
    with ``fut.result()``).  Otherwise return ``fut``'s result (or raise its exception)."""
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait((fut,))
        except asyncio.CancelledError as e:  # our caller, not fut: keep waiting
            cancelled = e
    if cancelled is not None:
        raise cancelled
    return fut.result()


@dataclass(frozen=True, slots=True)
class StoredEntry:
    index: int
    record: LeafRecord
    leaf_hash: bytes  # as stored (hashes[0])


@dataclass(slots=True)
class ReadStats:
    """Counters for benchmarks and tests: what proofs cost in storage reads."""

    batches: int = 0  # log_read_many calls (storage round trips)
    nodes: int = 0  # (level, index) nodes requested
    fetched: int = 0  # of those, not in the cache: read from storage
    entries: int = 0  # distinct log entries read

    def snapshot(self) -> tuple[int, int, int, int]:
        return (self.batches, self.nodes, self.fetched, self.entries)


class KtTreeStore:
    """An append-only RFC 9162 Merkle log on top of :class:`~qpc_core.storage.base.Storage`.

    Call :meth:`load` once before use.  Implements
    :class:`~qpc_kt_log.merkle.AsyncNodeSource` (``get_nodes``).
    """

    def __init__(self, storage: Storage, log_name: str = LOG_NAME, *,
                 cache_nodes: int = DEFAULT_CACHE_NODES,
                 verify_tail: int = DEFAULT_VERIFY_TAIL) -> None:
        if cache_nodes < 0:
            raise ValueError("cache_nodes must not be negative")
        if verify_tail < 1:
            raise ValueError("verify_tail must be at least 1")
        self._storage = storage
        self._log = log_name
        self._verify_tail = verify_tail
        self._frontier = Frontier()
        self._loaded = False
        self._stale = False
        self._broken: str | None = None  # set when a write landed at the wrong index
        self._cache: OrderedDict[NodeId, bytes] = OrderedDict()
        self._cache_max = cache_nodes
        self.stats = ReadStats()

    @property
    def log_name(self) -> str:
        return self._log

    @property
    def broken(self) -> str | None:
        """Why this store refuses to append (the stored log was rewritten), or None."""
        return self._broken

    @property
    def stale(self) -> bool:
        """An append's outcome is unknown (or nothing loaded yet): reload before use."""
        return self._stale or not self._loaded

    @property
    def size(self) -> int:
        """Number of leaves committed (as far as this process knows)."""
        return self._frontier.size

    def root(self) -> bytes:
        """Root hash of the whole committed tree (from memory, no reads)."""
        return self._frontier.root()

    async def load(self) -> None:
        """Read the size and the O(log n) frontier nodes, and check the newest entries.

        The newest ``verify_tail`` entries are replayed on top of the stored frontier before
        them: each must decode, its stored leaf hash must match its record, it must hold
        exactly the nodes appending its leaf completes, and the replay must end at the stored
        frontier.  Three storage reads in all.  :class:`StorageError` when the log is
        corrupt."""
        size = await self._storage.log_size(self._log)
        start = max(0, size - self._verify_tail)
        try:
            nodes = await self.get_nodes(list(dict.fromkeys(
                [*frontier_ids(start), *frontier_ids(size)])))
            base = Frontier.from_nodes(start, nodes)
            frontier = Frontier.from_nodes(size, nodes)
        except (MissingNodeError, CorruptEntry) as e:
            raise CorruptLog(f"kt_log: the stored Merkle log is corrupt: {e}") from e
        self._replay(base, await self._read_raw_entries(start, size), size)
        if base.peaks != frontier.peaks:
            raise CorruptLog(
                "kt_log: the stored Merkle log is corrupt: replaying the newest entries does "
                f"not give the stored frontier of size {size}")
        self._frontier = frontier
        self._loaded = True
        self._stale = False

    async def ensure_current(self) -> None:
        """Reload after an append whose outcome is unknown (cancelled or failed), checked
        like :meth:`refresh`."""
        if self._stale or not self._loaded:
            await self.refresh()

    # -- writing ---------------------------------------------------------------------------
    async def append(
        self, records: Sequence[LeafRecord], *,
        rows: Callable[[int], Sequence[tuple[str, bytes, bytes]]] | None = None,
    ) -> range:
        """Append ``records`` (one transaction); return their leaf indices.

        ``rows(first)`` gives kv rows (namespace, key, value) to store in the same
        transaction, for the leaves' indices from ``first``.  The entries are built for the
        size this process knows; if another writer (a server sharing the store) appended
        since, :class:`~qpc_core.storage.base.LogMoved` is raised and nothing was written:
        call :meth:`refresh`, check again what to append, and retry.

        Callers serialise appends.  Cancellation-safe: if the calling task is cancelled
        while the write is queued or committing, this still waits for the write to finish,
        adopts what it committed, and only then re-raises :class:`asyncio.CancelledError`
        (so a caller holding a lock keeps it until the log's size is known again).  If the
        write itself fails or is cancelled its outcome is unknown, so the store marks itself
        stale and reloads before the next append."""
        if self._broken is not None:
            raise StorageError(self._broken)
        await self.ensure_current()
        frontier = self._frontier.copy()
        entries = [
            encode_entry(r, [h for _level, _index, h in frontier.append(r.leaf_hash)])
            for r in records
        ]
        expected = self._frontier.size
        if not entries:
            return range(expected, expected)
        kv_puts = list(rows(expected)) if rows is not None else []
        self._stale = True  # until the write's outcome is known
        # The storage refuses the write (LogMoved, nothing written) unless the log still has
        # exactly the size these entries were built for.
        write = asyncio.ensure_future(self._storage.log_append(
            self._log, entries, expected_first=expected, kv_puts=kv_puts))
        try:
            first = await finish_despite_cancellation(write)
        except asyncio.CancelledError:
            # Either our caller was cancelled (the write has finished by now: adopt what it
            # committed) or the write itself was (outcome unknown: stay stale).
            if write.done() and not write.cancelled() and write.exception() is None:
                self._adopt(write.result(), expected, frontier)
            elif write.done() and not write.cancelled() and isinstance(write.exception(),
                                                                      LogMoved):
                self._stale = False  # nothing was written
            raise
        except LogMoved:
            self._stale = False  # nothing was written; what this process knows still holds
            raise
        if not self._adopt(first, expected, frontier):
            raise StorageError(
                f"kt_log: the log grew behind this process's back (expected index {expected}, "
                f"got {first}); is another server writing the same database?"
            )
        return range(first, first + len(entries))

    async def write_rows_if_unmoved(self, rows: Sequence[tuple[str, bytes, bytes]]) -> None:
        """Store kv ``rows`` only if the log still has the size this process knows
        (:class:`~qpc_core.storage.base.LogMoved` otherwise, nothing written): for indexes
        rebuilt from the log, which must not overwrite rows a newer append wrote."""
        await finish_despite_cancellation(asyncio.ensure_future(self._storage.log_append(
            self._log, [], expected_first=self.size, kv_puts=rows)))

    async def refresh(self) -> bool:
        """Take in what other writers appended (servers sharing the store); True if the
        log grew.

        The new entries are checked against what this process already holds: replayed on
        top of its frontier (each must hold exactly the nodes its append completes), or,
        after more than ``verify_tail`` of them, the whole frontier is loaded again and the
        stored tree must have this process's root at its old size.  So a log that another
        writer rewrote is refused (:class:`StorageError`), never adopted: this process never
        signs a head that does not extend the ones it signed before.  Callers serialise it
        with their appends."""
        if self._broken is not None:
            raise StorageError(self._broken)
        if not self._loaded:
            await self.load()
            return True
        # After an append whose outcome is unknown the frontier is still the last one known
        # committed: the stored log must extend it like any other.
        size = await self._storage.log_size(self._log)
        old_size = self.size
        if size < old_size:
            raise self._refuse(f"kt_log: the stored log shrank from {old_size} to {size} "
                               "entries: it was truncated or replaced")
        if size == old_size and not self._stale:
            return False
        old_root = self.root()
        if size - old_size <= self._verify_tail and not self._stale:
            frontier = self._frontier.copy()
            tail = await self._read_raw_entries(old_size, size)
            try:
                self._replay(frontier, tail, size)
            except CorruptLog as e:
                raise self._refuse(str(e)) from e
            self._frontier = frontier
            return True
        kept, kept_stale = self._frontier, self._stale
        try:
            await self.load()
            extends = await self.root_at(old_size) == old_root
        except BaseException as e:
            # Not adopted: keep what this process held, without any node read meanwhile.
            # A read that failed is checked again later; a corrupt log is refused for good.
            self._frontier, self._stale = kept, kept_stale
            self._cache.clear()
            if isinstance(e, CorruptLog):
                raise self._refuse(str(e)) from e
            raise
        if not extends:
            # Refused, not adopted: back to the tree this process held, without any node
            # read from the rewritten log, and no append on top of it.
            self._frontier, self._stale = kept, kept_stale
            self._cache.clear()
            raise self._refuse(f"kt_log: the stored log does not extend the tree of size "
                               f"{old_size} this server held: it was rewritten")
        return size != old_size

    def _refuse(self, reason: str) -> StorageError:
        """Refuse the stored log for good (no append, no refresh): it contradicts the tree
        this process held.  Returns the error to raise."""
        if self._broken is None:
            log.critical("%s", reason)
            self._broken = reason
        return StorageError(self._broken)

    def _replay(self, base: Frontier,
                tail: Sequence[tuple[int, LeafRecord, list[bytes]]], size: int) -> None:
        """Append ``tail``'s leaves to ``base``, checking each entry's stored hashes."""
        if len(tail) != size - base.size:
            raise CorruptLog(f"kt_log: the stored Merkle log is corrupt: {size} entries "
                               f"reported, {base.size + len(tail)} readable")
        for index, record, hashes in tail:
            if record.leaf_hash != hashes[0]:
                raise CorruptLog(
                    f"kt_log: entry {index}: stored leaf hash does not match its record")
            replayed = [h for _level, _index, h in base.append(record.leaf_hash)]
            if replayed != hashes:
                raise CorruptLog(
                    f"kt_log: the stored Merkle log is corrupt: entry {index} does not hold "
                    "the nodes its append completes (was it written at the wrong index?)")

    def _adopt(self, first: int, expected: int, frontier: Frontier) -> bool:
        """Take ``frontier`` as committed if the write landed at the index it was built for.

        False otherwise: entries built for index ``expected`` now sit at ``first``, so the
        log is corrupt from there on (:meth:`load` refuses it); this store then refuses every
        later append."""
        if first != expected:
            self._broken = (f"kt_log: entries built for index {expected} were stored at index "
                            f"{first}: the stored log is corrupt from there on; refusing to "
                            "append")
            log.critical("%s", self._broken)
            return False
        self._frontier = frontier
        self._stale = False
        return True

    # -- reading ---------------------------------------------------------------------------
    async def get_nodes(self, ids: Sequence[NodeId]) -> Mapping[NodeId, bytes]:
        """Stored hashes of ``ids``: cached ones from memory, the rest with one
        ``log_read_many`` (none if all are cached).  Absent nodes are left out."""
        out: dict[NodeId, bytes] = {}
        cache = self._cache
        by_entry: dict[int, list[NodeId]] = {}
        for node in ids:
            value = cache.get(node)
            if value is not None:
                cache.move_to_end(node)
                out[node] = value
            else:
                by_entry.setdefault(completing_leaf(*node), []).append(node)
        self.stats.nodes += len(ids)
        if not by_entry:
            return out
        self.stats.batches += 1
        self.stats.fetched += sum(len(v) for v in by_entry.values())
        self.stats.entries += len(by_entry)
        raw = await self._storage.log_read_many(self._log, list(by_entry))
        for leaf, wanted in by_entry.items():
            data = raw.get(leaf)
            if data is None:
                continue
            hashes = entry_hashes(data)
            for node in wanted:
                if node[0] < len(hashes):
                    out[node] = hashes[node[0]]
                    if self._cache_max:
                        cache[node] = hashes[node[0]]
        while len(cache) > self._cache_max:
            cache.popitem(last=False)
        return out

    async def _run(self, plan: ProofPlan) -> list[bytes]:
        nodes = await self.get_nodes(plan.nodes) if plan.nodes else {}
        try:
            return plan.evaluate(nodes)
        except MissingNodeError as e:
            raise CorruptLog(f"kt_log: the stored Merkle log is corrupt: {e}") from e

    def _check_size(self, size: int, what: str = "size") -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"{what} {size} is beyond the tree size {self.size}")

    async def root_at(self, size: int) -> bytes:
        """Root of the first ``size`` leaves (O(log n) reads; none for the current size)."""
        self._check_size(size)
        if size == self.size:
            return self.root()
        (root,) = await self._run(plan_root(size))
        return root

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 audit path of leaf ``index`` in the tree of ``size`` leaves."""
        self._check_size(size)
        return await self._run(plan_inclusion(index, size))

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof from ``old_size`` to ``new_size`` leaves."""
        self._check_size(new_size, "new_size")
        return await self._run(plan_consistency(old_size, new_size))

    async def _read_raw_entries(self, start: int, end: int
                                ) -> list[tuple[int, LeafRecord, list[bytes]]]:
        raw = await self._storage.log_read(self._log, start, end)
        out: list[tuple[int, LeafRecord, list[bytes]]] = []
        for offset, data in enumerate(raw):
            index = max(start, 0) + offset
            try:
                record, hashes = decode_entry(data)
            except CorruptEntry as e:
                raise CorruptLog(f"kt_log: entry {index} is corrupt: {e}") from e
            out.append((index, record, hashes))
        return out

    async def read_entries(self, start: int, end: int) -> list[StoredEntry]:
        """Decoded entries ``start <= index < end`` (clamped to the log)."""
        return [StoredEntry(index, record, hashes[0])
                for index, record, hashes in await self._read_raw_entries(start, end)]
