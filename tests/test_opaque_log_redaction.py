"""With ``redact_logs = true`` (the default) the OPAQUE plugin's registration log lines do not
name the user: they carry the audit log's token of the identity key (when the audit log is
on) or nothing identifying; ``redact_logs = false`` keeps the name."""

from __future__ import annotations

import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as opaque_client
from qpc_auth_opaque import opaque

from qpc_core import audit, users

FAST = opaque.IdentityKSF()
CFG = {"ksf": "identity"}
NAME = "zebulon-the-user"


def _opaque_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qpc.auth_opaque"]


async def _register(app, connect, caplog, *, interrupted: bool = False) -> bytes:
    key = Ed25519PrivateKey.generate()
    c = await connect(app, token=None, identity=key)
    if interrupted:  # only the directory entry was written (a crash between the two writes)
        await users.register_user(app, NAME, c.identity_key)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="qpc.auth_opaque")
    await opaque_client.register(c, NAME, "correct horse", ksf=FAST)
    identity: bytes = c.identity_key
    return identity


@pytest.mark.parametrize("interrupted", [False, True])
async def test_redacted_with_the_audit_token(app_factory, connect, caplog,
                                             interrupted: bool) -> None:
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG, audit_log=True,
                            redact_logs=True)
    identity = await _register(app, connect, caplog, interrupted=interrupted)
    audit_log = audit.get(app)
    assert audit_log is not None and audit_log.key is not None
    token = audit_log.token(identity)
    assert token.startswith("h:")
    lines = _opaque_lines(caplog)
    expected = [f"registered user identity={token}"]
    if interrupted:
        expected.insert(0, f"completing the interrupted registration of identity={token}")
    assert lines == expected
    assert NAME not in caplog.text


async def test_redacted_without_the_audit_log(app_factory, connect, caplog) -> None:
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG, redact_logs=True)
    assert audit.get(app) is None  # audit_log is off: no redaction key
    identity = await _register(app, connect, caplog, interrupted=True)
    assert _opaque_lines(caplog) == ["completing the interrupted registration of (redacted)",
                                     "registered user (redacted)"]
    assert NAME not in caplog.text and identity.hex() not in caplog.text


async def test_in_clear_when_redaction_is_off(app_factory, connect, caplog) -> None:
    app = await app_factory(plugins=["auth_opaque"], auth_opaque=CFG, audit_log=True,
                            redact_logs=False)
    await _register(app, connect, caplog)
    assert _opaque_lines(caplog) == [f"registered user {NAME}"]
