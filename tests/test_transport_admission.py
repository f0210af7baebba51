"""Connection admission against a real server on loopback: half-open connections (Initial
floods), the per-IP cap, QUIC Retry, and the deadline for authenticating."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from quic_raw import raw_clients, until

from qpc_core.framing import Status
from qpc_core.testing import quic_transport


def send_initials(app: Any, n: int) -> socket.socket:
    """``n`` handshakes started from one UDP socket and never continued."""
    host, port = quic_transport(app).address  # type: ignore[misc]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    for _ in range(n):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["qpc"], server_name="localhost")
        conn = QuicConnection(configuration=cfg)
        conn.connect((host, port), now=time.monotonic())
        for data, _addr in conn.datagrams_to_send(now=time.monotonic()):
            sock.sendto(data, (host, port))
    return sock


def server_connections(app: Any) -> set[Any]:
    """Every connection the QUIC library holds state for, half-open ones included."""
    return set(quic_transport(app).server._protocols.values())


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
async def test_half_open_connections_are_capped_and_expire(app_factory, connect,
                                                           backend) -> None:
    app = await app_factory(max_connections=4, handshake_timeout_secs=0.3, quic_retry="off",
                            quic_backend=backend)
    t = quic_transport(app)
    n = 40
    sock = send_initials(app, n)
    try:
        await until(lambda: len(server_connections(app)) + getattr(t, "initials_refused", 0)
                    >= n or len(server_connections(app)) > 4, what="Initials processed")
        assert len(server_connections(app)) <= 4
        assert t.initials_refused == n - 4
        # Past the handshake deadline they are gone, and the slots are free again.
        await until(lambda: not server_connections(app), what="half-open connections dropped")
        assert not t.pending and not t._per_ip
        c = await connect(app)
        assert (await c.health()).status == "ok"
    finally:
        sock.close()


async def test_per_ip_connection_cap(app_factory, connect) -> None:
    app = await app_factory(max_connections_per_ip=2)
    a = await connect(app)
    b = await connect(app)
    with pytest.raises((TimeoutError, ConnectionError)):
        await connect(app, timeout=1.0)
    assert quic_transport(app).initials_refused >= 1
    await b.close()
    await until(lambda: len(app.connections) == 1, what="the closed client forgotten")
    c = await connect(app)
    assert (await c.health()).status == "ok"
    assert (await a.health()).status == "ok"


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
async def test_retry_on(app_factory, connect, backend) -> None:
    app = await app_factory(quic_retry="on", quic_backend=backend)
    assert quic_transport(app).server._retry is not None
    c = await connect(app)
    assert (await c.health()).status == "ok"


async def test_retry_auto_turns_on_under_half_open_load(app_factory, connect) -> None:
    app = await app_factory(quic_retry="auto", retry_half_open_threshold=3)
    t = quic_transport(app)
    assert t.server._retry is None
    sock = send_initials(app, 3)
    try:
        await until(lambda: len(server_connections(app)) >= 3, what="three half-open connections")
        c = await connect(app)  # its Initial finds 3 half-open: answered with Retry
        assert t.server._retry is not None
        assert (await c.health()).status == "ok"
    finally:
        sock.close()


async def test_forged_initials_do_not_lock_out_an_address(app_factory, connect) -> None:
    """Handshakes that never complete (Initials forged with a NAT's address) fill its
    per-IP share: new connections from it must then pass a Retry, and are not refused."""
    app = await app_factory(max_connections_per_ip=8, quic_retry="auto")
    t = quic_transport(app)
    users = [await connect(app) for _ in range(6)]
    sock = send_initials(app, 2)  # never completed
    try:
        await until(lambda: len(t.pending) >= 2, what="two half-open connections")
        assert t.server._retry is None  # far below the global Retry threshold
        victim = await connect(app, timeout=5.0)  # through a Retry
        assert (await victim.health()).status == "ok"
        assert t.server._retry is None  # the Retry was for that address's Initial only
        assert t.initials_refused == 0
    finally:
        sock.close()
    assert all([(await u.health()).status == "ok" for u in users])


async def test_retry_stays_on_while_a_token_is_fresh(app_factory, connect) -> None:
    """Retry 'auto' turns off only when the last token handed out has expired: a client
    between its Retry and its next Initial must find its token accepted."""
    app = await app_factory(quic_retry="auto", retry_half_open_threshold=3)
    t = quic_transport(app)
    sock = send_initials(app, 1)  # one handshake open: not few enough to turn Retry off
    try:
        await until(lambda: len(t.pending) >= 1, what="a half-open connection")
        t.server._retry = t._retry_handler  # on for a long time already ...
        t._retry_since = time.monotonic() - 61
        c = await connect(app)  # ... and a token was handed out just now
        assert (await c.health()).status == "ok"
    finally:
        sock.close()
    t._auto_retry(0, 3)  # few handshakes open, but that token is fresh: stays on
    assert t.server._retry is not None
    t._retry_since -= 61  # the last token is long expired
    t._auto_retry(0, 3)
    assert t.server._retry is None


# -- auth deadline ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
async def test_unauthenticated_connection_is_closed_at_deadline(app_factory, connect,
                                                                backend) -> None:
    app = await app_factory(auth_timeout_secs=0.3, keepalive_interval_secs=0.1,
                            quic_backend=backend)
    async with raw_clients(app) as make:
        anon = await make()
        # Within the deadline the open methods work.
        assert (await anon.health()).status == Status.OK
        authed = await connect(app)
        code, reason = await asyncio.wait_for(asyncio.shield(anon.terminated), 5)
        assert code == 0x104
        assert reason == "not authenticated within 0.3 s"
        # The authenticated client outlived the deadline.
        assert (await authed.health()).status == "ok"
        await until(lambda: len(app.connections) == 1, what="the closed one forgotten")


async def test_unauthenticated_squatters_free_their_slots(app_factory, connect) -> None:
    app = await app_factory(max_connections=2, auth_timeout_secs=0.3,
                            keepalive_interval_secs=0.1)
    async with raw_clients(app) as make:
        squatters = [await make() for _ in range(2)]
        for s in squatters:
            await asyncio.wait_for(asyncio.shield(s.terminated), 5)
        await until(lambda: not app.connections, what="squatters forgotten")
        legit = await connect(app)
        assert (await legit.health()).status == "ok"


async def test_logout_restarts_the_auth_deadline(app_factory) -> None:
    app = await app_factory(auth_timeout_secs=0.3)
    async with raw_clients(app) as make:
        c = await make(token=b"devtoken")
        (conn,) = list(app.connections)
        assert (await c.health()).status == Status.OK
        conn.unbind()
        code, _reason = await asyncio.wait_for(asyncio.shield(c.terminated), 5)
        assert code == 0x104


async def test_refused_auth_handshake_does_not_lift_the_deadline(app_factory) -> None:
    from qpc_core.framing import encode_auth_request

    app = await app_factory(auth_timeout_secs=0.3)
    async with raw_clients(app) as make:
        c = await make()
        sid = c.send(encode_auth_request(b"wrong-token"))
        reply = await asyncio.wait_for(asyncio.shield(c._ended(sid)), 5)
        assert reply == bytes([0x01, Status.UNAUTHENTICATED])
        code, _reason = await asyncio.wait_for(asyncio.shield(c.terminated), 5)
        assert code == 0x104


async def test_per_request_auth_counts_as_authenticated(app_factory, monkeypatch) -> None:
    """A client that authenticates each request with its ``Auth`` field (which does not bind
    the connection) is not closed by the auth deadline."""
    from plugin_helpers import use_fake_plugins

    from qpc_core.pb import common_pb2

    use_fake_plugins(monkeypatch, authed_echo="authed_echo")
    app = await app_factory(plugins=["authed_echo"], auth_timeout_secs=0.3)
    with_auth = common_pb2.AuthEnvelope(
        auth=common_pb2.Auth(access_token=b"devtoken")).SerializeToString()
    async with raw_clients(app) as make:
        c = await make()
        assert (await c.call(9101, with_auth)).status == Status.OK
        later = await make()  # no credential, connected after c: its deadline comes later
        code, _reason = await asyncio.wait_for(asyncio.shield(later.terminated), 5)
        assert code == 0x104
        assert not c.terminated.done()
        assert (await c.call(9101, with_auth)).status == Status.OK


async def test_a_call_finishing_after_its_connection_ended_binds_nothing(
    app_factory, connect
) -> None:
    """Calls now run to completion after their client left: one that proves an identity
    (or logs in) then must not put the dead connection back into the identity table."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from qpc_core.identity import public_bytes
    from qpc_core.rpc import AuthResult

    app = await app_factory()
    c = await connect(app, new_identity=False)
    (conn,) = server_connections(app)
    await c.close()
    await until(lambda: not app.connections, what="the connection to end")
    key = public_bytes(Ed25519PrivateKey.generate())
    conn.bind(AuthResult(kind="session", identity_key=key))
    conn.bind_identity(key)
    assert key not in app.by_identity and conn.identity_key is None


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
async def test_a_retried_connection_completes_after_the_crowd_has_gone(
    app_factory, connect, backend
) -> None:
    """A client sent a Retry because its address had many handshakes open must get through
    even if they are gone by the time its second Initial (with the token) arrives: that one
    still needs the Retry path (it was missed under a 50-client benchmark)."""
    app = await app_factory(quic_retry="auto", quic_backend=backend)
    t = quic_transport(app)
    sock = send_initials(app, 8)  # eight handshakes that never complete
    try:
        await until(lambda: len(t.pending) >= 8, what="eight half-open connections")
        crowd = set(t.pending)
        handler = t._retry_handler
        create = handler.create_token

        def create_and_clear(*args: Any, **kwargs: Any) -> Any:
            for proto in crowd:  # the crowd leaves right after our Retry
                proto._abort("test", 0)
            return create(*args, **kwargs)

        handler.create_token = create_and_clear
        c = await connect(app, timeout=5.0)
        assert (await c.health()).status == "ok"
        assert not t.pending and t.server._retry is None
    finally:
        sock.close()


def forged_token_initial() -> bytes:
    """A QUIC v1 Initial with a 256-byte garbage token (1,200 bytes, as clients pad them)."""
    import os

    token = b"\x00" + os.urandom(255)
    head = (bytes([0xC3]) + b"\x00\x00\x00\x01" + bytes([8]) + os.urandom(8) + bytes([8])
            + os.urandom(8) + bytes([0x41, 0x00]) + token)
    rest = 1200 - len(head) - 2
    return head + bytes([0x40 | (rest >> 8), rest & 0xFF]) + os.urandom(rest)


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
@pytest.mark.parametrize("mode", ["auto", "on"])
async def test_forged_retry_tokens_are_refused_quietly(app_factory, connect, backend,
                                                       mode) -> None:
    """Token-bearing Initials reach the Retry path (a Retry was handed out recently); a
    forged token is just refused: no exception out of the receive path (qh3's handler raised
    its own crypto error there) and no state."""
    app = await app_factory(quic_backend=backend, quic_retry=mode)
    t = quic_transport(app)
    t._retry_since = time.monotonic()  # as if a token had just been handed out
    handler = t._retry_handler if mode == "auto" else t.server._retry
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    validated: list[bool] = []
    real = handler.validate_token

    def counting(*args: Any, **kwargs: Any) -> Any:
        validated.append(True)
        return real(*args, **kwargs)

    handler.validate_token = counting
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        for _ in range(5):
            sock.sendto(forged_token_initial(), t.address)
        await until(lambda: len(validated) >= 5, what="the tokens checked")
        c = await connect(app)
        assert (await c.health()).status == "ok"
    finally:
        sock.close()
        loop.set_exception_handler(old)
    assert not errors, errors[:1]
    assert not t.pending


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
async def test_retry_cannot_take_an_address_past_its_share(app_factory, connect,
                                                           backend) -> None:
    """Connections admitted through a per-address Retry still count against the address's
    share when their handshake completes."""
    app = await app_factory(max_connections_per_ip=2, quic_retry="auto", quic_backend=backend)
    results = await asyncio.gather(*(connect(app, timeout=5.0) for _ in range(6)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) >= 1
    await until(lambda: not quic_transport(app).pending, what="handshakes settled")
    assert len(app.connections) <= 2


async def test_a_quic_v2_client_retried_after_the_crowd_has_gone(app_factory) -> None:
    from aioquic.asyncio.client import connect as aq_connect
    from aioquic.quic.packet import QuicProtocolVersion
    from quic_raw import RawClient, client_config

    from qpc_core.testing import quic_port

    app = await app_factory(quic_retry="auto")
    t = quic_transport(app)
    sock = send_initials(app, 8)
    try:
        await until(lambda: len(t.pending) >= 8, what="eight half-open connections")
        crowd = set(t.pending)
        create = t._retry_handler.create_token

        def create_and_clear(*args: Any, **kwargs: Any) -> Any:
            for proto in crowd:
                proto._abort("test", 0)
            return create(*args, **kwargs)

        t._retry_handler.create_token = create_and_clear
        cfg = client_config(app)
        cfg.supported_versions = [QuicProtocolVersion.VERSION_2]
        async with aq_connect("127.0.0.1", quic_port(app), configuration=cfg,
                              create_protocol=RawClient, wait_connected=True) as c:
            assert (await c.health()).status == Status.OK
    finally:
        sock.close()
