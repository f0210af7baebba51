"""Entry encoding, signed-head bytes and the SQLCipher-backed tree store (no server)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qpc_kt_log.merkle import (
    MemoryNodeStore,
    MerkleLog,
    binding_leaf_hash,
    frontier_ids,
    nodes_completed_by,
    revocation_leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from qpc_kt_log.records import (
    STH_CONTEXT,
    CorruptEntry,
    LeafRecord,
    decode_entry,
    encode_entry,
    entry_hashes,
    sth_signed_bytes,
)
from qpc_kt_log.store import DEFAULT_VERIFY_TAIL, LOG_NAME, KtTreeStore

from qpc_core.errors import StorageError
from qpc_core.storage.base import LogMoved
from qpc_core.storage.sqlcipher import SqlCipherStorage

KEY = bytes(range(32))


def records(n: int, offset: int = 0) -> list[LeafRecord]:
    out = []
    for i in range(offset, offset + n):
        key = hashlib.sha256(b"key%d" % i).digest()
        if i % 5 == 4:
            out.append(LeafRecord.revocation(key, "compromised", timestamp_ms=i))
        else:
            out.append(LeafRecord.binding(f"user{i}", key, timestamp_ms=i))
    return out


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqlCipherStorage]:
    st = await SqlCipherStorage.open(tmp_path / "kt.db", "k", pool_size=2)
    yield st
    await st.close()


# -- records -------------------------------------------------------------------------------


def test_sth_signed_bytes_layout() -> None:
    root = bytes(range(100, 132))
    msg = sth_signed_bytes(7, root, 1_700_000_000_123)
    assert STH_CONTEXT == b"qpc-v1 kt-sth\x00"
    assert msg == b"qpc-v1 kt-sth\x00" + struct.pack(">Q", 7) + root + struct.pack(
        ">Q", 1_700_000_000_123)
    assert len(msg) == 14 + 8 + 32 + 8
    with pytest.raises(ValueError):
        sth_signed_bytes(-1, root, 0)
    with pytest.raises(ValueError):
        sth_signed_bytes(1, root[:31], 0)
    with pytest.raises(ValueError):
        sth_signed_bytes(1, root, 1 << 64)


def test_leaf_records() -> None:
    b = LeafRecord.binding("alice", KEY, 5)
    assert b.leaf_hash == binding_leaf_hash("alice", KEY)
    r = LeafRecord.revocation(KEY, "superseded")
    assert r.leaf_hash == revocation_leaf_hash(KEY, "superseded")
    for bad in [lambda: LeafRecord.binding("alice", KEY[:31]),
                lambda: LeafRecord.binding("", KEY),
                lambda: LeafRecord.binding("a\x00b", KEY),
                lambda: LeafRecord.revocation(KEY, "stolen"),
                lambda: LeafRecord.revocation(KEY, "userrevoked"),
                lambda: LeafRecord.revocation(KEY + b"x", "compromised")]:
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        _ = LeafRecord(7, KEY).leaf_hash


def test_entry_roundtrip_and_corruption() -> None:
    hashes = [bytes([i]) * 32 for i in range(3)]
    for rec in [LeafRecord.binding("zoë", KEY, 2**63), LeafRecord.revocation(KEY, "UserRevoked")]:
        data = encode_entry(rec, hashes)
        assert decode_entry(data) == (rec, hashes)
        for cut in range(len(data)):
            with pytest.raises(CorruptEntry):
                decode_entry(data[:cut])
        with pytest.raises(CorruptEntry):
            decode_entry(data + b"\x00")
        with pytest.raises(CorruptEntry):
            decode_entry(b"\x02" + data[1:])  # unknown version
        with pytest.raises(CorruptEntry):
            decode_entry(data[:1] + b"\x01" + data[2:])  # unknown kind
    with pytest.raises(ValueError):
        encode_entry(LeafRecord.binding("a1", KEY), [])
    with pytest.raises(ValueError):
        encode_entry(LeafRecord.binding("a1", KEY), [b"short"])
    data = encode_entry(LeafRecord.binding("a1", KEY), hashes)
    assert entry_hashes(data) == hashes
    for bad in [data[:5], data[:40], b"\x02" + data[1:]]:
        with pytest.raises(CorruptEntry):
            entry_hashes(bad)


# -- the store over SQLCipher ----------------------------------------------------------------


async def test_store_matches_reference_tree(storage: SqlCipherStorage) -> None:
    tree = KtTreeStore(storage)
    await tree.load()
    assert tree.size == 0
    recs = records(300)
    # mixed batch sizes, including single appends
    pos = 0
    for batch in [1, 1, 2, 5, 1, 40, 3, 100, 1, 146]:
        assert await tree.append(recs[pos : pos + batch]) == range(pos, pos + batch)
        pos += batch
    assert pos == 300
    assert await tree.append([]) == range(300, 300)
    ref = MerkleLog(MemoryNodeStore())
    leaves = [r.leaf_hash for r in recs]
    ref.append_many(leaves)
    assert tree.root() == ref.root()
    for size in [1, 2, 3, 64, 65, 199, 300]:
        assert await tree.root_at(size) == ref.root(size)
        for index in {0, size // 2, size - 1}:
            proof = await tree.inclusion_proof(index, size)
            assert proof == ref.inclusion_proof(index, size)
            assert verify_inclusion(leaves[index], index, size, proof, ref.root(size))
        for old in {0, 1, size // 3, size - 1, size}:
            proof = await tree.consistency_proof(old, size)
            assert proof == ref.consistency_proof(old, size)
            assert verify_consistency(old, size, ref.root(old), ref.root(size), proof)
    # entries round-trip with their stored leaf hash
    entries = await tree.read_entries(295, 400)
    assert [e.index for e in entries] == list(range(295, 300))
    assert [e.record for e in entries] == recs[295:]
    assert all(e.leaf_hash == e.record.leaf_hash for e in entries)
    # bad sizes
    for bad in [lambda: tree.inclusion_proof(0, 301), lambda: tree.inclusion_proof(5, 5),
                lambda: tree.consistency_proof(10, 301), lambda: tree.consistency_proof(11, 10),
                lambda: tree.root_at(301)]:
        with pytest.raises(ValueError):
            await bad()


async def test_each_entry_holds_the_nodes_its_append_completed(
    storage: SqlCipherStorage,
) -> None:
    tree = KtTreeStore(storage)
    await tree.load()
    recs = records(64)
    await tree.append(recs)
    ref = MemoryNodeStore()
    MerkleLog(ref).append_many([r.leaf_hash for r in recs])
    raw = await storage.log_read(LOG_NAME, 0, 64)
    for i, data in enumerate(raw):
        record, hashes = decode_entry(data)
        assert record == recs[i]
        assert hashes == [ref.get(lv, ix) for lv, ix in nodes_completed_by(i)]
    # 64 leaves: 127 stored nodes, no more
    assert sum(len(decode_entry(d)[1]) for d in raw) == 127 == len(ref)


def _delta(tree: KtTreeStore, before: tuple[int, ...]) -> list[int]:
    return [a - b for a, b in zip(tree.stats.snapshot(), before, strict=True)]


async def test_reload_and_proof_read_counts(storage: SqlCipherStorage) -> None:
    n = 5000
    tree = KtTreeStore(storage)
    await tree.load()
    for start in range(0, n, 1000):
        await tree.append(records(1000, start))
    root = tree.root()
    again = KtTreeStore(storage, cache_nodes=0)
    await again.load()
    assert again.size == n and again.root() == root
    # one batch: the frontier and the frontier before the verified tail (shared peaks once)
    peaks = len({*frontier_ids(n), *frontier_ids(n - DEFAULT_VERIFY_TAIL)})
    assert peaks <= 2 * n.bit_count() + 6
    assert again.stats.snapshot()[:3] == (1, peaks, peaks)
    bound = 2 * math.log2(n) + 2
    for index in [0, 1, 2500, 4095, 4096, n - 1]:
        before = again.stats.snapshot()
        await again.inclusion_proof(index, n)
        batches, nodes, fetched, entries = _delta(again, before)
        assert batches == 1 and fetched == nodes <= bound and entries <= nodes
    for old in [1, 3, 1000, 4096, n - 1]:
        before = again.stats.snapshot()
        await again.consistency_proof(old, n)
        batches, nodes, fetched, _ = _delta(again, before)
        assert batches == 1 and fetched == nodes <= bound


async def test_node_cache(storage: SqlCipherStorage) -> None:
    n = 3000
    tree = KtTreeStore(storage, cache_nodes=40)
    await tree.load()
    await tree.append(records(n))
    ref = MerkleLog(MemoryNodeStore())
    ref.append_many([r.leaf_hash for r in records(n)])
    before = tree.stats.snapshot()
    assert await tree.inclusion_proof(1234, n) == ref.inclusion_proof(1234, n)
    batches, nodes, fetched, _ = _delta(tree, before)
    assert batches == 1 and fetched == nodes
    before = tree.stats.snapshot()
    assert await tree.inclusion_proof(1234, n) == ref.inclusion_proof(1234, n)
    assert _delta(tree, before)[:3] == [0, nodes, 0]  # all from memory: no round trip
    before = tree.stats.snapshot()
    assert await tree.inclusion_proof(1235, n) == ref.inclusion_proof(1235, n)
    batches, nodes, fetched, _ = _delta(tree, before)
    assert batches == 1 and fetched == 1  # only the sibling leaf differs
    for i in range(0, n, 97):  # the cache stays bounded and answers stay right
        assert await tree.inclusion_proof(i, n) == ref.inclusion_proof(i, n)
        assert len(tree._cache) <= 40
    with pytest.raises(ValueError):
        KtTreeStore(storage, cache_nodes=-1)


async def test_append_with_unknown_outcome_reloads(storage: SqlCipherStorage,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tree = KtTreeStore(storage)
    await tree.load()
    await tree.append(records(3))
    real = storage.log_append

    async def committed_then_cancelled(log: str, entries: list[bytes], **kw: object) -> int:
        await real(log, entries, **kw)  # type: ignore[arg-type]
        raise asyncio.CancelledError

    monkeypatch.setattr(storage, "log_append", committed_then_cancelled)
    with pytest.raises(asyncio.CancelledError):
        await tree.append(records(2, 3))
    monkeypatch.setattr(storage, "log_append", real)
    assert tree.size == 3  # not trusted...
    assert await tree.append(records(1, 5)) == range(5, 6)  # ...reloaded before appending
    ref = MerkleLog(MemoryNodeStore())
    ref.append_many([r.leaf_hash for r in records(6)])
    assert tree.root() == ref.root()


async def test_foreign_append_is_detected(storage: SqlCipherStorage) -> None:
    tree = KtTreeStore(storage)
    await tree.load()
    await tree.append(records(2))
    await storage.log_append(LOG_NAME, [encode_entry(records(1)[0], [b"\x00" * 32])])
    # The storage refuses our append (the log moved), taking in the foreign entry finds it
    # does not hold the nodes its append completes, and nothing is written on top.
    with pytest.raises(LogMoved):
        await tree.append(records(1, 2))
    with pytest.raises(StorageError, match="does not match its record"):
        await tree.refresh()
    assert tree.size == 2 and await storage.log_size(LOG_NAME) == 3


async def test_corrupt_log_refuses_to_load(storage: SqlCipherStorage) -> None:
    tree = KtTreeStore(storage)
    await tree.load()
    await tree.append(records(3))
    # an entry whose stored leaf hash does not match its record
    rec = LeafRecord.binding("mallory", KEY)
    await storage.log_append(LOG_NAME, [encode_entry(rec, [b"\x01" * 32, b"\x02" * 32,
                                                            b"\x03" * 32])])
    with pytest.raises(StorageError, match="does not match its record"):
        await KtTreeStore(storage).load()
    await storage.log_append(LOG_NAME, [b"garbage"])
    with pytest.raises(StorageError, match="corrupt"):
        await KtTreeStore(storage).load()


async def test_any_prefix_of_an_append_is_a_valid_tree(storage: SqlCipherStorage) -> None:
    """Entry i depends only on leaves <= i: even a backend that kept only part of a
    multi-entry append (SQLCipher never does) would leave a loadable, correct tree."""
    staging = KtTreeStore(storage, log_name="staging")
    await staging.load()
    await staging.append(records(37))
    raw = await storage.log_read("staging", 0, 37)
    ref = MerkleLog(MemoryNodeStore())
    ref.append_many([r.leaf_hash for r in records(37)])
    for cut in [1, 2, 5, 16, 31, 37]:
        name = f"prefix{cut}"
        await storage.log_append(name, raw[:cut])
        tree = KtTreeStore(storage, log_name=name)
        await tree.load()
        assert tree.size == cut and tree.root() == ref.root(cut)
        assert await tree.append(records(1, cut)) == range(cut, cut + 1)
