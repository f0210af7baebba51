"""Built-in plugin ``core``: the QUIC listener, Health, and the identity-proof methods.

Methods: 104 AuthChallenge, 105 ProveIdentity, 106 WhoAmI, 802 Health.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from qpc_core.errors import BadRequest, Forbidden, Unauthenticated
from qpc_core.hookspecs import hookimpl
from qpc_core.identity import (
    check_identity_key,
    prove_identity_message,
    public_bytes,
    verify_signature,
)
from qpc_core.pb import common_pb2 as pb
from qpc_core.rpc import RpcContext, RpcMethod, Transport
from qpc_core.transport.quic import QuicTransport
from qpc_core.users import server_key

if TYPE_CHECKING:
    from qpc_core.app import App

HEALTH = 802
AUTH_CHALLENGE = 104
PROVE_IDENTITY = 105
WHOAMI = 106


async def health(ctx: RpcContext, req: pb.HealthRequest) -> pb.HealthResponse:
    app = ctx.app
    return pb.HealthResponse(
        status="draining" if app.draining else "ok",
        version=app.version,
        uptime_secs=int(time.time() - app.started_at),
        signing_key=public_bytes(await server_key(app, "delivery")),
    )


async def auth_challenge(ctx: RpcContext, req: pb.AuthChallengeRequest) -> pb.AuthChallengeResponse:
    nonce = os.urandom(32)
    ctx.conn.challenge = nonce  # type: ignore[attr-defined]
    return pb.AuthChallengeResponse(nonce=nonce)


async def prove_identity(ctx: RpcContext, req: pb.ProveIdentityRequest) -> pb.ProveIdentityResponse:
    if ctx.auth is None:
        raise Unauthenticated("authenticate the connection before proving an identity")
    key = check_identity_key(req.identity_key)
    nonce: bytes | None = getattr(ctx.conn, "challenge", None)
    if not nonce:
        raise BadRequest("call AuthChallenge (104) first: no challenge is pending")
    ctx.conn.challenge = None  # type: ignore[attr-defined]  # single use
    # The request's credential (an Auth field) and the connection's own must both allow it:
    # a connection bound to session X cannot re-route itself to Y with another credential.
    for auth in (ctx.auth, ctx.conn.auth):
        if auth is not None and auth.identity_key is not None and auth.identity_key != key:
            raise Forbidden("this session belongs to another identity")
    # Bound to this server's certificate: a proof another server relayed does not verify.
    binding: bytes = getattr(ctx.conn, "tls_binding", b"")
    if not verify_signature(key, req.signature, prove_identity_message(nonce, key, binding)):
        raise Unauthenticated(
            "identity proof signature does not verify (signed for this challenge, this key "
            "and this server's certificate, or on the WebSocket bridge its host?)")
    if ctx.conn.auth is None:
        ctx.conn.bind(ctx.auth)
    ctx.conn.bind_identity(key)
    return pb.ProveIdentityResponse(identity_key=key)


async def whoami(ctx: RpcContext, req: pb.WhoAmIRequest) -> pb.WhoAmIResponse:
    auth = ctx.auth
    return pb.WhoAmIResponse(
        authenticated=auth is not None,
        auth_kind=auth.kind if auth else "",
        identity_key=ctx.identity_key or b"",
        username=(auth.username or "") if auth else "",
    )


@hookimpl
def register_rpc_methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod(HEALTH, "Health", pb.HealthRequest, health, group="health", auth="none"),
        RpcMethod(
            AUTH_CHALLENGE,
            "AuthChallenge",
            pb.AuthChallengeRequest,
            auth_challenge,
            group="auth",
            auth="none",
        ),
        RpcMethod(
            PROVE_IDENTITY,
            "ProveIdentity",
            pb.ProveIdentityRequest,
            prove_identity,
            group="auth",
            auth="authenticated",
        ),
        RpcMethod(WHOAMI, "WhoAmI", pb.WhoAmIRequest, whoami, group="health", auth="none"),
    ]


@hookimpl
def register_transports(app: App) -> list[Transport]:
    return [QuicTransport()]
