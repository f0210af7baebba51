"""qpc plugin ``auth_opaque``: RFC 9807 OPAQUE registration and login (methods 100-103, 107).

Hook implementations only; the protocol lives in :mod:`qpc_auth_opaque.opaque` (sans-I/O) and
the server logic in :mod:`qpc_auth_opaque.service`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qpc_auth_opaque.config import OpaqueConfig
from qpc_core.hookspecs import hookimpl
from qpc_core.pb import auth_pb2 as pb
from qpc_core.pb import common_pb2
from qpc_core.rpc import AuthResult, ConfigSection, PeerInfo, RpcContext, RpcMethod

if TYPE_CHECKING:
    from qpc_auth_opaque.service import OpaqueService
    from qpc_core.app import App
    from qpc_core.config import ConfigReload

NAME = "auth_opaque"
REGISTER_START, REGISTER_FINISH, LOGIN_START, LOGIN_FINISH, LOGOUT = 100, 101, 102, 103, 107


def _service(app: App) -> OpaqueService:
    svc: OpaqueService = app.state[NAME]
    return svc


@hookimpl
def register_config_sections(app: App) -> list[ConfigSection]:
    return [ConfigSection(NAME, OpaqueConfig)]


@hookimpl
async def startup(app: App) -> None:
    from qpc_auth_opaque.service import OpaqueService, load_or_create_setup

    setup = await load_or_create_setup(app)
    app.state[NAME] = OpaqueService(app, app.plugin_config(NAME), setup)


#: Keys of ``[auth_opaque]`` applied while running (SIGHUP): each is read where it is used.
#: The OPAQUE parameters (ksf, context, server_identity) are part of every stored record and
#: the failure throttles are built at start-up: those need a restart.
RELOADABLE = ("registration_open", "session_lifetime_secs", "pending_login_ttl_secs",
              "max_pending_logins", "max_pending_logins_per_ip")


@hookimpl
def register_reloadable_settings(app: App) -> list[str]:
    return [f"{NAME}.{key}" for key in RELOADABLE]


@hookimpl
async def on_config_reload(app: App, reload: ConfigReload) -> None:
    svc: OpaqueService | None = app.state.get(NAME)
    if svc is not None and reload.changed(NAME):
        svc.configure(app.plugin_config(NAME))


def _h(name: str) -> Any:
    async def handler(ctx: RpcContext, req: Any) -> Any:
        return await getattr(_service(ctx.app), name)(ctx, req)

    handler.__name__ = name
    return handler


@hookimpl
def register_rpc_methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod(
            REGISTER_START,
            "OpaqueRegisterStart",
            pb.OpaqueRegisterStartRequest,
            _h("register_start"),
            group="auth",
            auth="none",
        ),
        RpcMethod(
            REGISTER_FINISH,
            "OpaqueRegisterFinish",
            pb.OpaqueRegisterFinishRequest,
            _h("register_finish"),
            group="auth",
            auth="none",
        ),
        RpcMethod(
            LOGIN_START,
            "OpaqueLoginStart",
            pb.OpaqueLoginStartRequest,
            _h("login_start"),
            group="auth",
            auth="none",
        ),
        RpcMethod(
            LOGIN_FINISH,
            "OpaqueLoginFinish",
            pb.OpaqueLoginFinishRequest,
            _h("login_finish"),
            group="auth",
            auth="none",
        ),
        RpcMethod(
            LOGOUT,
            "Logout",
            common_pb2.LogoutRequest,
            _h("logout"),
            group="auth",
            auth="authenticated",
        ),
    ]


@hookimpl
async def authenticate(app: App, token: bytes, peer: PeerInfo) -> AuthResult | None:
    return await _service(app).authenticate(token)


@hookimpl
async def on_account_deleted(app: App, identity_key: bytes, username: str | None) -> None:
    await _service(app).forget(username)
