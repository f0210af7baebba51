"""The audit log (qpc_core.audit): one line per answered RPC, identities and IPs redacted."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re

import pytest

from qpc_core import audit
from qpc_core.cli import _overrides, build_parser
from qpc_core.config import load_config
from qpc_core.framing import Status
from qpc_core.pb import delivery_pb2

LINE = re.compile(
    r"rpc method=(\w+) id=(\d+) status=(\w+) ms=[\d.]+ identity=(\S+) peer=(\S+) conn=\d+$"
)


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, ...]]:
    out = []
    for r in caplog.records:
        if r.name == "qpc.audit" and r.getMessage().startswith("rpc "):
            m = LINE.match(r.getMessage())
            assert m, r.getMessage()
            out.append(m.groups())
    return out


@pytest.mark.asyncio
async def test_redacted_lines_name_method_status_and_keyed_tokens(
    app_factory, connect, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="qpc.audit")
    app = await app_factory(audit_log=True)
    alice, bob = await connect(app), await connect(app)
    caplog.clear()
    await alice.enqueue(bob.identity_key, b"hello")
    other = delivery_pb2.FetchRequest(recipient_key=bob.identity_key).SerializeToString()
    refused = await alice.call_raw(202, other)  # FetchWait on bob's inbox
    assert refused.status == Status.FORBIDDEN
    lines = audit_lines(caplog)
    key = await app.storage.kv_get(audit.KEY_NAMESPACE, audit.KEY_NAME)
    assert key is not None and len(key) == 32

    def token(v: bytes) -> str:
        return "h:" + hmac.new(key, v, hashlib.sha256).hexdigest()[:16]

    # (the SDK's keep-alive Health calls are logged too; they are not what this test sends)
    lines = [line for line in lines if line[0] != "Health"]
    assert [(m, i, s) for m, i, s, _who, _peer in lines] == [
        ("Enqueue", "200", "OK"), ("FetchWait", "202", "FORBIDDEN")]
    assert {who for *_rest, who, _peer in lines} == {token(alice.identity_key)}
    assert {peer for *_rest, peer in lines} == {token(b"127.0.0.1")}
    text = caplog.text
    assert alice.identity_key.hex() not in text and bob.identity_key.hex() not in text
    assert "127.0.0.1" not in text.replace("h:", "")


@pytest.mark.asyncio
async def test_redaction_key_survives_a_restart(app_factory, connect, caplog, tmp_path) -> None:
    caplog.set_level(logging.INFO, logger="qpc.audit")
    first = await app_factory(audit_log=True, data_dir=tmp_path / "d")
    key = await first.storage.kv_get(audit.KEY_NAMESPACE, audit.KEY_NAME)
    await first.stop()
    again = await app_factory(audit_log=True, data_dir=tmp_path / "d")
    assert await again.storage.kv_get(audit.KEY_NAMESPACE, audit.KEY_NAME) == key


@pytest.mark.asyncio
async def test_unredacted_lines_show_hex_identity_and_ip(app_factory, connect, caplog) -> None:
    caplog.set_level(logging.INFO, logger="qpc.audit")
    app = await app_factory(audit_log=True, redact_logs=False)
    alice = await connect(app)
    caplog.clear()
    await alice.enqueue(alice.identity_key, b"note to self")
    ((method, _id, status, who, peer),) = [x for x in audit_lines(caplog) if x[0] != "Health"]
    assert (method, status, who, peer) == ("Enqueue", "OK", alice.identity_key.hex(), "127.0.0.1")
    assert await app.storage.kv_get(audit.KEY_NAMESPACE, audit.KEY_NAME) is None


@pytest.mark.asyncio
async def test_off_by_default(app_factory, connect, caplog) -> None:
    caplog.set_level(logging.INFO, logger="qpc.audit")
    app = await app_factory()
    alice = await connect(app)
    await alice.enqueue(alice.identity_key, b"unlogged")
    assert audit_lines(caplog) == [] and audit.get(app) is None


def test_command_line_and_environment() -> None:
    args = build_parser().parse_args(["run", "--audit-log", "--no-redact-logs"])
    s = load_config(None, _overrides(args), env={})
    assert (s.audit_log, s.redact_logs) == (True, False)
    s = load_config(None, _overrides(build_parser().parse_args(["run"])), env={
        "QPC_AUDIT_LOG": "true"})
    assert (s.audit_log, s.redact_logs) == (True, True)
    with pytest.raises(Exception, match="audit_log"):
        load_config(None, {}, env={"QPC_AUDIT_LOG": "sometimes"})
