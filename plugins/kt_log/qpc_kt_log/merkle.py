"""RFC 9162 (Certificate Transparency v2) style Merkle tree for the key-transparency log.

Tree shape (RFC 9162 section 2.1.1)::

    MTH({})       = SHA-256()                                   (empty tree)
    MTH({d0})     = leaf_hash(d0)                               (computed by the caller)
    MTH(D[n])     = node_hash(MTH(D[0:k]), MTH(D[k:n]))         k = largest power of 2 < n
    node_hash(l, r) = SHA-256(0x01 || l || r)

Leaf hashes are supplied by callers (see :func:`rfc6962_leaf_hash`,
:func:`binding_leaf_hash` and :func:`revocation_leaf_hash`); this module only ever combines
32-byte hashes with :func:`node_hash`.

Storage model
-------------
A :class:`NodeStore` holds the hash of every *complete* perfect subtree: the node at
``(level, index)`` covers leaves ``[index * 2**level, (index + 1) * 2**level)`` and is
written as soon as its last leaf is appended. Level 0 holds the leaf hashes themselves.
Every append writes the leaf plus each ancestor completed by it (amortised O(1), worst case
O(log n) writes), in a single :meth:`NodeStore.put_many` call.

Any aligned range ``[i * 2**k, (i + 1) * 2**k)`` is therefore a single stored node, and any
RFC-shaped range (a prefix, or a right-hand subtree reached while walking down from a root)
decomposes into at most ``log2(n) + 1`` stored nodes. As a result :meth:`MerkleLog.root`,
:meth:`MerkleLog.inclusion_proof` and :meth:`MerkleLog.consistency_proof` read
O(log n) stored hashes, never whole levels.

Asynchronous stores
-------------------
:class:`NodeStore` is synchronous. For a database behind an event loop, plan first and read
once: :func:`plan_root`, :func:`plan_inclusion` and :func:`plan_consistency` return a
:class:`ProofPlan` listing the exact ``(level, index)`` nodes the answer needs (computed from
the sizes alone, since the tree's shape does not depend on its contents); fetch them in one
batch and call :meth:`ProofPlan.evaluate` (or let :func:`run_plan` do both through an
:class:`AsyncNodeSource`). :class:`Frontier` keeps the O(log n) peak hashes in memory so that
appends and the current root need no reads at all; :func:`nodes_completed_by` /
:func:`completing_leaf` say which nodes an append completes, which lets a store keep a leaf and
the nodes it completes in one record.

Verification
------------
:func:`verify_inclusion`, :func:`root_from_inclusion` and :func:`verify_consistency` are pure
functions following RFC 9162 sections 2.1.3.2 and 2.1.4.2. They never raise: any malformed
input (wrong types, wrong hash lengths, ``index >= size``, wrong proof length, ...) yields
``False`` / ``None``.

Note that a proof on its own does not bind the tree size: for some size pairs the same proof
evaluates identically (e.g. the inclusion proof for leaf 0 in a tree of 7 leaves is also a
well-formed path for leaf 0 in a tree of 8 leaves). Clients must take ``size`` and ``root``
together from an authenticated (signed) tree head, never from the party supplying the proof.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "AsyncNodeSource",
    "Frontier",
    "MemoryNodeStore",
    "MerkleLog",
    "MissingNodeError",
    "NodeId",
    "NodeStore",
    "ProofPlan",
    "binding_leaf_hash",
    "completing_leaf",
    "compute_root",
    "consistency_ranges",
    "frontier_ids",
    "inclusion_ranges",
    "node_hash",
    "nodes_completed_by",
    "plan_consistency",
    "plan_inclusion",
    "plan_root",
    "range_hash_from",
    "range_nodes",
    "revocation_leaf_hash",
    "rfc6962_leaf_hash",
    "root_from_inclusion",
    "run_plan",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Length in bytes of every leaf, node and root hash (SHA-256)."""

EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()
"""Root hash of the empty tree (RFC 9162: the hash of the empty string)."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_REVOCATION_PREFIX = b"\x02"


# ---------------------------------------------------------------------------
# Hash helpers
# ---------------------------------------------------------------------------


def node_hash(left: bytes, right: bytes) -> bytes:
    """Interior node hash: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def rfc6962_leaf_hash(data: bytes) -> bytes:
    """Plain RFC 6962 / RFC 9162 leaf hash: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def binding_leaf_hash(username: str | bytes, identity_key: bytes) -> bytes:
    """Leaf hash binding a username to an identity key.

    ``SHA-256(0x00 || SHA-256(username_utf8 || 0x00 || identity_key))``.

    The username is encoded as UTF-8 without any normalisation (callers must canonicalise it
    first). A username containing a NUL byte is rejected with :class:`ValueError`, since it
    would make the ``username || 0x00 || key`` encoding ambiguous.
    """
    name = username.encode("utf-8") if isinstance(username, str) else bytes(username)
    if b"\x00" in name:
        raise ValueError("username must not contain NUL bytes")
    inner = hashlib.sha256(name + b"\x00" + bytes(identity_key)).digest()
    return hashlib.sha256(_LEAF_PREFIX + inner).digest()


def revocation_leaf_hash(identity_key: bytes, reason: str) -> bytes:
    """Leaf hash recording the revocation of an identity key.

    ``SHA-256(0x02 || SHA-256(identity_key || 0x00 || reason_utf8))``.

    The 0x02 prefix keeps revocation leaves distinct from binding leaves and interior nodes.
    The encoding is only unambiguous when all identity keys have the same length (as is the
    case for a fixed key algorithm).
    """
    inner = hashlib.sha256(bytes(identity_key) + b"\x00" + reason.encode("utf-8")).digest()
    return hashlib.sha256(_REVOCATION_PREFIX + inner).digest()


def _largest_pow2_below(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (requires ``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def compute_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Reference MTH of a full list of leaf hashes (straight recursion on RFC 9162 2.1.1)."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return bytes(leaf_hashes[0])
    k = _largest_pow2_below(n)
    return node_hash(compute_root(leaf_hashes[:k]), compute_root(leaf_hashes[k:]))


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


@runtime_checkable
class NodeStore(Protocol):
    """Storage of complete perfect-subtree hashes, keyed by ``(level, index)``.

    Contract:

    * ``get(level, index)`` returns the stored 32-byte hash, or ``None`` if absent.
    * ``put_many(items)`` stores ``(level, index, hash)`` triples. It must be atomic (all or
      nothing), because :class:`MerkleLog` writes a leaf and the ancestors it completes in one
      call; a crash between them would leave the tree unreadable.
    * ``size()`` is the number of leaves, i.e. one more than the highest stored level-0
      index (0 when empty). A database store can compute it as ``MAX(index) + 1`` over
      level-0 rows or keep a counter updated in the same transaction as ``put_many``.

    Writers must be serialised (one appender at a time); :class:`MerkleLog` does no locking.
    """

    def get(self, level: int, index: int) -> bytes | None: ...

    def put_many(self, items: list[tuple[int, int, bytes]]) -> None: ...

    def size(self) -> int: ...


class MemoryNodeStore:
    """Dict-backed :class:`NodeStore`, for tests and ephemeral logs."""

    def __init__(self) -> None:
        self._nodes: dict[tuple[int, int], bytes] = {}
        self._size = 0

    def get(self, level: int, index: int) -> bytes | None:
        return self._nodes.get((level, index))

    def put_many(self, items: list[tuple[int, int, bytes]]) -> None:
        for level, index, value in items:
            self._nodes[(level, index)] = bytes(value)
            if level == 0 and index >= self._size:
                self._size = index + 1

    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        """Number of stored nodes (all levels)."""
        return len(self._nodes)


class MissingNodeError(LookupError):
    """A node that must exist (its subtree is complete) is absent from the store."""


# ---------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------


def _check_hash(value: bytes, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes")
    return bytes(value)


def _check_int(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int")
    return value


class MerkleLog:
    """Append-only RFC 9162 Merkle log on top of a :class:`NodeStore`.

    Not thread-safe: callers must serialise appends (reads may run concurrently with each
    other as long as the store allows it). Sizes and roots are always read from the store,
    so several :class:`MerkleLog` objects may share one store.
    """

    def __init__(self, store: NodeStore) -> None:
        self._store = store

    @property
    def store(self) -> NodeStore:
        return self._store

    @property
    def size(self) -> int:
        """Current number of leaves."""
        return self._store.size()

    # -- writing ---------------------------------------------------------

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash; returns its index."""
        return self.append_many([leaf_hash])[0]

    def append_many(self, leaf_hashes: Iterable[bytes]) -> range:
        """Append several leaf hashes in one atomic ``put_many``; returns their indices."""
        leaves = [_check_hash(h, "leaf hash") for h in leaf_hashes]
        start = self._store.size()
        if not leaves:
            return range(start, start)
        pending: dict[tuple[int, int], bytes] = {}
        items: list[tuple[int, int, bytes]] = []
        for offset, leaf in enumerate(leaves):
            index = start + offset
            level, value = 0, leaf
            pending[(0, index)] = value
            items.append((0, index, value))
            # Each trailing 1 bit of `index` at this level means the node just written is a
            # right child that completes its parent.
            while index & 1:
                left = pending.get((level, index - 1))
                if left is None:
                    left = self._node(level, index - 1)
                value = node_hash(left, value)
                level += 1
                index >>= 1
                pending[(level, index)] = value
                items.append((level, index, value))
        self._store.put_many(items)
        return range(start, start + len(leaves))

    # -- reading ---------------------------------------------------------

    def leaf(self, index: int) -> bytes:
        """Stored leaf hash at ``index``."""
        _check_int(index, "index")
        if not 0 <= index < self._store.size():
            raise IndexError(f"leaf index {index} out of range")
        return self._node(0, index)

    def root(self, size: int | None = None) -> bytes:
        """Root hash of the first ``size`` leaves (default: the whole log)."""
        current = self._store.size()
        if size is None:
            size = current
        _check_int(size, "size")
        if not 0 <= size <= current:
            raise ValueError(f"size {size} out of range [0, {current}]")
        return self._range_hash(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Audit path for leaf ``index`` in the tree of the first ``size`` leaves.

        RFC 9162 PATH(m, D[n]); ordered from the leaf's sibling up to the root's child.
        """
        _check_int(index, "index")
        _check_int(size, "size")
        current = self._store.size()
        if not 0 <= size <= current:
            raise ValueError(f"size {size} out of range [0, {current}]")
        if not 0 <= index < size:
            raise ValueError(f"index {index} out of range for size {size}")
        return [self._range_hash(lo, hi) for lo, hi in inclusion_ranges(index, size)]

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Consistency proof between the trees of ``old_size`` and ``new_size`` leaves.

        RFC 9162 PROOF(m, D[n]) for ``0 < m < n``. For ``old_size == 0`` or
        ``old_size == new_size`` the proof is empty (see :func:`verify_consistency`).
        """
        _check_int(old_size, "old_size")
        _check_int(new_size, "new_size")
        current = self._store.size()
        if not 0 <= new_size <= current:
            raise ValueError(f"new_size {new_size} out of range [0, {current}]")
        if not 0 <= old_size <= new_size:
            raise ValueError(f"old_size {old_size} out of range [0, {new_size}]")
        return [self._range_hash(lo, hi) for lo, hi in consistency_ranges(old_size, new_size)]

    # -- internals -------------------------------------------------------

    def _node(self, level: int, index: int) -> bytes:
        value = self._store.get(level, index)
        if value is None:
            raise MissingNodeError(f"missing Merkle node (level={level}, index={index})")
        return value

    def _range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) with the RFC shape rooted at ``start``.

        Reads one stored node per perfect aligned piece: for the ranges used by root() and
        the proofs (``start`` aligned to the largest power of two <= end - start) that is at
        most popcount(end - start) reads.
        """
        n = end - start
        if n <= 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            level = n.bit_length() - 1
            return self._node(level, start >> level)
        k = _largest_pow2_below(n)
        return node_hash(self._range_hash(start, start + k), self._range_hash(start + k, end))


# ---------------------------------------------------------------------------
# Proof shapes and batch planning (for asynchronous stores)
# ---------------------------------------------------------------------------

NodeId = tuple[int, int]
"""``(level, index)`` of a stored complete-subtree node."""

Range = tuple[int, int]
"""A half-open leaf range ``[start, end)``."""


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """Leaf ranges whose subtree hashes form RFC 9162 PATH(index, D[size]), bottom-up.

    Requires ``0 <= index < size`` (not checked here; see :func:`plan_inclusion`).
    """
    top_down: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_pow2_below(hi - lo)
        if index < lo + k:
            top_down.append((lo + k, hi))
            hi = lo + k
        else:
            top_down.append((lo, lo + k))
            lo += k
    top_down.reverse()
    return top_down


def consistency_ranges(old_size: int, new_size: int) -> list[Range]:
    """Leaf ranges whose subtree hashes form RFC 9162 PROOF(old_size, D[new_size]).

    Requires ``0 <= old_size <= new_size`` (not checked here); empty when ``old_size`` is 0 or
    equal to ``new_size``.
    """
    if old_size in (0, new_size):
        return []
    top_down: list[Range] = []
    lo, hi, m = 0, new_size, old_size
    complete_old_subtree = True  # the RFC's `b` flag
    while True:
        if m == hi - lo:
            if not complete_old_subtree:
                top_down.append((lo, hi))
            break
        k = _largest_pow2_below(hi - lo)
        if m <= k:
            top_down.append((lo + k, hi))
            hi = lo + k
        else:
            top_down.append((lo, lo + k))
            lo += k
            m -= k
            complete_old_subtree = False
    top_down.reverse()
    return top_down


def range_nodes(start: int, end: int) -> list[NodeId]:
    """Stored nodes whose hashes make up MTH(D[start:end]) (RFC shape rooted at ``start``).

    Left to right; one node per perfect aligned piece (popcount(end - start) of them for the
    ranges proofs use). Empty for an empty range.
    """
    out: list[NodeId] = []
    _range_nodes(start, end, out)
    return out


def _range_nodes(start: int, end: int, out: list[NodeId]) -> None:
    n = end - start
    if n <= 0:
        return
    if n & (n - 1) == 0 and start % n == 0:
        level = n.bit_length() - 1
        out.append((level, start >> level))
        return
    k = _largest_pow2_below(n)
    _range_nodes(start, start + k, out)
    _range_nodes(start + k, end, out)


def range_hash_from(start: int, end: int, nodes: Mapping[NodeId, bytes]) -> bytes:
    """MTH(D[start:end]) computed from already-fetched ``nodes`` (see :func:`range_nodes`).

    :class:`MissingNodeError` when a needed node is absent from ``nodes``.
    """
    n = end - start
    if n <= 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0 and start % n == 0:
        level = n.bit_length() - 1
        value = nodes.get((level, start >> level))
        if value is None:
            raise MissingNodeError(f"missing Merkle node (level={level}, index={start >> level})")
        return value
    k = _largest_pow2_below(n)
    return node_hash(
        range_hash_from(start, start + k, nodes), range_hash_from(start + k, end, nodes)
    )


@dataclass(frozen=True, slots=True)
class ProofPlan:
    """What a root or proof needs from storage, known before anything is read.

    ``ranges`` are the leaf ranges whose hashes form the result, in output order. ``nodes``
    lists every stored node they decompose into, deduplicated, in first-use order: at most
    ``2 * log2(size) + 2`` of them. Fetch ``nodes`` in one batch, then :meth:`evaluate`.
    """

    ranges: tuple[Range, ...]
    nodes: tuple[NodeId, ...]

    @classmethod
    def for_ranges(cls, ranges: Iterable[Range]) -> ProofPlan:
        rs = tuple(ranges)
        ids = dict.fromkeys(node for lo, hi in rs for node in range_nodes(lo, hi))
        return cls(rs, tuple(ids))

    def evaluate(self, nodes: Mapping[NodeId, bytes]) -> list[bytes]:
        """The hashes of :attr:`ranges`; :class:`MissingNodeError` if a node is absent."""
        return [range_hash_from(lo, hi, nodes) for lo, hi in self.ranges]


def plan_root(size: int) -> ProofPlan:
    """Plan for the root of the first ``size`` leaves (``evaluate`` returns ``[root]``)."""
    _check_int(size, "size")
    if size < 0:
        raise ValueError(f"size {size} must not be negative")
    return ProofPlan.for_ranges([(0, size)])


def plan_inclusion(index: int, size: int) -> ProofPlan:
    """Plan for the inclusion proof of leaf ``index`` in the tree of ``size`` leaves.

    The caller checks ``size`` against the stored tree; :class:`ValueError` unless
    ``0 <= index < size``.
    """
    _check_int(index, "index")
    _check_int(size, "size")
    if not 0 <= index < size:
        raise ValueError(f"index {index} out of range for size {size}")
    return ProofPlan.for_ranges(inclusion_ranges(index, size))


def plan_consistency(old_size: int, new_size: int) -> ProofPlan:
    """Plan for the consistency proof between trees of ``old_size`` and ``new_size`` leaves.

    The caller checks ``new_size`` against the stored tree; :class:`ValueError` unless
    ``0 <= old_size <= new_size``.
    """
    _check_int(old_size, "old_size")
    _check_int(new_size, "new_size")
    if not 0 <= old_size <= new_size:
        raise ValueError(f"old_size {old_size} out of range [0, {new_size}]")
    return ProofPlan.for_ranges(consistency_ranges(old_size, new_size))


@runtime_checkable
class AsyncNodeSource(Protocol):
    """An asynchronous node store that answers many ``(level, index)`` lookups at once.

    ``get_nodes`` returns the stored hashes of the requested nodes; absent ones are left out.
    """

    async def get_nodes(self, ids: Sequence[NodeId]) -> Mapping[NodeId, bytes]: ...


async def run_plan(plan: ProofPlan, source: AsyncNodeSource) -> list[bytes]:
    """Fetch ``plan.nodes`` with one ``get_nodes`` call, then evaluate the plan."""
    nodes = await source.get_nodes(plan.nodes) if plan.nodes else {}
    return plan.evaluate(nodes)


# ---------------------------------------------------------------------------
# Append frontier (compact range)
# ---------------------------------------------------------------------------


def completing_leaf(level: int, index: int) -> int:
    """Index of the leaf whose append completes node ``(level, index)`` (its last leaf)."""
    return ((index + 1) << level) - 1


def nodes_completed_by(leaf_index: int) -> list[NodeId]:
    """Nodes completed by appending leaf ``leaf_index``: the leaf itself, then one ancestor per
    trailing 1 bit of ``leaf_index``, bottom-up."""
    out: list[NodeId] = [(0, leaf_index)]
    level, index = 0, leaf_index
    while index & 1:
        level += 1
        index >>= 1
        out.append((level, index))
    return out


def frontier_ids(size: int) -> list[NodeId]:
    """The perfect subtrees ("peaks") that tile ``[0, size)``, left to right (largest first).

    One per set bit of ``size``; every one of them is a stored complete node.
    """
    out: list[NodeId] = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            out.append((level, start >> level))
            start += 1 << level
    return out


class Frontier:
    """The right edge of the tree: the peak hashes tiling ``[0, size)`` (see
    :func:`frontier_ids`).

    Enough to append (each append returns the nodes it completes, ready to store) and to
    compute the current root, without reading the store. O(log n) memory.
    """

    __slots__ = ("_peaks", "_size")

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        _check_int(size, "size")
        if size < 0:
            raise ValueError("size must not be negative")
        if len(peaks) != size.bit_count():
            raise ValueError(f"a frontier of size {size} has {size.bit_count()} peaks")
        self._size = size
        self._peaks = [_check_hash(p, "peak hash") for p in peaks]

    @classmethod
    def from_nodes(cls, size: int, nodes: Mapping[NodeId, bytes]) -> Frontier:
        """Build from fetched nodes (at least :func:`frontier_ids` ``(size)``)."""
        peaks: list[bytes] = []
        for level, index in frontier_ids(size):
            value = nodes.get((level, index))
            if value is None:
                raise MissingNodeError(f"missing Merkle node (level={level}, index={index})")
            peaks.append(value)
        return cls(size, peaks)

    @property
    def size(self) -> int:
        return self._size

    @property
    def peaks(self) -> list[bytes]:
        return list(self._peaks)

    def copy(self) -> Frontier:
        return Frontier(self._size, self._peaks)

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf; return the ``(level, index, hash)`` nodes it completes, bottom-up
        (exactly :func:`nodes_completed_by` ``(old size)``)."""
        value = _check_hash(leaf_hash, "leaf hash")
        level, index = 0, self._size
        completed = [(0, index, value)]
        while index & 1:
            value = node_hash(self._peaks.pop(), value)
            level += 1
            index >>= 1
            completed.append((level, index, value))
        self._peaks.append(value)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """MTH of the first :attr:`size` leaves."""
        if not self._peaks:
            return EMPTY_ROOT
        value = self._peaks[-1]
        for peak in reversed(self._peaks[:-1]):
            value = node_hash(peak, value)
        return value


# ---------------------------------------------------------------------------
# Pure verification (client side)
# ---------------------------------------------------------------------------


def _is_hash(value: object) -> bool:
    return isinstance(value, (bytes, bytearray)) and len(value) == HASH_SIZE


_MAX_SIZE = 1 << 64  # RFC 9162 tree sizes are uint64


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_SIZE


def _hash_list(proof: object) -> list[bytes] | None:
    if isinstance(proof, (str, bytes, bytearray)) or not isinstance(proof, Sequence):
        return None
    out: list[bytes] = []
    for item in proof:
        if not _is_hash(item):
            return None
        out.append(bytes(item))
    return out


def root_from_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]
) -> bytes | None:
    """Root implied by an inclusion proof (RFC 9162 2.1.3.2 steps 1-5), or ``None``.

    ``None`` is returned for malformed input, ``index >= size``, or a proof whose length does
    not match the path length for ``(index, size)``.
    """
    if not (_is_hash(leaf_hash) and _is_size(index) and _is_size(size)):
        return None
    path = _hash_list(proof)
    if path is None or index >= size:
        return None
    fn, sn = index, size - 1
    r = bytes(leaf_hash)
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return None
    return r


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True iff ``proof`` shows ``leaf_hash`` at ``index`` in the tree ``(size, root)``."""
    if not _is_hash(root):
        return False
    computed = root_from_inclusion(leaf_hash, index, size, proof)
    return computed is not None and computed == bytes(root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True iff ``proof`` shows tree ``(old_size, old_root)`` is a prefix of
    ``(new_size, new_root)`` (RFC 9162 2.1.4.2).

    Edge cases (not covered by the RFC algorithm, which requires ``0 < old_size < new_size``):

    * ``old_size == new_size``: the proof must be empty and the roots equal.
    * ``old_size == 0``: every tree extends the empty tree; the proof must be empty and
      ``old_root`` must be :data:`EMPTY_ROOT` (the only valid size-0 root); ``new_root`` is
      only checked to be a well-formed hash.
    * ``old_size > new_size`` or anything malformed: ``False``.
    """
    if not (_is_size(old_size) and _is_size(new_size)):
        return False
    if not (_is_hash(old_root) and _is_hash(new_root)):
        return False
    path = _hash_list(proof)
    if path is None or old_size > new_size:
        return False
    old_root, new_root = bytes(old_root), bytes(new_root)
    if old_size == new_size:
        return not path and old_root == new_root
    if old_size == 0:
        return not path and old_root == EMPTY_ROOT
    # RFC 9162 2.1.4.2
    if not path:  # step 1
        return False
    if old_size & (old_size - 1) == 0:  # step 2: old tree is a complete left subtree
        path = [old_root, *path]
    fn, sn = old_size - 1, new_size - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root  # step 7
