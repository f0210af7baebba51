"""`qpc-client kt verify/audit` against a real `qpc run` process.

Skipped until qpc-client wires in :func:`qpc_kt_log.client.add_commands` / ``run``."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from qpc_core.client import cli
from qpc_core.testing import BIN, ServerProcess


def _wired() -> bool:
    try:
        cli.build_parser().parse_args(["kt", "audit"])
    except SystemExit:
        return False
    return True


pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not _wired(), reason="qpc-client has no `kt` command yet"),
]


async def _cli(srv: ServerProcess, state: Path, *args: str,
               password: str | None = None) -> tuple[int | None, str, str]:
    env = {"PATH": os.environ["PATH"], "QPC_OPAQUE_KSF": "identity"}
    if password is not None:
        env["QPC_PASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "qpc-client"), "--server", f"127.0.0.1:{srv.port}", "--ca-cert", str(srv.ca),
        "--state", str(state), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_kt_verify_and_audit(tmp_path: Path) -> None:
    cfg = tmp_path / "qpc.toml"
    cfg.write_text('plugins = ["auth_opaque", "kt_log"]\n[auth_opaque]\nksf = "identity"\n')
    srv = ServerProcess(tmp_path / "data", args=["--config", str(cfg)])
    await srv.start()
    a, b = tmp_path / "alice.json", tmp_path / "bob.json"
    try:
        for state, name in [(a, "alice"), (b, "bob")]:
            rc, _out, err = await _cli(srv, state, "register", name, password="pw-" + name)
            assert rc == 0, err
        rc, out, err = await _cli(srv, a, "--user", "alice", "kt", "verify", "@bob",
                                  password="pw-alice")
        assert rc == 0 and out.startswith("PASS  @bob"), out + err
        rc, out, err = await _cli(srv, a, "--user", "alice", "kt", "audit",
                                  password="pw-alice")
        assert rc == 0 and out.startswith("PASS  audited 2 entries"), out + err
        saved = json.loads(a.read_text())
        kt_state = next(iter(saved["servers"].values()))["kt"]
        assert kt_state["tree_size"] == 2 and kt_state["log_key"]
        # a remembered head the server cannot extend: FAIL, exit status 1
        kt_state["root_hash"] = "00" * 32
        a.write_text(json.dumps(saved))
        rc, out, err = await _cli(srv, a, "--user", "alice", "kt", "verify", "@bob",
                                  password="pw-alice")
        assert rc == 1 and out.startswith("FAIL") and "forked" in out, out + err
    finally:
        await srv.terminate()
