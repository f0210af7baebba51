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

Not safe for concurrent appends: the caller serialises them (the service holds one lock).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qpc_core.errors import StorageError
from qpc_core.storage.base import Storage
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
                 cache_nodes: int = DEFAULT_CACHE_NODES) -> None:
        if cache_nodes < 0:
            raise ValueError("cache_nodes must not be negative")
        self._storage = storage
        self._log = log_name
        self._frontier = Frontier()
        self._loaded = False
        self._stale = False
        self._cache: OrderedDict[NodeId, bytes] = OrderedDict()
        self._cache_max = cache_nodes
        self.stats = ReadStats()

    @property
    def size(self) -> int:
        """Number of leaves committed (as far as this process knows)."""
        return self._frontier.size

    def root(self) -> bytes:
        """Root hash of the whole committed tree (from memory, no reads)."""
        return self._frontier.root()

    async def load(self) -> None:
        """Read the size and the O(log n) frontier nodes; check the newest entry decodes and
        its stored leaf hash matches its record.  :class:`StorageError` when the log is
        corrupt."""
        size = await self._storage.log_size(self._log)
        ids = frontier_ids(size)
        try:
            nodes = await self.get_nodes(ids)
            frontier = Frontier.from_nodes(size, nodes)
        except (MissingNodeError, CorruptEntry) as e:
            raise StorageError(f"kt_log: the stored Merkle log is corrupt: {e}") from e
        if size:
            (last,) = await self.read_entries(size - 1, size)
            if last.record.leaf_hash != last.leaf_hash:
                raise StorageError(
                    f"kt_log: entry {size - 1}: stored leaf hash does not match its record"
                )
        self._frontier = frontier
        self._loaded = True
        self._stale = False

    async def ensure_current(self) -> None:
        """Reload after an append whose outcome is unknown (cancelled or failed)."""
        if self._stale or not self._loaded:
            await self.load()

    # -- writing ---------------------------------------------------------------------------
    async def append(self, records: Sequence[LeafRecord]) -> range:
        """Append ``records`` (one transaction); return their leaf indices.

        Callers serialise appends.  If the write fails or is cancelled its outcome is
        unknown, so the store marks itself stale and reloads before the next append."""
        await self.ensure_current()
        frontier = self._frontier.copy()
        entries = [
            encode_entry(r, [h for _level, _index, h in frontier.append(r.leaf_hash)])
            for r in records
        ]
        if not entries:
            return range(frontier.size, frontier.size)
        expected = self._frontier.size
        try:
            first = await self._storage.log_append(self._log, entries)
        except BaseException:
            self._stale = True
            raise
        if first != expected:
            self._stale = True
            raise StorageError(
                f"kt_log: the log grew behind this process's back (expected index {expected}, "
                f"got {first}); is another server writing the same database?"
            )
        self._frontier = frontier
        return range(first, first + len(entries))

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
            raise StorageError(f"kt_log: the stored Merkle log is corrupt: {e}") from e

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

    async def read_entries(self, start: int, end: int) -> list[StoredEntry]:
        """Decoded entries ``start <= index < end`` (clamped to the log)."""
        raw = await self._storage.log_read(self._log, start, end)
        out: list[StoredEntry] = []
        for offset, data in enumerate(raw):
            index = max(start, 0) + offset
            try:
                record, hashes = decode_entry(data)
            except CorruptEntry as e:
                raise StorageError(f"kt_log: entry {index} is corrupt: {e}") from e
            out.append(StoredEntry(index, record, hashes[0]))
        return out
