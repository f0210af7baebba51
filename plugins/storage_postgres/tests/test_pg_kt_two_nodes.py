"""kt_log on two qpc servers sharing one real PostgreSQL database: one log.

Both servers append (registrations, rotations, revocations) and answer proofs; a client that
moves between them must see one log that only grows, with heads that never go back in size or
time, and every check (already revoked? already bound?) must hold across the servers.  The
races are made deterministic by holding one server's append (inside its locked section)
while the other tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import qpc_kt_log.service as kt_service
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_kt_log import client as kt
from qpc_kt_log.records import LeafRecord, sth_signed_bytes
from qpc_kt_log.service import KV, STH_LOG, KtLogService
from qpc_kt_log.store import LOG_NAME, KtTreeStore
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.app import App
from qpc_core.client import QpcClient
from qpc_core.errors import Conflict, PluginError, StorageError
from qpc_core.identity import public_bytes
from qpc_core.pb import directory_pb2 as pb
from qpc_core.storage.base import LogMoved
from qpc_core.users import register_user

pytestmark = pytest.mark.timeout(120)


def key() -> bytes:
    return public_bytes(Ed25519PrivateKey.generate())


def svc(app: App) -> KtLogService:
    s: KtLogService = app.state["kt_log"]
    return s


@pytest.fixture
async def nodes(pg_dsn: str, app_factory, tmp_path: Path) -> tuple[App, App]:
    async def node(name: str) -> App:
        return await app_factory(plugins=["postgres", "kt_log"], storage="postgres",
                                 postgres={"dsn": pg_dsn}, data_dir=tmp_path / name)

    return await node("one"), await node("two")


class HeldAppend:
    """Holds ``app``'s next append to the Merkle log (after its checks ran and its entries
    were built for the size it knows) until released."""

    def __init__(self, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        self.moved = 0  # LogMoved refusals seen by the held server
        storage = app.storage
        real = storage.log_append

        async def held(log: str, entries: Any, **kw: Any) -> int:
            if log == LOG_NAME and entries and not self.release.is_set():
                self.reached.set()
                await self.release.wait()
            try:
                return await real(log, entries, **kw)
            except LogMoved:
                if log == LOG_NAME:
                    self.moved += 1
                raise

        monkeypatch.setattr(storage, "log_append", held)


def without_the_lock(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """``app`` appends without the store's exclusive section: what happens when a server's
    lock connection died mid-section (PostgreSQL then released its lock)."""

    @contextlib.asynccontextmanager
    async def no_lock(name: str) -> AsyncIterator[None]:
        yield

    monkeypatch.setattr(app.storage, "exclusive", no_lock)


async def lock_waiters(app: App) -> int:
    n: int = await app.storage._pool.fetchval(  # type: ignore[attr-defined]
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    return n


async def until_async(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 10
    while not await cond():  # bounded poll of a state the servers reach by themselves
        assert time.monotonic() < deadline, f"not within 10 s: {what}"
        await asyncio.sleep(0.005)


async def user(app: App, connect: Any, name: str) -> QpcClient:
    c: QpcClient = await connect(app)
    assert c.identity_key is not None
    await register_user(app, name, c.identity_key)
    return c


async def test_both_servers_append_to_one_log_and_a_client_may_move_between_them(
    nodes: tuple[App, App], connect: Any
) -> None:
    one, two = nodes
    clients = {}
    for i in range(6):  # registrations alternate between the servers
        app = (one, two)[i % 2]
        clients[f"u{i}"] = await user(app, connect, f"u{i}")
    c1, c2 = await connect(one), await connect(two)
    state = kt.KtState()
    for i in range(6):  # each lookup on the other server than the last
        c = (c2, c1)[i % 2]
        resp = await kt.resolve_verified(c, f"u{i}", state)
        assert resp.identity_key == clients[f"u{i}"].identity_key
    assert state.tree_size == 6
    # The newest head is the same on both, right after an append on either (no lag).
    await register_user(one, "late", key())
    h2 = await kt.get_sth(c2)
    assert h2.tree_size == 7
    await kt.accept_sth(c2, h2, state)
    await kt.accept_sth(c1, await kt.get_sth(c1), state)  # one does not go back
    assert not (await kt.audit(c1, state)).problems
    assert not (await kt.audit(c2, state)).problems
    # One log: what a fresh reader loads is what both servers hold.
    fresh = KtTreeStore(one.storage)
    await fresh.load()
    assert fresh.size == 7 == svc(one).tree.size == svc(two).tree.size
    assert fresh.root() == svc(one).tree.root() == svc(two).tree.root()


async def test_appends_on_two_servers_take_turns(
    nodes: tuple[App, App], connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server two has checked "not revoked yet" and built its leaf; server one's revocation
    of the same key waits for two's section (a PostgreSQL advisory lock), then finds it
    revoked: one leaf, no refused write."""
    one, two = nodes
    alice = await user(one, connect, "alice")
    assert alice.identity_key is not None
    c2 = await connect(two, identity=alice.identity)
    await kt.resolve_verified(c2, "alice", kt.KtState())  # logs the binding (leaf 0)
    hold = HeldAppend(two, monkeypatch)
    held = asyncio.ensure_future(svc(two).revoke(alice.identity_key, "compromised"))
    await asyncio.wait_for(hold.reached.wait(), 10)
    waiting = asyncio.ensure_future(svc(one).revoke(alice.identity_key, "superseded"))
    await until_async(lambda: _positive(lock_waiters(one)), "server one waits for the lock")
    assert not waiting.done()
    hold.release.set()
    assert await held == 1
    with pytest.raises(Conflict):
        await waiting
    assert hold.moved == 0
    assert await one.storage.log_size(LOG_NAME) == 2
    state = kt.KtState()
    assert await kt.check_revocation_verified(c2, alice.identity_key, state) == "compromised"
    assert not (await kt.audit(c2, state)).problems


async def _positive(n: Awaitable[int]) -> bool:
    return await n > 0


async def test_a_revocation_racing_without_the_lock_is_still_logged_once(
    nodes: tuple[App, App], connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the lock is lost, the conditional write still decides: two's leaf, built for the
    old size, is refused (nothing written), and its checks run again on the grown log."""
    one, two = nodes
    alice = await user(one, connect, "alice")
    assert alice.identity_key is not None
    c2 = await connect(two, identity=alice.identity)
    await kt.resolve_verified(c2, "alice", kt.KtState())
    without_the_lock(one, monkeypatch)
    hold = HeldAppend(two, monkeypatch)
    held = asyncio.ensure_future(svc(two).revoke(alice.identity_key, "compromised"))
    await asyncio.wait_for(hold.reached.wait(), 10)
    assert await svc(one).revoke(alice.identity_key, "superseded") == 1
    hold.release.set()
    with pytest.raises(Conflict):  # checked again on the grown log
        await held
    assert hold.moved == 1 and svc(two).stats.conflicts == 1
    assert await one.storage.log_size(LOG_NAME) == 2
    state = kt.KtState()
    assert await kt.check_revocation_verified(c2, alice.identity_key, state) == "superseded"
    assert not (await kt.audit(c2, state)).problems


async def test_bindings_racing_without_the_lock_are_appended_once_and_keep_order(
    nodes: tuple[App, App], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = nodes
    without_the_lock(one, monkeypatch)
    k1 = key()
    hold = HeldAppend(two, monkeypatch)
    held = asyncio.ensure_future(svc(two).log_binding("alice", k1))
    await asyncio.wait_for(hold.reached.wait(), 10)
    assert await svc(one).log_binding("alice", k1) == 0
    hold.release.set()
    assert await held == 0 and hold.moved == 1  # found on the retry, not appended again
    assert await one.storage.log_size(LOG_NAME) == 1
    # A rotation on one while two is held with another rotation: the later leaf is the
    # newest binding in the index both servers read.
    k2, k3 = key(), key()
    hold2 = HeldAppend(two, monkeypatch)
    held = asyncio.ensure_future(svc(two).log_binding("alice", k3))
    await asyncio.wait_for(hold2.reached.wait(), 10)
    assert await svc(one).log_binding("alice", k2) == 1
    hold2.release.set()
    assert await held == 2 and hold2.moved == 1
    for app in (one, two):
        assert await svc(app)._latest_binding("alice") == (2, k3)
    raw = await one.storage.kv_get(KV, b"k:" + k2)
    assert raw is not None and raw[:8] == (1).to_bytes(8, "big")


async def test_many_concurrent_appends_on_both_servers(nodes: tuple[App, App]) -> None:
    one, two = nodes
    keys = {f"n{i}": key() for i in range(40)}
    got = await asyncio.gather(*(svc((one, two)[i % 2]).log_binding(name, k)
                                 for i, (name, k) in enumerate(keys.items())))
    assert sorted(got) == list(range(40))  # every binding once, the log dense
    fresh = KtTreeStore(one.storage)
    await fresh.load()
    assert fresh.size == 40
    for entry in await fresh.read_entries(0, 40):
        assert keys[entry.record.username] == entry.record.identity_key
        assert await svc(two)._latest_binding(entry.record.username) == (
            entry.index, entry.record.identity_key)
    assert await one.storage.kv_get(KV, b"m:indexed") == (40).to_bytes(8, "big")


async def test_heads_never_go_back_in_time_across_servers(
    nodes: tuple[App, App], connect: Any
) -> None:
    """Server two's clock is an hour behind server one's: the heads it signs still carry a
    timestamp no older than the newest head either server handed out."""
    one, two = nodes
    c1, c2 = await connect(one), await connect(two)
    state = kt.KtState()
    await register_user(one, "ann", key())
    await kt.accept_sth(c1, await kt.get_sth(c1), state)
    behind = svc(two).clock() - 3600
    svc(two).clock = lambda: behind
    await register_user(two, "bob", key())
    head = await kt.get_sth(c2)
    assert head.tree_size == 2 and head.timestamp_ms >= state.timestamp_ms
    await kt.accept_sth(c2, head, state)  # no FreshnessError
    # Every head handed out is stored, newest last, in order of size and time.
    n = await one.storage.log_size(STH_LOG)
    heads = [pb.SignedTreeHead.FromString(r) for r in await one.storage.log_read(STH_LOG, 0, n)]
    assert [h.tree_size for h in heads] == sorted(h.tree_size for h in heads)
    assert [h.timestamp_ms for h in heads] == sorted(h.timestamp_ms for h in heads)
    assert heads[-1] == head
    assert await kt.get_sth(c1) == head  # one serves the same newest head


# -- found by review: each of these failed before its fix ----------------------------------------


async def node(app_factory: Any, pg_dsn: str, tmp_path: Path, name: str) -> App:
    app: App = await app_factory(plugins=["postgres", "kt_log"], storage="postgres",
                                 postgres={"dsn": pg_dsn}, data_dir=tmp_path / name)
    return app


async def test_a_log_rewritten_past_the_newest_head_is_refused(
    pg_dsn: str, app_factory: Any, tmp_path: Path
) -> None:
    """The log is replaced by a different, longer one (a restore of another backup, or
    someone with database access); the stored heads are kept.  A server must not start and
    sign a head that does not extend the newest one handed out."""
    one = await node(app_factory, pg_dsn, tmp_path, "one")
    await svc(one).log_binding("alice", key())
    await svc(one).log_binding("bob", key())
    assert (await svc(one).sth()).tree_size == 2
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("DELETE FROM logs WHERE log = $1", LOG_NAME)
        await admin.execute("DELETE FROM log_heads WHERE log = $1", LOG_NAME)
        await admin.execute("DELETE FROM kv WHERE namespace = $1", KV)
    finally:
        await admin.close()
    forged = KtTreeStore(one.storage)
    await forged.load()
    await forged.append([LeafRecord.binding(n, key(), 1) for n in ("mallory", "eve", "zed")])
    with pytest.raises(PluginError, match="head of size 2 has another root"):
        await node(app_factory, pg_dsn, tmp_path, "two")
    # The running server refuses too, at its next head.
    with pytest.raises(StorageError, match="head of size 2 has another root"):
        await svc(one).sth()


async def test_a_cancelled_append_keeps_its_index_rows(
    nodes: tuple[App, App], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client resetting its stream mid-append: the leaf and its rows committed together,
    so nothing is re-indexed (and nothing is reported as written without its rows)."""
    one, _two = nodes
    s = svc(one)
    hold = HeldAppend(one, monkeypatch)
    task = asyncio.ensure_future(s.log_binding("alice", key()))
    await asyncio.wait_for(hold.reached.wait(), 10)
    task.cancel()  # the task takes it at the await where its write is held
    hold.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.tree.size == 1 and s._indexed == 1
    caplog.clear()
    await s.sth()
    assert "without their index rows" not in caplog.text


async def test_reindexing_an_old_log_never_rolls_newer_rows_back(
    pg_dsn: str, app_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log from an earlier version (entries without rows).  Server two re-indexes it page
    by page; server one (its lock lost) indexes everything and logs a rotation meanwhile.
    Two's next page is refused (LogMoved) and it goes on from what the stored indexes cover,
    never writing its older rows over one's newer ones."""
    monkeypatch.setattr(kt_service, "REINDEX_PAGE", 1)
    k1, k2 = key(), key()
    st = await PostgresStorage.open(pg_dsn)
    legacy = KtTreeStore(st)
    await legacy.load()
    await legacy.append([LeafRecord.binding("alice", k1, 1), LeafRecord.binding("bob", key(), 1)])
    await st.close()
    real = KtTreeStore.read_entries
    reached, release = asyncio.Event(), asyncio.Event()
    two_tree: list[KtTreeStore] = []
    seen: list[tuple[int, int, bool]] = []

    async def read_entries(self: KtTreeStore, start: int, end: int) -> Any:
        if not two_tree:  # server two's first page
            two_tree.append(self)
            reached.set()
            await release.wait()
        elif self is two_tree[0]:
            raw = await self._storage.kv_get(KV, b"n:alice")
            assert raw is not None
            seen.append((start, int.from_bytes(raw[:8], "big"), raw[8:] == k2))
        return await real(self, start, end)

    monkeypatch.setattr(KtTreeStore, "read_entries", read_entries)
    starting = asyncio.ensure_future(node(app_factory, pg_dsn, tmp_path, "two"))
    await asyncio.wait_for(reached.wait(), 20)
    monkeypatch.setattr(PostgresStorage, "exclusive", _no_lock)  # server one: lock lost
    one = await node(app_factory, pg_dsn, tmp_path, "one")
    assert await svc(one).log_binding("alice", k2) == 2  # rotation, rows in its transaction
    release.set()
    two = await asyncio.wait_for(starting, 20)
    assert all(leaf == 2 and is_k2 for _start, leaf, is_k2 in seen), seen
    assert await svc(two)._latest_binding("alice") == (2, k2)
    assert await svc(two)._latest_binding("bob") is not None


@contextlib.asynccontextmanager
async def _no_lock(self: Any, name: str) -> AsyncIterator[None]:
    yield


async def test_appends_go_on_after_the_lock_connection_was_killed(
    pg_dsn: str, app_factory: Any, tmp_path: Path
) -> None:
    """PostgreSQL drops the idle lock connection (a restart, idle_session_timeout, a proxy):
    the next append reconnects."""
    one = await node(app_factory, pg_dsn, tmp_path, "one")
    await svc(one).log_binding("alice", key())  # opens the lock connection
    pid = one.storage._lock_conns["kt_log.append"].get_server_pid()  # type: ignore[attr-defined]
    admin = await asyncpg.connect(pg_dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(500):  # bounded: until the backend is gone
            if not await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                break
            await asyncio.sleep(0.01)
    finally:
        await admin.close()
    assert await svc(one).log_binding("bob", key()) == 1


async def test_ordinary_clock_skew_between_servers_is_not_reported(
    nodes: tuple[App, App], caplog: pytest.LogCaptureFixture
) -> None:
    one, two = svc(nodes[0]), svc(nodes[1])
    base = one.clock() + 5
    one.clock = lambda: base
    two.clock = lambda: base - 0.020  # 20 ms behind: ordinary NTP skew
    await one.log_binding("alice", key())
    await one.sth()
    await two.log_binding("bob", key())
    with caplog.at_level(logging.ERROR, "qpc.kt_log"):
        head = await two.sth()
    assert head.tree_size == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_head_request_does_not_wait_for_another_servers_append(
    nodes: tuple[App, App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server two holds the log's lock mid-append and server one's own append waits for it;
    a head request on one (its head due for signing again) is answered meanwhile."""
    one, two = svc(nodes[0]), svc(nodes[1])
    await one.log_binding("alice", key())
    await one.sth()
    hold = HeldAppend(nodes[1], monkeypatch)
    appending_two = asyncio.ensure_future(two.log_binding("bob", key()))
    await asyncio.wait_for(hold.reached.wait(), 10)
    appending_one = asyncio.ensure_future(one.log_binding("carol", key()))
    await until_async(lambda: _positive(lock_waiters(nodes[0])), "one waits for two's lock")
    now = one.clock()
    one.clock = lambda: now + one.config.sth_max_age_secs + 60
    try:
        head = await asyncio.wait_for(one.sth(), 10)
        assert head.tree_size == 1 and not appending_one.done()
    finally:
        hold.release.set()
        await asyncio.gather(appending_two, appending_one)


# -- fourth review ------------------------------------------------------------------------


async def test_a_head_another_request_read_meanwhile_does_not_refuse_the_log(
    nodes: tuple[App, App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server one signs a head (its tree refreshed at size 2) while a proof request on one
    reads the newest stored head, which server two has meanwhile signed for size 3.  Honest
    servers: the signer must not take that head for a truncated log."""
    one, two = nodes
    a, b = svc(one), svc(two)
    await a.log_binding("u0", key())
    await a.sth()
    await b.log_binding("u1", key())  # no head signed for it yet
    await a.sync()
    assert a.tree.size == 2 and a.head is not None and a.head.tree_size == 1
    reached, release = asyncio.Event(), asyncio.Event()
    real = one.storage.log_size

    async def held(log: str) -> int:
        n = await real(log)
        if log == LOG_NAME and a._lock.locked() and not reached.is_set():
            reached.set()  # in the signing section, the tree just read at size 2
            await release.wait()
        return n

    monkeypatch.setattr(one.storage, "log_size", held)
    signer = asyncio.ensure_future(a.sth())
    await asyncio.wait_for(reached.wait(), 10)
    await b.log_binding("u2", key())
    assert (await b.sth()).tree_size == 3
    prover = asyncio.ensure_future(a.sth(covering=0))  # CheckRevocation on one, say
    await until_async(lambda: _ready(a.head is not None and a.head.tree_size == 3),
                      "one's proof request read the newest stored head")
    release.set()
    assert (await signer).tree_size == 3
    await prover
    assert a.refused is None


async def _ready(value: bool) -> bool:
    return value


async def test_a_refused_log_takes_no_more_appends_and_hands_out_no_heads(
    nodes: tuple[App, App]
) -> None:
    """A stored head of the log's size with another root (a rewritten log, or heads restored
    from another store): refused, and from then on nothing is appended or handed out."""
    one, _two = nodes
    a = svc(one)
    await a.log_binding("u0", key())
    good = await a.sth()
    forged_root = bytes(32)
    signer = Ed25519PrivateKey.generate()
    ts = good.timestamp_ms + 1
    forged = pb.SignedTreeHead(
        tree_size=good.tree_size, root_hash=forged_root, timestamp_ms=ts,
        public_key=public_bytes(signer),
        signature=signer.sign(sth_signed_bytes(good.tree_size, forged_root, ts)))
    await one.storage.log_append(STH_LOG, [forged.SerializeToString()])
    later = a.clock() + 10 * a.config.sth_max_age_secs
    a.clock = lambda: later  # the head is due for signing again
    with pytest.raises(StorageError, match="another root"):
        await a.sth()
    assert a.refused is not None
    size = a.tree.size
    with pytest.raises(StorageError, match="another root"):
        await a.log_binding("u1", key())
    with pytest.raises(StorageError, match="another root"):
        await a.sth(covering=0)
    assert await one.storage.log_size(LOG_NAME) == size


# -- fifth review --------------------------------------------------------------------------


async def test_a_signer_never_hands_out_a_head_older_than_one_this_server_did(
    nodes: tuple[App, App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proof request on one reads head x under its lock and is held; two signs y (x aged
    on two's clock, 20 ms ahead of one's); another request on one hands out y; then the
    held one must not hand out x."""
    one, two = nodes
    a, b = svc(one), svc(two)
    start = a.clock() + 5
    a.clock = b.clock = lambda: start
    await a.log_binding("u0", key())
    await a.sth()
    await b.log_binding("u1", key())
    x = await b.sth()  # size 2; one's tree is still at 1
    assert x.tree_size == 2 and a.tree.size == 1
    age = a.config.sth_max_age_secs
    a.clock = lambda: start + age - 0.010
    b.clock = lambda: start + age + 0.010
    reached, release = asyncio.Event(), asyncio.Event()
    real = one.storage.log_read

    async def held(log: str, first: int, end: int) -> Any:
        rows = await real(log, first, end)
        if log == STH_LOG and a._lock.locked() and not reached.is_set():
            reached.set()  # the signer has read x under its lock
            await release.wait()
        return rows

    monkeypatch.setattr(one.storage, "log_read", held)
    signer = asyncio.ensure_future(a.sth(covering=1))
    await asyncio.wait_for(reached.wait(), 10)
    y = await b.sth()
    assert y.tree_size == 2 and y.timestamp_ms > x.timestamp_ms
    seen = await asyncio.wait_for(a.sth(covering=0), 10)
    assert seen == y
    release.set()
    assert (await signer).timestamp_ms >= y.timestamp_ms


async def test_a_sync_stopped_half_way_does_not_reindex_rows_written_with_the_log(
    nodes: tuple[App, App], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = nodes
    a, b = svc(one), svc(two)
    await a.log_binding("u0", key())
    await b.log_binding("u1", key())  # with its index rows
    reached, release = asyncio.Event(), asyncio.Event()
    real = one.storage.kv_get

    async def held(ns: str, k: bytes) -> Any:
        if ns == KV and k == b"m:indexed" and not reached.is_set():
            reached.set()  # one took in two's entry, not yet what the indexes cover
            await release.wait()
        return await real(ns, k)

    monkeypatch.setattr(one.storage, "kv_get", held)
    task = asyncio.ensure_future(a.sync())  # a GetSignedTreeHead whose client went away
    await asyncio.wait_for(reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rewrites: list[Any] = []
    real_append = one.storage.log_append

    async def spy(log: str, entries: Any, **kw: Any) -> Any:
        if log == LOG_NAME and not entries:
            rewrites.append(kw.get("kv_puts"))
        return await real_append(log, entries, **kw)

    monkeypatch.setattr(one.storage, "log_append", spy)
    with caplog.at_level(logging.WARNING, "qpc.kt_log"):
        await a.sync()
    assert rewrites == [] and "without their index rows" not in caplog.text
    assert a._indexed == a.tree.size == 2
