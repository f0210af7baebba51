"""Signed tree heads on one server (SQLCipher): stored before they are handed out, never
back in size or time, never over another root, even with appends and other head requests
running while one is being signed.  Each test failed before its fix (found by review)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from kt_test_helpers import AppFactory, key, svc
from qpc_kt_log.records import LeafRecord
from qpc_kt_log.service import STH_LOG
from qpc_kt_log.store import LOG_NAME, KtTreeStore

import qpc_core.storage.sqlcipher as sq
from qpc_core.admin.testing import scrape
from qpc_core.app import App
from qpc_core.builtin.directory import resolve_user
from qpc_core.errors import StorageError, Unavailable
from qpc_core.pb import directory_pb2 as pb
from qpc_core.storage.sqlcipher import SqlCipherStorage
from qpc_core.testing import until
from qpc_core.users import register_user

pytestmark = pytest.mark.timeout(120)


async def stored_heads(app: App) -> list[pb.SignedTreeHead]:
    n = await app.storage.log_size(STH_LOG)
    return [pb.SignedTreeHead.FromString(r) for r in await app.storage.log_read(STH_LOG, 0, n)]


class HeldRead:
    """Holds the next ``log_read_many`` (the signer's read of the tree at the newest head's
    size) until released."""

    def __init__(self, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        real = app.storage.log_read_many

        async def read_many(log: str, indices: Any) -> Any:
            if not self.reached.is_set():
                self.reached.set()
                await asyncio.wait_for(self.release.wait(), 30)
            return await real(log, indices)

        monkeypatch.setattr(app.storage, "log_read_many", read_many)


async def test_a_head_is_signed_over_the_root_of_its_own_size(
    app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append arriving while a head is being signed waits for it; the head pairs its
    size with that size's root (it used to take the root of the grown tree)."""
    app = await app_factory(plugins=["kt_log"])
    s = svc(app)
    for i in range(2):
        await s.log_binding(f"user{i}", key())
    await s.sth()  # stored head: size 2
    await s.log_binding("user2", key())  # tree 3, head 2
    s.tree._cache.clear()  # the signer has to read the tree at size 2 from storage
    hold = HeldRead(app, monkeypatch)
    signing = asyncio.ensure_future(s.sth())
    await asyncio.wait_for(hold.reached.wait(), 10)
    appending = asyncio.ensure_future(s.log_binding("user3", key()))
    await until(lambda: bool(s._lock._waiters), what="the append waits for the signer")
    hold.release.set()
    head, leaf = await asyncio.gather(signing, appending)
    assert (head.tree_size, leaf) == (3, 3)
    assert head.root_hash == await s.tree.root_at(3)
    after = await s.sth()  # and the server goes on (it refused every read before the fix)
    assert after.tree_size == 4
    assert [h.tree_size for h in await stored_heads(app)][-2:] == [3, 4]


async def test_concurrent_head_requests_never_store_an_older_head_after_a_newer_one(
    app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await app_factory(plugins=["kt_log"])
    s = svc(app)
    t = [1_000_000.0]
    s.clock = lambda: t[0]
    for i in range(2):
        await s.log_binding(f"user{i}", key())
    await s.sth()
    await s.log_binding("user2", key())
    s.tree._cache.clear()
    hold = HeldRead(app, monkeypatch)
    first = asyncio.ensure_future(s.sth())  # signs for size 3 at t
    await asyncio.wait_for(hold.reached.wait(), 10)
    t[0] += 60
    appending = asyncio.ensure_future(s.log_binding("user3", key()))
    second = asyncio.ensure_future(s.sth())
    await until(lambda: len(s._lock._waiters or ()) == 2, what="both wait for the signer")
    hold.release.set()
    h1, _leaf, h2 = await asyncio.gather(first, appending, second)
    heads = [(h.tree_size, h.timestamp_ms) for h in await stored_heads(app)]
    assert heads == sorted(heads), heads
    assert (h1.tree_size, h2.tree_size) == (3, 4) and h2.timestamp_ms >= h1.timestamp_ms


def recs(n: int, tag: bytes) -> list[LeafRecord]:
    return [LeafRecord.binding(f"user{i}", hashlib.sha256(tag + b"%d" % i).digest(), i)
            for i in range(n)]


@pytest.fixture
async def st(tmp_path: Any) -> AsyncIterator[SqlCipherStorage]:
    store = await SqlCipherStorage.open(tmp_path / "kt.db", "k", pool_size=2)
    yield store
    await store.close()


async def honest_tree(st: SqlCipherStorage, log_name: str = LOG_NAME) -> KtTreeStore:
    """A loaded tree of five honest leaves."""
    tree = KtTreeStore(st, log_name=log_name)
    await tree.load()
    await tree.append(recs(5, b"honest"))
    return tree


async def _rewrite(st: SqlCipherStorage) -> None:
    """Another writer replaces the log with a different, longer one (100 leaves)."""
    await st._write(lambda conn: conn.execute("DELETE FROM logs WHERE log = ?", (LOG_NAME,)))
    forger = KtTreeStore(st)
    await forger.load()
    await forger.append(recs(100, b"forged"))


async def refused_for_good(tree: KtTreeStore, old_root: bytes) -> None:
    """The rewritten log is refused on every look, nothing of it adopted, no append."""
    for _ in range(2):
        with pytest.raises(StorageError, match="rewritten"):
            await tree.refresh()
        assert tree.size == 5 and tree.root() == old_root
    with pytest.raises(StorageError, match="rewritten"):
        await tree.append(recs(1, b"more"))


def refuse_new_heads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The store refuses writes to the signed heads' log (disk full); returns an undo."""
    real = sq._log_append

    def full(conn: Any, log_name: str, *args: Any) -> int:
        if log_name == STH_LOG:
            raise OSError("database or disk is full")
        return real(conn, log_name, *args)

    monkeypatch.setattr(sq, "_log_append", full)
    return lambda: monkeypatch.setattr(sq, "_log_append", real)


async def test_a_rewritten_log_is_refused_and_stays_refused(st: SqlCipherStorage) -> None:
    """More than verify_tail new entries: the frontier is loaded again and checked against
    the tree this process held; a rewritten log is refused, not adopted, every time."""
    tree = await honest_tree(st)
    old_root = tree.root()
    await _rewrite(st)
    await refused_for_good(tree, old_root)


async def test_reads_go_on_when_a_new_head_cannot_be_stored(
    app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses the new head (disk full): the newest stored head is handed out
    (no client can have seen a newer one); a proof it cannot cover is a clear UNAVAILABLE."""
    app = await app_factory(plugins=["kt_log"])
    s = svc(app)
    alice, bob = key(), key()
    await s.log_binding("alice", alice)
    stored = await s.sth()  # head 1, stored
    await s.log_binding("bob", bob)
    undo = refuse_new_heads(monkeypatch)
    proof = await s.prove_binding("alice", alice)
    assert proof is not None and proof.sth == stored
    assert s.stats.head_store_failures == 1
    assert await s.sth() == stored
    with pytest.raises(Unavailable):
        await s.prove_binding("bob", bob)
    undo()
    proof = await s.prove_binding("bob", bob)
    assert proof is not None and proof.tree_size == 2


async def test_a_head_from_a_clock_that_jumped_ahead_is_reported(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """One head signed while the clock was ten years ahead: later heads cannot go back in
    time, so they keep that time, and the server says so (clients checking head age would
    otherwise see a frozen log with no explanation)."""
    app = await app_factory(plugins=["kt_log"])
    s = svc(app)
    now = s.clock()
    s.clock = lambda: now + 10 * 365 * 86400
    await s.log_binding("user0", key())
    jumped = await s.sth()
    s.clock = lambda: now + 3600
    await s.log_binding("user1", key())
    with caplog.at_level(logging.ERROR, "qpc.kt_log"):
        head = await s.sth()
    assert head.tree_size == 2 and head.timestamp_ms == jumped.timestamp_ms
    assert "ahead of this server's clock" in caplog.text


async def test_stored_heads_that_disappear_are_an_error(app_factory: AppFactory) -> None:
    """The heads this server stored were deleted (a restore of an older backup of only part
    of the store): it must not start over with heads clients would see going back."""
    app = await app_factory(plugins=["kt_log"], storage="sqlcipher")
    s = svc(app)
    s.shared = True  # read the stored heads on every request, as on a shared store
    await s.log_binding("alice", key())
    await s.sth()
    await app.storage._write(  # type: ignore[attr-defined]
        lambda conn: conn.execute("DELETE FROM logs WHERE log = ?", (STH_LOG,)))
    with pytest.raises(StorageError, match="signed heads went from 2 to 0"):
        await s.sth()


async def test_a_failed_read_during_the_rewrite_check_adopts_nothing(
    st: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = await honest_tree(st)
    old_root = tree.root()
    await _rewrite(st)
    real = st.log_read_many
    calls = [0]

    async def flaky(log: str, indices: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # load()'s read succeeds, the check's read fails once
            raise StorageError("database error (log_read_many): connection reset")
        return await real(log, indices)

    monkeypatch.setattr(st, "log_read_many", flaky)
    with pytest.raises(StorageError, match="connection reset"):
        await tree.refresh()
    monkeypatch.setattr(st, "log_read_many", real)
    assert tree.size == 5 and tree.root() == old_root
    with pytest.raises(StorageError, match="rewritten"):  # checked again, refused
        await tree.refresh()


async def test_a_rewritten_log_after_an_append_of_unknown_outcome_is_refused(
    st: SqlCipherStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = await honest_tree(st)
    old_root = tree.root()
    real = st.log_append

    async def failing(*args: Any, **kw: Any) -> Any:
        raise StorageError("database error (log_append): timeout")

    monkeypatch.setattr(st, "log_append", failing)
    with pytest.raises(StorageError, match="timeout"):
        await tree.append(recs(1, b"x"))  # outcome unknown: the store is stale
    monkeypatch.setattr(st, "log_append", real)
    await _rewrite(st)
    await refused_for_good(tree, old_root)


async def test_resolve_user_fails_whole_when_no_head_can_cover_the_binding(
    app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: a binding the log cannot prove yet is not served without its proof;
    the caller gets UNAVAILABLE (retry), as docs/protocol.md says."""
    app = await app_factory(plugins=["kt_log"])
    s = svc(app)
    await register_user(app, "alice", key())
    await s.sth()
    refuse_new_heads(monkeypatch)
    await register_user(app, "bob", key())
    ctx: Any = SimpleNamespace(app=app)
    with pytest.raises(Unavailable, match="retry"):
        await resolve_user(ctx, pb.ResolveUserRequest(username="bob"))
    assert (await resolve_user(ctx, pb.ResolveUserRequest(username="alice"))).inclusion.sth


async def test_metrics_show_the_log_and_a_refused_log(app_factory: AppFactory) -> None:
    app = await app_factory(plugins=["kt_log", "metrics"], metrics_enabled=True)
    s = svc(app)
    await s.log_binding("alice", key())
    await s.log_binding("bob", key())
    head = await s.sth()
    m = await scrape(app)
    assert m.value("kt_log_leaves") == 2
    assert m.value("kt_log_appended_leaves_total") == 2
    assert m.value("kt_log_head_timestamp_seconds") == head.timestamp_ms / 1000
    assert m.value("kt_log_refused") == 0
    assert m.value("kt_log_append_conflicts_total") == 0
    assert m.value("kt_log_head_store_failures_total") == 0
    # The stored heads disappear: refused, and the metric says so until a restart.
    s.shared = True
    await app.storage._write(  # type: ignore[attr-defined]
        lambda conn: conn.execute("DELETE FROM logs WHERE log = ?", (STH_LOG,)))
    with pytest.raises(StorageError):
        await s.sth()
    assert (await scrape(app)).value("kt_log_refused") == 1


async def test_a_truncated_or_briefly_rewritten_log_is_refused_for_good(
    st: SqlCipherStorage,
) -> None:
    """Found by the docs audit: these were refused on each read but not marked, so the
    kt_log_refused metric (and its alert) stayed silent."""
    tree = await honest_tree(st)
    await st._write(lambda conn: conn.execute(
        "DELETE FROM logs WHERE log = ? AND idx >= 3", (LOG_NAME,)))
    with pytest.raises(StorageError, match="shrank from 5 to 3"):
        await tree.refresh()
    assert tree.broken is not None and tree.size == 5

    other = await honest_tree(st, log_name="other")
    # one entry appended by a writer that built it on another tree (wrong nodes)
    wrong = KtTreeStore(st, log_name="scratch")
    await wrong.load()
    await wrong.append(recs(6, b"elsewhere"))
    (forged,) = await st.log_read("scratch", 5, 6)
    await st.log_append("other", [forged])
    with pytest.raises(StorageError, match="does not hold the nodes"):
        await other.refresh()
    assert other.broken is not None
    with pytest.raises(StorageError, match="does not hold the nodes"):
        await other.append(recs(1, b"more"))
