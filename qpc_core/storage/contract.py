"""The behaviour every :class:`~qpc_core.storage.base.Storage` backend must have, as a test
suite a backend's own tests inherit (pytest, pytest-asyncio in auto mode).

The core and the copy between backends (``qpc store copy``) rely on these semantics being the
same everywhere; the built-in SQLCipher store and the PostgreSQL plugin both run this suite.
A third-party backend subclasses :class:`StorageContract` and provides a ``store`` fixture
that yields a new, empty, open store (and closes it afterwards)::

    from qpc_core.storage.contract import StorageContract

    class TestMyStoreContract(StorageContract):
        @pytest.fixture
        async def store(self, tmp_path):
            st = await MyStore.open(tmp_path / "db")
            yield st
            await st.close()

Only the public Storage API is used.  Backend-specific behaviour (durability across a
crash, concurrency between servers, file formats) stays in the backend's own tests; the
crash check is :func:`qpc_core.testing.sigkill_loses_nothing`.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from qpc_core.storage.base import (
    AlreadyExists,
    EnqueueOutcome,
    LogMoved,
    NewMessage,
    QueueFull,
    SessionRecord,
    Storage,
    StoredMessage,
    UserRecord,
)

BIG = 10**9
R1, R2, R3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
DAY = 86_400.0


def msg(recipient: bytes = R1, payload: bytes = b"x", mid: bytes = b"", channel: bytes = b"",
        expires_at: float | None = None) -> NewMessage:
    return NewMessage(recipient, channel, payload, mid, expires_at)


async def put(st: Storage, *ms: NewMessage, max_depth: int = BIG, since: float = 0.0,
              take: tuple[tuple[bytes, bytes], ...] = ()) -> list[tuple[int, bool, bool]]:
    """Enqueue one call; (seq, duplicate, taken) per message."""
    outs = await st.enqueue(list(ms), max_depth=max_depth, dedup_since=since, take=take)
    return [(o.seq, o.duplicate, o.taken) for o in outs]


async def take(st: Storage, *ms: NewMessage) -> list[EnqueueOutcome]:
    """Enqueue one call with a reader waiting on every inbox it names; the outcomes."""
    inboxes = tuple({(m.recipient_key, m.channel_id) for m in ms})
    return await st.enqueue(list(ms), max_depth=BIG, dedup_since=0.0, take=inboxes)


def seqs(messages: list[StoredMessage]) -> list[int]:
    return [m.seq for m in messages]


class StorageContract:
    """Inherit and provide a ``store`` fixture (a new, empty, open store)."""

    # -- delivery ----------------------------------------------------------------------------
    async def test_contract_queues_are_fifo_per_inbox_with_their_own_seqs(
        self, store: Storage
    ) -> None:
        assert await put(store, msg(payload=b"a"), msg(payload=b"b"), msg(R2, b"c"),
                         msg(payload=b"d", channel=b"ch")) == [
            (1, False, False), (2, False, False), (1, False, False), (1, False, False)]
        now = time.time()
        assert await store.peek(R1, b"", 0, now=now) == [StoredMessage(1, b"a"),
                                                          StoredMessage(2, b"b")]
        assert await store.queue_depth(R1, b"") == 2  # a peek removes nothing
        assert await store.fetch(R1, b"", 1, now=now) == [StoredMessage(1, b"a")]
        assert await store.fetch(R1, b"", 0, now=now) == [StoredMessage(2, b"b")]
        assert await store.fetch(R1, b"", 0, now=now) == []
        assert await store.total_queue_depth() == 2  # R2's and R1/ch's
        assert await put(store, msg(payload=b"e")) == [(3, False, False)]  # never reused

    async def test_contract_ack_removes_up_to_a_seq(self, store: Storage) -> None:
        await put(store, *(msg(payload=bytes([i])) for i in range(5)))
        assert await store.ack(R1, b"", 3) == 3
        assert await store.ack(R1, b"", 3) == 0
        assert seqs(await store.peek(R1, b"", 0, now=time.time())) == [4, 5]
        assert await store.ack(R2, b"", 10) == 0  # an inbox that never existed

    async def test_contract_a_byte_cap_still_returns_the_first_message(
        self, store: Storage
    ) -> None:
        await put(store, msg(payload=b"x" * 100), msg(payload=b"y" * 100),
                  msg(payload=b"z" * 100))
        now = time.time()
        assert seqs(await store.peek(R1, b"", 0, now=now, max_bytes=250)) == [1, 2]
        assert seqs(await store.fetch(R1, b"", 0, now=now, max_bytes=10)) == [1]  # never stuck
        assert seqs(await store.fetch(R1, b"", 0, now=now, max_bytes=250)) == [2, 3]

    async def test_contract_per_message_bytes_count_against_the_cap(
        self, store: Storage
    ) -> None:
        await put(store, *(msg(payload=b"p" * 100) for _ in range(4)))
        now = time.time()
        # 3 x 100 fit in 320 alone, but not with 24 more per message (3 x 124 = 372).
        assert seqs(await store.peek(R1, b"", 0, now=now, max_bytes=320)) == [1, 2, 3]
        assert seqs(await store.peek(R1, b"", 0, now=now, max_bytes=320, per_message=24)) == [
            1, 2]
        assert seqs(await store.fetch(R1, b"", 0, now=now, max_bytes=10, per_message=24)) == [1]
        assert seqs(await store.fetch(R1, b"", 5, now=now, max_bytes=248, per_message=24)) == [
            2, 3]

    async def test_contract_dedup_within_the_window_only(self, store: Storage) -> None:
        mid = b"m" * 16
        now = time.time()
        assert await put(store, msg(payload=b"a", mid=mid), since=now - DAY) == [
            (1, False, False)]
        assert await put(store, msg(payload=b"again", mid=mid), since=now - DAY) == [
            (1, True, False)]
        # Within one call too, and per inbox: the same id to another inbox is new.
        assert await put(store, msg(payload=b"b", mid=b"n" * 16),
                         msg(payload=b"b2", mid=b"n" * 16), msg(R2, b"c", mid=mid),
                         since=now - DAY) == [(2, False, False), (2, True, False),
                                              (1, False, False)]
        # Outside the window (the original is older than `since`) it is a new message.
        assert await put(store, msg(payload=b"late", mid=mid), since=time.time() + 1) == [
            (3, False, False)]
        assert [m.payload for m in await store.peek(R1, b"", 0, now=time.time())] == [
            b"a", b"b", b"late"]
        assert await store.purge_dedup(time.time() + 1) >= 3

    async def test_contract_a_full_queue_fails_the_whole_call(self, store: Storage) -> None:
        await put(store, msg(R2, b"r2"), msg(payload=b"r1"))
        with pytest.raises(QueueFull) as e:
            await put(store, msg(payload=b"ok"), msg(R2, b"a"), msg(R2, b"b"), max_depth=2)
        # Which inbox; `depth` is informative (counting the call's own earlier messages or
        # not is up to the backend).
        assert (e.value.recipient_key, e.value.channel_id) == (R2, b"")
        assert await store.queue_depth(R1, b"") == 1  # nothing of the call was written
        assert await put(store, msg(R2, b"next")) == [(2, False, False)]  # no seq reserved

    async def test_contract_expired_messages_are_skipped_then_purged(
        self, store: Storage
    ) -> None:
        past, future = time.time() - 1, time.time() + DAY
        await put(store, msg(payload=b"old", expires_at=past), msg(payload=b"live"),
                  msg(payload=b"later", expires_at=future), msg(R2, b"old2", expires_at=past))
        now = time.time()
        assert [m.payload for m in await store.peek(R1, b"", 0, now=now)] == [b"live",
                                                                            b"later"]
        assert await store.purge_expired(now) == 2
        assert await store.total_queue_depth() == 2
        assert [m.payload for m in await store.fetch(R1, b"", 0, now=future + 1)] == [b"live"]

    async def test_contract_take_hands_over_only_from_an_empty_inbox(
        self, store: Storage
    ) -> None:
        await put(store, msg(R2, b"waiting"))
        out = await take(store, msg(payload=b"handed"), msg(R2, b"stored"))
        assert [(o.seq, o.duplicate, o.taken) for o in out] == [(1, False, True),
                                                                (2, False, False)]
        now = time.time()
        assert await store.peek(R1, b"", 0, now=now) == []  # handed over, not stored
        # A hand-over whose reader left is put back under its seq, before later messages.
        await store.restore([(msg(payload=b"handed"), out[0])])
        await put(store, msg(payload=b"next"))
        assert await store.fetch(R1, b"", 0, now=now) == [StoredMessage(1, b"handed"),
                                                           StoredMessage(2, b"next")]

    async def test_contract_restore_never_stores_into_a_deleted_inbox(
        self, store: Storage
    ) -> None:
        """A hand-over whose reader left after the recipient deleted the account is not put
        back: its inbox is gone, and a new inbox of the same name (seqs restarted) takes no
        stale seq either, so its enqueues keep working."""
        (handed,) = await take(store, msg(payload=b"handed"))
        assert (handed.seq, handed.taken) == (1, True)
        assert await store.delete_account(R1) is None  # no user record: inbox data only
        await store.restore([(msg(payload=b"handed"), handed)])
        now = time.time()
        assert await store.peek(R1, b"", 0, now=now) == []
        assert await store.total_queue_depth() == 0
        assert await put(store, msg(payload=b"new"), msg(R2, b"other")) == [
            (1, False, False), (1, False, False)]
        # Seq 1 is the new inbox's own message, seq 2 it has not given out.
        await store.restore([(msg(payload=b"stale"), handed),
                             (msg(payload=b"stale"), EnqueueOutcome(2, False, True,
                                                                    handed.inbox_epoch))])
        assert await put(store, msg(payload=b"next")) == [(2, False, False)]
        assert await store.queue_depth(R1, b"") == 2
        assert await store.fetch(R1, b"", 0, now=now) == [StoredMessage(1, b"new"),
                                                           StoredMessage(2, b"next")]

    async def test_contract_restore_never_stores_into_a_recreated_inbox(
        self, store: Storage
    ) -> None:
        """The account was deleted and its inbox created again, which gave out (and
        delivered) the old message's seq before the put-back ran: the old message is not
        stored under a seq its reader already had, nor anywhere else in the new inbox.  A
        hand-over of the new inbox itself is put back as usual."""
        (old,) = await take(store, msg(payload=b"old"))
        assert await store.delete_account(R1) is None
        assert await put(store, msg(payload=b"new"), msg(payload=b"new2")) == [
            (1, False, False), (2, False, False)]
        now = time.time()
        assert await store.fetch(R1, b"", 0, now=now) == [StoredMessage(1, b"new"),
                                                           StoredMessage(2, b"new2")]
        await store.restore([(msg(payload=b"old"), old)])
        assert await store.peek(R1, b"", 0, now=now) == []
        assert await store.queue_depth(R1, b"") == 0
        (mine,) = await take(store, msg(payload=b"mine"))
        assert (mine.seq, mine.taken) == (3, True)
        # A seq this incarnation has not given out is not stored either, epoch or not.
        unseen = EnqueueOutcome(mine.seq + 1, False, True, mine.inbox_epoch)
        await store.restore([(msg(payload=b"old"), old), (msg(payload=b"mine"), mine),
                             (msg(payload=b"ahead"), unseen)])
        assert await store.fetch(R1, b"", 0, now=now) == [StoredMessage(3, b"mine")]
        assert [o.seq for o in await take(store, msg(payload=b"next"))] == [4]

    async def test_contract_hand_overs_of_concurrent_calls_go_back_to_their_inboxes(
        self, store: Storage
    ) -> None:
        """Two calls at once (one commit on a batching backend), three inboxes (one of them
        created before), every message handed over: each outcome names its own inbox's
        incarnation, so every put-back lands where it belongs."""
        await put(store, msg(R3, b"earlier"))
        await store.fetch(R3, b"", 0, now=time.time())
        first = [msg(R3, b"a3"), msg(R1, b"a1"), msg(R2, b"a2")]
        second = [msg(R2, b"b2"), msg(R1, b"b1")]
        waiting = ((R1, b""), (R2, b""), (R3, b""))
        o1, o2 = await asyncio.gather(
            store.enqueue(first, max_depth=BIG, dedup_since=0.0, take=waiting),
            store.enqueue(second, max_depth=BIG, dedup_since=0.0, take=waiting))
        assert all(o.taken for o in (*o1, *o2))
        await store.restore(list(zip([*first, *second], [*o1, *o2], strict=True)))
        now = time.time()
        assert {r: [m.payload for m in await store.peek(r, b"", 0, now=now)]
                for r in (R1, R2, R3)} == {R1: [b"a1", b"b1"], R2: [b"a2", b"b2"],
                                           R3: [b"a3"]}

    async def test_contract_forget_taken_drops_only_that_seqs_dedup_record(
        self, store: Storage
    ) -> None:
        mid = b"t" * 16
        now = time.time()
        (out,) = await store.enqueue([msg(payload=b"x", mid=mid)], max_depth=BIG,
                                     dedup_since=now - DAY, take=((R1, b""),))
        assert (out.seq, out.duplicate, out.taken) == (1, False, True)
        other = EnqueueOutcome(99, False, True, out.inbox_epoch)
        await store.forget_taken([(msg(payload=b"x", mid=mid), other)])  # another seq: kept
        assert await put(store, msg(payload=b"x", mid=mid), since=now - DAY) == [
            (1, True, False)]
        await store.forget_taken([(msg(payload=b"x", mid=mid), out)])
        assert await put(store, msg(payload=b"x", mid=mid), since=now - DAY) == [
            (2, False, False)]

    async def test_contract_forget_taken_leaves_a_new_incarnations_record(
        self, store: Storage
    ) -> None:
        """The old inbox's put-back failed after the account was deleted and the same id
        was sent again to the new inbox (same seq 1): forgetting the old hand-over must not
        remove the new inbox's record, or the next retry would be stored twice."""
        mid = b"n" * 16
        (old,) = await store.enqueue([msg(payload=b"x", mid=mid)], max_depth=BIG,
                                     dedup_since=0.0, take=((R1, b""),))
        assert (old.seq, old.taken) == (1, True)
        assert await store.delete_account(R1) is None
        assert await put(store, msg(payload=b"x", mid=mid)) == [(1, False, False)]
        await store.forget_taken([(msg(payload=b"x", mid=mid), old)])
        assert await put(store, msg(payload=b"x", mid=mid)) == [(1, True, False)]
        assert await store.queue_depth(R1, b"") == 1

    # -- keys, users, channels, sessions, accounts --------------------------------------------
    async def test_contract_key_packages_are_fifo_and_single_use(
        self, store: Storage
    ) -> None:
        assert await store.pop_key_package(R1) is None
        for i in range(3):
            await store.add_key_package(R1, b"kp%d" % i, b"fp%d" % i)
        await store.add_key_package(R2, b"r2-kp", b"r2-fp")
        assert await store.count_key_packages(R1) == 3
        assert await store.pop_key_package(R1) == b"kp0"  # oldest first
        for i in range(3, 6):
            await store.add_key_package(R1, b"kp%d" % i, b"fp%d" % i)
        # Concurrent pops: each package goes to exactly one caller.
        popped = await asyncio.gather(*(store.pop_key_package(R1) for _ in range(7)))
        assert sorted(p for p in popped if p) == [b"kp1", b"kp2", b"kp3", b"kp4", b"kp5"]
        assert popped.count(None) == 2
        assert await store.count_key_packages(R1) == 0
        assert await store.count_key_packages(R2) == 1

    async def test_contract_hybrid_keys_are_replaced_and_fetched_in_bulk(
        self, store: Storage
    ) -> None:
        assert await store.get_hybrid_keys([]) == {}
        await store.set_hybrid_key(R1, b"pk-1a")
        await store.set_hybrid_key(R2, b"pk-2")
        await store.set_hybrid_key(R1, b"pk-1b")
        assert await store.get_hybrid_keys([R1, R2, R3, R1]) == {R1: b"pk-1b", R2: b"pk-2"}
        many = [i.to_bytes(32, "big") for i in range(1200)]  # large lookups (chunked IN)
        for k in many[::100]:
            await store.set_hybrid_key(k, b"pk" + k[-2:])
        assert await store.get_hybrid_keys(many) == {k: b"pk" + k[-2:] for k in many[::100]}

    async def test_contract_usernames_and_identities_are_unique(self, store: Storage) -> None:
        await store.create_user("alice", R1, now=100.0)
        for name, ident in (("alice", R2), ("alice2", R1)):
            with pytest.raises(AlreadyExists):
                await store.create_user(name, ident, now=101.0)
        await store.create_user("bob", R2, now=102.0)
        assert await store.get_user_by_name("alice") == UserRecord("alice", R1, 100.0)
        assert await store.get_user_by_identity(R2) == await store.get_user_by_name("bob")
        assert await store.get_user_by_name("alice2") is None
        assert await store.get_user_by_identity(R3) is None

    async def test_contract_channels(self, store: Storage) -> None:
        assert await store.channel_members(b"ch") is None
        assert await store.create_channel(b"ch", [R1, R2, R1], R1, now=1.0) is True
        assert sorted(await store.channel_members(b"ch") or []) == [R1, R2]
        await store.delete_account(R2)  # drops R2's membership
        assert await store.channel_members(b"ch") == [R1]
        assert await store.create_channel(b"ch", [R1, R2], R1, now=2.0) is False
        assert sorted(await store.channel_members(b"ch") or []) == [R1, R2]  # back again
        assert await store.create_channel(b"empty", [], R1, now=1.0) is True
        assert await store.channel_members(b"empty") == []

    async def test_contract_sessions(self, store: Storage) -> None:
        rec = SessionRecord(b"t1", R1, "alice", 10.0, 100.0)
        await store.put_session(rec)
        await store.put_session(SessionRecord(b"t2", R1, "alice", 10.0, 50.0))
        await store.put_session(SessionRecord(b"t3", R2, "bob", 10.0, 200.0))
        assert await store.get_session(b"t1") == rec
        assert await store.get_session(b"nope") is None
        renewed = SessionRecord(b"t1", R1, "alice", 10.0, 150.0)
        await store.put_session(renewed)
        assert await store.get_session(b"t1") == renewed
        assert await store.delete_session(b"t1") is True
        assert await store.delete_session(b"t1") is False
        assert await store.purge_sessions(50.0) == 1  # t2 expired at exactly 50
        assert await store.get_session(b"t2") is None
        assert await store.get_session(b"t3") is not None
        assert await store.purge_sessions(50.0) == 0

    async def test_contract_delete_account_removes_everything_of_the_identity(
        self, store: Storage
    ) -> None:
        await store.create_user("alice", R1, now=1.0)
        await put(store, msg(payload=b"a"), msg(payload=b"b", channel=b"ch"), msg(R2, b"keep"))
        await store.add_key_package(R1, b"kp", b"f" * 32)
        await store.set_hybrid_key(R1, b"h")
        await store.create_channel(b"ch", [R1, R2], R2, now=1.0)
        await store.put_session(SessionRecord(b"s" * 32, R1, "alice", 1.0, time.time() + DAY))
        assert await store.delete_account(R1) == "alice"
        now = time.time()
        assert await store.peek(R1, b"", 0, now=now) == []
        assert await store.peek(R1, b"ch", 0, now=now) == []
        assert await store.pop_key_package(R1) is None
        assert await store.get_hybrid_keys([R1]) == {}
        assert await store.channel_members(b"ch") == [R2]
        assert await store.get_session(b"s" * 32) is None
        assert await store.get_user_by_identity(R1) is None
        assert await store.total_queue_depth() == 1  # R2's message stays
        assert await store.delete_account(R1) is None

    # -- plugin data ---------------------------------------------------------------------------
    async def test_contract_kv(self, store: Storage) -> None:
        assert await store.kv_get("ns", b"k") is None
        await store.kv_put("ns", b"k", b"v1")
        await store.kv_put("ns", b"k", b"v2")
        await store.kv_put("other", b"k", b"o")
        assert await store.kv_get("ns", b"k") == b"v2"
        assert await store.kv_put_if_absent("ns", b"k", b"v3") == b"v2"
        assert await store.kv_put_if_absent("ns", b"new", b"n") == b"n"
        assert await store.kv_get("ns", b"new") == b"n"
        assert await store.kv_delete("ns", b"new") is True
        assert await store.kv_delete("ns", b"new") is False
        assert await store.kv_get("other", b"k") == b"o"  # namespaces are apart

    async def test_contract_kv_scan_is_a_byte_ordered_prefix_range(
        self, store: Storage
    ) -> None:
        keys = [b"", b"a", b"a\x00", b"a\xff", b"a\xff\xff", b"a\xff\xffz", b"ab", b"b",
                b"\xff", b"\xff\x00", b"\xff\xff"]
        for k in reversed(keys):
            await store.kv_put("ns", k, b"v" + k)
        await store.kv_put("zz", b"a1", b"elsewhere")

        async def scan(prefix: bytes, limit: int = 0) -> list[bytes]:
            return [k for k, _ in await store.kv_scan("ns", prefix, limit)]

        assert await scan(b"") == sorted(keys)
        assert await scan(b"a") == [b"a", b"a\x00", b"ab", b"a\xff", b"a\xff\xff",
                                    b"a\xff\xffz"]
        assert await scan(b"a\xff") == [b"a\xff", b"a\xff\xff", b"a\xff\xffz"]
        assert await scan(b"a\xff\xff") == [b"a\xff\xff", b"a\xff\xffz"]
        assert await scan(b"\xff") == [b"\xff", b"\xff\x00", b"\xff\xff"]
        assert await scan(b"\xff\xff") == [b"\xff\xff"]
        assert await scan(b"c") == []
        assert await scan(b"a", limit=2) == [b"a", b"a\x00"]
        assert await store.kv_scan("ns", b"ab") == [(b"ab", b"vab")]

    async def test_contract_logs_are_append_only_and_dense(self, store: Storage) -> None:
        assert await store.log_size("kt") == 0
        assert await store.log_read("kt", 0, 10) == []
        assert await store.log_append("kt", [b"e0", b"e1", b"e2"]) == 0
        assert await store.log_append("kt", [b"e3"]) == 3
        assert await store.log_append("kt", []) == 4
        assert await store.log_append("other", [b"x"]) == 0
        assert await store.log_size("kt") == 4
        assert await store.log_read("kt", 1, 3) == [b"e1", b"e2"]
        assert await store.log_read("kt", 2, 100) == [b"e2", b"e3"]
        assert await store.log_read("kt", -5, 1) == [b"e0"]
        assert await store.log_read("kt", 3, 1) == []
        starts = await asyncio.gather(*(store.log_append("kt", [b"c", b"c"]) for _ in range(5)))
        assert sorted(starts) == [4, 6, 8, 10, 12]
        assert await store.log_size("kt") == 14

    async def test_contract_log_append_at_an_expected_size(self, store: Storage) -> None:
        assert await store.log_append("kt", [b"e0"], expected_first=0) == 0
        assert await store.log_append("kt", [b"e1", b"e2"], expected_first=1) == 1
        for stale in (1, 0, 4):
            with pytest.raises(LogMoved) as ei:
                await store.log_append("kt", [b"x"], expected_first=stale)
            assert (ei.value.expected, ei.value.actual) == (stale, 3)
        assert await store.log_size("kt") == 3  # nothing written by the refused appends
        assert await store.log_read("kt", 0, 10) == [b"e0", b"e1", b"e2"]
        with pytest.raises(LogMoved):  # also for a log that does not exist yet
            await store.log_append("new", [b"x"], expected_first=1)
        assert await store.log_size("new") == 0
        # Racing writers built for the same size: exactly one lands.
        outcomes = await asyncio.gather(
            *(store.log_append("kt", [b"r"], expected_first=3) for _ in range(4)),
            return_exceptions=True)
        assert sorted(type(o).__name__ for o in outcomes) == ["LogMoved"] * 3 + ["int"]
        assert await store.log_size("kt") == 4

    async def test_contract_log_append_writes_kv_rows_with_its_entries(
        self, store: Storage
    ) -> None:
        await store.kv_put("idx", b"old", b"0")
        rows = [("idx", b"a", b"1"), ("idx", b"old", b"2"), ("other", b"a", b"3")]
        assert await store.log_append("kt", [b"e0"], expected_first=0, kv_puts=rows) == 0
        assert [await store.kv_get(ns, k) for ns, k, _v in rows] == [b"1", b"2", b"3"]
        # Refused: neither the entry nor any row is written.
        with pytest.raises(LogMoved):
            await store.log_append("kt", [b"x"], expected_first=0,
                                   kv_puts=[("idx", b"a", b"lost"), ("idx", b"new", b"lost")])
        assert await store.log_size("kt") == 1
        assert await store.kv_get("idx", b"a") == b"1"
        assert await store.kv_get("idx", b"new") is None
        # No entries: the rows are written only if the log still has the expected size.
        assert await store.log_append("kt", [], expected_first=1,
                                      kv_puts=[("idx", b"a", b"4")]) == 1
        assert await store.kv_get("idx", b"a") == b"4"
        with pytest.raises(LogMoved):
            await store.log_append("kt", [], expected_first=0, kv_puts=[("idx", b"a", b"5")])
        assert await store.kv_get("idx", b"a") == b"4"
        assert await store.log_size("kt") == 1
        # Racing writers built for the same size: the rows of exactly one land, with it.
        outcomes = await asyncio.gather(
            *(store.log_append("kt", [b"r%d" % i], expected_first=1,
                               kv_puts=[("idx", b"race", b"%d" % i)]) for i in range(4)),
            return_exceptions=True)
        winner = [i for i, o in enumerate(outcomes) if o == 1]
        assert len(winner) == 1
        assert await store.log_read("kt", 1, 2) == [b"r%d" % winner[0]]
        assert await store.kv_get("idx", b"race") == b"%d" % winner[0]

    async def test_contract_exclusive_sections_do_not_overlap(self, store: Storage) -> None:
        inside: list[int] = []
        overlaps = 0

        async def section(i: int, name: str) -> None:
            nonlocal overlaps
            async with store.exclusive(name):
                overlaps += bool(inside)
                inside.append(i)
                await store.log_append("sections", [b"%d" % i])
                inside.remove(i)

        await asyncio.gather(*(section(i, "one") for i in range(8)))
        assert overlaps == 0 and await store.log_size("sections") == 8
        async with store.exclusive("one"):  # another name does not wait
            await asyncio.wait_for(section(99, "two"), 10)

    async def test_contract_log_read_many(self, store: Storage) -> None:
        entries = [b"e%d" % i for i in range(1200)]  # large lookups (chunked IN)
        assert await store.log_append("kt", entries) == 0
        await store.log_append("other", [b"x0", b"x1"])
        assert await store.log_read_many("kt", []) == {}
        got = await store.log_read_many("kt", [5, 0, 5, 1199, 1200, -1, 700])
        assert got == {0: b"e0", 5: b"e5", 700: b"e700", 1199: b"e1199"}
        wide = list(range(0, 1200, 2))
        assert await store.log_read_many("kt", wide) == {i: entries[i] for i in wide}
        assert await store.log_read_many("other", [1, 2]) == {1: b"x1"}
        assert await store.log_read_many("missing", [0]) == {}
        # The base class's fallback (one log_read per index) gives the same answers.
        assert await Storage.log_read_many(store, "kt", [5, 0, 5, 1199, 1200, -1, 700]) == got


__all__ = ["StorageContract"]
