"""qpc plugin ``kt_log``: the key-transparency log (methods 510, 511, 520, 521, 522).

Hook implementations only.  The Merkle tree is in :mod:`qpc_kt_log.merkle` (sans-I/O), its
persistence in :mod:`qpc_kt_log.store`, the server logic and RPC handlers in
:mod:`qpc_kt_log.service`, the verifying client in :mod:`qpc_kt_log.client`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qpc_core.admin.state import metrics_registry
from qpc_core.hookspecs import hookimpl
from qpc_core.pb import directory_pb2 as pb
from qpc_core.rpc import ConfigSection, RpcMethod
from qpc_core.users import server_key
from qpc_kt_log import service as s
from qpc_kt_log.config import KtLogConfig
from qpc_kt_log.metrics import KtCollector
from qpc_kt_log.service import KtLogService

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.kt_log")

NAME = "kt_log"
REVOKE_KEY, CHECK_REVOCATION, AUDIT, GET_STH, GET_CONSISTENCY = 510, 511, 520, 521, 522


@hookimpl
def register_config_sections(app: App) -> list[ConfigSection]:
    return [ConfigSection(NAME, KtLogConfig)]


@hookimpl
async def startup(app: App) -> None:
    config = app.plugin_config(NAME)
    if config.sole_writer:
        log.warning("kt_log: [kt_log] sole_writer is no longer needed and has no effect: "
                    "every server sharing the store may run kt_log; remove the key")
    svc = KtLogService(app, config, await server_key(app, NAME))
    await svc.start()
    app.state[NAME] = svc
    metrics_registry(app).register(KtCollector(svc))


@hookimpl
def register_rpc_methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod(REVOKE_KEY, "RevokeKey", pb.RevokeKeyRequest, s.revoke_key, group="users"),
        RpcMethod(CHECK_REVOCATION, "CheckRevocation", pb.CheckRevocationRequest,
                  s.check_revocation, group="users", auth="authenticated"),
        RpcMethod(AUDIT, "AuditKeyTransparency", pb.AuditKeyTransparencyRequest, s.audit_log,
                  group="users", auth="authenticated"),
        RpcMethod(GET_STH, "GetSignedTreeHead", pb.GetSignedTreeHeadRequest, s.get_sth,
                  group="users", auth="authenticated"),
        RpcMethod(GET_CONSISTENCY, "GetConsistencyProof", pb.GetConsistencyProofRequest,
                  s.get_consistency_proof, group="users", auth="authenticated"),
    ]


@hookimpl
async def on_user_registered(app: App, username: str, identity_key: bytes) -> None:
    # Only if the directory still has this binding: a hook that runs late (after the account
    # was deleted and the name re-registered) must not log the old key as the newest.
    await s.service(app).log_directory_binding(username, identity_key)


@hookimpl
async def prove_binding(app: App, username: str, identity_key: bytes) -> Any | None:
    return await s.service(app).prove_binding(username, identity_key)
