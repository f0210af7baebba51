"""Helpers shared by the kt_log plugin's tests."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_kt_log import client as kt
from qpc_kt_log.service import KtLogService

from qpc_core.app import App
from qpc_core.client import QpcClient
from qpc_core.identity import public_bytes

AppFactory = Callable[..., Any]
Connect = Callable[..., Any]


def key() -> bytes:
    """A fresh identity key (public bytes)."""
    return public_bytes(Ed25519PrivateKey.generate())


def svc(app: App) -> KtLogService:
    s: KtLogService = app.state["kt_log"]
    return s


async def kt_cli(client: QpcClient, state_dict: dict[str, Any], *argv: str) -> tuple[int, str]:
    """Run ``qpc-client [--json] kt ARGV`` in-process on ``client``; (exit code, stdout)."""
    parser = argparse.ArgumentParser(prog="qpc-client")
    parser.add_argument("--json", action="store_true")
    sub = parser.add_subparsers(dest="command")
    kt.add_commands(sub)
    json_flag = [a for a in argv if a == "--json"]
    args = parser.parse_args([*json_flag, "kt", *(a for a in argv if a != "--json")])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = await kt.run(args, client, state_dict)
    return rc, buf.getvalue()
