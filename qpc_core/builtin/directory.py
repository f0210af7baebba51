"""Built-in plugin ``directory``: users (500-501), channels (400) and DeleteAccount (950).

* ResolveUser / ResolveIdentity answer from the username directory that auth plugins fill
  (:func:`qpc_core.users.register_user`); the ``inclusion`` field is filled by whichever
  plugin answers the ``prove_binding`` hook (the KT log).
* CreateChannel: the channel id is derived from the sorted member set (SHA-256, first 16
  bytes), so creating the same channel twice returns the same id with ``was_new = false``.
  Enqueue to a created channel requires sender and recipient to be members.
* DeleteAccount purges the caller's data in one transaction, closes its sessions, then fires
  ``on_account_deleted``.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from qpc_core.errors import BadRequest, NotFound, TooLarge
from qpc_core.framing import PushEvent
from qpc_core.hookspecs import hookimpl
from qpc_core.identity import check_identity_key
from qpc_core.pb import common_pb2
from qpc_core.pb import directory_pb2 as pb
from qpc_core.rpc import RpcContext, RpcMethod
from qpc_core.users import normalize_username, split_qualified
from qpc_core.users import resolve_identity as _resolve_identity

if TYPE_CHECKING:
    from qpc_core.app import App

MAX_CHANNEL_MEMBERS = 1000


def channel_id_for(members: list[bytes]) -> bytes:
    h = hashlib.sha256(b"qpc-v1 channel\x00")
    for m in sorted(set(members)):
        h.update(m)
    return h.digest()[:16]


async def resolve_user(ctx: RpcContext, req: pb.ResolveUserRequest) -> pb.ResolveUserResponse:
    app = ctx.app
    username = req.username
    qualified = (split_qualified(username)
                 if app.hooks.implementers("resolve_remote_user") else None)
    if qualified is not None:  # "name@domain": a user of that server (federation)
        local, domain = qualified
        fed = app.settings.federation
        if fed.enabled and domain == fed.domain:
            username = local
        else:
            remote = await app.hooks.resolve_remote_user(app, local, domain)
            if remote is not None:
                return remote  # type: ignore[no-any-return]
    name = normalize_username(username)
    user = await ctx.app.storage.get_user_by_name(name)
    if user is None:
        raise NotFound(f"no user named '{name}'")
    resp = pb.ResolveUserResponse(identity_key=user.identity_key, username=user.username)
    proof = await ctx.app.hooks.prove_binding(ctx.app, user.username, user.identity_key)
    if proof is not None:
        resp.inclusion.CopyFrom(proof)
    return resp


async def resolve_identity(
    ctx: RpcContext, req: pb.ResolveIdentityRequest
) -> pb.ResolveIdentityResponse:
    ident = check_identity_key(req.identity_key)
    user = await _resolve_identity(ctx.app, ident)
    if user is None:
        raise NotFound("no user has this identity key")
    resp = pb.ResolveIdentityResponse(username=user.username)
    proof = await ctx.app.hooks.prove_binding(ctx.app, user.username, user.identity_key)
    if proof is not None:
        resp.inclusion.CopyFrom(proof)
    return resp


async def create_channel(
    ctx: RpcContext, req: pb.CreateChannelRequest
) -> pb.CreateChannelResponse:
    me = ctx.require_identity()
    members = [check_identity_key(k, "member_keys[]") for k in req.member_keys]
    if not set(members) - {me}:
        raise BadRequest("member_keys must name at least one other member")
    all_members = sorted(set(members) | {me})
    if len(members) > MAX_CHANNEL_MEMBERS or len(all_members) > MAX_CHANNEL_MEMBERS:
        raise TooLarge(f"at most {MAX_CHANNEL_MEMBERS} members, the caller included")
    cid = channel_id_for(all_members)
    was_new = await ctx.app.storage.create_channel(cid, all_members, me, now=time.time())
    delivery = ctx.app.state.get("delivery")
    if delivery is not None:
        delivery.forget_channels(cid)
    return pb.CreateChannelResponse(channel_id=cid, was_new=was_new)


async def delete_account(
    ctx: RpcContext, req: pb.DeleteAccountRequest
) -> pb.DeleteAccountResponse:
    me = ctx.require_identity()
    app = ctx.app
    username = await app.storage.delete_account(me)
    await app.hooks.on_account_deleted(app, me, username)
    payload = common_pb2.SessionRevokedEvent(reason="account deleted").SerializeToString()
    for conn in list(app.by_identity.get(me, ())):
        if conn is not ctx.conn:
            conn.push(PushEvent.SESSION_REVOKED, payload)
            conn.disconnect("account deleted")
    # Every connection (the caller's too) drops what the account gave it: its sessions,
    # bound or used in requests' Auth fields, and the proven identity; other credentials
    # (the operator token, another account's session) stay.
    for conn in list(app.connections):
        forget = getattr(conn, "forget_credential", None)
        if forget is not None:
            forget(identity_key=me)
        elif conn is ctx.conn:  # a transport written before forget_credential
            conn.unbind()
    return pb.DeleteAccountResponse()


@hookimpl
def register_rpc_methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod(400, "CreateChannel", pb.CreateChannelRequest, create_channel, group="users"),
        RpcMethod(500, "ResolveUser", pb.ResolveUserRequest, resolve_user, group="users"),
        RpcMethod(501, "ResolveIdentity", pb.ResolveIdentityRequest, resolve_identity,
                  group="users"),
        RpcMethod(950, "DeleteAccount", pb.DeleteAccountRequest, delete_account, group="auth"),
    ]
