"""qpc-client register / login / send --to @username against a real server process."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from qpc_core.testing import BIN, ServerProcess

pytestmark = pytest.mark.timeout(120)


async def _cli(srv: ServerProcess, state: Path, *args: str, password: str | None = None):
    env = {"PATH": os.environ["PATH"], "QPC_OPAQUE_KSF": "identity"}
    if password is not None:
        env["QPC_PASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "qpc-client"),
        "--server",
        f"127.0.0.1:{srv.port}",
        "--ca-cert",
        str(srv.ca),
        "--state",
        str(state),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_register_login_send_to_username(tmp_path: Path) -> None:
    cfg = tmp_path / "qpc.toml"
    cfg.write_text('plugins = ["auth_opaque"]\n[auth_opaque]\nksf = "identity"\n')
    srv = ServerProcess(tmp_path / "data", args=["--config", str(cfg)])
    await srv.start()
    a, b = tmp_path / "alice.json", tmp_path / "bob.json"
    try:
        rc, out, err = await _cli(srv, a, "register", "alice", password="pw-alice")
        assert rc == 0, err
        rc, out, err = await _cli(srv, b, "register", "bob", password="pw-bob")
        assert rc == 0, err
        rc, out, err = await _cli(srv, a, "register", "alice", password="x")
        assert rc == 2 and "CONFLICT" in err
        rc, out, err = await _cli(srv, a, "login", "alice", password="wrong")
        assert rc == 2 and "UNAUTHENTICATED" in err
        rc, out, err = await _cli(srv, a, "login", "alice", password="pw-alice")
        assert rc == 0 and "logged in as alice" in out, err
        rc, out, err = await _cli(
            srv, a, "--user", "alice", "send", "--to", "@bob", "hi bob", password="pw-alice"
        )
        assert rc == 0 and "delivery proof verified" in out, err
        rc, out, err = await _cli(srv, b, "--user", "bob", "--json", "recv", password="pw-bob")
        assert rc == 0, err
        (msg,) = json.loads(out)
        assert msg["text"] == "hi bob"
        assert msg["from"] == json.loads(a.read_text())["identity_key"]
        assert "session_token" not in a.read_text()  # tokens are never written to disk
    finally:
        await srv.terminate()
