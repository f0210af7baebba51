"""kt_log end to end: a real App, real QUIC, the real SDK and the verifying KT client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlcipher3  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kt_test_helpers import AppFactory, Connect, key, kt_cli, svc
from qpc_kt_log import client as kt
from qpc_kt_log.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryNodeStore,
    MerkleLog,
    verify_consistency,
)
from qpc_kt_log.records import LeafRecord, decode_entry, encode_entry, sth_signed_bytes
from qpc_kt_log.service import STH_LOG
from qpc_kt_log.store import LOG_NAME, KtTreeStore

from qpc_core.app import App
from qpc_core.client import QpcClient
from qpc_core.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    PluginError,
    Unauthenticated,
)
from qpc_core.identity import public_bytes
from qpc_core.pb import directory_pb2 as pb
from qpc_core.users import register_user, server_key

pytestmark = pytest.mark.timeout(120)



async def user(app: App, connect: Connect, name: str) -> QpcClient:
    """A connected client whose proven identity is registered as ``name``."""
    c: QpcClient = await connect(app)
    assert c.identity_key is not None
    await register_user(app, name, c.identity_key)
    return c


@pytest.fixture
async def kt_app(app_factory: AppFactory) -> App:
    app: App = await app_factory(plugins=["kt_log"])
    return app


# -- resolve with verified proofs ----------------------------------------------------------------


async def test_resolve_is_verified_and_proofs_track_the_log(kt_app: App, connect: Connect) -> None:
    alice = await user(kt_app, connect, "alice")
    bob = await user(kt_app, connect, "bob")
    state = kt.KtState()
    resp = await kt.resolve_verified(bob, "@Alice", state)
    assert resp.username == "alice" and resp.identity_key == alice.identity_key
    inc = resp.inclusion
    assert (inc.leaf_index, inc.tree_size, inc.sth.tree_size) == (0, 2, 2)
    assert state.tree_size == 2 and state.root_hash == inc.sth.root_hash
    assert state.log_key == public_bytes(await server_key(kt_app, "kt_log"))

    # ResolveIdentity carries a proof too.
    assert bob.identity_key is not None
    r2 = await kt.resolve_identity_verified(alice, bob.identity_key, state)
    assert r2.username == "bob" and r2.inclusion.leaf_index == 1

    # The log grows; the next resolve proves consistency from the remembered head.
    heads = [state.tree_size]
    for i in range(5):
        await register_user(kt_app, f"user{i}", key())
        await kt.resolve_verified(bob, "alice", state)
        heads.append(state.tree_size)
    assert heads == [2, 3, 4, 5, 6, 7]

    # Registering again with the same key is not a second leaf.
    await svc(kt_app).log_binding("alice", alice.identity_key)  # type: ignore[arg-type]
    assert svc(kt_app).tree.size == 7


async def test_consistency_proofs_between_any_two_sizes(kt_app: App, connect: Connect) -> None:
    c = await user(kt_app, connect, "alice")
    roots = {0: EMPTY_ROOT}
    sth = await kt.get_sth(c)
    roots[sth.tree_size] = bytes(sth.root_hash)
    for i in range(12):
        await register_user(kt_app, f"u{i}", key())
        sth = await kt.get_sth(c)
        kt.verify_sth_signature(sth)
        roots[sth.tree_size] = bytes(sth.root_hash)
    assert sorted(roots) == list(range(14))
    for old in range(14):
        for new in range(old, 14):
            proof = await kt.get_consistency_proof(c, old, new)
            assert verify_consistency(old, new, roots[old], roots[new], proof), (old, new)
    # bad input: start > end, sizes beyond the tree
    with pytest.raises(BadRequest, match="must not exceed"):
        await kt.get_consistency_proof(c, 5, 4)
    with pytest.raises(BadRequest, match="beyond the tree size 13"):
        await kt.get_consistency_proof(c, 1, 14)
    with pytest.raises(BadRequest, match="beyond the tree size"):
        await kt.get_consistency_proof(c, 2**64 - 1, 2**64 - 1)


async def test_signed_tree_head(kt_app: App, connect: Connect) -> None:
    c = await user(kt_app, connect, "alice")
    sth = await kt.get_sth(c)
    log_key = public_bytes(await server_key(kt_app, "kt_log"))
    assert sth.public_key == log_key
    assert sth.tree_size == 1 and len(sth.root_hash) == 32 and len(sth.signature) == 64
    # the documented signed bytes
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(log_key).verify(
        sth.signature, b"qpc-v1 kt-sth\x00" + sth.tree_size.to_bytes(8, "big")
        + sth.root_hash + sth.timestamp_ms.to_bytes(8, "big"))
    kt.verify_sth_signature(sth, log_key)
    for mutate in [lambda s: setattr(s, "tree_size", 2),
                   lambda s: setattr(s, "timestamp_ms", s.timestamp_ms + 1),
                   lambda s: setattr(s, "root_hash", bytes(32)),
                   lambda s: setattr(s, "signature", bytes(64))]:
        bad = pb.SignedTreeHead()
        bad.CopyFrom(sth)
        mutate(bad)
        with pytest.raises(kt.SignatureError):
            kt.verify_sth_signature(bad, log_key)
    with pytest.raises(kt.SignatureError, match="key changed"):
        kt.verify_sth_signature(sth, key())
    # the head is the same for an idle log, re-signed when stale
    assert (await kt.get_sth(c)) == sth
    later = svc(kt_app).clock() + svc(kt_app).config.sth_max_age_secs + 1
    svc(kt_app).clock = lambda: later
    fresh = await kt.get_sth(c)
    assert fresh.tree_size == sth.tree_size and fresh.root_hash == sth.root_hash
    assert fresh.timestamp_ms == int(later * 1000) and fresh.signature != sth.signature
    kt.verify_sth_signature(fresh, log_key)
    # audit responses carry the head
    page = await kt.audit_page(c, 0)
    assert page.sth.tree_size == page.tree_size == 1
    kt.verify_sth_signature(page.sth, log_key)


# -- revocation -------------------------------------------------------------------------------


async def test_revocation(kt_app: App, connect: Connect) -> None:
    alice = await user(kt_app, connect, "alice")
    bob = await user(kt_app, connect, "bob")
    assert alice.identity_key is not None and bob.identity_key is not None
    state = kt.KtState()
    assert await kt.check_revocation_verified(bob, alice.identity_key, state) is None

    # bad input first, then ownership
    with pytest.raises(BadRequest, match="reason must be one of"):
        await kt.revoke_key(alice, "stolen")
    with pytest.raises(BadRequest, match="reason must be one of"):
        await kt.revoke_key(alice, "")
    with pytest.raises(BadRequest, match="exactly 32 bytes"):
        await kt.revoke_key(alice, "compromised", alice.identity_key[:31])
    with pytest.raises(BadRequest, match="exactly 32 bytes"):
        await kt.revoke_key(alice, "compromised", alice.identity_key + b"\x00")
    with pytest.raises(Forbidden):
        await kt.revoke_key(bob, "compromised", alice.identity_key)
    anonymous = await connect(kt_app, new_identity=False)
    with pytest.raises(Unauthenticated):
        await kt.revoke_key(anonymous, "compromised", alice.identity_key)
    stranger = await connect(kt_app)  # proven identity, but never registered
    with pytest.raises(NotFound, match="no binding"):
        await kt.revoke_key(stranger, "compromised")
    assert svc(kt_app).tree.size == 2  # nothing was appended by the refused calls

    leaf = await kt.revoke_key(alice, "compromised")
    assert leaf == 2
    with pytest.raises(Conflict, match="already revoked"):
        await kt.revoke_key(alice, "superseded")
    assert svc(kt_app).tree.size == 3

    assert await kt.check_revocation_verified(bob, alice.identity_key, state) == "compromised"
    assert await kt.check_revocation_verified(bob, bob.identity_key, state) is None
    with pytest.raises(BadRequest):
        await bob.call(511, pb.CheckRevocationRequest(identity_key=b"short"),
                       pb.CheckRevocationResponse)
    with pytest.raises(kt.KeyRevokedError) as err:
        await kt.resolve_verified(bob, "alice", state)
    assert err.value.reason == "compromised"
    resp = await kt.resolve_verified(bob, "alice", state, check_revocation=False)
    assert resp.identity_key == alice.identity_key
    # every reason is accepted once
    for reason in ("superseded", "UserRevoked"):
        c = await user(kt_app, connect, f"x-{reason.lower()}")
        await kt.revoke_key(c, reason)
        assert c.identity_key is not None
        assert await kt.check_revocation_verified(bob, c.identity_key, state) == reason


async def test_key_rotation_after_account_deletion(kt_app: App, connect: Connect) -> None:
    old = await user(kt_app, connect, "alice")
    bob = await user(kt_app, connect, "bob")
    state = kt.KtState()
    assert (await kt.resolve_verified(bob, "alice", state)).inclusion.leaf_index == 0
    await old.delete_account()
    new = await user(kt_app, connect, "alice")  # same name, new key: a rotation
    resp = await kt.resolve_verified(bob, "alice", state)
    assert resp.identity_key == new.identity_key and resp.inclusion.leaf_index == 2
    report = await kt.audit(bob, state)
    assert (report.tree_size, report.bindings, report.rotations, report.usernames) == (3, 3, 1, 2)
    assert not report.problems
    # the old key can still be revoked (superseded) by its owner (DeleteAccount logged the
    # old connection out, so prove the key on a new one)
    again = await connect(kt_app, identity=old.identity)
    assert await kt.revoke_key(again, "superseded") == 3


# -- audit ------------------------------------------------------------------------------------


async def test_audit_pagination(app_factory: AppFactory, connect: Connect) -> None:
    app = await app_factory(plugins=["kt_log"], kt_log={"max_audit_page": 4})
    c = await user(app, connect, "alice")
    for i in range(9):
        await register_user(app, f"user{i}", key())
    await kt.revoke_key(c, "compromised")
    size = 11
    state = kt.KtState()
    report = await kt.audit(c, state)
    assert (report.tree_size, report.pages, report.bindings, report.revocations) == (
        size, 3, 10, 1)
    assert not report.problems and state.tree_size == size
    report = await kt.audit(c, state, page_size=2)
    assert report.pages == 6
    # raw paging rules
    page = await kt.audit_page(c, 0)
    assert [e.index for e in page.entries] == [0, 1, 2, 3]  # end = 0: the server's page size
    assert page.entries[0].username == "alice" and page.entries[0].kind == 0
    assert page.entries[0].timestamp_ms > 0
    page = await kt.audit_page(c, 2, 100)
    assert [e.index for e in page.entries] == [2, 3, 4, 5]  # capped at the maximum page
    page = await kt.audit_page(c, 9, 100)
    assert [e.index for e in page.entries] == [9, 10]  # clamped to the tree
    assert page.entries[1].kind == 2 and page.entries[1].reason == "compromised"
    assert page.entries[1].username == ""
    assert (await kt.audit_page(c, 11)).entries == []
    assert (await kt.audit_page(c, 3, 3)).entries == []
    with pytest.raises(BadRequest, match="must not exceed"):
        await kt.audit_page(c, 5, 4)
    with pytest.raises(BadRequest, match="beyond the tree size 11"):
        await kt.audit_page(c, 12)
    with pytest.raises(ConfigError, match=r"kt_log\.max_audit_page"):
        await app_factory(plugins=["kt_log"], kt_log={"max_audit_page": 0})
    with pytest.raises(ConfigError, match="kt_log"):
        await app_factory(plugins=["kt_log"], kt_log={"no_such_option": 1})


async def test_concurrent_registrations_are_serialised(kt_app: App, connect: Connect) -> None:
    c = await user(kt_app, connect, "alice")
    names = [f"c{i:02d}" for i in range(30)]
    state = kt.KtState()
    await asyncio.gather(
        *(register_user(kt_app, n, key()) for n in names),
        *(kt.resolve_verified(c, "alice", kt.KtState()) for _ in range(10)),
    )
    report = await kt.audit(c, state)
    assert report.tree_size == 31 and report.usernames == 31 and not report.problems
    for n in names[::7]:
        await kt.resolve_verified(c, n, state)


# -- restart and crash safety ----------------------------------------------------------------------


async def test_restart_keeps_the_log_and_the_key(app_factory: AppFactory,
                                                  connect: Connect) -> None:
    app = await app_factory(plugins=["kt_log"])
    c = await user(app, connect, "alice")
    for i in range(6):
        await register_user(app, f"u{i}", key())
    state = kt.KtState()
    await kt.resolve_verified(c, "alice", state)
    before = await kt.get_sth(c)
    await app.stop()

    app2 = await app_factory(plugins=["kt_log"])
    c2 = await connect(app2)
    after = await kt.get_sth(c2)
    assert (after.tree_size, after.root_hash, after.public_key) == (
        before.tree_size, before.root_hash, before.public_key)
    await kt.resolve_verified(c2, "alice", state)  # same pinned key, consistent
    await register_user(app2, "late", key())
    await kt.resolve_verified(c2, "late", state)
    assert state.tree_size == 8
    assert not (await kt.audit(c2, state)).problems


async def test_entries_without_index_rows_are_indexed_on_start(
    app_factory: AppFactory, connect: Connect, caplog: pytest.LogCaptureFixture,
) -> None:
    """Earlier versions wrote a leaf's index rows after it, so a crash in between left
    entries without rows (``m:indexed`` behind the log).  Start-up indexes them from the
    log; nothing is appended a second time."""
    app = await app_factory(plugins=["kt_log"])
    alice = await user(app, connect, "alice")
    assert alice.identity_key is not None
    bob = key()
    # What such a crash left: a revocation and a binding, committed without their rows.
    tree = KtTreeStore(app.storage)
    await tree.load()
    await tree.append([LeafRecord.revocation(alice.identity_key, "compromised", 1),
                       LeafRecord.binding("bob", bob, 2)])
    assert await app.storage.kv_get("kt_log", b"m:indexed") == (1).to_bytes(8, "big")
    await app.stop()
    caplog.clear()

    with caplog.at_level(logging.WARNING, "qpc.kt_log"):
        app = await app_factory(plugins=["kt_log"])
    assert "indexing entries 1..2" in caplog.text
    assert await app.storage.kv_get("kt_log", b"m:indexed") == (3).to_bytes(8, "big")
    with pytest.raises(Conflict):  # the revocation's row was rebuilt from the log
        await kt.revoke_key(await connect(app, identity=alice.identity), "compromised")
    await register_user(app, "bob", bob)
    c = await connect(app)
    state = kt.KtState()
    resp = await kt.resolve_verified(c, "bob", state)
    assert resp.inclusion.leaf_index == 2 and state.tree_size == 3  # found, not appended
    assert await kt.check_revocation_verified(c, alice.identity_key, state) == "compromised"
    assert not (await kt.audit(c, state)).problems


# -- a dishonest server is detected -------------------------------------------------------------


def _rewrite_db(path: Path, db_key: str, fn: Callable[[Any], None]) -> None:
    """What an operator with the database key could do with any SQLCipher client."""
    conn = sqlcipher3.connect(str(path))
    try:
        conn.execute("PRAGMA key = '" + db_key.replace("'", "''") + "'")
        fn(conn)
        conn.commit()
    finally:
        conn.close()


def _forged_entries(raw: list[bytes], victim: str, evil_key: bytes) -> list[bytes]:
    frontier = Frontier()
    out = []
    for data in raw:
        record, _ = decode_entry(data)
        if record.username == victim:
            record = LeafRecord.binding(victim, evil_key, record.timestamp_ms)
        out.append(encode_entry(record, [h for *_, h in frontier.append(record.leaf_hash)]))
    return out


async def test_rewritten_log_is_detected(app_factory: AppFactory, connect: Connect) -> None:
    app = await app_factory(plugins=["kt_log"])
    bob = await user(app, connect, "bob")
    alice = await user(app, connect, "alice")
    await register_user(app, "carol", key())
    state = kt.KtState()
    resp = await kt.resolve_verified(bob, "alice", state)
    assert resp.identity_key == alice.identity_key and state.tree_size == 3
    remembered = dict(state.to_dict())
    raw = await app.storage.log_read(LOG_NAME, 0, 3)
    await app.stop()

    # The operator swaps alice's key in the directory and rewrites the log to match,
    # keeping the tree size; the forged log is self-consistent and signed with the real key.
    mallory = key()
    forged = _forged_entries(raw, "alice", mallory)

    def rewrite(conn: Any) -> None:
        conn.execute("DELETE FROM logs WHERE log = ?", (LOG_NAME,))
        conn.executemany("INSERT INTO logs (log, idx, entry) VALUES (?, ?, ?)",
                         [(LOG_NAME, i, e) for i, e in enumerate(forged)])
        conn.execute("DELETE FROM kv WHERE namespace = 'kt_log'")
        conn.execute("UPDATE users SET identity_key = ? WHERE username = 'alice'", (mallory,))

    _rewrite_db(app.settings.data_dir / "qpc.db", "test-db-key", rewrite)
    # The server itself refuses the forged log: the head it signed for size 3 is stored,
    # with another root.
    with pytest.raises(PluginError, match="stored head of size 3 has another root"):
        await app_factory(plugins=["kt_log"])
    # A thorough forger deletes the stored heads too; then only clients can tell.
    _rewrite_db(app.settings.data_dir / "qpc.db", "test-db-key",
                lambda conn: conn.execute("DELETE FROM logs WHERE log = 'kt_log.sth'"))
    app2 = await app_factory(plugins=["kt_log"])
    c = await connect(app2)

    # A fresh client cannot tell (trust on first use)...
    fresh = kt.KtState()
    assert (await kt.resolve_verified(c, "alice", fresh)).identity_key == mallory
    # ...but one that saw the honest head detects the fork at the same size,
    with pytest.raises(kt.ConsistencyError, match="forked"):
        await kt.resolve_verified(c, "alice", state)
    assert state.to_dict() == remembered  # the good head is kept
    # and after the log grew, the consistency proof does not match the remembered root.
    await register_user(app2, "dave", key())
    with pytest.raises(kt.ConsistencyError, match="not an extension"):
        await kt.resolve_verified(c, "dave", state)
    with pytest.raises(kt.ConsistencyError):
        await kt.audit(c, state)
    assert state.to_dict() == remembered

    # The CLI reports FAIL and keeps failing.
    for _ in range(2):
        rc, out = await kt_cli(c, remembered, "verify", "@alice")
        assert rc == 1 and out.startswith("FAIL") and "forked or rewrote history" in out
    rc, out = await kt_cli(c, remembered, "--json", "audit")
    assert rc == 1 and json.loads(out)["kind"] == "ConsistencyError"


async def test_swapped_proof_answers_are_detected(kt_app: App, connect: Connect,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bob = await user(kt_app, connect, "bob")
    await user(kt_app, connect, "alice")
    state = kt.KtState()
    await kt.resolve_verified(bob, "alice", state)  # remembers the honest head (size 2)
    real_key = await server_key(kt_app, "kt_log")
    entries = await svc(kt_app).tree.read_entries(0, 2)
    mallory = key()

    def forged_inclusion(extra: int, signer: Ed25519PrivateKey,
                         inclusion_of: int = 1) -> pb.KtInclusion:
        """A forked tree where alice is bound to mallory, plus ``extra`` more leaves."""
        recs = [e.record for e in entries]
        recs[1] = LeafRecord.binding("alice", mallory)
        recs += [LeafRecord.binding(f"pad{i}", key()) for i in range(extra)]
        tree = MerkleLog(MemoryNodeStore())
        tree.append_many([r.leaf_hash for r in recs])
        size, root = tree.size, tree.root()
        sth = pb.SignedTreeHead(tree_size=size, root_hash=root, timestamp_ms=1,
                                signature=signer.sign(sth_signed_bytes(size, root, 1)),
                                public_key=public_bytes(signer))
        return pb.KtInclusion(leaf_index=inclusion_of, tree_size=size,
                              audit_path=tree.inclusion_proof(inclusion_of, size), sth=sth)

    # the directory now serves mallory's key for alice
    alice_key = (await kt_app.storage.get_user_by_name("alice")).identity_key  # type: ignore[union-attr]
    await kt_app.storage.delete_account(alice_key)
    await kt_app.storage.create_user("alice", mallory, now=0)

    def serve(answer: pb.KtInclusion) -> None:
        async def fake(username: str, identity_key: bytes) -> pb.KtInclusion:
            return answer

        monkeypatch.setattr(svc(kt_app), "prove_binding", fake)

    remembered = state.to_dict()
    serve(forged_inclusion(0, real_key))  # same size, different root
    with pytest.raises(kt.ConsistencyError, match="forked"):
        await kt.resolve_verified(bob, "alice", state)
    serve(forged_inclusion(3, real_key))  # bigger than the real tree
    with pytest.raises(kt.ConsistencyError, match="could not prove"):
        await kt.resolve_verified(bob, "alice", state)
    serve(forged_inclusion(0, Ed25519PrivateKey.generate()))  # not the log's key
    with pytest.raises(kt.SignatureError, match="key changed"):
        await kt.resolve_verified(bob, "alice", state)
    assert state.to_dict() == remembered
    # an honest proof for another leaf, or for another size
    honest = await svc(kt_app).inclusion(0)
    serve(honest)
    with pytest.raises(kt.InclusionError, match="does not verify"):
        await kt.resolve_verified(bob, "alice", state)
    bad_size = pb.KtInclusion()
    bad_size.CopyFrom(honest)
    bad_size.tree_size = 1
    serve(bad_size)
    with pytest.raises(kt.InclusionError, match="proof is for tree size 1"):
        await kt.resolve_verified(bob, "alice", state)
    # no proof at all (the honest log refuses to prove a binding it has not recorded)
    monkeypatch.undo()
    svc(kt_app).config.log_on_resolve = False
    with pytest.raises(kt.InclusionError, match="no key-transparency proof"):
        await kt.resolve_verified(bob, "alice", state)
    # with log_on_resolve (the default) the swap itself becomes public in the log
    svc(kt_app).config.log_on_resolve = True
    resp = await kt.resolve_verified(bob, "alice", state)
    assert resp.identity_key == mallory and resp.inclusion.leaf_index == 2
    page = await kt.audit_page(bob, 2)
    assert page.entries[0].username == "alice" and page.entries[0].identity_key == mallory


# -- directory entries the log has not seen --------------------------------------------------------


async def test_bindings_created_outside_the_hook_are_logged_on_resolve(
    app_factory: AppFactory, connect: Connect,
) -> None:
    app = await app_factory(plugins=["kt_log"])
    c = await user(app, connect, "alice")
    early = key()
    await app.storage.create_user("early", early, now=0)  # e.g. before the plugin was enabled
    state = kt.KtState()
    resp = await kt.resolve_verified(c, "early", state)
    assert resp.identity_key == early and resp.inclusion.leaf_index == 1
    await kt.resolve_verified(c, "early", state)
    assert svc(app).tree.size == 2  # logged once
    # RevokeKey backfills the binding first (one atomic append of two leaves).
    owner = await connect(app)
    assert owner.identity_key is not None
    await app.storage.create_user("quiet", owner.identity_key, now=0)
    assert await kt.revoke_key(owner, "compromised") == 3
    page = await kt.audit_page(c, 2)
    assert [(e.kind, e.username) for e in page.entries] == [(0, "quiet"), (2, "")]


async def test_without_log_on_resolve_the_proof_is_absent(app_factory: AppFactory,
                                                          connect: Connect) -> None:
    app = await app_factory(plugins=["kt_log"], kt_log={"log_on_resolve": False})
    c = await user(app, connect, "alice")
    await app.storage.create_user("early", key(), now=0)
    assert not (await c.resolve_user("early")).HasField("inclusion")
    with pytest.raises(kt.InclusionError):
        await kt.resolve_verified(c, "early", kt.KtState())
    await kt.resolve_verified(c, "alice", kt.KtState())


# -- together with auth_opaque ---------------------------------------------------------------------


async def test_with_auth_opaque(app_factory: AppFactory, connect: Connect) -> None:
    from qpc_auth_opaque import client as opaque_client
    from qpc_auth_opaque import opaque

    app = await app_factory(plugins=["auth_opaque", "kt_log"], auth_opaque={"ksf": "identity"})
    alice = await connect(app, token=None)
    await opaque_client.register(alice, "alice", "pw", ksf=opaque.IdentityKSF())
    bob = await connect(app, token=None)
    await opaque_client.register(bob, "bob", "pw2", ksf=opaque.IdentityKSF())
    await opaque_client.login(bob, "bob", "pw2", ksf=opaque.IdentityKSF())
    state = kt.KtState()
    resp = await kt.resolve_verified(bob, "alice", state)
    assert resp.identity_key == alice.identity_key and resp.inclusion.leaf_index == 0
    await opaque_client.login(alice, "alice", "pw", ksf=opaque.IdentityKSF())
    assert await kt.revoke_key(alice, "compromised") == 2
    assert not (await kt.audit(bob, state)).problems


# -- qpc-client kt ... ---------------------------------------------------------------------------




async def test_cli_verify_and_audit(kt_app: App, connect: Connect) -> None:
    c = await user(kt_app, connect, "alice")
    await register_user(kt_app, "bob", key())
    saved: dict[str, Any] = {}
    rc, out = await kt_cli(c, saved, "verify", "@alice")
    assert rc == 0 and out.startswith("PASS  @alice -> "), out
    assert saved["tree_size"] == 2 and saved["log_key"]
    json.dumps(saved)  # JSON-serialisable
    await register_user(kt_app, "carol", key())
    rc, out = await kt_cli(c, saved, "--json", "verify", "carol")
    data = json.loads(out)
    assert rc == 0 and data["result"] == "PASS" and data["consistent_from"] == 2
    assert data["tree_size"] == 3 and saved["tree_size"] == 3
    rc, out = await kt_cli(c, saved, "audit", "--page-size", "2")
    assert rc == 0 and out.startswith("PASS  audited 3 entries in 2 pages"), out
    await kt.revoke_key(c, "compromised")
    rc, out = await kt_cli(c, saved, "verify", "@alice")
    assert rc == 1 and "FAIL" in out and "revoked (compromised)" in out
    rc, out = await kt_cli(c, saved, "verify", "--no-revocation-check", "@alice")
    assert rc == 0
    rc, out = await kt_cli(c, {"tree_size": "x"}, "audit")
    assert rc == 1 and "unreadable" in out
    with pytest.raises(NotFound):
        await kt_cli(c, saved, "verify", "@nobody")


async def test_heads_are_stored_and_never_go_back_in_time_across_restarts(
    app_factory: AppFactory, connect: Connect
) -> None:
    app = await app_factory(plugins=["kt_log"])
    await register_user(app, "alice", key())
    c = await connect(app)
    state = kt.KtState()
    h1 = await kt.get_sth(c)
    await kt.accept_sth(c, h1, state)
    stored = await app.storage.log_size(STH_LOG)
    assert await kt.get_sth(c) == h1  # the same head while the tree is unchanged and fresh
    assert await app.storage.log_size(STH_LOG) == stored
    await app.stop()

    # Restarted with its clock an hour behind: the next head is still no older than h1.
    app = await app_factory(plugins=["kt_log"])
    behind = svc(app).clock() - 3600
    svc(app).clock = lambda: behind
    await register_user(app, "bob", key())
    c = await connect(app)
    h2 = await kt.get_sth(c)
    assert h2.tree_size == 2 and h2.timestamp_ms >= h1.timestamp_ms
    await kt.accept_sth(c, h2, state)  # no FreshnessError
    # Older than sth_max_age_secs: signed again (same tree, later time) and stored.
    later = h2.timestamp_ms / 1000 + svc(app).config.sth_max_age_secs + 1
    svc(app).clock = lambda: later
    h3 = await kt.get_sth(c)
    assert (h3.tree_size, h3.root_hash) == (h2.tree_size, h2.root_hash)
    assert h3.timestamp_ms == int(later * 1000)
    n = await app.storage.log_size(STH_LOG)
    assert pb.SignedTreeHead.FromString((await app.storage.log_read(STH_LOG, n - 1, n))[0]) == h3
