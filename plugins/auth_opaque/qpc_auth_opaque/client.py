"""Client side of OPAQUE for the SDK: ``register`` and ``login`` on a :class:`QpcClient`.

The password never leaves this process; Argon2id runs here (the server never runs the
KSF).  Client and server must agree on the KSF parameters and context (server config table
``[auth_opaque]``; defaults match).  The session token is returned to the caller and is not
written to disk by the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpc_auth_opaque import opaque
from qpc_auth_opaque.service import login_message, register_message
from qpc_core.client.sdk import QpcClient
from qpc_core.errors import BadRequest
from qpc_core.pb import auth_pb2 as pb
from qpc_core.pb import common_pb2
from qpc_core.users import normalize_username


@dataclass(frozen=True)
class LoginResult:
    session_token: bytes
    expires_at: int
    export_key: bytes


def default_ksf() -> opaque.KSF:
    return opaque.Argon2idKSF()


async def register(
    client: QpcClient,
    username: str,
    password: str,
    *,
    ksf: opaque.KSF | None = None,
    server_identity: bytes | None = None,
) -> bytes:
    """Register ``username`` bound to the client's identity key; returns the export key.

    ``server_identity`` must equal the server's ``[auth_opaque] server_identity`` when that is
    set (default: the server's OPAQUE public key, nothing to pass)."""
    if client.identity is None or client.identity_key is None:
        raise ValueError("the client needs an identity key to register")
    name = normalize_username(username)
    state, request = opaque.client_start_registration(password.encode())
    resp = await client.call(
        100,
        pb.OpaqueRegisterStartRequest(username=name, request=request.serialize()),
        pb.OpaqueRegisterStartResponse,
    )
    try:
        response = opaque.RegistrationResponse.deserialize(resp.response)
    except opaque.OpaqueError as e:
        raise BadRequest(f"server sent an invalid registration response: {e}") from None
    record, export_key = opaque.client_finalize_registration(
        state, response, ksf or default_ksf(), server_identity=server_identity
    )
    upload = record.serialize()
    sig = client.identity.sign(register_message(response.server_public_key, name, upload))
    await client.call(
        101,
        pb.OpaqueRegisterFinishRequest(
            username=name, upload=upload, identity_key=client.identity_key, signature=sig
        ),
        pb.OpaqueRegisterFinishResponse,
    )
    return export_key


async def login(
    client: QpcClient,
    username: str,
    password: str,
    *,
    ksf: opaque.KSF | None = None,
    context: bytes = opaque.DEFAULT_CONTEXT,
    server_identity: bytes | None = None,
) -> LoginResult:
    """Log in; on success the connection is bound to the session and identity."""
    if client.identity is None or client.identity_key is None:
        raise ValueError("the client needs its identity key to log in")
    name = normalize_username(username)
    state, ke1 = opaque.client_start_login(password.encode())
    ke1_b = ke1.serialize()
    resp = await client.call(
        102, pb.OpaqueLoginStartRequest(username=name, request=ke1_b), pb.OpaqueLoginStartResponse
    )
    try:
        ke2 = opaque.KE2.deserialize(resp.response)
        ke3, _session_key, export_key = opaque.client_finish_login(
            state, ke2, ksf or default_ksf(), context, server_identity=server_identity
        )
    except opaque.OpaqueError:
        # Tell the server this attempt is over so it counts the failure consistently.
        await _abort(client, name, ke1_b, resp.response)
        from qpc_core.errors import Unauthenticated

        raise Unauthenticated("login failed: wrong username or password") from None
    sig = client.identity.sign(login_message(ke1_b, resp.response, client.identity_key))
    fin = await client.call(
        103,
        pb.OpaqueLoginFinishRequest(
            username=name,
            finalization=ke3.serialize(),
            identity_key=client.identity_key,
            signature=sig,
        ),
        pb.OpaqueLoginFinishResponse,
    )
    return LoginResult(fin.session_token, fin.expires_at, export_key)


async def _abort(client: QpcClient, name: str, ke1: bytes, ke2: bytes) -> None:
    """Finish the exchange with a KE3 that cannot verify (the server records the failure).
    The identity signature over this attempt's KE1/KE2 tells the server which attempt gives
    up (another login of the same name on this connection stays pending)."""
    ident = client.identity_key or b""
    sig = client.identity.sign(login_message(ke1, ke2, ident)) if client.identity else b""
    try:
        await client.call(
            103,
            pb.OpaqueLoginFinishRequest(
                username=name, finalization=bytes(64), identity_key=ident, signature=sig
            ),
            pb.OpaqueLoginFinishResponse,
        )
    except Exception:
        pass


async def logout(client: QpcClient) -> None:
    await client.call(107, common_pb2.LogoutRequest(), common_pb2.LogoutResponse)
