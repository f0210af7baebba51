"""Cancelled appends, writes landing at the wrong index, and the start-up tail check.

The storage writer is held inside ``_log_append`` (a ``threading.Event`` in the writer
thread), so "the RPC was cancelled while its write was queued/committing" is reproduced
exactly, without timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_kt_log.merkle import Frontier, MemoryNodeStore, MerkleLog
from qpc_kt_log.records import LeafRecord, encode_entry
from qpc_kt_log.service import KtLogService
from qpc_kt_log.store import LOG_NAME, KtTreeStore

import qpc_core.storage.sqlcipher as sq
from qpc_core.app import App
from qpc_core.errors import Internal, StorageError
from qpc_core.identity import public_bytes
from qpc_core.storage.base import LogMoved
from qpc_core.storage.sqlcipher import SqlCipherStorage

pytestmark = pytest.mark.timeout(120)

AppFactory = Callable[..., Any]
WAIT = 30.0  # upper bound for any thread hand-over; never reached when things work


def key() -> bytes:
    return public_bytes(Ed25519PrivateKey.generate())


def recs(n: int, offset: int = 0) -> list[LeafRecord]:
    return [LeafRecord.binding(f"user{i}", hashlib.sha256(b"k%d" % i).digest(), i)
            for i in range(offset, offset + n)]


class WriterGate:
    """Holds the SQLCipher writer thread inside the next ``_log_append`` to the Merkle log
    until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.armed = True
        self.real = sq._log_append

    def __call__(
        self, conn: Any, log_name: str, entries: list[bytes], expected_first: int | None,
        kv_puts: Any = None,
    ) -> int:
        if self.armed and log_name == LOG_NAME:  # not the signed heads' log
            self.armed = False
            self.entered.set()
            assert self.release.wait(WAIT), "test never released the writer"
        return self.real(conn, log_name, entries, expected_first, kv_puts)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT), "write never reached storage"


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[WriterGate]:
    g = WriterGate()
    monkeypatch.setattr(sq, "_log_append", g)
    yield g
    g.release.set()  # never leave the writer thread blocked


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SqlCipherStorage]:
    st = await SqlCipherStorage.open(tmp_path / "kt.db", "k", pool_size=2)
    yield st
    await st.close()


async def _stored_leaves(storage: Any) -> list[bytes]:
    tree = KtTreeStore(storage)
    await tree.load()  # the start-up check: raises on a corrupt log
    return [e.leaf_hash for e in await tree.read_entries(0, tree.size)]


def _reference_root(leaves: list[bytes]) -> bytes:
    ref = MerkleLog(MemoryNodeStore())
    ref.append_many(leaves)
    return ref.root()


# -- the helper ------------------------------------------------------------------------------


async def test_finish_despite_cancellation_waits_for_the_operation() -> None:
    from qpc_kt_log.store import finish_despite_cancellation

    release = asyncio.Event()
    work = asyncio.ensure_future(release.wait())
    waiter = asyncio.ensure_future(finish_despite_cancellation(work))
    await asyncio.sleep(0)
    for _ in range(3):  # repeated cancels do not abandon the work either
        waiter.cancel()
        await asyncio.sleep(0)
        assert not waiter.done() and not work.cancelled()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert work.done() and work.result() is True
    # not cancelled: the result is passed through
    assert await finish_despite_cancellation(asyncio.ensure_future(asyncio.sleep(0, "ok"))) \
        == "ok"


# -- the service: a cancelled RPC must not let the next append build on a stale frontier -------


async def test_cancelled_append_keeps_the_lock_until_its_write_committed(
    app_factory: AppFactory, gate: WriterGate,
) -> None:
    """The reviewer's scenario: ResolveUser/Register is cancelled (stream reset) while its
    append is committing; another append follows.  Before the fix the first task released the
    lock at once, the second built entry N from the old frontier, storage wrote it at N+1 and
    the server refused to start ('stored Merkle log is corrupt')."""
    app: App = await app_factory(plugins=["kt_log"])
    s: KtLogService = app.state["kt_log"]
    gate.armed = False
    for i in range(2):
        await s.log_binding(f"u{i}", key())
    gate.armed = True
    first = asyncio.ensure_future(s.log_binding("alice", key()))
    await gate.wait_entered()  # alice's entry is in the writer, not yet committed
    first.cancel()
    second = asyncio.ensure_future(s.log_binding("bob", key()))
    for _ in range(5):  # let the cancellation and the second task run as far as they can
        await asyncio.sleep(0)
    assert s._lock.locked() and not first.done(), "lock released while the write was queued"
    assert s.tree.size == 2
    gate.release.set()
    results: list[Any] = await asyncio.gather(first, second, return_exceptions=True)
    r1, r2 = results
    assert isinstance(r1, asyncio.CancelledError)
    assert r2 == 3  # bob after alice, whose committed leaf was adopted
    assert s.tree.size == 4 == await app.storage.log_size(LOG_NAME)
    assert await s.log_binding("carol", key()) == 4
    leaves = await _stored_leaves(app.storage)
    assert _reference_root(leaves) == s.tree.root()
    await app.stop()
    app2: App = await app_factory(plugins=["kt_log"])  # restarts (it refused before the fix)
    s2: KtLogService = app2.state["kt_log"]
    assert s2.tree.size == 5 and s2.tree.root() == _reference_root(leaves)
    # alice's binding was committed and is indexed (repaired from the log)
    assert await s2._latest_binding("alice") is not None


async def test_leaf_and_index_rows_commit_together(app_factory: AppFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The index rows are written in the append's own transaction: a write that fails after
    its statements ran (a crash before the commit) leaves neither the leaf nor a row, and
    the next append, after a reload, lands at the same index with its rows."""
    app: App = await app_factory(plugins=["kt_log"])
    s: KtLogService = app.state["kt_log"]
    real = sq._log_append

    def fails_before_commit(conn: Any, log_name: str, *args: Any) -> int:
        first = real(conn, log_name, *args)
        if log_name == LOG_NAME:
            raise OSError("simulated crash after the statements, before the commit")
        return first

    monkeypatch.setattr(sq, "_log_append", fails_before_commit)
    with pytest.raises((OSError, StorageError, Internal)):
        await s.log_binding("alice", key())
    assert await app.storage.log_size(LOG_NAME) == 0
    assert await app.storage.kv_scan("kt_log") == []  # no index row, no m:indexed
    monkeypatch.setattr(sq, "_log_append", real)
    alice = key()
    assert await s.log_binding("alice", alice) == 0
    assert await s._latest_binding("alice") == (0, alice)
    assert await app.storage.kv_get("kt_log", b"m:indexed") == (1).to_bytes(8, "big")


# -- the store ------------------------------------------------------------------------------


async def test_cancelled_store_append_adopts_the_committed_write(
    storage: SqlCipherStorage, gate: WriterGate,
) -> None:
    tree = KtTreeStore(storage)
    await tree.load()
    gate.armed = False
    await tree.append(recs(3))
    gate.armed = True
    task = asyncio.ensure_future(tree.append(recs(2, 3)))
    await gate.wait_entered()
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()  # still waiting for the write
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the outcome is known: the committed entries are adopted without a reload
    assert tree.size == 5 == await storage.log_size(LOG_NAME)
    reads = tree.stats.snapshot()
    assert await tree.append(recs(1, 5)) == range(5, 6)
    assert tree.stats.snapshot() == reads  # no reload was needed
    assert tree.root() == _reference_root([r.leaf_hash for r in recs(6)])


async def test_another_writer_moving_the_log_is_refused_then_rebuilt(
    storage: SqlCipherStorage,
) -> None:
    """Another writer slips in an entry: the storage refuses ours (built for index 3) without
    writing it (LogMoved), the store takes the new entry in and appends at index 4 built from
    the new frontier, and the log stays loadable.  (Before expected_first, the write landed
    one index late and corrupted the log.)"""
    tree = KtTreeStore(storage)
    await tree.load()
    await tree.append(recs(3))
    foreign = Frontier()
    for r in recs(3):
        foreign.append(r.leaf_hash)
    intruder = LeafRecord.binding("intruder", bytes(32), 0)
    await storage.log_append(LOG_NAME, [encode_entry(
        intruder, [h for *_, h in foreign.append(intruder.leaf_hash)])])
    with pytest.raises(LogMoved):
        await tree.append(recs(1, 3))
    assert await storage.log_size(LOG_NAME) == 4  # nothing of ours written
    assert await tree.refresh()  # takes in the intruder's entry, checked
    assert await tree.append(recs(1, 3)) == range(4, 5)
    assert await storage.log_size(LOG_NAME) == 5
    fresh = KtTreeStore(storage)
    await fresh.load()  # every entry holds the nodes its own append completes
    assert fresh.size == 5 and fresh.root() == tree.root()


async def test_a_write_committed_at_the_wrong_index_stops_all_appends(
    storage: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage that ignores ``expected_first`` (a broken third-party backend) and stores
    our entries one index late: nothing more may be appended on top."""
    tree = KtTreeStore(storage)
    await tree.load()
    await tree.append(recs(3))
    real = storage.log_append

    async def ignores_expected(log: str, entries: Any, **_kw: Any) -> int:
        return await real(log, entries)

    await real(LOG_NAME, [b"foreign"])
    monkeypatch.setattr(storage, "log_append", ignores_expected)
    with pytest.raises(StorageError, match="behind this process's back"):
        await tree.append(recs(1, 3))
    size = await storage.log_size(LOG_NAME)
    with pytest.raises(StorageError, match="were stored at index"):
        await tree.append(recs(1, 4))
    assert await storage.log_size(LOG_NAME) == size  # nothing written on top


async def test_load_replays_the_newest_entries(storage: SqlCipherStorage) -> None:
    """An entry whose node hashes were built from a wrong frontier (right index, right leaf
    hash, right number of hashes): the old check of the newest leaf hash let it load with a
    wrong root."""
    tree = KtTreeStore(storage)
    await tree.load()
    await tree.append(recs(3))
    wrong = Frontier()
    for r in recs(3, 100):  # some other tree of 3 leaves
        wrong.append(r.leaf_hash)
    rec = recs(1, 3)[0]
    await storage.log_append(LOG_NAME, [encode_entry(
        rec, [h for *_, h in wrong.append(rec.leaf_hash)])])
    with pytest.raises(StorageError, match="entry 3 does not hold the nodes"):
        await KtTreeStore(storage).load()


async def test_load_checks_only_the_tail(storage: SqlCipherStorage) -> None:
    tree = KtTreeStore(storage)
    await tree.load()
    await tree.append(recs(300))
    again = KtTreeStore(storage, verify_tail=10)
    await again.load()
    assert again.size == 300 and again.root() == tree.root()
    assert again.stats.batches == 1  # plus one log_size and one log_read of 10 entries
    with pytest.raises(ValueError):
        KtTreeStore(storage, verify_tail=0)
