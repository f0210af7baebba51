"""Two qpc servers (real QUIC on loopback) sharing one real PostgreSQL database: one user base.

A sender on server 1 and a recipient on server 2 must behave as if both were on one server:
long polls are woken, pushes arrive, seqs stay gap-free, proofs verify, channel membership
created on one server is enforced on the other.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from qpc_storage_postgres.store import PostgresStorage

from qpc_core.builtin.directory import channel_id_for
from qpc_core.errors import Forbidden
from qpc_core.framing import PushEvent
from qpc_core.pb import common_pb2


@pytest.fixture
async def nodes(app_factory, tmp_path: Path, pg_dsn: str):
    async def node(name: str):
        return await app_factory(
            plugins=["postgres"], storage="postgres", postgres={"dsn": pg_dsn},
            data_dir=tmp_path / name, max_fetch_wait_ms=120_000,
        )

    return await node("one"), await node("two")


async def test_the_nodes_share_one_postgres_store(nodes) -> None:
    one, two = nodes
    assert isinstance(one.storage, PostgresStorage) and one.storage.shared
    assert one.storage.node_id != two.storage.node_id


async def test_long_poll_on_one_server_is_woken_by_enqueue_on_the_other(nodes, connect) -> None:
    one, two = nodes
    alice, bob = await connect(one), await connect(two)
    # The poll may wait two minutes; only a cross-server wake-up answers it within 10 s.
    poll = asyncio.ensure_future(bob.fetch_wait(120_000))
    inbox = (bob.identity_key, b"")
    waiters = two.state["delivery"].waiters
    for _ in range(500):  # until the poll is parked on server two (bounded: <= 10 s)
        if any(w.parked for w in waiters.get(inbox, ())):
            break
        await asyncio.sleep(0.02)
    assert any(w.parked for w in waiters.get(inbox, ())), "FetchWait never parked"
    r = await alice.enqueue(bob.identity_key, b"hello from one")  # proof verified
    got = await asyncio.wait_for(poll, 10)
    assert [(m.seq, m.data) for m in got] == [(r.seq, b"hello from one")]


async def test_push_reaches_a_connection_on_the_other_server(nodes, connect) -> None:
    one, two = nodes
    alice, bob = await connect(one), await connect(two)
    r = await alice.enqueue(bob.identity_key, b"hi", channel=b"c1")
    push = await asyncio.wait_for(bob.pushes.get(), 10)
    assert push.event_type == PushEvent.NEW_MESSAGE
    ev = common_pb2.NewMessageEvent.FromString(push.payload)
    assert (ev.recipient_key, ev.channel_id, ev.seq) == (bob.identity_key, b"c1", r.seq)
    assert [m.data for m in await bob.fetch(channel=b"c1")] == [b"hi"]


async def test_senders_on_both_servers_get_gap_free_seqs(nodes, connect) -> None:
    one, two = nodes
    a1, a2, bob = await connect(one), await connect(two), await connect(one)
    sent = await asyncio.gather(*(
        (a1 if i % 2 else a2).enqueue(bob.identity_key, b"m%d" % i) for i in range(40)))
    assert sorted(r.seq for r in sent) == list(range(1, 41))
    got = await bob.fetch()
    assert [m.seq for m in got] == list(range(1, 41))
    assert {m.data for m in got} == {b"m%d" % i for i in range(40)}


async def test_channel_created_on_one_server_is_enforced_on_the_other(nodes, connect) -> None:
    one, two = nodes
    alice, bob = await connect(one), await connect(one)
    mallory = await connect(two)
    cid = channel_id_for(sorted([alice.identity_key, bob.identity_key]))
    # Before creation the id is just an application-level channel id: allowed (and seen by
    # server two, which must not remember that answer)...
    await mallory.enqueue(bob.identity_key, b"early", channel=cid)
    created, was_new = await alice.create_channel([bob.identity_key])
    assert (created, was_new) == (cid, True)
    # ...after it, server two enforces membership at once.
    with pytest.raises(Forbidden):
        await mallory.enqueue(bob.identity_key, b"late", channel=cid)
    await asyncio.wait_for(alice.enqueue(bob.identity_key, b"member", channel=cid), 10)


async def test_delivery_proofs_use_one_key_across_servers(nodes, connect) -> None:
    one, two = nodes
    c1, c2 = await connect(one), await connect(two)
    assert await c1.signing_key() == await c2.signing_key()
