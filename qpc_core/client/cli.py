"""``qpc-client``: the command-line client.

    qpc-client --server 127.0.0.1:7000 --auth-token devtoken [--ca-cert data/ca-cert.pem]
               [--state FILE] [COMMAND ...]

With no command it connects, authenticates, prints health and the round-trip time and exits
0 (the scaling guide's load-test loop).  ``QPC_ACCESS_TOKEN`` stands in for --auth-token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from qpc_core.client.sdk import QpcClient, client_backend
from qpc_core.client.sealed import open_text, seal_text
from qpc_core.client.state import ClientState
from qpc_core.config import parse_hostport
from qpc_core.errors import RpcError

DEFAULT_STATE = "qpc-client-state.json"
#: Trusted when no --ca-cert is given: the dev server's CA, else (data directories from
#: before the CA-issued dev certificate) its self-signed certificate.
DEV_CAS = (Path("data/ca-cert.pem"), Path("data/server-cert.pem"))


def dev_ca() -> Path | None:
    return next((p for p in DEV_CAS if p.is_file()), None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpc-client", description="qpc command-line client")
    p.add_argument("--server", default=os.environ.get("QPC_SERVER", "127.0.0.1:7000"))
    p.add_argument(
        "--auth-token",
        default=os.environ.get("QPC_ACCESS_TOKEN"),
        help="operator or session token (env QPC_ACCESS_TOKEN)",
    )
    p.add_argument(
        "--ca-cert",
        type=Path,
        default=None,
        help="CA certificate to trust (PEM or DER); default data/ca-cert.pem, else "
        "data/server-cert.pem, when present (the dev server's)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="skip certificate verification (development only)"
    )
    p.add_argument("--server-name", default="localhost", help="TLS server name (SNI)")
    p.add_argument(
        "--quic-backend",
        choices=("aioquic", "qh3"),
        default=None,
        help="QUIC library (env QPC_CLIENT_QUIC_BACKEND; default aioquic; qh3 needs "
        "qpc-core[fast])",
    )
    p.add_argument(
        "--state", type=Path, default=Path(os.environ.get("QPC_CLIENT_STATE", DEFAULT_STATE))
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("health", help="server health and version")
    sub.add_parser("whoami", help="what the server knows about this connection")
    send = sub.add_parser("send", help="seal a text message to a recipient and enqueue it")
    send.add_argument("--to", required=True, help="identity key hex or @username")
    send.add_argument("message")
    send.add_argument("--ttl", type=int, default=0)
    recv = sub.add_parser("recv", help="fetch, open and print messages")
    recv.add_argument("--wait", type=float, default=0.0, help="long-poll up to SECONDS")
    lt = sub.add_parser("loadtest", help="enqueue -> delivery load test (clients in pairs)")
    lt.add_argument("--clients", type=int, default=2)
    lt.add_argument("--messages", type=int, default=1000)
    lt.add_argument("--size", type=int, default=256, help="payload bytes")
    lt.add_argument("--rate", type=float, default=None, help="open loop: total msgs/s")
    lt.add_argument("--window", type=int, default=4, help="closed loop: in flight per sender")
    lt.add_argument("--max-seconds", type=float, default=60.0)
    reg = sub.add_parser("register", help="register USERNAME with a password (OPAQUE)")
    reg.add_argument("username")
    lg = sub.add_parser("login", help="check USERNAME's password and print the session")
    lg.add_argument("username")
    kt = _kt()
    if kt is not None:
        kt.add_commands(sub)
    blob_cli = _blob_cli()
    if blob_cli is not None:
        blob_cli.add_commands(sub)
    p.add_argument(
        "--user",
        default=os.environ.get("QPC_USER"),
        help="log in as USERNAME (OPAQUE; password from QPC_PASSWORD or a prompt) "
        "before running the command",
    )
    return p


def _password(prompt: str) -> str:
    pw = os.environ.get("QPC_PASSWORD")
    if pw is not None:
        return pw
    import getpass

    return getpass.getpass(prompt)


def _blob_cli() -> Any:
    """The ``blob`` commands of the qpc-blobs plugin, when it is installed."""
    try:
        from qpc_blobs import cli as blob_cli
    except ImportError:
        return None
    return blob_cli


def _kt() -> Any:
    """The key-transparency commands, when qpc-kt-log is installed."""
    try:
        from qpc_kt_log import client as kt_client
    except ImportError:
        return None
    return kt_client


def _opaque() -> Any:
    try:
        from qpc_auth_opaque import client as opaque_client
        from qpc_auth_opaque import opaque
    except ImportError:
        raise SystemExit("qpc-client: password login needs the qpc-auth-opaque package") from None
    ksf = opaque.IdentityKSF() if os.environ.get("QPC_OPAQUE_KSF") == "identity" else None
    return opaque_client, ksf


def _token(args: argparse.Namespace, state: ClientState) -> str | None:
    token: str | None = args.auth_token or state.session_token(args.server)
    return token


async def open_client(args: argparse.Namespace, state: ClientState) -> QpcClient:
    host, port = parse_hostport(args.server, default_host="127.0.0.1")
    ca = args.ca_cert
    if ca is None and not args.insecure:
        ca = dev_ca()
    client = await QpcClient.connect(
        host,
        port,
        token=_token(args, state),
        identity=state.identity,
        ca_cert=ca,
        insecure=args.insecure,
        server_name=args.server_name,
        pinned_signing_key=state.server_key(args.server),
        quic_backend=args.quic_backend,
    )

    def pin(key: bytes) -> None:
        state.pin_server_key(args.server, key)
        state.save()

    client.on_server_key = pin
    return client


async def resolve_recipient(client: QpcClient, to: str) -> bytes:
    if to.startswith("@"):
        return bytes((await client.resolve_user(to[1:])).identity_key)
    try:
        key = bytes.fromhex(to)
    except ValueError:
        raise SystemExit(
            f"qpc-client: --to must be 64 hex characters or @username: {to!r}"
        ) from None
    if len(key) != 32:
        raise SystemExit("qpc-client: --to identity key must be 32 bytes (64 hex characters)")
    return key


def emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


async def run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "loadtest":
        return await run_load(args)
    state = ClientState.load_or_create(args.state)
    t0 = time.perf_counter()
    if cmd in ("register", "login") or args.user:
        args.auth_token = None  # password auth does not need the operator token
    client = await open_client(args, state)
    try:
        if cmd == "register":
            oc, ksf = _opaque()
            await oc.register(client, args.username, _password("new password: "), ksf=ksf)
            emit(
                args,
                {"registered": args.username, "identity_key": state.identity_key.hex()},
                f"registered {args.username} with identity {state.identity_key.hex()}",
            )
            return 0
        if cmd == "login" or args.user:
            oc, ksf = _opaque()
            name = args.username if cmd == "login" else args.user
            res = await oc.login(client, name, _password(f"password for {name}: "), ksf=ksf)
            if cmd == "login":
                emit(
                    args,
                    {"username": name, "expires_at": res.expires_at},
                    f"logged in as {name}; session valid until {res.expires_at} "
                    "(the token is not stored: use --user to log in per command)",
                )
                return 0
        if cmd == "blob":
            blob_cli = _blob_cli()
            assert blob_cli is not None  # the parser offers "blob" only when it imports
            return int(await blob_cli.run(args, client))
        if cmd is None or cmd == "health":
            t1 = time.perf_counter()
            h = await client.health()
            rtt = (time.perf_counter() - t1) * 1000
            total = (time.perf_counter() - t0) * 1000
            emit(
                args,
                {
                    "status": h.status,
                    "version": h.version,
                    "uptime_secs": h.uptime_secs,
                    "rtt_ms": round(rtt, 3),
                    "connect_ms": round(total - rtt, 3),
                },
                f"status={h.status} version={h.version} uptime={h.uptime_secs}s "
                f"rtt={rtt:.2f}ms connect={total - rtt:.2f}ms",
            )
        elif cmd == "whoami":
            w = await client.whoami()
            emit(
                args,
                {
                    "authenticated": w.authenticated,
                    "auth_kind": w.auth_kind,
                    "identity_key": w.identity_key.hex(),
                    "username": w.username,
                },
                f"authenticated={w.authenticated} kind={w.auth_kind or '-'} "
                f"identity={w.identity_key.hex() or '-'} username={w.username or '-'}",
            )
        elif cmd == "send":
            recipient = await resolve_recipient(client, args.to)
            sealed = seal_text(state.identity, recipient, args.message)
            resp = await client.enqueue(recipient, sealed, ttl_secs=args.ttl)
            emit(
                args,
                {"seq": resp.seq, "duplicate": resp.duplicate, "proof": resp.delivery_proof.hex()},
                f"sent seq={resp.seq} (delivery proof verified)",
            )
        elif cmd == "kt":
            kt_state = state.servers.setdefault(args.server, {}).setdefault("kt", {})
            rc: int = await _kt().run(args, client, kt_state)
            return rc
        elif cmd == "recv":
            if args.wait > 0:
                msgs = await client.fetch_wait(int(args.wait * 1000))
            else:
                msgs = await client.fetch()
            out: list[dict[str, Any]] = []
            for m in msgs:
                try:
                    sender, text = open_text(state.identity, m.data)
                    out.append({"seq": m.seq, "from": sender.hex(), "text": text})
                except ValueError as e:
                    out.append({"seq": m.seq, "error": str(e)})
            if args.json:
                print(json.dumps(out))
            else:
                for o in out:
                    if "error" in o:
                        print(f"[{o['seq']}] <unreadable: {o['error']}>")
                    else:
                        print(f"[{o['seq']}] {o['from'][:16]}…: {o['text']}")
                if not out:
                    print("no messages")
        return 0
    finally:
        await client.close()
        state.save()


async def run_load(args: argparse.Namespace) -> int:
    from qpc_core.client.loadtest import format_result, run_loadtest

    host, port = parse_hostport(args.server, default_host="127.0.0.1")
    ca = args.ca_cert
    if ca is None and not args.insecure:
        ca = dev_ca()
    try:
        result = await run_loadtest(
            host, port, token=args.auth_token, ca_cert=ca, insecure=args.insecure,
            clients=args.clients, messages=args.messages, size=args.size, rate=args.rate,
            window=args.window, max_seconds=args.max_seconds, quic_backend=args.quic_backend,
        )
    except ValueError as e:
        print(f"qpc-client: error: {e}", file=sys.stderr)
        return 2
    print(format_result(result, args.json))
    return 0 if result.errors == 0 and result.delivered > 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # a mistyped QPC_CLIENT_QUIC_BACKEND or a missing qh3 is a usage error, not a crash
        args.quic_backend = client_backend(args.quic_backend).name
    except (ValueError, ImportError) as e:
        print(f"qpc-client: error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args))
    except RpcError as e:
        print(f"qpc-client: error: {e.status.name}: {e}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError, TimeoutError) as e:
        print(
            f"qpc-client: error: cannot reach {args.server}: {e or type(e).__name__}",
            file=sys.stderr,
        )
        return 3
