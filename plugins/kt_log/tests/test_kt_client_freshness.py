"""Client-side checks: old or replayed tree heads, superseded bindings, and errors that must be
reported as KtError (a FAIL result), not escape as other exceptions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kt_test_helpers import AppFactory, Connect, key, kt_cli, svc
from qpc_kt_log import client as kt
from qpc_kt_log.records import sth_signed_bytes

from qpc_core.app import App
from qpc_core.client import QpcClient
from qpc_core.errors import Unavailable
from qpc_core.identity import public_bytes
from qpc_core.pb import directory_pb2 as pb
from qpc_core.users import register_user, server_key

pytestmark = pytest.mark.timeout(120)



async def user(app: App, connect: Connect, name: str) -> QpcClient:
    c: QpcClient = await connect(app)
    assert c.identity_key is not None
    await register_user(app, name, c.identity_key)
    return c


async def signed_head(app: App, timestamp_ms: int) -> pb.SignedTreeHead:
    """The real log key signing the current tree with any timestamp."""
    signer = await server_key(app, "kt_log")
    size, root = svc(app).tree.size, svc(app).tree.root()
    return pb.SignedTreeHead(tree_size=size, root_hash=root, timestamp_ms=timestamp_ms,
                             signature=signer.sign(sth_signed_bytes(size, root, timestamp_ms)),
                             public_key=public_bytes(signer))


async def _return(value: Any) -> Any:
    return value


async def test_older_heads_are_refused(app_factory: AppFactory, connect: Connect) -> None:
    app: App = await app_factory(plugins=["kt_log"])
    bob = await user(app, connect, "bob")
    fresh = await svc(app).sth()
    state = kt.KtState()
    await kt.accept_sth(bob, fresh, state)
    assert state.timestamp_ms == fresh.timestamp_ms
    remembered = state.to_dict()
    old = await signed_head(app, 1)  # same tree, signed in 1970
    with pytest.raises(kt.FreshnessError, match="older than the head seen before"):
        await kt.accept_sth(bob, old, state)
    assert state.to_dict() == remembered  # not rolled back to the old head
    newer = await signed_head(app, fresh.timestamp_ms + 1)
    await kt.accept_sth(bob, newer, state)
    assert state.timestamp_ms == fresh.timestamp_ms + 1
    with pytest.raises(kt.FreshnessError):  # the previous head is now too old as well
        await kt.accept_sth(bob, fresh, state)


async def test_max_head_age(app_factory: AppFactory, connect: Connect,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    app: App = await app_factory(plugins=["kt_log"])
    bob = await user(app, connect, "bob")
    now = 2_000_000_000.0
    state = kt.KtState(max_sth_age_secs=600, clock=lambda: now)
    with pytest.raises(kt.FreshnessError, match="s old"):  # even on first contact
        await kt.accept_sth(bob, await signed_head(app, 1), state)
    assert state.log_key is None and state.tree_size == 0
    with pytest.raises(kt.FreshnessError):
        await kt.accept_sth(bob, await signed_head(app, int((now - 601) * 1000)), state)
    await kt.accept_sth(bob, await signed_head(app, int((now - 599) * 1000)), state)
    assert state.log_key is not None
    # the policy is not part of the persisted state
    assert "max_sth_age_secs" not in state.to_dict()
    # the CLI option, against a server that keeps serving a head signed in 1970
    rc, out = await kt_cli(bob, {}, "verify", "--max-head-age", "600", "@bob")
    assert rc == 0, out  # the real, fresh head
    frozen = await signed_head(app, 1)

    async def frozen_head(**_kw: Any) -> pb.SignedTreeHead:
        return frozen

    monkeypatch.setattr(svc(app), "sth", frozen_head)
    rc, out = await kt_cli(bob, {}, "--json", "verify", "--max-head-age", "600", "@bob")
    data = json.loads(out)
    assert rc == 1 and data["result"] == "FAIL" and data["kind"] == "FreshnessError"


async def test_superseded_binding_is_refused(app_factory: AppFactory, connect: Connect,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """alice rotates K1 -> K2; a server answering K1 with the genuine proof of the old leaf
    (against the newest head) is refused by a client that verified K2 before."""
    app: App = await app_factory(plugins=["kt_log"])
    bob = await user(app, connect, "bob")
    k1, k2 = key(), key()
    await register_user(app, "alice", k1)  # leaf 1
    state = kt.KtState()
    await kt.resolve_verified(bob, "alice", state)
    await app.storage.delete_account(k1)
    await register_user(app, "alice", k2)  # leaf 2
    r = await kt.resolve_verified(bob, "alice", state)
    assert r.identity_key == k2 and state.names["alice"] == (2, k2)
    state = kt.KtState.from_dict(json.loads(json.dumps(state.to_dict())))  # persisted
    assert state.names["alice"] == (2, k2)
    old_proof = await svc(app).inclusion(1)
    stale = pb.ResolveUserResponse(username="alice", identity_key=k1, inclusion=old_proof)
    monkeypatch.setattr(bob, "resolve_user", lambda name: _return(stale))
    with pytest.raises(kt.InclusionError, match="superseded"):
        await kt.resolve_verified(bob, "alice", state)
    assert state.names["alice"] == (2, k2)
    # the same through ResolveIdentity
    stale_id = pb.ResolveIdentityResponse(username="alice", inclusion=old_proof)
    monkeypatch.setattr(bob, "resolve_identity", lambda ident: _return(stale_id))
    with pytest.raises(kt.InclusionError, match="superseded"):
        await kt.resolve_identity_verified(bob, k1, state)
    # a client that never saw K2 cannot tell (documented in the README)
    naive = kt.KtState()
    assert (await kt.resolve_verified(bob, "alice", naive)).identity_key == k1


async def test_state_names_validation() -> None:
    good = kt.KtState(names={"alice": (3, bytes(32))}).to_dict()
    assert kt.KtState.from_dict(good).names == {"alice": (3, bytes(32))}
    assert kt.KtState.from_dict({**good, "names": None}).names == {}
    del good["names"]  # a state saved by an older client
    assert kt.KtState.from_dict(good).names == {}
    for bad in [{"alice": [3]}, {"alice": [-1, "00" * 32]}, {"alice": [0, "00" * 31]},
                {"alice": "x"}, ["alice"]]:
        with pytest.raises(ValueError, match="unreadable"):
            kt.KtState.from_dict({**good, "names": bad})


async def test_consistency_rpc_errors_are_a_fail(app_factory: AppFactory, connect: Connect,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Any RpcError from GetConsistencyProof (522) is a ConsistencyError, so `kt verify`
    prints FAIL instead of a traceback (before: only BadRequest was caught)."""
    app: App = await app_factory(plugins=["kt_log"])
    bob = await user(app, connect, "bob")
    saved: dict[str, Any] = {}
    rc, _ = await kt_cli(bob, saved, "verify", "@bob")
    assert rc == 0 and saved["tree_size"] == 1
    await register_user(app, "alice", key())
    real_call = bob.call

    async def flaky(method: int, req: Any, resp_type: Any, *a: Any, **kw: Any) -> Any:
        if method == kt.GET_CONSISTENCY:
            raise Unavailable("try later")
        return await real_call(method, req, resp_type, *a, **kw)

    monkeypatch.setattr(bob, "call", flaky)
    rc, out = await kt_cli(bob, saved, "--json", "verify", "@alice")
    data = json.loads(out)
    assert rc == 1 and data["kind"] == "ConsistencyError" and "try later" in data["error"]
    assert saved["tree_size"] == 1  # the state kept the last good head


async def test_nul_in_a_resolved_username_is_a_kt_error(app_factory: AppFactory,
                                                        connect: Connect,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    app: App = await app_factory(plugins=["kt_log"])
    bob = await user(app, connect, "bob")
    assert bob.identity_key is not None
    proof = await svc(app).inclusion(0)
    evil = pb.ResolveIdentityResponse(username="bob\x00x", inclusion=proof)
    monkeypatch.setattr(bob, "resolve_identity", lambda ident: _return(evil))
    with pytest.raises(kt.InclusionError, match="invalid username"):
        await kt.resolve_identity_verified(bob, bob.identity_key, kt.KtState())


