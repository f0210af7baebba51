"""auth_opaque against a hostile client: throttling that cannot be skipped, bounded state,
registrations that cannot be replayed or half-done (real App, real QUIC, the real SDK)."""

from __future__ import annotations

import asyncio
import unicodedata

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as opaque_client
from qpc_auth_opaque import opaque
from qpc_auth_opaque.service import login_message
from qpc_auth_opaque.throttle import Throttle

from qpc_core import users
from qpc_core.errors import BadRequest, Conflict, RateLimited, Unauthenticated
from qpc_core.pb import auth_pb2

FAST = opaque.IdentityKSF()
CFG = {"ksf": "identity"}


async def anon(connect, app, identity=None):
    return await connect(app, token=None, identity=identity or Ed25519PrivateKey.generate())


async def login_start(c, name: str, password: str):
    state, ke1 = opaque.client_start_login(password.encode())
    resp = await c.call(
        102,
        auth_pb2.OpaqueLoginStartRequest(username=name, request=ke1.serialize()),
        auth_pb2.OpaqueLoginStartResponse,
    )
    return state, ke1.serialize(), resp.response


def login_finish_request(c, name: str, state, ke1: bytes, ke2: bytes):
    ke3, _sk, _ek = opaque.client_finish_login(state, opaque.KE2.deserialize(ke2), FAST)
    sig = c.identity.sign(login_message(ke1, ke2, c.identity_key))
    return auth_pb2.OpaqueLoginFinishRequest(
        username=name, finalization=ke3.serialize(), identity_key=c.identity_key, signature=sig
    )


async def test_login_start_alone_counts_against_the_throttle(app_factory, connect) -> None:
    """A KE2 lets its receiver test a password guess offline, so a client that never sends
    LoginFinish must be throttled like one that fails it."""
    app = await app_factory(
        plugins=["auth_opaque"],
        auth_opaque={**CFG, "user_free_failures": 3, "ip_free_failures": 100},
    )
    owner = await anon(connect, app)
    await opaque_client.register(owner, "alice", "pw-0042", ksf=FAST)
    failures: list[str] = []
    orig = app.hooks.on_login_failure

    def record(app_, username, peer, reason):
        failures.append(reason)
        return orig(app_, username, peer, reason)

    app.hooks.on_login_failure = record  # type: ignore[method-assign]
    attacker = await anon(connect, app)
    for i in range(4):  # 3 free attempts, the 4th locks the name
        state, _ke1, ke2 = await login_start(attacker, "alice", f"guess-{i}")
        with pytest.raises(opaque.OpaqueError):  # the offline test of one guess
            opaque.client_finish_login(state, opaque.KE2.deserialize(ke2), FAST)
    with pytest.raises(RateLimited):
        await login_start(attacker, "alice", "pw-0042")
    assert failures[-1] == "throttled"
    svc = app.state["auth_opaque"]
    assert svc.user_throttle.retry_after("alice") > 0
    assert sum(1 for x in svc.pending.values() for _ in x) == 4  # still waiting, counted


async def test_successful_login_takes_back_only_its_own_count(app_factory, connect) -> None:
    app = await app_factory(
        plugins=["auth_opaque"], auth_opaque={**CFG, "user_free_failures": 2}
    )
    c = await anon(connect, app)
    await opaque_client.register(c, "alice", "right", ksf=FAST)
    svc = app.state["auth_opaque"]
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await opaque_client.login(c, "alice", "wrong", ksf=FAST)
    ip_before = len(svc.ip_throttle._entries["127.0.0.1"].failures)
    assert ip_before == 2
    await opaque_client.login(c, "alice", "right", ksf=FAST)
    assert svc.user_throttle.retry_after("alice") == 0 and "alice" not in svc.user_throttle._entries
    # The IP keeps the two failures; the successful attempt's own count was taken back.
    assert len(svc.ip_throttle._entries["127.0.0.1"].failures) == ip_before


async def test_finish_without_start_does_not_lock_the_username(app_factory, connect) -> None:
    """A LoginFinish with nothing to finish reveals nothing: it counts against the sender's
    address, never against the (victim's) username."""
    app = await app_factory(
        plugins=["auth_opaque"],
        auth_opaque={**CFG, "user_free_failures": 1, "ip_free_failures": 3},
    )
    victim = await anon(connect, app)
    await opaque_client.register(victim, "alice", "pw", ksf=FAST)
    attacker = await anon(connect, app)
    bogus = auth_pb2.OpaqueLoginFinishRequest(
        username="alice", finalization=bytes(64), identity_key=attacker.identity_key
    )
    for _ in range(4):
        with pytest.raises(Unauthenticated):
            await attacker.call(103, bogus, auth_pb2.OpaqueLoginFinishResponse)
    svc = app.state["auth_opaque"]
    assert svc.user_throttle.retry_after("alice") == 0
    assert svc.ip_throttle.retry_after("127.0.0.1") > 0  # the sender's address is locked


async def test_two_logins_of_one_name_on_one_connection(app_factory, connect) -> None:
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    c = await anon(connect, app)
    await opaque_client.register(c, "alice", "pw", ksf=FAST)
    a = await login_start(c, "alice", "pw")
    b = await login_start(c, "alice", "pw")
    # Finished in the other order: each KE3 finds its own pending state.
    ok_b = await c.call(
        103, login_finish_request(c, "alice", *b), auth_pb2.OpaqueLoginFinishResponse
    )
    ok_a = await c.call(
        103, login_finish_request(c, "alice", *a), auth_pb2.OpaqueLoginFinishResponse
    )
    assert ok_a.session_token and ok_b.session_token and ok_a.session_token != ok_b.session_token
    assert app.state["auth_opaque"].user_throttle.retry_after("alice") == 0
    assert not app.state["auth_opaque"].pending


async def test_a_failed_attempt_gives_up_only_itself(app_factory, connect) -> None:
    """Two logins of one name on one connection, the second with a wrong password: its
    abort (signed over its own KE1/KE2, as the SDK and qpc-opaque.js send it) consumes that
    attempt, and the first still finishes.  An unsigned abort takes the oldest, as before."""
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    c = await anon(connect, app)
    await opaque_client.register(c, "alice", "pw", ksf=FAST)
    good = await login_start(c, "alice", "pw")
    _bad_state, bad_ke1, bad_ke2 = await login_start(c, "alice", "wrong")
    await opaque_client._abort(c, "alice", bad_ke1, bad_ke2)
    ok = await c.call(103, login_finish_request(c, "alice", *good),
                      auth_pb2.OpaqueLoginFinishResponse)
    assert ok.session_token
    assert not app.state["auth_opaque"].pending
    # Unsigned (an older client): the oldest attempt is the one consumed.
    first = await login_start(c, "alice", "pw")
    await login_start(c, "alice", "wrong")
    with pytest.raises(Unauthenticated):
        await c.call(103, auth_pb2.OpaqueLoginFinishRequest(
            username="alice", finalization=bytes(64), identity_key=c.identity_key),
            auth_pb2.OpaqueLoginFinishResponse)
    with pytest.raises(Unauthenticated):
        await c.call(103, login_finish_request(c, "alice", *first),
                     auth_pb2.OpaqueLoginFinishResponse)


async def test_pending_logins_per_ip_are_capped(app_factory, connect) -> None:
    app = await app_factory(
        plugins=["auth_opaque"], auth_opaque={**CFG, "max_pending_logins_per_ip": 3}
    )
    c = await anon(connect, app)
    for i in range(3):
        await login_start(c, f"user{i}", "pw")
    with pytest.raises(RateLimited, match="max_pending_logins_per_ip"):
        await login_start(c, "user9", "pw")
    svc = app.state["auth_opaque"]
    assert svc.pending_count == 3 and svc.pending_per_ip == {"127.0.0.1": 3}
    # Finishing one (here: failing it) frees its slot.
    bogus = auth_pb2.OpaqueLoginFinishRequest(
        username="user0", finalization=bytes(64), identity_key=c.identity_key
    )
    with pytest.raises(Unauthenticated):
        await c.call(103, bogus, auth_pb2.OpaqueLoginFinishResponse)
    await login_start(c, "user9", "pw")
    assert svc.pending_per_ip == {"127.0.0.1": 3}


async def test_long_username_is_refused_before_normalisation(
    app_factory, connect, monkeypatch
) -> None:
    """NFKC can grow a string 18-fold: a huge name must be refused before it is normalised."""
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    c = await anon(connect, app)
    lengths: list[int] = []
    real = unicodedata.normalize

    def spy(form, text):
        lengths.append(len(text))
        return real(form, text)

    monkeypatch.setattr(users.unicodedata, "normalize", spy)
    _s, ke1 = opaque.client_start_login(b"pw")
    huge = "\ufdfa" * 20_000  # 60 KB of UTF-8: under the pre-login payload cap
    with pytest.raises(BadRequest, match="2-32 characters"):
        await c.call(
            102,
            auth_pb2.OpaqueLoginStartRequest(username=huge, request=ke1.serialize()),
            auth_pb2.OpaqueLoginStartResponse,
        )
    assert all(n <= users.MAX_USERNAME_INPUT for n in lengths)
    assert users.normalize_username("  @Alice ") == "alice"  # normal input still normalised


async def test_registration_cannot_be_replayed_to_another_server(app_factory, connect, tmp_path):
    a = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    b = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG, data_dir=tmp_path / "b")
    victim = await anon(connect, a)
    captured: list[auth_pb2.OpaqueRegisterFinishRequest] = []
    orig_call = victim.call

    async def capture(method_id, request, *args, **kw):
        if method_id == 101:
            captured.append(request)
        return await orig_call(method_id, request, *args, **kw)

    victim.call = capture  # type: ignore[method-assign]
    await opaque_client.register(victim, "alice", "pw", ksf=FAST)
    (finish,) = captured
    mallory = await anon(connect, b)
    # B issues its own RegisterStart answer; the captured finish was signed for A's key.
    _st, req = opaque.client_start_registration(b"x")
    await mallory.call(
        100,
        auth_pb2.OpaqueRegisterStartRequest(username="alice", request=req.serialize()),
        auth_pb2.OpaqueRegisterStartResponse,
    )
    with pytest.raises(BadRequest, match="does not verify"):
        await mallory.call(101, finish, auth_pb2.OpaqueRegisterFinishResponse)
    assert await b.storage.get_user_by_name("alice") is None
    # The victim can still register there with their own key.
    v2 = await anon(connect, b, identity=victim.identity)
    await opaque_client.register(v2, "alice", "pw", ksf=FAST)


async def test_registration_survives_the_client_going_away(app_factory, connect) -> None:
    """The directory entry and the OPAQUE record are written together even when the client
    disconnects between them (the request task is cancelled)."""
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    entered, gate, stored = asyncio.Event(), asyncio.Event(), asyncio.Event()
    orig_hook = app.hooks.on_user_registered

    async def slow_hook(app_, username, identity_key):
        entered.set()
        await gate.wait()
        await orig_hook(app_, username, identity_key)

    app.hooks.on_user_registered = slow_hook  # type: ignore[method-assign]
    orig_put = app.storage.kv_put

    async def put(ns, key, value):
        await orig_put(ns, key, value)
        if key == b"record:alice":
            stored.set()

    app.storage.kv_put = put  # type: ignore[method-assign]
    key = Ed25519PrivateKey.generate()
    c = await anon(connect, app, identity=key)
    task = asyncio.ensure_future(opaque_client.register(c, "alice", "pw", ksf=FAST))
    await asyncio.wait_for(entered.wait(), 10)
    await c.close()  # the client goes away between the two writes
    await asyncio.gather(task, return_exceptions=True)
    gate.set()
    await asyncio.wait_for(stored.wait(), 10)
    c2 = await anon(connect, app, identity=key)
    res = await opaque_client.login(c2, "alice", "pw", ksf=FAST)
    assert res.session_token


async def test_interrupted_registration_is_completed_by_its_key_holder(
    app_factory, connect
) -> None:
    """A crash between the directory entry and the record left a name nobody could use or
    register; now the identity key's holder finishes it, anyone else still gets CONFLICT."""
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    key = Ed25519PrivateKey.generate()
    owner = await anon(connect, app, identity=key)
    await users.register_user(app, "alice", owner.identity_key)  # the first write only
    other = await anon(connect, app)
    with pytest.raises(Conflict):
        await opaque_client.register(other, "alice", "pw", ksf=FAST)
    await opaque_client.register(owner, "alice", "pw", ksf=FAST)
    assert (await opaque_client.login(owner, "alice", "pw", ksf=FAST)).session_token
    with pytest.raises(Conflict):  # now complete: taken for everyone
        await opaque_client.register(owner, "alice", "pw2", ksf=FAST)


def test_throttle_memory_is_capped_and_keeps_locked_keys() -> None:
    now = [1000.0]
    t = Throttle(free=1, window=60, base=30, cap=60, clock=lambda: now[0], max_keys=100)
    t.failure("victim")
    t.failure("victim")  # locked
    for i in range(5000):
        t.failure(f"name{i}")
    assert len(t) <= 100
    assert t.retry_after("victim") > 0  # unlocked keys went first
    assert t.retry_after("name4999") == 0 and "name4999" in t._entries  # newest kept


def test_throttle_forgive_takes_back_one_failure() -> None:
    now = [1000.0]
    t = Throttle(free=5, window=60, base=30, cap=60, clock=lambda: now[0])
    t.failure("ip")
    t.failure("ip")
    t.forgive("ip")
    assert len(t._entries["ip"].failures) == 1
    t.forgive("ip")
    assert "ip" not in t._entries
    t.forgive("ip")  # nothing to take back: no error


async def test_session_connection_cannot_reroute_with_another_credential(
    app_factory, connect
) -> None:
    """A connection logged in as alice presents the operator token in a request's Auth field
    and proves another key: refused, the connection stays alice's."""
    from qpc_core.errors import Forbidden
    from qpc_core.identity import prove_identity_message, public_bytes
    from qpc_core.pb import common_pb2

    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG)
    c = await anon(connect, app)
    await opaque_client.register(c, "alice", "pw", ksf=FAST)
    await opaque_client.login(c, "alice", "pw", ksf=FAST)
    other = Ed25519PrivateKey.generate()
    op = common_pb2.Auth(access_token=b"devtoken")
    ch = await c.call(104, common_pb2.AuthChallengeRequest(auth=op),
                      common_pb2.AuthChallengeResponse)
    sig = other.sign(prove_identity_message(ch.nonce, public_bytes(other)))
    with pytest.raises(Forbidden, match="another identity"):
        await c.call(
            105,
            common_pb2.ProveIdentityRequest(
                identity_key=public_bytes(other), signature=sig, auth=op),
            common_pb2.ProveIdentityResponse,
        )
    who = await c.whoami()
    assert who.identity_key == c.identity_key and who.username == "alice"


async def test_parallel_login_starts_are_counted_one_by_one(app_factory, connect) -> None:
    """LoginStarts arriving together must not all pass the throttle before any is counted
    (each answer is an offline guess)."""
    app = await app_factory(
        plugins=["auth_opaque"],
        auth_opaque={**CFG, "user_free_failures": 3, "ip_free_failures": 1000},
    )
    owner = await anon(connect, app)
    await opaque_client.register(owner, "alice", "pw", ksf=FAST)
    conns = [await anon(connect, app) for _ in range(3)]
    results = await asyncio.gather(
        *(login_start(c, "alice", f"guess-{i}") for i in range(4) for c in conns),
        return_exceptions=True)
    answered = [r for r in results if not isinstance(r, BaseException)]
    limited = [r for r in results if isinstance(r, RateLimited)]
    assert len(answered) == 4  # 3 free attempts + the one that locks the name
    assert len(limited) == len(results) - 4


async def test_parallel_login_starts_respect_the_per_ip_cap(app_factory, connect) -> None:
    app = await app_factory(
        plugins=["auth_opaque"], auth_opaque={**CFG, "max_pending_logins_per_ip": 3}
    )
    conns = [await anon(connect, app) for _ in range(3)]
    results = await asyncio.gather(
        *(login_start(c, f"user{i}", "pw") for i in range(4) for c in conns),
        return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    svc = app.state["auth_opaque"]
    assert svc.pending_count == 3 and svc.pending_per_ip == {"127.0.0.1": 3}


async def test_a_correct_login_does_not_lock_its_address(app_factory, connect) -> None:
    app = await app_factory(
        plugins=["auth_opaque"],
        auth_opaque={**CFG, "ip_free_failures": 2, "backoff_base_secs": 30},
    )
    alice = await anon(connect, app)
    await opaque_client.register(alice, "alice", "pw-a", ksf=FAST)
    bob = await anon(connect, app)
    await opaque_client.register(bob, "bob", "pw-b", ksf=FAST)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await opaque_client.login(alice, "alice", "typo", ksf=FAST)
    await opaque_client.login(alice, "alice", "pw-a", ksf=FAST)  # its start hit the limit
    svc = app.state["auth_opaque"]
    assert svc.ip_throttle.retry_after("127.0.0.1") == 0
    assert (await opaque_client.login(bob, "bob", "pw-b", ksf=FAST)).session_token


async def test_busy_auth_traffic_does_not_refuse_valid_tokens(app_factory, connect) -> None:
    """Logins fill the 'auth' group; refused tokens have a bucket of their own."""
    app = await app_factory(
        plugins=["auth_opaque"], auth_opaque=CFG,
        rate_limits={"auth": {"requests": 2, "window_secs": 600}}, rate_limit_ip_factor=3,
    )
    c = await anon(connect, app)
    for i in range(6):  # the address's whole 'auth' budget, no token refused
        await login_start(c, f"someone{i}", "pw")
    with pytest.raises(RateLimited):
        await login_start(c, "someone9", "pw")
    ok = await connect(app, new_identity=False)  # the operator token still works
    assert (await ok.whoami()).authenticated
