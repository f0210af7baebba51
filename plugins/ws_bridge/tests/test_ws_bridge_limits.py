"""Who the bridge lets in and how it bounds them: origins, hosts, subprotocol, connection caps,
the pre-auth message size, the auth deadline, calls in flight per connection, proxies,
wss://, production checks, and shutdown losing nothing acknowledged."""

from __future__ import annotations

import asyncio
import ssl
from types import SimpleNamespace

import pytest
import qpc_ws_bridge
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_ws_bridge import wire
from qpc_ws_bridge.client import WsClient
from qpc_ws_bridge.config import WsBridgeConfig
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from ws_helpers import bridge, bridge_settings, until, ws_url

from qpc_core.app import App
from qpc_core.errors import ConfigError, RpcError
from qpc_core.framing import Status
from qpc_core.pb import common_pb2
from qpc_core.testing import TEST_TOKEN, make_settings
from qpc_core.transport.certs import generate_self_signed


async def status_of(url: str, **kw) -> int:
    with pytest.raises(InvalidStatus) as e:
        async with ws_connect(url, **kw):
            pass
    return e.value.response.status_code


async def test_origins_hosts_paths_and_subprotocol(app_factory) -> None:
    app = await app_factory(**bridge_settings(allowed_origins=["http://good.example"]))
    url = ws_url(app)
    sub = {"subprotocols": [wire.SUBPROTOCOL]}
    assert await status_of(url, origin="http://evil.example", **sub) == 403
    ok = await WsClient.connect(url, token=TEST_TOKEN, origin="http://good.example")
    await ok.close()
    nobrowser = await WsClient.connect(url, token=TEST_TOKEN)  # no Origin: not a browser
    await nobrowser.close()
    assert await status_of(url) == 400  # no qpc.v1 subprotocol offered
    assert await status_of(ws_url(app, "/elsewhere"), **sub) == 404
    # Only the hosts the operator names (set here after start: the port is ephemeral).
    port = bridge(app).address[1]
    bridge(app).cfg.public_hosts = [f"localhost:{port}"]
    assert await status_of(url, **sub) == 421  # Host 127.0.0.1:port
    c = await WsClient.connect(ws_url(app, host="localhost"), token=TEST_TOKEN,
                               identity=Ed25519PrivateKey.generate())
    await c.close()
    assert bridge(app).refused == {"origin": 1, "host": 1, "not found": 1, "subprotocol": 1}


async def test_origins_follow_a_configuration_reload(app_factory, settings_factory) -> None:
    cfg = bridge_settings(allowed_origins=["http://good.example"])
    app = await app_factory(**cfg)
    app.config_source = lambda: settings_factory(**cfg)
    url = ws_url(app)
    ok = await WsClient.connect(url, token=TEST_TOKEN, origin="http://good.example")
    cfg["ws_bridge"] = {**cfg["ws_bridge"], "allowed_origins": ["http://new.example"],
                        "path": "/v2/ws"}
    r = await app.reload_config()
    assert (r.applied, r.restart_pending) == (("ws_bridge.allowed_origins",),
                                              ("ws_bridge.path",))
    sub = {"subprotocols": [wire.SUBPROTOCOL]}
    assert await status_of(url, origin="http://good.example", **sub) == 403
    c = await WsClient.connect(url, token=TEST_TOKEN, origin="http://new.example")
    await c.close()
    assert (await ok.call(106, common_pb2.WhoAmIRequest(),
                          common_pb2.WhoAmIResponse)).authenticated  # open ones stay
    await ok.close()


def http_get(app: App, path: str) -> tuple[int, str, bytes]:
    import http.client

    host, port = bridge(app).address
    h = http.client.HTTPConnection(host, port, timeout=10)
    try:
        h.request("GET", path)
        r = h.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read()
    finally:
        h.close()


async def test_client_library_is_served(app_factory) -> None:
    app = await app_factory(**bridge_settings())
    status, ctype, body = await asyncio.to_thread(http_get, app, "/v1/ws/qpc.js")
    assert status == 200 and ctype.startswith("text/javascript")
    assert b"root.Qpc = {" in body and b'"qpc.v1"' in body
    status, ctype, body = await asyncio.to_thread(http_get, app, "/v1/ws/qpc-opaque.js")
    assert status == 200 and ctype.startswith("text/javascript")
    assert b"QpcOpaque" in body and b"OPAQUE-DeriveDiffieHellmanKeyPair" in body
    status, _ctype, _body = await asyncio.to_thread(http_get, app, "/v1/ws/other.js")
    assert status == 404


async def test_an_unbuilt_opaque_client_is_said_and_not_served(
    app_factory, monkeypatch, caplog
) -> None:
    import qpc_ws_bridge.bridge as bridge_mod

    monkeypatch.setattr(bridge_mod, "OPAQUE_JS", "not-built.js")
    app = await app_factory(**bridge_settings())
    assert any("not-built.js (the browser OPAQUE client) is not built" in r.getMessage()
               for r in caplog.records)
    status, _ctype, body = await asyncio.to_thread(http_get, app, "/v1/ws/not-built.js")
    assert status == 404 and b"not found" in body
    assert (await asyncio.to_thread(http_get, app, "/v1/ws/qpc.js"))[0] == 200


async def test_connection_caps(app_factory) -> None:
    app = await app_factory(**bridge_settings(max_connections=2))
    url = ws_url(app)
    a = await WsClient.connect(url, token=TEST_TOKEN)
    b = await WsClient.connect(url, token=TEST_TOKEN)
    assert await status_of(url, subprotocols=[wire.SUBPROTOCOL]) == 503
    await a.close()
    await until(lambda: len(bridge(app).conns) == 1)
    c = await WsClient.connect(url, token=TEST_TOKEN)  # room again
    await asyncio.gather(b.close(), c.close())

    app2 = await app_factory(data_dir=app.data_dir.parent / "d2", max_connections_per_ip=1,
                             **bridge_settings())
    d = await WsClient.connect(ws_url(app2), token=TEST_TOKEN)
    assert await status_of(ws_url(app2), subprotocols=[wire.SUBPROTOCOL]) == 503
    await d.close()


async def test_pre_auth_message_size_and_auth_deadline(app_factory) -> None:
    app = await app_factory(auth_timeout_secs=0.5, max_unauthenticated_payload_bytes=2048,
                            max_payload_bytes=100_000, **bridge_settings())
    url = ws_url(app)
    # Unauthenticated: a message above the pre-auth limit is not read (1009, too big).
    c = await WsClient.connect(url)
    await c.send_raw(wire.request_message(802, 1, b"\0" * 5000))
    await asyncio.wait_for(c.closed, 10)
    assert c.ws.close_code == 1009
    # Authenticated: the same message is read and answered (here: not a HealthRequest).
    d = await WsClient.connect(url, token=TEST_TOKEN)
    frame = await d.call_raw(802, b"\0" * 5000)
    assert frame.status == Status.BAD_REQUEST
    # Above max_payload_bytes: not read either (a connection holds at most one message of
    # that size in progress); an authenticated client is told why, by the close code.
    big = await WsClient.connect(url, token=TEST_TOKEN)
    await big.send_raw(wire.request_message(200, 1, b"\0" * (app.settings.max_payload_bytes + 1)))
    await asyncio.wait_for(big.closed, 10)
    assert big.ws.close_code == 1009
    # Never authenticated: closed at the deadline with a policy-violation code.
    e = await WsClient.connect(url)
    await asyncio.wait_for(e.closed, 10)
    assert e.ws.close_code == 1008 and "not authenticated" in (e.ws.close_reason or "")
    assert not d.closed.done()  # the authenticated one stays
    await d.close()


async def test_calls_in_flight_per_connection_are_bounded(app_factory) -> None:
    app = await app_factory(max_concurrent_bidi_streams=3, **bridge_settings())
    c = await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                               identity=Ed25519PrivateKey.generate())
    conn = next(iter(bridge(app).conns))
    waits = [asyncio.ensure_future(c.fetch_wait(30_000)) for _ in range(3)]
    await until(lambda: len(conn.running) == 3)
    health = asyncio.ensure_future(
        c.call(802, common_pb2.HealthRequest(), common_pb2.HealthResponse))
    await until(lambda: len(conn.waiting) == 1)  # read, but not started: it waits its turn
    assert len(conn.running) == 3 and not health.done()
    waits[0].cancel()  # CANCEL still arrives while requests wait, and frees a slot
    assert (await asyncio.wait_for(health, 10)).status == "ok"
    for w in waits[1:]:
        w.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    await c.close()


async def test_trusted_proxy_sets_the_client_address(app_factory) -> None:
    app = await app_factory(**bridge_settings(trusted_proxies=["127.0.0.0/8"]))
    c = await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                               additional_headers={"X-Forwarded-For": "198.51.100.9, 127.0.0.2"})
    assert {x.peer.host for x in bridge(app).conns} == {"198.51.100.9"}
    await c.close()
    app2 = await app_factory(data_dir=app.data_dir.parent / "d2", **bridge_settings())
    d = await WsClient.connect(ws_url(app2), token=TEST_TOKEN,
                               additional_headers={"X-Forwarded-For": "198.51.100.9"})
    assert {x.peer.host for x in bridge(app2).conns} == {"127.0.0.1"}  # not a trusted proxy
    await d.close()


async def test_wss_with_the_servers_certificate(app_factory) -> None:
    app = await app_factory(**bridge_settings(tls=True))
    ctx = ssl.create_default_context(cafile=str(app.settings.data_dir / "ca-cert.pem"))
    ctx.check_hostname = False  # the development certificate names localhost
    port = bridge(app).address[1]
    c = await WsClient.connect(f"wss://localhost:{port}/v1/ws", token=TEST_TOKEN,
                               identity=Ed25519PrivateKey.generate(), ssl_context=ctx)
    r = await c.enqueue(c.identity_key, b"over tls")
    assert [m.seq for m in await c.fetch()] == [r.seq]
    await c.close()
    with pytest.raises(ssl.SSLError):  # not trusted without the CA
        await WsClient.connect(f"wss://localhost:{port}/v1/ws",
                               ssl_context=ssl.create_default_context())


async def test_wss_serves_a_reloaded_certificate_to_new_connections(app_factory,
                                                                      tmp_path) -> None:
    """SIGHUP's reload (App.reload_tls): new wss:// connections get the certificate now in
    tls_cert/tls_key; an established one keeps its own and goes on working."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        generate_self_signed(d)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(d) -> None:
        cert.write_bytes((d / "server-cert.pem").read_bytes())
        key.write_bytes((d / "server-key.pem").read_bytes())

    def trusting(d) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(d / "ca-cert.pem"))
        ctx.check_hostname = False
        return ctx

    def served(c: WsClient) -> bytes:
        return c.ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)

    def leaf(d) -> bytes:
        return (d / "server-cert.der").read_bytes()

    install(a)
    app = await app_factory(tls_cert=cert, tls_key=key, **bridge_settings(tls=True))
    url = f"wss://localhost:{bridge(app).address[1]}/v1/ws"
    old = await WsClient.connect(url, token=TEST_TOKEN, identity=Ed25519PrivateKey.generate(),
                                 ssl_context=trusting(a))
    assert served(old) == leaf(a)
    install(b)
    assert await app.reload_tls() == {"quic": None, "ws_bridge": None}
    new = await WsClient.connect(url, token=TEST_TOKEN, identity=Ed25519PrivateKey.generate(),
                                 ssl_context=trusting(b))
    assert served(new) == leaf(b)
    r = await old.enqueue(new.identity_key, b"over the old session")
    assert [m.seq for m in await new.fetch()] == [r.seq]
    with pytest.raises(ssl.SSLError):  # A's CA alone no longer fits what is served
        await WsClient.connect(url, ssl_context=trusting(a))
    await old.close()
    await new.close()


def rsa_pair(root) -> tuple[bytes, bytes, bytes]:
    """A self-signed RSA certificate for localhost and 127.0.0.1: (cert PEM, key PEM, DER)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(Encoding.PEM)
    (root / "rsa-ca.pem").write_bytes(pem)
    return pem, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), \
        cert.public_bytes(Encoding.DER)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # with SNI, and without
async def test_wss_reload_to_another_key_type_serves_the_new_certificate(
    app_factory, tmp_path, host
) -> None:
    """ECDSA (the development pair) to RSA: a context that gets a second pair keeps both
    (one per key type) and goes on serving the old one to ECDSA-capable clients."""
    generate_self_signed(tmp_path / "a")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes((tmp_path / "a" / "server-cert.pem").read_bytes())
    key.write_bytes((tmp_path / "a" / "server-key.pem").read_bytes())
    app = await app_factory(tls_cert=cert, tls_key=key, **bridge_settings(tls=True))
    new_cert, new_key, new_der = rsa_pair(tmp_path)
    cert.write_bytes(new_cert)
    key.write_bytes(new_key)
    assert await app.reload_tls() == {"quic": None, "ws_bridge": None}
    ctx = ssl.create_default_context(cafile=str(tmp_path / "rsa-ca.pem"))
    ctx.check_hostname = False
    c = await WsClient.connect(f"wss://{host}:{bridge(app).address[1]}/v1/ws",
                               token=TEST_TOKEN, ssl_context=ctx)
    try:
        assert c.ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True) == (
            new_der)
    finally:
        await c.close()


def test_config_errors_and_production_rules(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"ws_bridge\.listen"):
        App(make_settings(tmp_path, **bridge_settings(listen="nowhere")))
    for bad in ({"path": "v1"}, {"allowed_origins": ["good.example"]},
                {"trusted_proxies": ["proxy"]}, {"max_connections": 0}, {"unknown": 1}):
        with pytest.raises(ValueError):
            WsBridgeConfig(**bad)
    # Normalised as browsers send them (lower case, no default port).
    cfg = WsBridgeConfig(allowed_origins=["https://Chat.Example.com:443", "http://x:80",
                                          "http://x:8080"],
                         public_hosts=["Chat.Example.com:443", "x:80", "x:8080"])
    assert cfg.allowed_origins == ["https://chat.example.com", "http://x", "http://x:8080"]
    assert cfg.public_hosts == ["chat.example.com", "x", "x:8080"]
    prod = SimpleNamespace(settings=SimpleNamespace(production=True))
    problems = qpc_ws_bridge._problems(prod, WsBridgeConfig(listen="0.0.0.0:7002"))
    assert any("ws_bridge.public_hosts" in p for p in problems)
    assert any("ws_bridge.tls" in p for p in problems)
    assert qpc_ws_bridge._problems(prod, WsBridgeConfig(public_hosts=["chat.example"])) == []
    assert qpc_ws_bridge._problems(prod, WsBridgeConfig(
        listen="0.0.0.0:443", tls=True, public_hosts=["chat.example"])) == []


async def test_shutdown_loses_no_acknowledged_message(app_factory, connect, tmp_path) -> None:
    data = tmp_path / "shared"
    app = await app_factory(data_dir=data, **bridge_settings())
    rx = Ed25519PrivateKey.generate()
    c = await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                               identity=Ed25519PrivateKey.generate())
    acked: list[int] = []
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        try:
            r = await c.enqueue(rx.public_key().public_bytes_raw(), b"m%d" % i)
            acked.append(r.seq)
        except (RpcError, ConnectionError, ConnectionClosed):
            refused += 1

    sends = [asyncio.ensure_future(one(i)) for i in range(300)]
    await until(lambda: len(acked) >= 50)
    await app.stop()  # mid-stream: the rest are answered UNAVAILABLE or never sent
    await asyncio.gather(*sends)
    assert acked and len(acked) + refused == 300
    again: App = await app_factory(data_dir=data, **bridge_settings())
    r = await connect(again, identity=rx)
    stored = {m.seq for m in await r.fetch()}
    assert set(acked) <= stored  # every acknowledged message survived the shutdown
