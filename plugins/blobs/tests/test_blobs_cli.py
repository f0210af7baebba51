"""``blob put`` / ``blob get`` as qpc-client runs them: add_commands + run on a real client."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import pytest
from qpc_blobs import cli

from qpc_core.errors import NotFound


def parser() -> argparse.ArgumentParser:
    """The shape of qpc-client's parser: global --json, then sub-commands."""
    p = argparse.ArgumentParser(prog="qpc-client")
    p.add_argument("--json", action="store_true")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("health")
    cli.add_commands(sub)
    return p


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_put_then_get(app_factory, connect, tmp_path: Path, capsys) -> None:
    app = await app_factory(plugins=["blobs"])
    c = await connect(app)
    src = tmp_path / "notes.txt"
    src.write_bytes(os.urandom(700_000))
    assert await cli.run(parser().parse_args(["blob", "put", str(src)]), c) == 0
    out, err = capsys.readouterr()
    blob_hex = out.strip()
    assert len(blob_hex) == 64 and err == ""  # no progress bar when stderr is not a TTY
    dst = tmp_path / "out" / "copy.txt"
    dst.parent.mkdir()
    assert await cli.run(parser().parse_args(["blob", "get", blob_hex, "-o", str(dst)]), c) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == f"wrote 700000 bytes to {dst} (SHA-256 verified)"
    assert dst.read_bytes() == src.read_bytes()
    # --json output, and the MIME type guessed from the name.
    args = parser().parse_args(["--json", "blob", "put", str(src)])
    assert await cli.run(args, c) == 0
    assert json.loads(capsys.readouterr().out) == {
        "blob_id": blob_hex, "size": 700_000, "mime_type": "text/plain"}
    # Local mistakes: one line, exit 1.  Server errors propagate (qpc-client prints them).
    assert await cli.run(parser().parse_args(["blob", "get", "xyz", "-o", str(dst)]), c) == 1
    assert "64 hex characters" in capsys.readouterr().err
    assert await cli.run(parser().parse_args(["blob", "put", str(tmp_path / "nope")]), c) == 1
    with pytest.raises(NotFound, match="E027"):
        await cli.run(parser().parse_args(["blob", "get", "00" * 32, "-o", str(dst)]), c)
    assert dst.read_bytes() == src.read_bytes()  # a failed download leaves the file alone


def test_get_requires_output() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["blob", "get", "00" * 32])


def test_progress_bar_only_on_a_terminal() -> None:
    tty = Tty()
    bar = cli.ProgressBar("put x", stream=tty)
    bar(0, 2_000_000)
    bar(2_000_000, 2_000_000)
    bar.finish()
    text = tty.getvalue()
    assert text.startswith("\rput x [") and "100% 2.0/2.0 MB" in text and text.endswith("\n")
    plain = io.StringIO()
    quiet = cli.ProgressBar("put x", stream=plain)
    quiet(0, 10)
    quiet(10, 10)
    quiet.finish()
    assert plain.getvalue() == ""


def _mounted() -> bool:
    from qpc_core.client import cli as client_cli

    sub = next(a for a in client_cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    return "blob" in sub.choices


@pytest.mark.timeout(120)
async def test_qpc_client_blob_put_get(tmp_path: Path) -> None:
    """Through the real ``qpc-client`` binary (once qpc-client mounts these commands)."""
    import asyncio

    from qpc_core.testing import BIN, ServerProcess

    if not _mounted():
        pytest.skip("qpc-client does not mount the blob commands yet")
    srv = ServerProcess(tmp_path / "data", args=["--plugins", "blobs"])
    await srv.start()
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1_200_000))

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "qpc-client"), "--server", f"127.0.0.1:{srv.port}", "--ca-cert",
            str(srv.ca), "--auth-token", "devtoken", "--state", str(tmp_path / "state.json"),
            *args, env={"PATH": os.environ["PATH"]},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    try:
        rc, out, err = await run("blob", "put", str(src))
        assert rc == 0 and len(out.strip()) == 64 and err == "", err
        rc, out, err = await run("blob", "get", out.strip(), "-o", str(tmp_path / "g.bin"))
        assert rc == 0 and "SHA-256 verified" in out, err
        assert (tmp_path / "g.bin").read_bytes() == src.read_bytes()
        rc, out, err = await run("blob", "get", "00" * 32, "-o", str(tmp_path / "h.bin"))
        assert rc == 2 and "NOT_FOUND: E027 BLOB_NOT_FOUND" in err
    finally:
        await srv.terminate()
