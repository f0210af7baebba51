"""Tests for qpc_kt_log.merkle (RFC 9162 Merkle tree, store, proofs and verification)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import cache, lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qpc_kt_log.merkle import (
    EMPTY_ROOT,
    AsyncNodeSource,
    Frontier,
    MemoryNodeStore,
    MerkleLog,
    MissingNodeError,
    NodeId,
    NodeStore,
    binding_leaf_hash,
    completing_leaf,
    compute_root,
    frontier_ids,
    node_hash,
    nodes_completed_by,
    plan_consistency,
    plan_inclusion,
    plan_root,
    revocation_leaf_hash,
    rfc6962_leaf_hash,
    root_from_inclusion,
    run_plan,
    verify_consistency,
    verify_inclusion,
)

# database=None: do not leave a .hypothesis/ directory behind in the source tree.
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MAX_N = 300

# ---------------------------------------------------------------------------
# Independent reference implementations (direct transcriptions of RFC 9162 2.1)
# ---------------------------------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(m, D[n])."""
    n = len(d)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*ref_path(m, d[:k]), compute_root(d[k:])]
    return [*ref_path(m - k, d[k:]), compute_root(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    """RFC 9162 2.1.4.1 SUBPROOF(m, D[n], b)."""
    n = len(d)
    if m == n:
        return [] if b else [compute_root(d)]
    k = _split(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), compute_root(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), compute_root(d[:k])]


def ref_proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 PROOF(m, D[n]), extended with the empty proof for m == 0 and m == n."""
    if m == 0 or m == len(d):
        return []
    return ref_subproof(m, d, True)


def ref_root_from_path(leaf: bytes, m: int, n: int, proof: Sequence[bytes]) -> bytes | None:
    """Oracle: evaluate the PATH structure for (m, n) on the given proof elements."""
    if not 0 <= m < n:
        return None
    if n == 1:
        return leaf if not proof else None
    if not proof:
        return None
    k = _split(n)
    last, rest = proof[-1], proof[:-1]
    if m < k:
        sub = ref_root_from_path(leaf, m, k, rest)
        return None if sub is None else node_hash(sub, last)
    sub = ref_root_from_path(leaf, m - k, n - k, rest)
    return None if sub is None else node_hash(last, sub)


def _ref_sub_roots(
    m: int, n: int, b: bool, old_root: bytes, proof: Sequence[bytes]
) -> tuple[bytes, bytes] | None:
    """Oracle: (old subtree hash, new subtree hash) implied by SUBPROOF(m, D[n], b)."""
    if m == n:
        if b:
            return (old_root, old_root) if not proof else None
        return (proof[0], proof[0]) if len(proof) == 1 else None
    if not proof:
        return None
    k = _split(n)
    last, rest = proof[-1], proof[:-1]
    if m <= k:
        sub = _ref_sub_roots(m, k, b, old_root, rest)
        return None if sub is None else (sub[0], node_hash(sub[1], last))
    sub = _ref_sub_roots(m - k, n - k, False, old_root, rest)
    return None if sub is None else (node_hash(last, sub[0]), node_hash(last, sub[1]))


def ref_verify_consistency(
    m: int, n: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    if not 0 <= m <= n:
        return False
    if m == n:
        return not proof and old_root == new_root
    if m == 0:
        return not proof and old_root == EMPTY_ROOT
    roots = _ref_sub_roots(m, n, True, old_root, proof)
    return roots is not None and roots == (old_root, new_root)


def ref_verify_inclusion(leaf: bytes, m: int, n: int, proof: Sequence[bytes], root: bytes) -> bool:
    return ref_root_from_path(leaf, m, n, proof) == root


# ---------------------------------------------------------------------------
# Fixtures / helpers
# ---------------------------------------------------------------------------


def make_leaves(n: int, seed: int = 0) -> list[bytes]:
    return [rfc6962_leaf_hash(b"leaf:%d:%d" % (seed, i)) for i in range(n)]


LEAVES = make_leaves(MAX_N)


@cache
def exact_log(n: int) -> MerkleLog:
    """A log containing exactly LEAVES[:n] (so the proofs also cover the current size)."""
    log = MerkleLog(MemoryNodeStore())
    log.append_many(LEAVES[:n])
    return log


@lru_cache(maxsize=1)
def big_log() -> MerkleLog:
    log = MerkleLog(MemoryNodeStore())
    log.append_many(LEAVES)
    return log


@cache
def prefix_root(n: int) -> bytes:
    return compute_root(LEAVES[:n])


def flip(h: bytes, pos: int = 0) -> bytes:
    b = bytearray(h)
    b[pos % len(b)] ^= 0x01
    return bytes(b)


class CountingStore:
    """NodeStore wrapper counting get() and put_many() calls."""

    def __init__(self, inner: NodeStore) -> None:
        self.inner = inner
        self.reads = 0
        self.put_calls = 0
        self.puts = 0

    def get(self, level: int, index: int) -> bytes | None:
        self.reads += 1
        return self.inner.get(level, index)

    def put_many(self, items: list[tuple[int, int, bytes]]) -> None:
        self.put_calls += 1
        self.puts += len(items)
        self.inner.put_many(items)

    def size(self) -> int:
        return self.inner.size()


size_and_index = st.integers(1, MAX_N).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(0, n - 1))
)
old_and_new = st.integers(0, MAX_N).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))

# ---------------------------------------------------------------------------
# Known answers (RFC 6962 / certificate-transparency test leaves)
# ---------------------------------------------------------------------------

KAT_LEAVES = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
# Verified independently with a throwaway hashlib script while writing these tests.
KAT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _kat_leaf_hashes() -> list[bytes]:
    return [rfc6962_leaf_hash(bytes.fromhex(x)) for x in KAT_LEAVES]


def _manual_mth(d: list[bytes]) -> bytes:
    """Second, deliberately naive MTH written with hashlib only."""
    if not d:
        return _h(b"")
    if len(d) == 1:
        return d[0]
    k = _split(len(d))
    return _h(b"\x01" + _manual_mth(d[:k]) + _manual_mth(d[k:]))


def test_known_answer_roots() -> None:
    leaves = _kat_leaf_hashes()
    assert leaves[0] == _h(b"\x00")
    log = MerkleLog(MemoryNodeStore())
    log.append_many(leaves)
    assert log.root().hex() == KAT_ROOTS[-1]
    for size in range(1, 9):
        expected = KAT_ROOTS[size - 1]
        assert compute_root(leaves[:size]).hex() == expected
        assert _manual_mth(leaves[:size]).hex() == expected
        assert log.root(size).hex() == expected


def test_known_answer_proofs_verify() -> None:
    leaves = _kat_leaf_hashes()
    log = MerkleLog(MemoryNodeStore())
    for leaf in leaves:
        log.append(leaf)
    for size in range(1, 9):
        root = bytes.fromhex(KAT_ROOTS[size - 1])
        for index in range(size):
            proof = log.inclusion_proof(index, size)
            assert proof == ref_path(index, leaves[:size])
            assert verify_inclusion(leaves[index], index, size, proof, root)
        for old in range(size + 1):
            proof = log.consistency_proof(old, size)
            assert proof == ref_proof(old, leaves[:size])
            old_root = EMPTY_ROOT if old == 0 else bytes.fromhex(KAT_ROOTS[old - 1])
            assert verify_consistency(old, size, old_root, root, proof)


# ---------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------


def test_empty_tree() -> None:
    log = MerkleLog(MemoryNodeStore())
    assert log.size == 0
    assert _h(b"") == EMPTY_ROOT
    assert log.root() == EMPTY_ROOT
    assert log.root(0) == EMPTY_ROOT
    assert compute_root([]) == EMPTY_ROOT
    assert log.consistency_proof(0, 0) == []
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(ValueError):
        log.inclusion_proof(0, 0)
    with pytest.raises(ValueError):
        log.root(1)
    assert log.append_many([]) == range(0)


def test_size_one() -> None:
    leaf = LEAVES[0]
    log = MerkleLog(MemoryNodeStore())
    assert log.append(leaf) == 0
    assert log.size == 1
    assert log.root() == leaf
    assert log.inclusion_proof(0, 1) == []
    assert verify_inclusion(leaf, 0, 1, [], leaf)
    assert root_from_inclusion(leaf, 0, 1, []) == leaf
    assert not verify_inclusion(leaf, 0, 1, [leaf], leaf)
    assert not verify_inclusion(leaf, 1, 1, [], leaf)
    assert log.consistency_proof(1, 1) == []
    assert verify_consistency(1, 1, leaf, leaf, [])
    assert log.consistency_proof(0, 1) == []
    assert verify_consistency(0, 1, EMPTY_ROOT, leaf, [])


def test_consistency_edge_cases() -> None:
    r5, r8 = prefix_root(5), prefix_root(8)
    # equal sizes: empty proof, equal roots
    assert verify_consistency(5, 5, r5, r5, [])
    assert not verify_consistency(5, 5, r5, r8, [])
    assert not verify_consistency(5, 5, r5, r5, [r5])
    # from the empty tree: empty proof, old root must be the empty root
    assert verify_consistency(0, 8, EMPTY_ROOT, r8, [])
    assert not verify_consistency(0, 8, EMPTY_ROOT, r8, [r8])
    assert not verify_consistency(0, 8, r5, r8, [])
    # shrinking is never consistent
    assert not verify_consistency(8, 5, r8, r5, [])
    assert not verify_consistency(8, 5, r8, r5, big_log().consistency_proof(5, 8))
    # RFC step 1: empty proof with 0 < m < n fails even if the roots look plausible
    assert not verify_consistency(4, 8, prefix_root(4), r8, [])


def test_proof_request_validation() -> None:
    log = exact_log(10)
    for bad_index, bad_size in [(-1, 5), (5, 5), (0, 11), (0, -1)]:
        with pytest.raises(ValueError):
            log.inclusion_proof(bad_index, bad_size)
    for bad_old, bad_new in [(-1, 5), (6, 5), (0, 11)]:
        with pytest.raises(ValueError):
            log.consistency_proof(bad_old, bad_new)
    with pytest.raises(ValueError):
        log.root(11)
    with pytest.raises(ValueError):
        log.root(-1)
    with pytest.raises(ValueError):
        log.append(b"short")
    with pytest.raises(IndexError):
        log.leaf(10)
    assert log.leaf(3) == LEAVES[3]


def test_size_is_not_bound_by_proof_alone() -> None:
    """Documented caveat: callers must take (size, root) from a signed tree head."""
    leaves = LEAVES[:8]
    p7 = ref_path(0, leaves[:7])
    r7 = compute_root(leaves[:7])
    assert verify_inclusion(leaves[0], 0, 7, p7, r7)
    assert verify_inclusion(leaves[0], 0, 8, p7, r7)  # same path shape
    assert ref_verify_inclusion(leaves[0], 0, 8, p7, r7)
    c = ref_proof(4, leaves[:7])
    assert verify_consistency(4, 7, prefix_root(4), r7, c)
    assert verify_consistency(4, 8, prefix_root(4), r7, c)
    assert ref_verify_consistency(4, 8, prefix_root(4), r7, c)


# ---------------------------------------------------------------------------
# Property tests: inclusion
# ---------------------------------------------------------------------------


@SETTINGS
@given(size_and_index, st.booleans())
def test_inclusion_proofs_verify(si: tuple[int, int], exact: bool) -> None:
    size, index = si
    log = exact_log(size) if exact else big_log()
    root = log.root(size)
    assert root == prefix_root(size)
    proof = log.inclusion_proof(index, size)
    assert proof == ref_path(index, LEAVES[:size])
    assert verify_inclusion(LEAVES[index], index, size, proof, root)
    assert root_from_inclusion(LEAVES[index], index, size, proof) == root
    assert ref_verify_inclusion(LEAVES[index], index, size, proof, root)
    # bytearray / tuple inputs are accepted too
    leaf_ba = bytearray(LEAVES[index])
    assert verify_inclusion(leaf_ba, index, size, tuple(proof), root)  # type: ignore[arg-type]


@SETTINGS
@given(size_and_index, st.data())
def test_inclusion_tampering_fails(si: tuple[int, int], data: st.DataObject) -> None:
    size, index = si
    leaf = LEAVES[index]
    root = prefix_root(size)
    proof = big_log().inclusion_proof(index, size)
    assert verify_inclusion(leaf, index, size, proof, root)

    # altered proof elements
    for i in range(len(proof)):
        pos = data.draw(st.integers(0, 31), label="byte")
        bad = list(proof)
        bad[i] = flip(bad[i], pos)
        assert not verify_inclusion(leaf, index, size, bad, root)
    # altered root / leaf
    assert not verify_inclusion(leaf, index, size, proof, flip(root, data.draw(st.integers(0, 31))))
    assert not verify_inclusion(flip(leaf), index, size, proof, root)
    other = data.draw(st.integers(0, MAX_N - 1), label="other leaf")
    if other != index:
        assert not verify_inclusion(LEAVES[other], index, size, proof, root)
    # altered index (every other index, and out-of-range ones)
    for j in [*range(size), size, size + 1, -1]:
        if j != index:
            assert not verify_inclusion(leaf, j, size, proof, root)
    # truncated / extended proofs
    for cut in range(len(proof)):
        assert not verify_inclusion(leaf, index, size, proof[:cut], root)
        assert not verify_inclusion(leaf, index, size, proof[cut + 1 :], root)
    extra = data.draw(st.sampled_from([root, leaf, EMPTY_ROOT, *proof]), label="extra")
    assert not verify_inclusion(leaf, index, size, [*proof, extra], root)
    assert not verify_inclusion(leaf, index, size, [extra, *proof], root)
    # altered size: the RFC algorithm accepts exactly when the path shape for (index, size')
    # evaluates the given proof to the given root; check against the independent oracle.
    for s2 in range(2 * size + 3):
        if s2 == size:
            continue
        got = verify_inclusion(leaf, index, s2, proof, root)
        assert got == ref_verify_inclusion(leaf, index, s2, proof, root)


# ---------------------------------------------------------------------------
# Property tests: consistency
# ---------------------------------------------------------------------------


@SETTINGS
@given(old_and_new, st.booleans())
def test_consistency_proofs_verify(mn: tuple[int, int], exact: bool) -> None:
    m, n = mn
    log = exact_log(n) if exact else big_log()
    old_root, new_root = log.root(m), log.root(n)
    assert old_root == prefix_root(m)
    assert new_root == prefix_root(n)
    proof = log.consistency_proof(m, n)
    assert proof == ref_proof(m, LEAVES[:n])
    assert verify_consistency(m, n, old_root, new_root, proof)
    assert ref_verify_consistency(m, n, old_root, new_root, proof)


@SETTINGS
@given(
    st.integers(2, MAX_N).flatmap(lambda n: st.tuples(st.integers(1, n - 1), st.just(n))), st.data()
)
def test_consistency_tampering_fails(mn: tuple[int, int], data: st.DataObject) -> None:
    m, n = mn
    old_root, new_root = prefix_root(m), prefix_root(n)
    proof = big_log().consistency_proof(m, n)
    assert proof
    assert verify_consistency(m, n, old_root, new_root, proof)

    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = flip(bad[i], data.draw(st.integers(0, 31), label="byte"))
        assert not verify_consistency(m, n, old_root, new_root, bad)
    assert not verify_consistency(m, n, flip(old_root), new_root, proof)
    assert not verify_consistency(m, n, old_root, flip(new_root), proof)
    assert not verify_consistency(m, n, new_root, old_root, proof)
    # roots of other (genuine) prefixes must not be accepted either
    other = data.draw(st.integers(0, MAX_N), label="other size")
    if other != m:
        assert not verify_consistency(m, n, prefix_root(other), new_root, proof)
    if other != n:
        assert not verify_consistency(m, n, old_root, prefix_root(other), proof)
    for cut in range(len(proof)):
        assert not verify_consistency(m, n, old_root, new_root, proof[:cut])
        assert not verify_consistency(m, n, old_root, new_root, proof[cut + 1 :])
    extra = data.draw(st.sampled_from([old_root, new_root, EMPTY_ROOT, *proof]), label="extra")
    assert not verify_consistency(m, n, old_root, new_root, [*proof, extra])
    assert not verify_consistency(m, n, old_root, new_root, [extra, *proof])
    # altered sizes: must agree with the independent oracle (accepts only identical shapes)
    for m2 in range(n + 3):
        if m2 != m:
            got = verify_consistency(m2, n, old_root, new_root, proof)
            assert got == ref_verify_consistency(m2, n, old_root, new_root, proof)
    for n2 in range(2 * n + 3):
        if n2 != n:
            got = verify_consistency(m, n2, old_root, new_root, proof)
            assert got == ref_verify_consistency(m, n2, old_root, new_root, proof)


# ---------------------------------------------------------------------------
# Malformed input never raises
# ---------------------------------------------------------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=40),
    st.text(max_size=5),
    st.lists(st.binary(min_size=31, max_size=33), max_size=4),
    st.lists(st.one_of(st.none(), st.integers(), st.text()), max_size=3),
)


@settings(max_examples=120, deadline=None, database=None)
@given(junk, junk, junk, junk, junk)
def test_verifiers_never_raise(a: object, b: object, c: object, d: object, e: object) -> None:
    # deliberately ill-typed calls
    assert verify_inclusion(a, b, c, d, e) in (True, False)  # type: ignore[arg-type]
    assert verify_consistency(a, b, c, d, e) in (True, False)  # type: ignore[arg-type]
    r = root_from_inclusion(a, b, c, d)  # type: ignore[arg-type]
    assert r is None or isinstance(r, bytes)


def test_malformed_examples() -> None:
    leaf, root = LEAVES[0], prefix_root(4)
    proof = big_log().inclusion_proof(0, 4)
    assert verify_inclusion(leaf, 0, 4, proof, root)
    assert not verify_inclusion(leaf, True, 4, proof, root)  # bool is not a size
    assert not verify_inclusion(leaf, 0, 4.0, proof, root)  # type: ignore[arg-type]
    assert not verify_inclusion(leaf, 0, 4, b"".join(proof), root)  # type: ignore[arg-type]
    assert not verify_inclusion(leaf, 0, 4, [p[:31] for p in proof], root)
    assert not verify_inclusion(leaf[:31], 0, 4, proof, root)
    assert not verify_inclusion(leaf, 0, 4, proof, root + b"\x00")
    assert not verify_inclusion(leaf, 0, 2**64, proof, root)
    assert not verify_inclusion(leaf, 2**200, 2**201, proof, root)
    assert root_from_inclusion(leaf, 4, 4, proof) is None
    c = big_log().consistency_proof(3, 4)
    assert verify_consistency(3, 4, prefix_root(3), root, c)
    assert not verify_consistency(3, 4, prefix_root(3), root, [None])  # type: ignore[list-item]
    assert not verify_consistency(3, 4, prefix_root(3), None, c)  # type: ignore[arg-type]
    assert not verify_consistency(-1, 4, prefix_root(3), root, c)
    assert not verify_consistency(3, 2**64, prefix_root(3), root, c)


# ---------------------------------------------------------------------------
# Appending, storage layout and read counts
# ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 200), st.data())
def test_root_of_older_sizes_after_appends(n: int, data: st.DataObject) -> None:
    log = MerkleLog(MemoryNodeStore())
    roots = [(0, log.root())]
    pos = 0
    while pos < n:
        batch = data.draw(st.integers(1, 9), label="batch")
        chunk = LEAVES[pos : min(n, pos + batch)]
        if len(chunk) == 1:
            assert log.append(chunk[0]) == pos
        else:
            assert log.append_many(chunk) == range(pos, pos + len(chunk))
        pos += len(chunk)
        roots.append((pos, log.root()))
    assert log.size == n
    sizes = data.draw(st.lists(st.integers(0, n), min_size=1, max_size=8), label="sizes")
    for s in [0, n, *sizes]:
        assert log.root(s) == compute_root(LEAVES[:s]) == prefix_root(s)
    # every root observed along the way is still reproducible from the grown log
    for s, r in roots:
        assert log.root(s) == r == prefix_root(s)


def test_stores_exactly_complete_subtrees() -> None:
    n = 1000
    leaves = make_leaves(n, seed=7)
    one_by_one = MemoryNodeStore()
    log1 = MerkleLog(one_by_one)
    for leaf in leaves:
        log1.append(leaf)
    batched = MemoryNodeStore()
    MerkleLog(batched).append_many(leaves)
    expected = sum(n >> level for level in range(n.bit_length()))
    assert len(one_by_one) == len(batched) == expected
    for level in range(n.bit_length()):
        for index in range(n >> level):
            node = one_by_one.get(level, index)
            assert node is not None
            assert node == batched.get(level, index)
            lo = index << level
            assert node == compute_root(leaves[lo : lo + (1 << level)])
        assert one_by_one.get(level, n >> level) is None


def test_append_cost_is_amortised_constant() -> None:
    store = CountingStore(MemoryNodeStore())
    log = MerkleLog(store)
    n = 4096 + 77
    worst_reads = 0
    for i, leaf in enumerate(make_leaves(n, seed=3)):
        before = store.reads
        assert log.append(leaf) == i
        worst_reads = max(worst_reads, store.reads - before)
    assert store.put_calls == n  # one atomic batch per append
    assert store.puts <= 2 * n
    assert store.reads <= 2 * n
    assert worst_reads <= math.log2(n) + 1
    # a batch append reads nothing that it wrote itself
    store2 = CountingStore(MemoryNodeStore())
    MerkleLog(store2).append_many(make_leaves(n, seed=3))
    assert store2.reads == 0
    assert store2.put_calls == 1


def test_missing_node_raises() -> None:
    store = MemoryNodeStore()
    log = MerkleLog(store)
    log.append_many(LEAVES[:6])
    del store._nodes[(2, 0)]  # covers leaves 0..3; needed by root(6) and the path of leaf 5
    with pytest.raises(MissingNodeError):
        log.root()
    with pytest.raises(MissingNodeError):
        log.inclusion_proof(5, 6)


def test_protocol_conformance() -> None:
    assert isinstance(MemoryNodeStore(), NodeStore)
    assert isinstance(CountingStore(MemoryNodeStore()), NodeStore)


@lru_cache(maxsize=1)
def _large() -> tuple[list[bytes], CountingStore, MerkleLog]:
    n = 2**16 + 12345
    leaves = make_leaves(n, seed=42)
    store = CountingStore(MemoryNodeStore())
    log = MerkleLog(store)
    log.append_many(leaves)
    return leaves, store, log


def test_read_counts_are_logarithmic() -> None:
    leaves, store, log = _large()
    n = len(leaves)
    bound = 4 * math.log2(n) + 8
    full_root = compute_root(leaves)

    before = store.reads
    assert log.root() == full_root
    assert store.reads - before <= bound
    sizes = [n, n - 1, 2**16, 2**16 + 1, 2**16 - 1, 12345, 77777, 3, 1]
    worst = 0
    for size in sizes:
        before = store.reads
        log.root(size)
        worst = max(worst, store.reads - before)
        for index in {0, 1, size // 2, size - 2, size - 1, (size * 7) // 11}:
            if not 0 <= index < size:
                continue
            before = store.reads
            proof = log.inclusion_proof(index, size)
            worst = max(worst, store.reads - before)
            assert verify_inclusion(leaves[index], index, size, proof, log.root(size))
        for old in {1, 2, 3, size // 3, size - 1, 2**15, 2**16 - 1, 2**16 + 1, 4097}:
            if not 0 < old <= size:
                continue
            before = store.reads
            proof = log.consistency_proof(old, size)
            worst = max(worst, store.reads - before)
            assert verify_consistency(old, size, log.root(old), log.root(size), proof)
    assert worst <= bound
    assert log.root(12345) == compute_root(leaves[:12345])
    assert log.root(2**16 + 1) == compute_root(leaves[: 2**16 + 1])


# ---------------------------------------------------------------------------
# Leaf hash helpers
# ---------------------------------------------------------------------------


def test_leaf_hash_helpers() -> None:
    key = bytes(range(32))
    assert rfc6962_leaf_hash(b"abc") == _h(b"\x00abc")
    expected = _h(b"\x00" + _h("zoë".encode() + b"\x00" + key))
    assert binding_leaf_hash("zoë", key) == expected
    assert binding_leaf_hash("zoë".encode(), key) == expected
    assert binding_leaf_hash("zoe", key) != expected
    with pytest.raises(ValueError):
        binding_leaf_hash("a\x00b", key)
    rev = revocation_leaf_hash(key, "compromised")
    assert rev == _h(b"\x02" + _h(key + b"\x00compromised"))
    assert rev != revocation_leaf_hash(key, "superseded")
    assert len({rev, binding_leaf_hash("x", key), rfc6962_leaf_hash(key)}) == 3
    assert node_hash(key, key) == _h(b"\x01" + key + key)


# ---------------------------------------------------------------------------
# Planning API (batch reads for asynchronous stores)
# ---------------------------------------------------------------------------


class PlanStore:
    """An AsyncNodeSource over a MemoryNodeStore that records its batches."""

    def __init__(self, inner: MemoryNodeStore) -> None:
        self.inner = inner
        self.batches: list[list[NodeId]] = []

    async def get_nodes(self, ids: Sequence[NodeId]) -> dict[NodeId, bytes]:
        self.batches.append(list(ids))
        out = {}
        for node in ids:
            value = self.inner.get(*node)
            if value is not None:
                out[node] = value
        return out


def _stored(log: MerkleLog) -> MemoryNodeStore:
    store = log.store
    assert isinstance(store, MemoryNodeStore)
    return store


@SETTINGS
@given(size_and_index)
def test_plans_match_the_sync_proofs(si: tuple[int, int]) -> None:
    size, index = si
    log = big_log()
    store = _stored(log)
    plan = plan_inclusion(index, size)
    assert len(plan.nodes) == len(set(plan.nodes))
    assert all(store.get(*n) is not None for n in plan.nodes)
    nodes = {n: store.get(*n) for n in plan.nodes}
    assert plan.evaluate(nodes) == log.inclusion_proof(index, size)  # type: ignore[arg-type]
    (root,) = plan_root(size).evaluate({n: store.get(*n) for n in plan_root(size).nodes})  # type: ignore[misc]
    assert root == prefix_root(size)
    assert len(plan.nodes) <= 2 * math.log2(size) + 2 if size > 1 else not plan.nodes


@SETTINGS
@given(old_and_new)
def test_consistency_plans_match_the_sync_proofs(mn: tuple[int, int]) -> None:
    m, n = mn
    log = big_log()
    store = _stored(log)
    plan = plan_consistency(m, n)
    nodes = {node: store.get(*node) for node in plan.nodes}
    assert plan.evaluate(nodes) == log.consistency_proof(m, n)  # type: ignore[arg-type]
    if n > 1:
        assert len(plan.nodes) <= 2 * math.log2(n) + 2


async def test_run_plan_reads_once() -> None:
    src = PlanStore(_stored(big_log()))
    assert isinstance(src, AsyncNodeSource)
    proof = await run_plan(plan_inclusion(123, 290), src)
    assert verify_inclusion(LEAVES[123], 123, 290, proof, prefix_root(290))
    proof = await run_plan(plan_consistency(77, 290), src)
    assert verify_consistency(77, 290, prefix_root(77), prefix_root(290), proof)
    assert len(src.batches) == 2
    # Plans that need nothing do not call the store.
    assert await run_plan(plan_consistency(0, 290), src) == []
    assert await run_plan(plan_root(0), src) == [EMPTY_ROOT]
    assert len(src.batches) == 2
    # A node the store lacks surfaces as MissingNodeError.
    partial = MemoryNodeStore()
    MerkleLog(partial).append_many(LEAVES[:10])
    del partial._nodes[(3, 0)]
    with pytest.raises(MissingNodeError):
        await run_plan(plan_inclusion(9, 10), PlanStore(partial))


def test_plan_validation() -> None:
    for index, size in [(-1, 5), (5, 5), (0, 0)]:
        with pytest.raises(ValueError):
            plan_inclusion(index, size)
    for old, new in [(-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            plan_consistency(old, new)
    with pytest.raises(ValueError):
        plan_root(-1)
    with pytest.raises(TypeError):
        plan_inclusion(True, 5)
    with pytest.raises(TypeError):
        plan_root(2.0)  # type: ignore[arg-type]


def test_plan_node_counts_are_logarithmic_at_large_sizes() -> None:
    """Planning needs no store, so huge trees can be checked directly."""
    for size in [10**6, 10**9, 2**40 + 12345, 2**63 - 1]:
        bound = 2 * math.log2(size) + 2
        for index in [0, 1, size // 3, size - 2, size - 1]:
            assert len(plan_inclusion(index, size).nodes) <= bound
        for old in [1, 2, size // 7, size // 2 + 1, size - 1]:
            assert len(plan_consistency(old, size).nodes) <= bound
        assert len(plan_root(size).nodes) == size.bit_count()


# ---------------------------------------------------------------------------
# Frontier and the append-to-entry mapping
# ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, MAX_N))
def test_frontier_matches_the_log(n: int) -> None:
    frontier = Frontier()
    store = MemoryNodeStore()
    for i, leaf in enumerate(LEAVES[:n]):
        completed = frontier.append(leaf)
        assert [(lv, ix) for lv, ix, _ in completed] == nodes_completed_by(i)
        store.put_many(completed)
        for level, index, _ in completed:
            assert completing_leaf(level, index) == i
    assert frontier.size == n
    assert frontier.root() == prefix_root(n)
    reference = _stored(exact_log(n))
    assert store._nodes == reference._nodes  # exactly the complete subtrees, same hashes
    ids = frontier_ids(n)
    assert len(ids) == n.bit_count()
    rebuilt = Frontier.from_nodes(n, {node: store._nodes[node] for node in ids})
    assert rebuilt.peaks == frontier.peaks
    assert rebuilt.root() == frontier.root()
    # a copy is independent
    twin = frontier.copy()
    twin.append(LEAVES[0])
    assert frontier.size == n and twin.size == n + 1


def test_frontier_validation() -> None:
    with pytest.raises(ValueError):
        Frontier(3, [LEAVES[0]])  # size 3 has two peaks
    with pytest.raises(ValueError):
        Frontier(-1)
    with pytest.raises(ValueError):
        Frontier(1, [b"short"])
    with pytest.raises(MissingNodeError):
        Frontier.from_nodes(3, {(1, 0): LEAVES[0]})
    assert Frontier().root() == EMPTY_ROOT
    assert frontier_ids(0) == []
    assert frontier_ids(13) == [(3, 0), (2, 2), (0, 12)]
    assert completing_leaf(0, 5) == 5 and completing_leaf(2, 1) == 7
    assert nodes_completed_by(7) == [(0, 7), (1, 3), (2, 1), (3, 0)]
    assert nodes_completed_by(6) == [(0, 6)]
