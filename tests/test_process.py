"""Tests against a real `qpc run` process: crash safety, SIGTERM, the qpc-client CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from procs import BIN, ServerProcess

from qpc_core.testing import process_client, sigkill_loses_nothing

pytestmark = pytest.mark.timeout(240)


async def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    await srv.start()
    assert await sigkill_loses_nothing(srv, target=1500) >= 1500
    assert await srv.terminate() == 0


async def test_sigterm_is_graceful(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    await srv.start()
    c = await process_client(srv)
    await c.enqueue(c.identity_key, b"kept")
    rc = await srv.terminate()
    assert rc == 0
    log = "".join(srv.log)
    assert "shutting down" in log and "qpc stopped" in log
    await asyncio.wait_for(c.protocol.wait_closed(), 10)
    assert c.protocol.closed_reason == "server shutting down"
    await c.close()


def test_database_unreadable_without_key(tmp_path: Path) -> None:
    async def run() -> Path:
        srv = ServerProcess(tmp_path / "data")
        await srv.start()
        c = await process_client(srv)
        await c.enqueue(c.identity_key, b"x")
        await c.close()
        await srv.terminate()
        return tmp_path / "data" / "qpc.db"

    db = asyncio.run(run())
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(db).execute("SELECT count(*) FROM sqlite_master").fetchall()
    import sqlcipher3

    wrong = sqlcipher3.connect(str(db))
    wrong.execute("PRAGMA key='wrong'")
    with pytest.raises(sqlcipher3.DatabaseError):
        wrong.execute("SELECT count(*) FROM sqlite_master").fetchall()
    # The scaling guide's operator command works with the right key.
    ok = sqlcipher3.connect(str(db))
    ok.execute("PRAGMA key='proc-test-key'")
    ok.execute("PRAGMA wal_autocheckpoint=2000")
    assert ok.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 2000
    assert ok.execute("SELECT count(*) FROM messages").fetchone()[0] == 1


async def test_wrong_key_is_a_clear_startup_error(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    await srv.start()
    await srv.terminate()
    bad = ServerProcess(tmp_path / "data", env={"QPC_DB_KEY": "not-the-key"})
    with pytest.raises(RuntimeError, match="wrong database key"):
        await bad.start()
    assert bad.proc is not None and await bad.proc.wait() == 1


async def test_second_server_on_the_same_database_is_refused(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    await srv.start()
    try:
        second = ServerProcess(tmp_path / "data")
        with pytest.raises(RuntimeError, match="in use by another qpc process"):
            await second.start()
        assert second.proc is not None and await second.proc.wait() == 1
        c = await process_client(srv)  # the first one is untouched
        try:
            out = await c.enqueue(c.identity_key, b"still served")
            assert out.seq == 1
        finally:
            await c.close()
    finally:
        await srv.terminate()


async def test_production_refuses_dev_defaults(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "qpc"),
        "run",
        "--data-dir",
        str(tmp_path),
        env={"PATH": os.environ["PATH"], "QPC_PRODUCTION": "true"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await proc.communicate()
    assert proc.returncode == 1
    text = err.decode()
    assert "refusing to start in production mode" in text
    assert "auth_token" in text and "db_key" in text and "tls_cert" in text


async def _cli(srv: ServerProcess, *args: str, state: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "qpc-client"),
        "--server",
        f"127.0.0.1:{srv.port}",
        "--ca-cert",
        str(srv.ca),
        "--state",
        str(state),
        *args,
        env={"PATH": os.environ["PATH"], "QPC_ACCESS_TOKEN": "devtoken"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_qpc_client_cli(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    await srv.start()
    try:
        rc, out, err = await _cli(srv, state=tmp_path / "a.json")
        assert rc == 0, err
        assert "status=ok" in out and "rtt=" in out
        assert (os.stat(tmp_path / "a.json").st_mode & 0o777) == 0o600
        rc, out, _ = await _cli(srv, "health", state=tmp_path / "a.json")
        assert rc == 0 and "version=" in out
        rc, out, _ = await _cli(srv, "--json", "whoami", state=tmp_path / "b.json")
        bob = json.loads(out)
        assert bob["authenticated"] and len(bytes.fromhex(bob["identity_key"])) == 32
        rc, out, err = await _cli(
            srv, "send", "--to", bob["identity_key"], "hello bob", state=tmp_path / "a.json"
        )
        assert rc == 0, err
        assert "delivery proof verified" in out
        rc, out, err = await _cli(srv, "--json", "recv", state=tmp_path / "b.json")
        assert rc == 0, err
        (msg,) = json.loads(out)
        assert msg["text"] == "hello bob"
        alice_key = json.loads((tmp_path / "a.json").read_text())["identity_key"]
        assert msg["from"] == alice_key
        # The server stored only ciphertext.
        rc, out, err = await _cli(srv, "send", "--to", "abcd", "x", state=tmp_path / "a.json")
        assert rc != 0 and "64 hex" in err
    finally:
        await srv.terminate()


async def test_qpc_client_bad_token(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    await srv.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "qpc-client"),
            "--server",
            f"127.0.0.1:{srv.port}",
            "--ca-cert",
            str(srv.ca),
            "--state",
            str(tmp_path / "s.json"),
            "--auth-token",
            "wrong",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await proc.communicate()
        assert proc.returncode == 2
        assert "UNAUTHENTICATED" in err.decode()
    finally:
        await srv.terminate()


def test_sealed_text_roundtrip() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from qpc_core.client.sealed import open_text, seal_text
    from qpc_core.identity import public_bytes

    a, b, c = (Ed25519PrivateKey.generate() for _ in range(3))
    box = seal_text(a, public_bytes(b), "secret text")
    assert b"secret text" not in box
    sender, text = open_text(b, box)
    assert sender == public_bytes(a) and text == "secret text"
    with pytest.raises(ValueError, match="not sealed to this identity"):
        open_text(c, box)


async def test_qpc_client_loadtest(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    await srv.start()
    try:
        rc, out, err = await _cli(srv, "--json", "loadtest", "--clients", "4", "--messages",
                                  "200", "--size", "64", state=tmp_path / "s.json")
        assert rc == 0, err
        r = json.loads(out)
        assert r["delivered"] == 200 and r["errors"] == 0 and r["msgs_per_sec"] > 0
        assert r["leftover"] == 0  # nothing acknowledged was left undelivered
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        # Its own CPU during the run (did the generator limit the run?), within the run.
        assert 0 < r["client_cpu_s"] <= r["seconds"] * 1.5
        rc, out, err = await _cli(srv, "loadtest", "--clients", "3", state=tmp_path / "s.json")
        assert rc == 2 and "even number" in err
    finally:
        await srv.terminate()


async def test_server_runs_on_uvloop(tmp_path: Path) -> None:
    """The fast option: the same qpc code on uvloop (selected by config)."""
    srv = ServerProcess(tmp_path / "data", env={"QPC_EVENT_LOOP": "uvloop"})
    await srv.start()
    try:
        c = await process_client(srv)
        r = await c.enqueue(c.identity_key, b"on uvloop")
        assert r.seq == 1 and [m.data for m in await c.fetch()] == [b"on uvloop"]
        await c.close()
        assert "event loop: uvloop" in "".join(srv.log)
    finally:
        assert await srv.terminate() == 0


async def test_server_runs_on_qh3(tmp_path: Path) -> None:
    """The fast transport option: the same qpc code on qh3 (compiled crypto and buffers),
    talking to the aioquic-based SDK, with the configured stream limits applied."""
    srv = ServerProcess(tmp_path / "data", env={"QPC_QUIC_BACKEND": "qh3",
                                                "QPC_MAX_CONCURRENT_BIDI_STREAMS": "77"})
    await srv.start()
    try:
        c = await process_client(srv)
        r = await c.enqueue(c.identity_key, b"on qh3")
        assert r.seq == 1 and [m.data for m in await c.fetch()] == [b"on qh3"]
        waiting = asyncio.ensure_future(c.fetch_wait(10_000))
        other = await process_client(srv)
        await other.enqueue(c.identity_key, b"woken")
        assert [m.data for m in await asyncio.wait_for(waiting, 15)] == [b"woken"]
        # What the server advertised in its transport parameters.
        assert c.protocol._quic._remote_max_streams_bidi == 77
        await c.close()
        await other.close()
        assert "ALPN qpc, qh3" in "".join(srv.log)
    finally:
        assert await srv.terminate() == 0


def test_unknown_quic_backend_is_a_config_error(tmp_path: Path) -> None:
    from qpc_core.transport.backend import load_backend

    with pytest.raises(ValueError, match="unknown QUIC backend 'quiche'"):
        load_backend("quiche")
    res = subprocess.run([str(BIN / "qpc"), "check-config", "--data-dir", str(tmp_path)],
                         env={**os.environ, "QPC_QUIC_BACKEND": "quiche"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "quic_backend" in res.stderr


def test_qh3_2_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from qpc_core.transport.backend import load_backend

    assert load_backend("qh3").name == "qh3"  # the installed 1.x loads
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "2.1.0")
    with pytest.raises(ImportError, match=r"needs qh3 1\.x, found 2\.1\.0"):
        load_backend("qh3")
