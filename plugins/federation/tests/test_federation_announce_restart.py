"""Registration announcements survive a restart: a change not yet told to a peer (it was
unreachable) is recorded in the store before the registration answers, and told after the
next start, with the state the directory has then."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fed_helpers import D1, D2, Node, fed_settings
from qpc_federation import certs, get
from qpc_federation.service import ANNOUNCE_NAMESPACE

from qpc_core.testing import free_udp_port, until
from qpc_core.users import register_user

Factory = Callable[..., Any]


async def start(app_factory: Factory, tmp: Path, domain: str, port: int,
                peer: tuple[str, int]) -> Node:
    app = await app_factory(data_dir=tmp / f"data-{domain}", plugins=["federation"],
                            federation=fed_settings(tmp / domain, domain, port, [peer],
                                                    relay_timeout_secs=0.5))
    return Node(app, domain, port, tmp / domain)


async def markers(node: Node) -> list[bytes]:
    return [k for k, _ in await node.app.storage.kv_scan(ANNOUNCE_NAMESPACE)]


async def test_a_change_a_peer_missed_is_told_after_a_restart(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    certs.make_ca(tmp_path / "ca")
    for d in (D1, D2):
        certs.issue(tmp_path / "ca", tmp_path / d, d)
    p1, p2 = free_udp_port(), free_udp_port()
    n1 = await start(app_factory, tmp_path, D1, p1, (D2, p2))  # node2 not running yet
    alice, gone = await connect(n1.app), await connect(n1.app)
    await register_user(n1.app, "alice", alice.identity_key)
    await register_user(n1.app, "gone", gone.identity_key)
    recorded = await markers(n1)
    assert sorted(recorded) == sorted(D2.encode() + b"\0" + k
                                      for k in (alice.identity_key, gone.identity_key))
    # The account goes away without the hook (as if the process died right after): the
    # record says "tell node2 about this key", the directory says it is gone.
    assert await n1.app.storage.delete_account(gone.identity_key) == "gone"
    await n1.app.stop()  # before node2 was ever reachable: the in-memory retries are lost

    n2 = await start(app_factory, tmp_path, D2, p2, (D1, p1))
    fresh = await start(app_factory, tmp_path, D1, p1, (D2, p2))  # node1 again, same store
    fed2 = get(n2.app)
    assert fed2 is not None
    await until(lambda: fed2.routes.get(alice.identity_key) == D1, timeout=20,
                what="node2 never told that alice is node1's")
    # Told, so forgotten: nothing left to tell after the next start either.
    fed1 = get(fresh.app)
    assert fed1 is not None
    await until(lambda: not fed1._changes, timeout=20, what="changes left to tell")
    for _ in range(400):  # bounded: the marker deletes follow the answer
        if not await markers(fresh):
            break
        await asyncio.sleep(0.05)
    assert await markers(fresh) == []
    assert gone.identity_key not in fed2.routes  # told with the directory's state: gone
