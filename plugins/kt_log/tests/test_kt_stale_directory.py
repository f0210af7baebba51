"""A binding read from the directory before a change must not be logged as the newest one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kt_test_helpers import AppFactory, Connect, key, svc
from qpc_kt_log import client as kt
from qpc_kt_log.service import KtLogService

from qpc_core.app import App
from qpc_core.users import register_user

pytestmark = pytest.mark.timeout(120)



async def _names(app: App) -> list[tuple[str, bytes]]:
    entries = await svc(app).tree.read_entries(0, svc(app).tree.size)
    return [(e.record.username, e.record.identity_key) for e in entries]


async def test_stale_resolve_does_not_log_a_deleted_key(app_factory: AppFactory,
                                                         connect: Connect,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """ResolveUser read alice -> K1 from the directory; before its prove_binding ran, alice
    deleted her account and registered again with K2.  Before the fix log_on_resolve then
    appended K1 again, after K2, as alice's newest binding."""
    app: App = await app_factory(plugins=["kt_log"])
    bob = await connect(app)
    await register_user(app, "bob", bob.identity_key)
    k1, k2 = key(), key()
    await register_user(app, "alice", k1)  # leaf 1
    real = KtLogService.prove_binding
    reached, go = asyncio.Event(), asyncio.Event()

    async def held(self: KtLogService, username: str, identity_key: bytes) -> Any:
        if username == "alice" and not go.is_set():
            reached.set()
            await go.wait()  # the directory was read; prove_binding has not run yet
        return await real(self, username, identity_key)

    monkeypatch.setattr(KtLogService, "prove_binding", held)
    resolve = asyncio.ensure_future(bob.resolve_user("alice"))
    await reached.wait()
    await app.storage.delete_account(k1)
    await register_user(app, "alice", k2)  # leaf 2
    go.set()
    resp = await resolve
    assert resp.identity_key == k1  # the stale directory answer...
    assert not resp.HasField("inclusion")  # ...gets no proof, and nothing was appended
    assert [n for n in await _names(app) if n[0] == "alice"] == [("alice", k1), ("alice", k2)]
    assert svc(app).tree.size == 3
    raw = await app.storage.kv_get("kt_log", b"n:alice")
    assert raw is not None and raw[8:] == k2
    # a fresh resolve is proven against the newest binding
    state = kt.KtState()
    fresh = await kt.resolve_verified(bob, "alice", state)
    assert fresh.identity_key == k2 and fresh.inclusion.leaf_index == 2
    monkeypatch.setattr(bob, "resolve_user", lambda name: _return(resp))
    with pytest.raises(kt.InclusionError):  # the client refuses the unproven stale answer
        await kt.resolve_verified(bob, "alice", state)


async def _return(value: Any) -> Any:
    return value


async def test_prove_binding_and_late_hook_recheck_the_directory(app_factory: AppFactory) -> None:
    app: App = await app_factory(plugins=["kt_log"])
    s = svc(app)
    k1, k2 = key(), key()
    await register_user(app, "alice", k1)
    await app.storage.delete_account(k1)
    # deleted and not registered again: nothing to log, no proof
    assert await s.prove_binding("alice", k2) is None
    assert s.tree.size == 1
    await register_user(app, "alice", k2)
    assert s.tree.size == 2
    # a stale read of the old binding (ResolveUser / ResolveIdentity)
    assert await s.prove_binding("alice", k1) is None
    # on_user_registered for K1 arriving late (after K2's registration)
    await app.hooks.on_user_registered(app, "alice", k1)
    assert s.tree.size == 2
    assert await _names(app) == [("alice", k1), ("alice", k2)]
    # the current binding is still proven, and a directory binding the log has not seen yet
    # is still backfilled
    proof = await s.prove_binding("alice", k2)
    assert proof is not None and proof.leaf_index == 1
    k3 = key()
    await app.storage.create_user("early", k3, now=0)
    proof = await s.prove_binding("early", k3)
    assert proof is not None and proof.leaf_index == 2 and s.tree.size == 3
    # log_binding itself (no directory involved) is unchanged
    assert await s.log_binding("nobody", key()) == 3
