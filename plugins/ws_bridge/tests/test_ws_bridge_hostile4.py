"""Review round 4 (the shared credential code): DeleteAccount also ends the account's
per-request credentials, several per-request credentials are kept apart, a bound session's
end leaves a valid per-request one in place, and a transport without the new credential
methods still works with the dispatcher."""

from __future__ import annotations

import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as oc
from qpc_auth_opaque import opaque
from qpc_ws_bridge.client import WsClient
from ws_helpers import bridge, bridge_settings, until, ws_url

from qpc_core.dispatch import Dispatcher
from qpc_core.framing import RequestFrame, ResponseDecoder, Status
from qpc_core.pb import common_pb2, delivery_pb2, directory_pb2
from qpc_core.rpc import AuthResult, PeerInfo
from qpc_core.testing import TEST_TOKEN

FAST = opaque.IdentityKSF()


def session(sid: bytes, secs: float, key: bytes = b"\5" * 32) -> AuthResult:
    return AuthResult(kind="session", identity_key=key, session_id=sid,
                      expires_at=time.time() + secs)


async def test_delete_account_ends_the_accounts_request_credentials(app_factory, connect):
    settings = bridge_settings()
    settings["plugins"] = ["auth_opaque", "ws_bridge"]
    app = await app_factory(auth_opaque={"ksf": "identity"}, auth_timeout_secs=0.5, **settings)
    q = await connect(app, token=None, identity=Ed25519PrivateKey.generate())
    await oc.register(q, "bob", "pw", ksf=FAST)
    token = (await oc.login(q, "bob", "pw", ksf=FAST)).session_token
    ws = await WsClient.connect(ws_url(app))
    req = delivery_pb2.FetchRequest(recipient_key=q.identity_key)
    req.auth.access_token = token
    assert (await ws.call_raw(201, req.SerializeToString())).status == Status.OK
    conn = next(iter(bridge(app).conns))
    assert conn.authenticated
    await q.call(950, directory_pb2.DeleteAccountRequest(), directory_pb2.DeleteAccountResponse)
    assert not conn.authenticated and not conn._request_auths
    await until(lambda: ws.closed.done())  # at the auth deadline, as any unauthenticated one
    assert ws.ws.close_code == 1008


async def test_request_credentials_are_kept_apart_and_outlive_a_bound_session(app_factory):
    app = await app_factory(auth_timeout_secs=0.3, **bridge_settings())
    c = await WsClient.connect(ws_url(app))
    conn = next(iter(bridge(app).conns))
    # Two per-request credentials: the one ending first goes, the other keeps the connection.
    conn.note_request_credential(session(b"A", 0.2))
    conn.note_request_credential(session(b"B", 3600))
    await until(lambda: b"A" not in conn._request_auths)
    assert conn.authenticated and conn._auth_timer is None and b"B" in conn._request_auths
    # A bound session ending (its identity's pushes end with it) leaves B in place.
    bound = session(b"C", 0.2, key=b"\6" * 32)
    conn.bind(bound)
    assert conn.identity_key == b"\6" * 32
    await until(lambda: conn.auth is None)
    assert conn.identity_key is None and b"\6" * 32 not in app.by_identity
    assert conn.authenticated and conn._auth_timer is None and not c.closed.done()
    revoked = await c.pushes.get()
    assert common_pb2.SessionRevokedEvent.FromString(revoked.payload).reason == "session expired"
    # Logout of B (forget_credential) leaves nothing: the deadline again.
    conn.forget_credential(b"B")
    assert not conn.authenticated
    await until(lambda: c.closed.done())
    assert c.ws.close_code == 1008


class OldTransportConnection:
    """A plugin transport's connection written to the protocol before note_request_credential
    and forget_credential existed."""

    def __init__(self) -> None:
        self.connection_id = 10**9
        self.peer = PeerInfo("192.0.2.1", 1)
        self.auth: AuthResult | None = None
        self.identity_key: bytes | None = None

    def bind(self, auth: AuthResult) -> None:
        self.auth = auth

    def bind_identity(self, key: bytes) -> None:
        self.identity_key = key

    def unbind(self) -> None:
        self.auth = None

    def push(self, event_type: int, payload: bytes) -> None:
        pass

    def disconnect(self, reason: str) -> None:
        pass


async def test_a_transport_without_the_new_methods_still_works(app_factory):
    app = await app_factory(**bridge_settings())
    conn: Any = OldTransportConnection()
    req = common_pb2.WhoAmIRequest()
    req.auth.access_token = TEST_TOKEN.encode()
    out = await Dispatcher(app).call(conn, RequestFrame(106, 1, req.SerializeToString()))
    dec = ResponseDecoder()
    dec.feed(out)
    frame = dec.finish()
    assert frame.status == Status.OK
    assert common_pb2.WhoAmIResponse.FromString(frame.payload).authenticated
