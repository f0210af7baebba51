"""[auth_opaque] keys that apply on a configuration reload: a lower pending-login TTL
applies to logins already in progress too."""

from __future__ import annotations

import time
import types
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import opaque
from qpc_auth_opaque import service as service_mod

from qpc_core.pb import auth_pb2

CFG = {"ksf": "identity"}


async def login_start(c: Any, name: str) -> None:
    _state, ke1 = opaque.client_start_login(b"pw")
    await c.call(102, auth_pb2.OpaqueLoginStartRequest(username=name, request=ke1.serialize()),
                 auth_pb2.OpaqueLoginStartResponse)


async def test_a_lower_pending_login_ttl_frees_slots_of_logins_started_since(
    monkeypatch: pytest.MonkeyPatch, app_factory: Any, settings_factory: Any, connect: Any
) -> None:
    """pending_login_ttl_secs lowered 600 -> 5: logins in progress are shortened too, so
    an older login with the old expiry does not keep the slots of ones that expired under
    the new TTL (the pending logins stay in expiry order)."""
    clock = [1000.0]
    monkeypatch.setattr(service_mod, "time",
                        types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    cfg: dict[str, Any] = {"plugins": ["auth_opaque"], "auth_opaque": {
        **CFG, "pending_login_ttl_secs": 600.0, "max_pending_logins_per_ip": 2}}
    app = await app_factory(**cfg)
    app.config_source = lambda: settings_factory(**cfg)
    c = await connect(app, token=None, identity=Ed25519PrivateKey.generate())
    await login_start(c, "before")  # expires at 1600
    cfg["auth_opaque"] = {**cfg["auth_opaque"], "pending_login_ttl_secs": 5.0}
    assert (await app.reload_config()).applied == ("auth_opaque.pending_login_ttl_secs",)
    await login_start(c, "after")  # expires at 1005
    clock[0] = 1010.0  # "after" has expired under the new TTL
    svc = app.state["auth_opaque"]
    await login_start(c, "third")  # admitted: "after" expired, its slot is free
    assert any(name == "third" for _conn, name in svc.pending)
