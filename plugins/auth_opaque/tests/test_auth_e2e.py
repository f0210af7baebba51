"""auth_opaque end to end: a real App with the plugin, real QUIC, the real SDK."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as opaque_client
from qpc_auth_opaque import opaque
from qpc_auth_opaque.service import token_hash

from qpc_core.errors import BadRequest, Conflict, Forbidden, RateLimited, Unauthenticated
from qpc_core.framing import PushEvent
from qpc_core.pb import auth_pb2

FAST = opaque.IdentityKSF()
CFG = {"ksf": "identity"}


@pytest.fixture
async def opaque_app(app_factory):
    return await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)


async def anon(connect, app, identity=None):
    return await connect(app, token=None, identity=identity or Ed25519PrivateKey.generate())


async def register(connect, app, name="alice", password="correct horse"):
    c = await anon(connect, app)
    await opaque_client.register(c, name, password, ksf=FAST)
    return c


async def test_register_then_login(opaque_app, connect) -> None:
    c = await register(connect, opaque_app)
    res = await opaque_client.login(c, "alice", "correct horse", ksf=FAST)
    assert res.session_token.startswith(b"qpcs1.") and len(res.export_key) == 64
    who = await c.whoami()
    assert who.auth_kind == "session" and who.username == "alice"
    assert who.identity_key == c.identity_key
    # The password never reached the server: only the OPAQUE record is stored.
    rec = await opaque_app.storage.kv_get("auth_opaque", b"record:alice")
    assert rec is not None and len(rec) == opaque.RegistrationRecord.SIZE
    assert b"correct horse" not in rec
    # A new connection authenticates with the session token and is bound to the identity.
    c2 = await connect(opaque_app, token=res.session_token.decode(), new_identity=False)
    assert (await c2.whoami()).identity_key == c.identity_key
    # The session row holds only the token's hash.
    assert await opaque_app.storage.get_session(res.session_token) is None
    assert await opaque_app.storage.get_session(token_hash(res.session_token)) is not None


async def test_send_to_username_after_login(opaque_app, connect) -> None:
    alice = await register(connect, opaque_app, "alice")
    bob = await register(connect, opaque_app, "bob", "bobs password")
    await opaque_client.login(alice, "alice", "correct horse", ksf=FAST)
    await opaque_client.login(bob, "bob", "bobs password", ksf=FAST)
    target = (await alice.resolve_user("@bob")).identity_key
    await alice.enqueue(target, b"sealed for bob")
    assert [m.data for m in await bob.fetch()] == [b"sealed for bob"]


async def test_wrong_password_fails(opaque_app, connect) -> None:
    c = await register(connect, opaque_app)
    events = []
    opaque_app.hooks._notify = _recorder(opaque_app.hooks._notify, events)
    with pytest.raises(Unauthenticated, match="login failed"):
        await opaque_client.login(c, "alice", "wrong", ksf=FAST)
    assert ("on_login_failure", "alice") in events
    assert not (await c.whoami()).authenticated


def _recorder(orig, events):
    def notify(name, **kw):
        if name.startswith("on_login"):
            events.append((name, kw.get("username")))
        return orig(name, **kw)

    return notify


async def test_unknown_user_gets_fake_response_of_same_size(opaque_app, connect) -> None:
    await register(connect, opaque_app)
    c = await anon(connect, opaque_app)
    sizes = []
    for name in ("alice", "nobody"):
        _state, ke1 = opaque.client_start_login(b"guess")
        resp = await c.call(
            102,
            auth_pb2.OpaqueLoginStartRequest(username=name, request=ke1.serialize()),
            auth_pb2.OpaqueLoginStartResponse,
        )
        sizes.append(len(resp.response))
    assert sizes == [opaque.KE2.SIZE, opaque.KE2.SIZE]
    # Unknown users fail only at the final step, exactly like a wrong password.
    with pytest.raises(Unauthenticated, match="login failed"):
        await opaque_client.login(c, "nobody", "guess", ksf=FAST)


async def test_fake_record_is_stable_per_username(opaque_app, connect) -> None:
    svc = opaque_app.state["auth_opaque"]
    assert svc.fake_record("ghost").serialize() == svc.fake_record("ghost").serialize()
    assert svc.fake_record("ghost").serialize() != svc.fake_record("ghost2").serialize()


async def test_taken_username_is_conflict(opaque_app, connect) -> None:
    await register(connect, opaque_app)
    c = await anon(connect, opaque_app)
    with pytest.raises(Conflict):
        await opaque_client.register(c, "alice", "other", ksf=FAST)
    with pytest.raises(BadRequest, match="username"):
        await opaque_client.register(c, "x", "pw", ksf=FAST)


async def test_register_needs_identity_signature(opaque_app, connect) -> None:
    c = await anon(connect, opaque_app)
    state, req = opaque.client_start_registration(b"pw")
    resp = await c.call(
        100,
        auth_pb2.OpaqueRegisterStartRequest(username="carol", request=req.serialize()),
        auth_pb2.OpaqueRegisterStartResponse,
    )
    record, _ = opaque.client_finalize_registration(
        state, opaque.RegistrationResponse.deserialize(resp.response), FAST
    )
    with pytest.raises(BadRequest, match="signature"):
        await c.call(
            101,
            auth_pb2.OpaqueRegisterFinishRequest(
                username="carol",
                upload=record.serialize(),
                identity_key=c.identity_key,
                signature=b"\x00" * 64,
            ),
            auth_pb2.OpaqueRegisterFinishResponse,
        )
    with pytest.raises(BadRequest, match="registration record"):
        await c.call(
            101,
            auth_pb2.OpaqueRegisterFinishRequest(
                username="carol", upload=b"short", identity_key=c.identity_key
            ),
            auth_pb2.OpaqueRegisterFinishResponse,
        )


async def _manual_login(c, name, password):
    state, ke1 = opaque.client_start_login(password.encode())
    resp = await c.call(
        102,
        auth_pb2.OpaqueLoginStartRequest(username=name, request=ke1.serialize()),
        auth_pb2.OpaqueLoginStartResponse,
    )
    ke3, _sk, _ek = opaque.client_finish_login(state, opaque.KE2.deserialize(resp.response), FAST)
    from qpc_auth_opaque.service import login_message

    sig = c.identity.sign(login_message(ke1.serialize(), resp.response, c.identity_key))
    return auth_pb2.OpaqueLoginFinishRequest(
        username=name, finalization=ke3.serialize(), identity_key=c.identity_key, signature=sig
    )


async def test_replayed_and_forged_ke3(opaque_app, connect) -> None:
    c = await register(connect, opaque_app)
    fin = await _manual_login(c, "alice", "correct horse")
    forged = auth_pb2.OpaqueLoginFinishRequest()
    forged.CopyFrom(fin)
    forged.finalization = bytes(64)
    with pytest.raises(Unauthenticated):
        await c.call(103, forged, auth_pb2.OpaqueLoginFinishResponse)
    # The pending state was consumed by the failed attempt: the genuine KE3 is now a replay.
    with pytest.raises(Unauthenticated):
        await c.call(103, fin, auth_pb2.OpaqueLoginFinishResponse)
    fin2 = await _manual_login(c, "alice", "correct horse")
    ok = await c.call(103, fin2, auth_pb2.OpaqueLoginFinishResponse)
    assert ok.session_token
    with pytest.raises(Unauthenticated):  # replay after success
        await c.call(103, fin2, auth_pb2.OpaqueLoginFinishResponse)


async def test_login_with_another_identity_key_fails(opaque_app, connect) -> None:
    await register(connect, opaque_app)  # alice registered with her own key
    mallory = await anon(connect, opaque_app)  # knows the password, not alice's key
    with pytest.raises(Unauthenticated):
        await opaque_client.login(mallory, "alice", "correct horse", ksf=FAST)


async def test_token_from_another_identity_is_refused(opaque_app, connect) -> None:
    alice = await register(connect, opaque_app, "alice")
    res = await opaque_client.login(alice, "alice", "correct horse", ksf=FAST)
    bob = await register(connect, opaque_app, "bob", "pw-bob-123")
    await opaque_client.login(bob, "bob", "pw-bob-123", ksf=FAST)
    # Bob's connection presents Alice's token in a request: refused, identities differ.
    from qpc_core.pb import common_pb2

    req = common_pb2.WhoAmIRequest(auth=common_pb2.Auth(access_token=res.session_token))
    with pytest.raises(Unauthenticated, match="another identity"):
        await bob.call(106, req, common_pb2.WhoAmIResponse)
    # A session connection cannot prove a different identity either.
    c = await connect(
        opaque_app, token=res.session_token.decode(), identity=bob.identity, prove=False
    )
    with pytest.raises(Forbidden):
        await c.prove_identity()
    with pytest.raises(Forbidden):
        await c.fetch(recipient=bob.identity_key)


async def test_expired_session(app_factory, connect, monkeypatch) -> None:
    app = await app_factory(
        plugins=["auth_opaque"], auth_opaque={**CFG, "session_lifetime_secs": 1}
    )
    c = await register(connect, app)
    res = await opaque_client.login(c, "alice", "correct horse", ksf=FAST)
    assert (await c.whoami()).auth_kind == "session"
    import time

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 5)
    with pytest.raises(Unauthenticated, match="handshake refused"):
        await connect(app, token=res.session_token.decode(), new_identity=False)
    with pytest.raises(Unauthenticated, match="expired"):
        await c.fetch()  # the already-bound connection expires too
    who = await c.whoami()  # open methods still answer, as unauthenticated
    assert not who.authenticated and who.auth_kind == "" and who.username == ""
    svc = app.state["auth_opaque"]
    with pytest.raises(Unauthenticated, match="session expired"):
        await svc.authenticate(res.session_token)


async def test_logout_and_account_deletion_end_sessions(opaque_app, connect) -> None:
    c = await register(connect, opaque_app)
    res = await opaque_client.login(c, "alice", "correct horse", ksf=FAST)
    tok = res.session_token.decode()
    c2 = await connect(opaque_app, token=tok, new_identity=False)
    c3 = await connect(opaque_app, token=tok, new_identity=False)
    await opaque_client.logout(c2)
    assert not (await c2.whoami()).authenticated  # this connection is logged out
    push = await asyncio.wait_for(c3.pushes.get(), 10)  # and so is every other on the session
    assert push.event_type == PushEvent.SESSION_REVOKED
    assert not (await c3.whoami()).authenticated
    with pytest.raises(Unauthenticated, match="handshake refused"):
        await connect(opaque_app, token=tok, new_identity=False)
    with pytest.raises(Unauthenticated, match="revoked"):
        await opaque_app.state["auth_opaque"].authenticate(res.session_token)
    res2 = await opaque_client.login(c, "alice", "correct horse", ksf=FAST)
    await c.delete_account()
    with pytest.raises(Unauthenticated):
        await connect(opaque_app, token=res2.session_token.decode(), new_identity=False)
    assert await opaque_app.storage.kv_get("auth_opaque", b"record:alice") is None
    # The name is free again.
    await register(connect, opaque_app, "alice", "new password")


async def test_brute_force_backoff(app_factory, connect) -> None:
    app = await app_factory(
        plugins=["auth_opaque"],
        auth_opaque={**CFG, "user_free_failures": 3, "backoff_base_secs": 30},
    )
    await register(connect, app)
    attacker = await anon(connect, app)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await opaque_client.login(attacker, "alice", "guess", ksf=FAST)
    with pytest.raises(Unauthenticated):  # 4th failure: locks the name
        await opaque_client.login(attacker, "alice", "guess", ksf=FAST)
    with pytest.raises(RateLimited) as ei:
        await opaque_client.login(attacker, "alice", "correct horse", ksf=FAST)
    assert 0 < ei.value.retry_after <= 30
    svc = app.state["auth_opaque"]
    assert svc.user_throttle.failure("alice") == 60  # the lock-out doubles


async def test_pending_logins_are_bounded(app_factory, connect) -> None:
    app = await app_factory(plugins=["auth_opaque"], auth_opaque={**CFG, "max_pending_logins": 5})
    await register(connect, app)
    c = await anon(connect, app)
    for i in range(12):
        _s, ke1 = opaque.client_start_login(b"pw")
        await c.call(
            102,
            auth_pb2.OpaqueLoginStartRequest(username=f"user{i}", request=ke1.serialize()),
            auth_pb2.OpaqueLoginStartResponse,
        )
    assert len(app.state["auth_opaque"].pending) <= 5


async def test_restart_keeps_accounts_and_sessions(app_factory, connect) -> None:
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    c = await register(connect, app)
    identity = c.identity
    res = await opaque_client.login(c, "alice", "correct horse", ksf=FAST)
    setup = app.state["auth_opaque"].setup.serialize()
    await app.stop()
    app2 = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    assert app2.state["auth_opaque"].setup.serialize() == setup
    c2 = await connect(app2, token=res.session_token.decode(), new_identity=False)
    assert (await c2.whoami()).username == "alice"
    c3 = await anon(connect, app2, identity=identity)
    await opaque_client.login(c3, "alice", "correct horse", ksf=FAST)


async def test_argon2_default_ksf_roundtrip(app_factory, connect) -> None:
    ksf = opaque.Argon2idKSF(memory_kib=1024, iterations=1)
    app = await app_factory(plugins=["auth_opaque"])
    c = await anon(connect, app)
    await opaque_client.register(c, "dave", "pw", ksf=ksf)
    await opaque_client.login(c, "dave", "pw", ksf=ksf)
    with pytest.raises(Unauthenticated):  # a client with other KSF parameters cannot log in
        await opaque_client.login(c, "dave", "pw", ksf=FAST)


async def test_bad_config_names_path(app_factory) -> None:
    from qpc_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"auth_opaque\.ksf"):
        await app_factory(plugins=["auth_opaque"], auth_opaque={"ksf": "md5"})


async def test_setup_is_never_logged(app_factory, caplog) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    setup = app.state["auth_opaque"].setup
    text = caplog.text
    assert setup.oprf_seed.hex() not in text and setup.server_private_key.hex() not in text
    assert setup.oprf_seed.hex() not in repr(setup)


async def test_configured_server_identity_must_match(app_factory, connect) -> None:
    app = await app_factory(plugins=["auth_opaque"],
                            auth_opaque={**CFG, "server_identity": "chat.example.com"})
    c = await anon(connect, app)
    ident = b"chat.example.com"
    await opaque_client.register(c, "erin", "pw-erin", ksf=FAST, server_identity=ident)
    res = await opaque_client.login(c, "erin", "pw-erin", ksf=FAST, server_identity=ident)
    assert res.session_token
    other = await anon(connect, app, identity=c.identity)
    with pytest.raises(Unauthenticated):  # a client that does not use it cannot log in
        await opaque_client.login(other, "erin", "pw-erin", ksf=FAST)


async def test_registration_closes_on_a_configuration_reload(
    app_factory, settings_factory, connect
) -> None:
    cfg = {"plugins": ["auth_opaque"], "auth_opaque": dict(CFG)}
    app = await app_factory(**cfg)
    app.config_source = lambda: settings_factory(**cfg)
    alice = await register(connect, app, "alice")
    cfg["auth_opaque"] = {**CFG, "registration_open": False, "context": "other",
                          "session_lifetime_secs": 60}
    r = await app.reload_config()
    assert r.applied == ("auth_opaque.registration_open", "auth_opaque.session_lifetime_secs")
    assert r.restart_pending == ("auth_opaque.context",)  # part of every stored record
    with pytest.raises(Forbidden, match="registration is closed"):
        await register(connect, app, "bob")
    # Login still works: the OPAQUE context keeps its running value.
    res = await opaque_client.login(alice, "alice", "correct horse", ksf=FAST)
    session = await app.storage.get_session(token_hash(res.session_token))
    assert session is not None and session.expires_at - session.created_at <= 61
