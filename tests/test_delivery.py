"""Delivery service (200-205) end to end over real QUIC with the SQLCipher store."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from qpc_core.app import App
from qpc_core.builtin import delivery as delivery_mod
from qpc_core.client.sdk import ProofError
from qpc_core.errors import (
    BadRequest,
    Forbidden,
    QuotaExceeded,
    RateLimited,
    RpcError,
    StorageError,
    TooLarge,
)
from qpc_core.framing import PushEvent
from qpc_core.pb import common_pb2


def rate_limit_hits(app) -> list[tuple[str, str]]:
    """(key kind, group) of every on_rate_limited the app fires from now on."""
    from qpc_core.hookspecs import hookimpl

    hits: list[tuple[str, str]] = []

    class Spy:
        @hookimpl
        def on_rate_limited(self, app, key_kind, group, method_id, retry_after):
            hits.append((key_kind, group))

    app.pm.register(Spy(), name="rate-limit-spy")
    return hits


async def pair(server, connect):
    return await connect(server), await connect(server)


async def test_fifo_and_monotonic_seq(server, connect) -> None:
    alice, bob = await pair(server, connect)
    seqs = [(await alice.enqueue(bob.identity_key, f"m{i}".encode())).seq for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    msgs = await bob.fetch()
    assert [(m.seq, m.data) for m in msgs] == [(i + 1, f"m{i}".encode()) for i in range(5)]
    assert await bob.fetch() == []
    # seq keeps increasing after the inbox was drained
    assert (await alice.enqueue(bob.identity_key, b"later")).seq == 6


async def test_channels_are_separate_inboxes(server, connect) -> None:
    alice, bob = await pair(server, connect)
    await alice.enqueue(bob.identity_key, b"default")
    r = await alice.enqueue(bob.identity_key, b"grp", channel=b"group-1")
    assert r.seq == 1
    assert [m.data for m in await bob.fetch(channel=b"group-1")] == [b"grp"]
    assert [m.data for m in await bob.fetch()] == [b"default"]


async def test_fetch_limit(server, connect) -> None:
    alice, bob = await pair(server, connect)
    for i in range(5):
        await alice.enqueue(bob.identity_key, bytes([i]))
    assert [m.seq for m in await bob.fetch(limit=2)] == [1, 2]
    assert [m.seq for m in await bob.fetch(limit=0)] == [3, 4, 5]


async def test_dedup_returns_original_seq(server, connect) -> None:
    alice, bob = await pair(server, connect)
    mid = b"\x01" * 16
    first = await alice.enqueue(bob.identity_key, b"once", message_id=mid)
    await alice.enqueue(bob.identity_key, b"other")
    again = await alice.enqueue(bob.identity_key, b"once", message_id=mid)
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert [m.data for m in await bob.fetch()] == [b"once", b"other"]


async def test_a_duplicate_proof_vouches_for_the_id_not_the_retried_payload(
    server, connect
) -> None:
    """A repeat of a message id with another payload is answered as the duplicate it is, and
    its proof says "this id was accepted under this seq"; it never claims that the new
    payload was accepted (the server kept the first one)."""
    alice, bob = await pair(server, connect)
    mid = b"\x02" * 16
    first = await alice.enqueue(bob.identity_key, b"original", message_id=mid)
    again = await alice.enqueue(bob.identity_key, b"EVIL", message_id=mid)  # verified (SDK)
    assert again.duplicate and again.seq == first.seq
    digest = delivery_mod.proof_digest(bob.identity_key, b"", again.seq, b"EVIL")
    assert again.delivery_proof[:32] != digest
    assert again.delivery_proof[:32] == delivery_mod.duplicate_proof_digest(
        bob.identity_key, b"", again.seq, mid)
    with pytest.raises(ProofError, match="digest"):  # another id: not what was vouched for
        await alice.verify_proof(again, bob.identity_key, b"", b"EVIL", b"\x03" * 16)
    with pytest.raises(ProofError, match="without a message id"):
        await alice.verify_proof(again, bob.identity_key, b"", b"EVIL")
    # BatchEnqueue: one fresh and one duplicate result, each with its own kind of proof.
    batch = await alice.batch_enqueue([bob.identity_key, alice.identity_key], b"b", message_id=mid)
    assert [r.duplicate for r in batch] == [True, False]
    assert [m.data for m in await bob.fetch()] == [b"original"]


async def test_ack_beyond_any_seq_removes_everything(server, connect) -> None:
    """seq_up_to is a u64; values past the store's signed 64-bit range mean "all" (they
    used to end in an internal error)."""
    alice, bob = await pair(server, connect)
    for i in range(3):
        await alice.enqueue(bob.identity_key, b"m%d" % i)
    assert await bob.ack(2**64 - 1) == 3
    await alice.enqueue(bob.identity_key, b"later")
    assert await bob.ack(2**63) == 1
    assert await bob.peek() == []


async def test_fetch_all_is_not_answered_with_fewer_bytes_than_a_limit(
    app_factory, connect
) -> None:
    """The answer's envelope bytes are counted per message returned, so "all" (limit 0) and
    an explicit limit carry the same payload bytes, and many small messages still come in
    one answer."""
    app = await app_factory(max_payload_bytes=64 * 1024, max_message_bytes=16 * 1024)
    alice, bob = await pair(app, connect)
    for i in range(5):
        await alice.enqueue(bob.identity_key, bytes([i]) * 15_000)
    assert len(await bob.peek(limit=5)) == 4  # 4 x 15 000 fit in 64 KiB, 5 do not
    assert [m.seq for m in await bob.fetch(limit=0)] == [1, 2, 3, 4]
    assert [m.seq for m in await bob.fetch(limit=0)] == [5]
    for _ in range(500):
        await alice.enqueue(bob.identity_key, b"tiny", ttl_secs=0)
    assert len(await bob.fetch(limit=0)) == 500  # small messages: all of them at once


async def test_many_small_messages_fetch_within_one_frame(app_factory, connect) -> None:
    """Each message's envelope counts against the answer's frame (the service passes it to
    the store): 90 x 47 bytes do not fit one 4 KiB answer with their envelopes."""
    app = await app_factory(max_payload_bytes=4096)
    alice, bob = await pair(app, connect)
    for i in range(90):
        await alice.enqueue(bob.identity_key, bytes([i]) * 47)
    sizes = []
    while batch := await bob.fetch():  # an oversize answer would be INTERNAL here
        sizes.append(len(batch))
    assert sum(sizes) == 90 and len(sizes) >= 2


async def test_a_burst_handed_to_a_parked_fetch_wait_fits_one_frame(
    app_factory, connect, monkeypatch
) -> None:
    """Enqueues sharing one claim on a parked FetchWait count envelopes like the stores do,
    so what is handed over always fits one answer; the rest is stored, none lost."""
    app = await app_factory(max_payload_bytes=1024)
    alice, bob = await pair(app, connect)
    d = app.state["delivery"]
    parked, joined_all, gate = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_park, real_join, real_enqueue = delivery_mod.Waiter.park, d.join_claim, app.storage.enqueue
    joins = 0

    def park(self):
        real_park(self)
        parked.set()

    def join(key, size):
        nonlocal joins
        joins += 1
        if joins == 12:
            joined_all.set()
        return real_join(key, size)

    async def held_enqueue(messages, **kw):
        await gate.wait()  # the first commit waits until the whole burst has joined
        return await real_enqueue(messages, **kw)

    monkeypatch.setattr(delivery_mod.Waiter, "park", park)
    monkeypatch.setattr(d, "join_claim", join)
    monkeypatch.setattr(app.storage, "enqueue", held_enqueue)
    waiting = asyncio.ensure_future(bob.fetch_wait(20_000))
    await asyncio.wait_for(parked.wait(), 10)
    sends = [asyncio.ensure_future(alice.enqueue(bob.identity_key, bytes([i]) * 80))
             for i in range(12)]
    await asyncio.wait_for(joined_all.wait(), 10)
    gate.set()
    await asyncio.gather(*sends)
    handed = await asyncio.wait_for(waiting, 10)  # an oversize answer would be INTERNAL
    assert 0 < len(handed) < 12  # 12 x (80 + 24) > 1024 - 64
    rest = await bob.fetch()
    assert sorted(m.seq for m in handed + rest) == list(range(1, 13))


async def test_a_message_stored_under_a_larger_limit_is_still_delivered(
    app_factory, connect, tmp_path
) -> None:
    """Lowering max_payload_bytes must not lose messages accepted under the old limit: the
    one that no longer fits is answered alone, above the new limit (within the protocol's)."""
    data = tmp_path / "lowered"
    app = await app_factory(data_dir=data)
    alice, bob = await pair(app, connect)
    await alice.enqueue(bob.identity_key, b"B" * 100_000)
    await alice.enqueue(bob.identity_key, b"small")
    await app.stop()
    app2 = await app_factory(data_dir=data, max_payload_bytes=16 * 1024,
                             max_message_bytes=8 * 1024)
    bob2 = await connect(app2, identity=bob.identity)
    first = await bob2.fetch()
    assert [(m.seq, len(m.data)) for m in first] == [(1, 100_000)]
    assert [m.data for m in await bob2.fetch()] == [b"small"]


async def test_ttl_expiry_and_collector(server, connect, monkeypatch) -> None:
    alice, bob = await pair(server, connect)
    await alice.enqueue(bob.identity_key, b"short", ttl_secs=5)
    await alice.enqueue(bob.identity_key, b"forever")
    real = delivery_mod.time.time
    monkeypatch.setattr(delivery_mod.time, "time", lambda: real() + 10)
    assert [m.data for m in await bob.peek()] == [b"forever"]
    d = server.state["delivery"]
    assert await d.collect_once() == 1
    assert await server.storage.queue_depth(bob.identity_key, b"") == 1
    assert [m.data for m in await bob.fetch()] == [b"forever"]


async def test_fetch_wait_is_woken_by_enqueue(server, connect) -> None:
    alice, bob = await pair(server, connect)
    d = server.state["delivery"]
    registered = asyncio.Event()

    class Watched(dict):
        def setdefault(self, key, default=None):
            registered.set()  # the long poll is now waiting
            return super().setdefault(key, default)

    d.waiters = Watched(d.waiters)
    waiting = asyncio.ensure_future(bob.fetch_wait(20_000))
    await asyncio.wait_for(registered.wait(), 10)
    assert not waiting.done()
    await alice.enqueue(bob.identity_key, b"wake up")
    msgs = await asyncio.wait_for(waiting, 10)
    assert [m.data for m in msgs] == [b"wake up"]


async def test_fetch_wait_times_out_empty(server, connect) -> None:
    bob = await connect(server)
    assert await bob.fetch_wait(50) == []


async def test_fetch_wait_timeout_is_capped(app_factory, connect) -> None:
    app = await app_factory(max_fetch_wait_ms=100)
    bob = await connect(app)
    assert await asyncio.wait_for(bob.fetch_wait(3_600_000), 10) == []


async def test_push_on_new_message(server, connect) -> None:
    alice, bob = await pair(server, connect)
    r = await alice.enqueue(bob.identity_key, b"hi", channel=b"c1")
    push = await asyncio.wait_for(bob.pushes.get(), 10)
    assert push.event_type == PushEvent.NEW_MESSAGE
    ev = common_pb2.NewMessageEvent.FromString(push.payload)
    assert (ev.recipient_key, ev.channel_id, ev.seq) == (bob.identity_key, b"c1", r.seq)
    assert alice.pushes.empty()


async def test_peek_then_ack(server, connect) -> None:
    alice, bob = await pair(server, connect)
    for i in range(4):
        await alice.enqueue(bob.identity_key, bytes([i]))
    peeked = await bob.peek()
    assert [m.seq for m in peeked] == [1, 2, 3, 4]
    assert [m.seq for m in await bob.peek(limit=2)] == [1, 2]
    assert await bob.ack(2) == 2
    assert [m.seq for m in await bob.peek()] == [3, 4]
    assert await bob.ack(2) == 0
    assert await bob.ack(10) == 2
    assert await bob.fetch() == []


async def test_batch_enqueue(server, connect) -> None:
    alice, bob = await pair(server, connect)
    carol = await connect(server)
    await alice.enqueue(carol.identity_key, b"first for carol")
    res = await alice.batch_enqueue([bob.identity_key, carol.identity_key], b"to both")
    assert [r.seq for r in res] == [1, 2]
    assert [m.data for m in await bob.fetch()] == [b"to both"]
    assert [m.data for m in await carol.fetch()] == [b"first for carol", b"to both"]


async def test_batch_enqueue_all_or_nothing(app_factory, connect) -> None:
    app = await app_factory(max_queue_depth=2)
    alice, bob = await connect(app), await connect(app)
    carol = await connect(app)
    await alice.enqueue(carol.identity_key, b"1")
    await alice.enqueue(carol.identity_key, b"2")  # carol is now full
    with pytest.raises(QuotaExceeded, match="queue is full"):
        await alice.batch_enqueue([bob.identity_key, carol.identity_key], b"x")
    assert await bob.fetch() == []  # nothing was written for bob either
    with pytest.raises(BadRequest, match="duplicates"):
        await alice.batch_enqueue([bob.identity_key, bob.identity_key], b"x")
    with pytest.raises(BadRequest, match="32 bytes"):
        await alice.batch_enqueue([bob.identity_key, b"short"], b"x")


async def test_limits(app_factory, connect) -> None:
    app = await app_factory(max_message_bytes=1000, max_queue_depth=3)
    alice, bob = await connect(app), await connect(app)
    with pytest.raises(TooLarge, match="max_message_bytes=1000"):
        await alice.enqueue(bob.identity_key, b"x" * 1001)
    for _ in range(3):
        await alice.enqueue(bob.identity_key, b"ok")
    with pytest.raises(QuotaExceeded) as ei:
        await alice.enqueue(bob.identity_key, b"one too many")
    assert ei.value.retry_after and ei.value.retry_after > 0
    assert len(await bob.fetch()) == 3  # nothing lost, nothing extra


def test_a_call_refused_by_one_key_is_charged_to_none() -> None:
    from qpc_core.config import RateLimit
    from qpc_core.ratelimit import RateLimiter

    now = [0.0]
    lim = RateLimiter({"g": RateLimit(requests=3, window_secs=60)}, clock=lambda: now[0],
                      ip_factor=1.0)
    for _ in range(3):  # B uses up the shared IP's budget
        assert lim.check_all("g", [("identity", "B"), ("ip", "10.0.0.1")]).allowed
    refused = lim.check_all("g", [("identity", "A"), ("ip", "10.0.0.1")])
    assert not refused.allowed and refused.kind == "ip" and refused.retry_after_secs > 0
    # A's own budget is untouched: from another address it still has all 3 calls.
    for _ in range(3):
        assert lim.check_all("g", [("identity", "A"), ("ip", "10.0.0.2")]).allowed
    assert lim.check_all("g", [("identity", "A"), ("ip", "10.0.0.3")]).kind == "identity"


async def test_a_call_the_ip_limit_refuses_leaves_the_identity_budget_alone(
    app_factory, connect
) -> None:
    app = await app_factory(rate_limits={"delivery": {"requests": 3, "window_secs": 60}},
                            rate_limit_ip_factor=1.0)
    hits = rate_limit_hits(app)
    alice, carol, bob = await connect(app), await connect(app), await connect(app)
    await alice.enqueue(bob.identity_key, b"alice 1")  # alice 1/3, IP 1/3
    for _ in range(2):
        await carol.enqueue(bob.identity_key, b"carol")  # IP 3/3 (all on 127.0.0.1)
    with pytest.raises(RateLimited):
        await alice.enqueue(bob.identity_key, b"refused by the IP limit")
    assert hits == [("ip", "delivery")]
    used = app.rate_limiter._entries[("delivery", "identity", alice.identity_key)].cur
    assert used == 1  # the refused call was not charged to alice


async def test_batch_enqueue_counts_one_enqueue_per_recipient(app_factory, connect) -> None:
    app = await app_factory(rate_limits={"delivery": {"requests": 10, "window_secs": 60}})
    alice = await connect(app)
    others = [await connect(app) for _ in range(4)]
    keys = [o.identity_key for o in others]
    await alice.batch_enqueue(keys, b"to four")  # 4 of the 10
    await alice.batch_enqueue(keys, b"again")  # 8 of the 10
    with pytest.raises(RateLimited, match=r"\(4 enqueues\)") as ei:
        await alice.batch_enqueue(keys, b"too many")  # would be 12
    assert ei.value.retry_after is not None and ei.value.retry_after > 0
    await alice.enqueue(keys[0], b"9 of 10: the refused batch counted nothing")
    await alice.enqueue(keys[0], b"10 of 10")
    assert [len(await o.peek()) for o in others] == [4, 2, 2, 2]
    many = [bytes([i]) * 32 for i in range(11)]
    with pytest.raises(TooLarge, match="counts as 11 enqueues"):  # waiting would not help
        await others[0].batch_enqueue(many, b"never fits")


async def test_an_enqueue_only_rate_limit_leaves_reads_alone(app_factory, connect) -> None:
    """[rate_limits.enqueue] (optional) counts Enqueue/BatchEnqueue messages only: a sender
    at its enqueue limit can still fetch, and a refused batch counts nowhere."""
    app = await app_factory(rate_limits={"enqueue": {"requests": 4, "window_secs": 60},
                                         "delivery": {"requests": 20, "window_secs": 60}})
    hits = rate_limit_hits(app)
    alice, bob, carol = await connect(app), await connect(app), await connect(app)
    await alice.enqueue(bob.identity_key, b"1")
    await alice.batch_enqueue([bob.identity_key, carol.identity_key], b"2 and 3")
    with pytest.raises(RateLimited, match=r"'enqueue' calls exceeded \(2 enqueues\)"):
        await alice.batch_enqueue([bob.identity_key, carol.identity_key], b"4 and 5")
    await alice.enqueue(bob.identity_key, b"4")  # the refused batch counted nothing
    with pytest.raises(RateLimited, match="'enqueue'"):
        await alice.enqueue(bob.identity_key, b"5")
    for _ in range(5):  # reads are limited by the delivery group only
        await alice.fetch()
    assert hits == [("identity", "enqueue"), ("identity", "enqueue")]
    # delivery group: 1 + 2 (batch) + 1 + the refused ones given back + 5 fetches = 9 of 20
    used = app.rate_limiter._entries[("delivery", "identity", alice.identity_key)].cur
    assert used == 9
    with pytest.raises(TooLarge, match="'enqueue' rate limit allows 4"):
        await carol.batch_enqueue([bytes([i]) * 32 for i in range(5)], b"never fits")
    # ... and that refusal gave back what the batch had counted in the delivery group.
    assert app.rate_limiter._entries[("delivery", "identity", carol.identity_key)].cur == 0


async def test_the_enqueue_group_applies_only_when_configured(app_factory, connect) -> None:
    """No [rate_limits.enqueue]: sends are limited by delivery alone, never by `default`."""
    app = await app_factory(rate_limits={"default": {"requests": 2, "window_secs": 60},
                                         "delivery": {"requests": 100, "window_secs": 60}})
    alice, bob = await pair(app, connect)
    for i in range(5):
        await alice.enqueue(bob.identity_key, b"%d" % i)
    await alice.batch_enqueue([bob.identity_key, alice.identity_key], b"b")
    assert not any(k[0] == "enqueue" for k in app.rate_limiter._entries)


async def test_a_batch_the_delivery_limit_refuses_counts_nothing_in_enqueue(
    app_factory, connect
) -> None:
    app = await app_factory(rate_limits={"enqueue": {"requests": 100, "window_secs": 60},
                                         "delivery": {"requests": 3, "window_secs": 60}})
    alice, bob, carol = await connect(app), await connect(app), await connect(app)
    await alice.enqueue(bob.identity_key, b"1")  # delivery 1, enqueue 1
    with pytest.raises(RateLimited, match="'delivery'"):
        await alice.batch_enqueue([bob.identity_key, carol.identity_key, b"\x07" * 32], b"x")
    entries = app.rate_limiter._entries
    assert entries[("enqueue", "identity", alice.identity_key)].cur == 1
    assert entries[("delivery", "identity", alice.identity_key)].cur == 1


async def test_sender_rate_limit(app_factory, connect) -> None:
    app = await app_factory(rate_limits={"delivery": {"requests": 5, "window_secs": 60}})
    hits = rate_limit_hits(app)
    alice, bob = await connect(app), await connect(app)
    for _ in range(5):
        await alice.enqueue(bob.identity_key, b"x")
    with pytest.raises(RateLimited) as ei:
        await alice.enqueue(bob.identity_key, b"x")
    assert ei.value.retry_after is not None and ei.value.retry_after > 0
    assert hits == [("identity", "delivery")]
    assert len(await bob.fetch()) == 5


async def test_other_identity_queue_is_forbidden(server, connect) -> None:
    alice, bob = await pair(server, connect)
    await alice.enqueue(bob.identity_key, b"secret")
    for call in (alice.fetch, alice.peek):
        with pytest.raises(Forbidden, match="your own queue"):
            await call(recipient=bob.identity_key)
    with pytest.raises(Forbidden):
        await alice.fetch_wait(10, recipient=bob.identity_key)
    with pytest.raises(Forbidden):
        await alice.ack(100, recipient=bob.identity_key)
    assert [m.data for m in await bob.fetch()] == [b"secret"]  # still there


async def test_malformed_requests(server, connect) -> None:
    alice, bob = await pair(server, connect)
    with pytest.raises(BadRequest, match="message_id"):
        await alice.enqueue(bob.identity_key, b"x", message_id=b"short")
    with pytest.raises(BadRequest, match="payload must not be empty"):
        await alice.enqueue(bob.identity_key, b"")
    with pytest.raises(BadRequest, match="channel_id"):
        await alice.enqueue(bob.identity_key, b"x", channel=b"c" * 65)
    with pytest.raises(BadRequest, match="recipient_key"):
        await alice.enqueue(b"\x00" * 33, b"x")
    assert await bob.fetch() == []


async def test_delivery_proof_verifies_and_detects_tampering(server, connect) -> None:
    alice, bob = await pair(server, connect)
    r = await alice.enqueue(bob.identity_key, b"proof me")  # verified inside the SDK
    assert len(r.delivery_proof) == 96
    with pytest.raises(ProofError, match="digest"):
        await alice.verify_proof(r, bob.identity_key, b"", b"something else")
    forged = type(r)(seq=r.seq, delivery_proof=r.delivery_proof[:32] + bytes(64))
    with pytest.raises(ProofError, match="signature"):
        await alice.verify_proof(forged, bob.identity_key, b"", b"proof me")


async def test_signing_key_persists_across_restart(app_factory, connect) -> None:
    app = await app_factory()
    k1 = (await (await connect(app)).health()).signing_key
    await app.stop()
    app2 = await app_factory()
    assert (await (await connect(app2)).health()).signing_key == k1


async def test_created_channel_requires_membership(server, connect) -> None:
    alice, bob = await pair(server, connect)
    mallory = await connect(server)
    cid, was_new = await alice.create_channel([bob.identity_key])
    assert was_new and len(cid) == 16
    cid2, was_new2 = await bob.create_channel([alice.identity_key])
    assert cid2 == cid and not was_new2
    await alice.enqueue(bob.identity_key, b"member", channel=cid)
    with pytest.raises(Forbidden, match="not a member"):
        await mallory.enqueue(bob.identity_key, b"intruder", channel=cid)
    with pytest.raises(Forbidden, match="recipient is not a member"):
        await alice.enqueue(mallory.identity_key, b"x", channel=cid)
    assert [m.data for m in await bob.fetch(channel=cid)] == [b"member"]


async def test_recreating_a_channel_restores_a_member_who_deleted_the_account(
    server, connect
) -> None:
    """DeleteAccount drops the member from its channels; the same member set created again is
    the same channel (was_new false) with the member back (it used to stay forbidden)."""
    alice, bob = await pair(server, connect)
    cid, _ = await alice.create_channel([bob.identity_key])
    await bob.delete_account()
    bob2 = await connect(server, identity=bob.identity)  # the same key comes back
    with pytest.raises(Forbidden, match="recipient is not a member"):
        await alice.enqueue(bob2.identity_key, b"lost?", channel=cid)
    cid2, was_new = await alice.create_channel([bob2.identity_key])
    assert cid2 == cid and not was_new
    await alice.enqueue(bob2.identity_key, b"welcome back", channel=cid)
    assert [m.data for m in await bob2.fetch(channel=cid)] == [b"welcome back"]


async def test_a_lookup_racing_a_recreate_does_not_cache_the_old_members(
    server, connect, monkeypatch
) -> None:
    alice, bob = await pair(server, connect)
    cid, _ = await alice.create_channel([bob.identity_key])
    await bob.delete_account()
    bob2 = await connect(server, identity=bob.identity)
    d = server.state["delivery"]
    d.forget_channels()
    real = server.storage.channel_members
    looked, release = asyncio.Event(), asyncio.Event()

    async def slow(channel: bytes):
        members = await real(channel)  # read before the re-create commits: [alice]
        looked.set()
        await release.wait()
        return members

    monkeypatch.setattr(server.storage, "channel_members", slow)
    stale = asyncio.ensure_future(alice.enqueue(bob2.identity_key, b"x", channel=cid))
    await asyncio.wait_for(looked.wait(), 10)
    monkeypatch.setattr(server.storage, "channel_members", real)
    await alice.create_channel([bob2.identity_key])  # bob is back; the cache is dropped
    release.set()
    with pytest.raises(Forbidden):
        await stale  # answered from its own (old) read
    assert cid not in d.channel_cache  # ... but that read was not cached
    await alice.enqueue(bob2.identity_key, b"welcome back", channel=cid)


async def test_channel_member_cap_counts_the_caller(server, connect) -> None:
    alice = await connect(server)
    others = [bytes([i >> 8, i & 0xFF]) * 16 for i in range(1000)]
    with pytest.raises(TooLarge, match="at most 1000 members, the caller included"):
        await alice.create_channel(others)  # 1000 others + alice = 1001
    cid, was_new = await alice.create_channel(others[:999])  # 1000 with alice
    assert was_new and len(await server.storage.channel_members(cid)) == 1000


async def test_key_packages_single_use_fifo(server, connect) -> None:
    alice, bob = await pair(server, connect)
    fp = await alice.upload_key_package(b"kp-1")
    assert fp == hashlib.sha256(b"kp-1").digest()
    await alice.upload_key_package(b"kp-2")
    assert await bob.fetch_key_package(alice.identity_key) == b"kp-1"
    assert await bob.fetch_key_package(alice.identity_key) == b"kp-2"
    assert await bob.fetch_key_package(alice.identity_key) == b""
    with pytest.raises(TooLarge, match="1 MiB"):
        await alice.upload_key_package(b"x" * (1024 * 1024 + 1))
    with pytest.raises(BadRequest):
        await alice.upload_key_package(b"")
    from qpc_core.pb import keys_pb2

    with pytest.raises(Forbidden):
        await alice.call(
            300,
            keys_pb2.UploadKeyPackageRequest(identity_key=bob.identity_key, package=b"p"),
            keys_pb2.UploadKeyPackageResponse,
        )


async def test_key_packages_pop_atomically_under_concurrency(server, connect) -> None:
    alice = await connect(server)
    fetchers = [await connect(server) for _ in range(3)]
    for i in range(20):
        await alice.upload_key_package(f"kp-{i}".encode())
    got = await asyncio.gather(
        *(f.fetch_key_package(alice.identity_key) for f in fetchers for _ in range(10))
    )
    real = [g for g in got if g]
    assert sorted(real) == sorted(f"kp-{i}".encode() for i in range(20))  # each exactly once
    assert got.count(b"") == 10


async def test_hybrid_keys(server, connect) -> None:
    alice, bob = await pair(server, connect)
    key = bytes(range(256)) * 4 + bytes(1216 - 1024)
    with pytest.raises(BadRequest, match="1216"):
        await alice.upload_hybrid_key(b"x" * 100)
    await alice.upload_hybrid_key(key)
    assert await bob.fetch_hybrid_key(alice.identity_key) == key
    assert await bob.fetch_hybrid_key(bob.identity_key) == b""
    assert await bob.fetch_hybrid_keys([alice.identity_key, bob.identity_key]) == {
        alice.identity_key: key
    }
    await alice.upload_hybrid_key(key[::-1])  # replaced, not single use
    assert await bob.fetch_hybrid_key(alice.identity_key) == key[::-1]
    assert await bob.fetch_hybrid_key(alice.identity_key) == key[::-1]


async def test_resolve_user_and_identity(server, connect) -> None:
    from qpc_core.errors import Conflict, NotFound
    from qpc_core.users import register_user

    alice = await connect(server)
    assert await register_user(server, "Alice", alice.identity_key) == "alice"
    with pytest.raises(Conflict):
        await register_user(server, "alice", b"\x05" * 32)
    r = await alice.resolve_user("@alice")
    assert r.identity_key == alice.identity_key and r.username == "alice"
    assert (await alice.resolve_identity(alice.identity_key)).username == "alice"
    with pytest.raises(NotFound):
        await alice.resolve_user("nobody")
    with pytest.raises(BadRequest):
        await alice.resolve_user("bad name!")


async def test_delete_account_purges_everything(server, connect) -> None:
    from qpc_core.errors import NotFound
    from qpc_core.users import register_user

    alice, bob = await pair(server, connect)
    await register_user(server, "bob", bob.identity_key)
    other_bob = await connect(server, identity=bob.identity)
    await alice.enqueue(bob.identity_key, b"m1")
    await alice.enqueue(bob.identity_key, b"m2", channel=b"chan")
    await bob.upload_key_package(b"kp")
    await bob.upload_hybrid_key(b"h" * 1216)
    await alice.enqueue(alice.identity_key, b"alice keeps this")
    await bob.delete_account()
    assert await server.storage.queue_depth(bob.identity_key, b"") == 0
    assert await server.storage.queue_depth(bob.identity_key, b"chan") == 0
    assert await alice.fetch_key_package(bob.identity_key) == b""
    assert await alice.fetch_hybrid_key(bob.identity_key) == b""
    with pytest.raises(NotFound):
        await alice.resolve_user("bob")
    events = []
    while not events or events[-1] != PushEvent.SESSION_REVOKED:
        events.append((await asyncio.wait_for(other_bob.pushes.get(), 10)).event_type)
    assert events == [PushEvent.NEW_MESSAGE, PushEvent.NEW_MESSAGE, PushEvent.SESSION_REVOKED]
    await asyncio.wait_for(other_bob.protocol.wait_closed(), 10)
    assert [m.data for m in await alice.fetch()] == [b"alice keeps this"]


async def test_fetch_all_always_fits_in_one_frame(app_factory, connect) -> None:
    app = await app_factory(max_payload_bytes=4096)
    alice, bob = await connect(app), await connect(app)
    await asyncio.gather(
        *(alice.enqueue(bob.identity_key, bytes([i % 256]), verify=False) for i in range(300))
    )
    got = []
    while batch := await bob.fetch():  # limit 0 = "all that fit"; nothing may be lost
        assert len(batch) < 300
        got.extend(batch)
    assert sorted(m.seq for m in got) == list(range(1, 301))
    with pytest.raises(TooLarge, match="exceeds the limit"):
        await alice.enqueue(bob.identity_key, b"x" * 4020)  # fits a request, not a response


async def test_delete_account_unbinds_the_callers_connection(server, connect) -> None:
    from qpc_core.errors import Unauthenticated

    bob = await connect(server)
    await bob.delete_account()
    assert (await bob.whoami()).identity_key == b""
    with pytest.raises(Unauthenticated):
        await bob.fetch()


async def test_one_push_per_inbox_until_fetched(server, connect) -> None:
    alice, bob = await pair(server, connect)
    r1 = await alice.enqueue(bob.identity_key, b"1")
    await alice.enqueue(bob.identity_key, b"2")
    first = await asyncio.wait_for(bob.pushes.get(), 10)
    assert common_pb2.NewMessageEvent.FromString(first.payload).seq == r1.seq
    assert [m.seq for m in await bob.fetch()] == [1, 2]
    assert bob.pushes.empty()  # the second message did not cause a second push
    r3 = await alice.enqueue(bob.identity_key, b"3")  # after a fetch, notify again
    again = await asyncio.wait_for(bob.pushes.get(), 10)
    assert common_pb2.NewMessageEvent.FromString(again.payload).seq == r3.seq
    # A second device of bob's that connects later is told too.
    bob2 = await connect(server, identity=bob.identity)
    await alice.enqueue(bob.identity_key, b"4")
    push = await asyncio.wait_for(bob2.pushes.get(), 10)
    assert common_pb2.NewMessageEvent.FromString(push.payload).seq == r3.seq + 1


def watch_parking(monkeypatch) -> asyncio.Event:
    """An event set each time a FetchWait parks (found its inbox empty and now waits)."""
    changed = asyncio.Event()
    real_park = delivery_mod.Waiter.park

    def park(self) -> None:
        real_park(self)
        changed.set()

    monkeypatch.setattr(delivery_mod.Waiter, "park", park)
    return changed


async def parked(d, key, changed: asyncio.Event, n: int = 1) -> None:
    """Wait until ``n`` FetchWaits are parked on inbox ``key`` (event-driven, no sleeps)."""
    while sum(w.parked and not w.fut.done() for w in d.waiters.get(key, ())) < n:
        changed.clear()
        await asyncio.wait_for(changed.wait(), 10)


async def test_enqueue_hands_message_to_parked_fetch_wait(server, connect, monkeypatch) -> None:
    parking = watch_parking(monkeypatch)
    alice, bob = await pair(server, connect)
    d = server.state["delivery"]
    calls = []
    real = server.storage.enqueue

    async def spy(messages, **kw):
        calls.append(set(kw.get("take", ())))
        return await real(messages, **kw)

    server.storage.enqueue = spy
    waiting = asyncio.ensure_future(bob.fetch_wait(20_000))
    await parked(d, (bob.identity_key, b""), parking)
    r = await alice.enqueue(bob.identity_key, b"straight through")
    msgs = await asyncio.wait_for(waiting, 10)
    assert [(m.seq, m.data) for m in msgs] == [(r.seq, b"straight through")]
    assert calls == [{(bob.identity_key, b"")}]  # the enqueue offered the hand-off
    # Delivered exactly once: nothing left in the store, seq continues.
    assert await server.storage.queue_depth(bob.identity_key, b"") == 0
    assert await bob.fetch() == []
    assert (await alice.enqueue(bob.identity_key, b"next")).seq == r.seq + 1
    assert [m.data for m in await bob.fetch()] == [b"next"]
    assert not d.claims and not d.waiters.get((bob.identity_key, b""))


async def test_message_for_a_departed_waiter_is_kept(server, connect, monkeypatch) -> None:
    """The FetchWait is claimed by an Enqueue, then goes away (its task is cancelled, as when
    its connection closes) before the commit: the acknowledged message must end up in the
    store, not be lost."""
    alice, bob = await pair(server, connect)
    d = server.state["delivery"]
    real = server.storage.enqueue
    outcomes = []

    def server_fetch_wait_task() -> asyncio.Task:
        for t in asyncio.all_tasks():
            c, names = t.get_coro(), []
            while c is not None:
                names.append(getattr(c, "__qualname__", ""))
                c = getattr(c, "cr_await", None)
            if "Delivery.fetch_wait" in names:
                return t
        raise AssertionError("no server-side FetchWait task")

    async def waiter_leaves_then_enqueue(messages, **kw):
        assert set(kw["take"]) == {(bob.identity_key, b"")}
        victim.cancel()
        outs = await real(messages, **kw)
        outcomes.extend(outs)
        return outs

    parking = watch_parking(monkeypatch)
    client_wait = asyncio.ensure_future(bob.fetch_wait(20_000))
    await parked(d, (bob.identity_key, b""), parking)
    victim = server_fetch_wait_task()
    server.storage.enqueue = waiter_leaves_then_enqueue
    r = await alice.enqueue(bob.identity_key, b"keep me")
    server.storage.enqueue = real
    assert [o.taken for o in outcomes] == [True]  # it was handed over in the transaction...
    assert victim.cancelled()
    # ...and put back before the Enqueue answered OK, under its seq; bob (still connected)
    # is told, as for any stored message, so nothing waits for a poll timeout.
    assert await server.storage.queue_depth(bob.identity_key, b"") == 1
    push = await asyncio.wait_for(bob.pushes.get(), 10)
    assert push.event_type == PushEvent.NEW_MESSAGE
    assert common_pb2.NewMessageEvent.FromString(push.payload).seq == r.seq
    msgs = await bob.fetch()
    assert [(m.seq, m.data) for m in msgs] == [(r.seq, b"keep me")]
    client_wait.cancel()


async def test_failed_put_back_forgets_the_message_id_so_a_retry_stores_it(
    server, connect, monkeypatch
) -> None:
    """The FetchWait leaves after being handed a message and putting the message back fails:
    the Enqueue answers with an error, and its retry (same message_id) must store the
    message, not be told "duplicate" of a message that was never kept."""
    alice, bob = await pair(server, connect)
    d = server.state["delivery"]
    st = server.storage
    real_enqueue, real_restore = st.enqueue, st.restore
    outcomes, restores = [], []

    def server_fetch_wait_task() -> asyncio.Task:
        for t in asyncio.all_tasks():
            c, names = t.get_coro(), []
            while c is not None:
                names.append(getattr(c, "__qualname__", ""))
                c = getattr(c, "cr_await", None)
            if "Delivery.fetch_wait" in names:
                return t
        raise AssertionError("no server-side FetchWait task")

    async def waiter_leaves_then_enqueue(messages, **kw):
        victim.cancel()
        outs = await real_enqueue(messages, **kw)
        outcomes.extend(outs)
        return outs

    async def failing_restore(taken):
        restores.append(taken)
        raise StorageError("disk full (injected)")

    parking = watch_parking(monkeypatch)
    client_wait = asyncio.ensure_future(bob.fetch_wait(20_000))
    await parked(d, (bob.identity_key, b""), parking)
    victim = server_fetch_wait_task()
    monkeypatch.setattr(st, "enqueue", waiter_leaves_then_enqueue)
    monkeypatch.setattr(st, "restore", failing_restore)
    mid = b"\x42" * 16
    with pytest.raises(RpcError):
        await alice.enqueue(bob.identity_key, b"retry me", message_id=mid)
    assert [o.taken for o in outcomes] == [True] and len(restores) == 1
    monkeypatch.setattr(st, "enqueue", real_enqueue)
    monkeypatch.setattr(st, "restore", real_restore)
    again = await alice.enqueue(bob.identity_key, b"retry me", message_id=mid)
    assert not again.duplicate and again.seq > outcomes[0].seq
    msgs = await bob.fetch()
    assert [(m.seq, m.data) for m in msgs] == [(again.seq, b"retry me")]
    # A third send of the same id is now the duplicate of the stored one.
    third = await alice.enqueue(bob.identity_key, b"retry me", message_id=mid)
    assert third.duplicate and third.seq == again.seq
    client_wait.cancel()


async def test_enqueue_during_the_look_is_stored_not_handed_over(server, connect) -> None:
    """A FetchWait that is still looking in the store (registered, not parked) is not handed
    messages: the Enqueue stores its message and wakes it.  (Handing it over lost the message
    when the look then returned stored messages: the hand-off landed in a future nobody read
    any more.  Seen in closed-loop load runs as one message in a few thousand.)"""
    alice, bob = await pair(server, connect)
    d = server.state["delivery"]
    looking, release = asyncio.Event(), asyncio.Event()
    real_fetch, real_restore = server.storage.fetch, server.storage.restore
    takes, restores = [], []

    async def held_fetch(*a, **kw):
        looking.set()
        await release.wait()
        return await real_fetch(*a, **kw)

    async def enqueue_spy(messages, **kw):
        takes.append(set(kw.get("take", ())))
        return await real_enqueue(messages, **kw)

    async def restore_spy(taken):
        restores.append(taken)
        return await real_restore(taken)

    real_enqueue = server.storage.enqueue
    server.storage.fetch, server.storage.enqueue = held_fetch, enqueue_spy
    server.storage.restore = restore_spy
    waiting = asyncio.ensure_future(bob.fetch_wait(20_000))
    await asyncio.wait_for(looking.wait(), 10)
    assert d.waiters.get((bob.identity_key, b""))  # registered, so it will be woken
    r = await alice.enqueue(bob.identity_key, b"during the look")
    release.set()
    msgs = await asyncio.wait_for(waiting, 10)
    assert [(m.seq, m.data) for m in msgs] == [(r.seq, b"during the look")]
    assert takes == [set()] and restores == []
    assert await server.storage.queue_depth(bob.identity_key, b"") == 0


async def test_fetch_wait_on_a_drained_inbox_parks_without_a_storage_round_trip(
    server, connect, monkeypatch
) -> None:
    """The store remembers inboxes it saw drained: a FetchWait on one parks in the loop turn
    it arrives in (no reader job, no transaction), so every Enqueue that follows finds it
    parked and hands its message over inside its own commit."""
    parking = watch_parking(monkeypatch)
    alice, bob = await pair(server, connect)
    d = server.state["delivery"]
    st = server.storage
    key = (bob.identity_key, b"")
    reads, takes = [], []
    real_reads, real_enqueue = st._hand_to_readers, st.enqueue

    def count_reads(jobs):
        reads.extend(fn.__name__ for fn, _a, _f in jobs)
        real_reads(jobs)

    async def enqueue_spy(messages, **kw):
        outs = await real_enqueue(messages, **kw)
        takes.extend(o.taken for o in outs)
        return outs

    monkeypatch.setattr(st, "_hand_to_readers", count_reads)
    monkeypatch.setattr(st, "enqueue", enqueue_spy)
    assert await bob.fetch() == []  # first look: a reader finds the inbox empty
    assert reads == ["_has_messages"]
    for i in range(5):
        waiting = asyncio.ensure_future(bob.fetch_wait(20_000))
        await parked(d, key, parking)
        r = await alice.enqueue(bob.identity_key, b"m%d" % i)
        msgs = await asyncio.wait_for(waiting, 10)
        assert [(m.seq, m.data) for m in msgs] == [(r.seq, b"m%d" % i)]
    assert reads == ["_has_messages"]  # never asked again
    assert takes == [True] * 5  # every message handed over, none stored
    assert await st.queue_depth(*key) == 0


async def test_fetch_after_a_store_skips_the_emptiness_check(server, connect) -> None:
    """A connected recipient whose inbox got stored messages fetches without the reader-side
    emptiness check first (a hint only: results are the same)."""
    alice, bob = await pair(server, connect)
    seen = []
    real = server.storage.fetch

    async def spy(*a, **kw):
        seen.append(kw.get("likely_nonempty", False))
        return await real(*a, **kw)

    server.storage.fetch = spy
    await alice.enqueue(bob.identity_key, b"stored")
    assert [m.data for m in await bob.fetch()] == [b"stored"]
    assert await bob.fetch() == []
    assert seen == [True, False]


async def test_stored_message_wakes_other_waiters_during_a_hand_off(
    server, connect, monkeypatch
) -> None:
    """While one FetchWait is being handed a message, a second message that cannot join that
    hand-off (the first waiter asked for one message) is stored and must wake the other
    FetchWait parked on the same inbox (two devices of one identity), not wait for its
    timeout."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    d = server.state["delivery"]
    alice = await connect(server)
    key = Ed25519PrivateKey.generate()
    bob1 = await connect(server, identity=key)
    bob2 = await connect(server, identity=key)
    inbox = (bob1.identity_key, b"")
    changed = asyncio.Event()

    class Watched(dict):
        def setdefault(self, k, default=None):
            changed.set()
            return super().setdefault(k, default)

    d.waiters = Watched(d.waiters)
    real_join = d.join_claim

    def join(k, size):
        changed.set()
        return real_join(k, size)

    d.join_claim = join

    async def until(cond) -> None:
        while not cond():
            changed.clear()
            await asyncio.wait_for(changed.wait(), 10)

    real = server.storage.enqueue
    gate = asyncio.Event()

    async def held_first(messages, **kw):
        if kw.get("take"):
            await gate.wait()  # keep the first hand-off in flight
        return await real(messages, **kw)

    server.storage.enqueue = held_first
    parking = watch_parking(monkeypatch)
    w1 = asyncio.ensure_future(bob1.fetch_wait(20_000, limit=1))
    w2 = asyncio.ensure_future(bob2.fetch_wait(20_000, limit=1))
    await parked(d, inbox, parking, n=2)
    first = asyncio.ensure_future(alice.enqueue(bob1.identity_key, b"one"))
    await until(lambda: inbox in d.claims)
    second = await alice.enqueue(bob1.identity_key, b"two")  # stored, not joined
    done, _ = await asyncio.wait([w1, w2], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert done, "the other parked FetchWait was not woken by the stored message"
    got = [m for t in done for m in t.result()]
    assert [(m.seq, m.data) for m in got] == [(second.seq, b"two")]
    gate.set()
    r1 = await first
    rest = [t for t in (w1, w2) if t not in done]
    assert [(m.seq, m.data) for m in await asyncio.wait_for(rest[0], 10)] == [(r1.seq, b"one")]
    server.storage.enqueue = real


async def test_a_failed_store_stops_the_server_with_exit_status_1(
    settings_factory: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that can no longer serve (here: its writer thread died) must not leave a server
    answering every call with an error and /healthz green: it stops, status 1, for a restart."""
    app = App(settings_factory())
    started = asyncio.Event()
    real_start = app.start

    async def start() -> None:
        await real_start()
        started.set()

    monkeypatch.setattr(app, "start", start)
    serving = asyncio.ensure_future(app.serve_forever())
    try:
        await asyncio.wait_for(started.wait(), 30)
        client = await connect(app)
        await client.enqueue(b"R" * 32, b"kept")

        def crash(conn: Any, batch: Any) -> None:
            raise RuntimeError("writer bug")

        monkeypatch.setattr(app.storage, "_run_batch", crash)
        with pytest.raises(RpcError):
            await client.enqueue(b"R" * 32, b"never acknowledged")
        await asyncio.wait_for(serving, 60)
    finally:
        if not serving.done():
            app.request_stop()
            await asyncio.wait_for(serving, 60)
    assert app.exit_code == 1
    assert app.draining and not app.started
