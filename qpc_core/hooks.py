"""The typed async facade over the plugin manager: the only module that calls ``pm.hook``.

pluggy calls implementations synchronously, so for async hooks it would hand back coroutine
objects (and ``firstresult`` would stop at the first one, since a coroutine is never
``None``).  This facade instead walks the implementations itself in qpc's plugin order and
awaits them one at a time, and it isolates notification failures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from qpc_core.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from cryptography import x509

    from qpc_core.app import App
    from qpc_core.config import ConfigReload, Settings
    from qpc_core.plugins import PluginInfo
    from qpc_core.rpc import (
        AuthResult,
        ConfigSection,
        Connection,
        MessageEnqueued,
        MessagesFetched,
        PeerInfo,
        RpcMethod,
        Transport,
    )
    from qpc_core.storage.base import EnqueueOutcome, NewMessage, Storage

log = logging.getLogger("qpc.hooks")

Impl = tuple[str, Callable[..., Any]]


def _accepting(fn: Callable[..., Any], argnames: tuple[str, ...]) -> Callable[..., Any]:
    """Like pluggy: an implementation may accept only a subset of the spec's arguments."""

    def call(**kw: Any) -> Any:
        return fn(**{k: kw[k] for k in argnames})

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


class Hooks:
    """One per App.  Implementation lists are computed once, after plugins load."""

    def __init__(self, pm: pluggy.PluginManager, plugins: list[PluginInfo]) -> None:
        self._pm = pm
        self._order = {p.name: p.order for p in plugins}
        self._builtin = {p.name for p in plugins if p.builtin}
        self._cache: dict[str, list[Impl]] = {}
        self._resolver_cache: dict[str, list[Impl]] = {}

    # -- ordering -----------------------------------------------------------------------------
    def _impls(self, name: str) -> list[Impl]:
        """Implementations in plugin order (built-ins first, then selected as listed)."""
        cached = self._cache.get(name)
        if cached is None:
            caller = getattr(self._pm.hook, name)
            impls = []
            for i in caller.get_hookimpls():
                spec_args = caller.spec.argnames if caller.spec else ()
                fn = i.function
                if tuple(i.argnames) != tuple(spec_args):
                    fn = _accepting(fn, tuple(i.argnames))
                impls.append((i.plugin_name, fn))
            impls.sort(key=lambda t: self._order.get(t[0], 1 << 30))
            cached = self._cache[name] = impls
        return cached

    def _resolver_impls(self, name: str) -> list[Impl]:
        """Resolver order: selected plugins as listed, then the built-ins."""
        cached = self._resolver_cache.get(name)
        if cached is None:
            impls = list(self._impls(name))
            impls.sort(key=lambda t: (t[0] in self._builtin, self._order.get(t[0], 1 << 30)))
            cached = self._resolver_cache[name] = impls
        return cached

    def implementers(self, name: str) -> list[str]:
        return [p for p, _ in self._impls(name)]

    # -- generic callers ----------------------------------------------------------------------
    def _collect(self, name: str, **kw: Any) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for plugin, fn in self._impls(name):
            try:
                result = fn(**kw)
            except Exception as e:
                raise PluginError(f"plugin '{plugin}': hook '{name}' failed: {e}") from e
            if result is None:
                continue
            for item in result:
                out.append((plugin, item))
        return out

    async def _first(self, name: str, **kw: Any) -> Any:
        for _plugin, fn in self._resolver_impls(name):
            result = await fn(**kw)
            if result is not None:
                return result
        return None

    def _notify(self, name: str, **kw: Any) -> None:
        for plugin, fn in self._impls(name):
            try:
                fn(**kw)
            except Exception:
                log.exception("plugin '%s': notification hook '%s' failed", plugin, name)

    async def _anotify(self, name: str, **kw: Any) -> None:
        for plugin, fn in self._impls(name):
            try:
                await fn(**kw)
            except Exception:
                log.exception("plugin '%s': notification hook '%s' failed", plugin, name)

    # -- lifecycle ------------------------------------------------------------------------------
    async def startup(self, app: App) -> None:
        for plugin, fn in self._impls("startup"):
            try:
                await fn(app=app)
            except PluginError:
                raise
            except Exception as e:
                raise PluginError(f"plugin '{plugin}' failed to start: {e}") from e

    async def shutdown(self, app: App) -> None:
        for plugin, fn in reversed(self._impls("shutdown")):
            try:
                await fn(app=app)
            except Exception:
                log.exception("plugin '%s': shutdown failed", plugin)

    # -- registration ---------------------------------------------------------------------------
    def register_rpc_methods(self, app: App) -> list[tuple[str, RpcMethod]]:
        return self._collect("register_rpc_methods", app=app)

    def register_transports(self, app: App) -> list[tuple[str, Transport]]:
        return self._collect("register_transports", app=app)

    def register_admin_routes(self, app: App) -> list[tuple[str, Any]]:
        return self._collect("register_admin_routes", app=app)

    def register_config_sections(self, app: App) -> list[tuple[str, ConfigSection]]:
        return self._collect("register_config_sections", app=app)

    def register_reloadable_settings(self, app: App) -> list[tuple[str, str]]:
        return self._collect("register_reloadable_settings", app=app)

    def check_reload(self, app: App, new: Settings) -> None:
        for plugin, fn in self._impls("check_reload"):
            try:
                fn(app=app, new=new)
            except ConfigError:
                raise
            except Exception as e:
                raise PluginError(f"plugin '{plugin}': hook 'check_reload' failed: {e}") from e

    def check_config(self, app: App) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for plugin, fn in self._impls("check_config"):
            try:
                lines = fn(app=app) or []
            except ConfigError:
                raise
            except Exception as e:
                raise PluginError(f"plugin '{plugin}': hook 'check_config' failed: {e}") from e
            out += [(plugin, line) for line in lines]
        return out

    # -- resolvers -------------------------------------------------------------------------------
    async def open_storage(self, app: App) -> Storage | None:
        result: Storage | None = await self._first("open_storage", app=app)
        return result

    async def authenticate(self, app: App, token: bytes, peer: PeerInfo) -> AuthResult | None:
        result: AuthResult | None = await self._first(
            "authenticate", app=app, token=token, peer=peer
        )
        return result

    async def prove_binding(self, app: App, username: str, identity_key: bytes) -> Any | None:
        return await self._first("prove_binding", app=app, username=username,
                                 identity_key=identity_key)

    async def relay_enqueue(
        self, app: App, sender: bytes, messages: Sequence[NewMessage]
    ) -> list[EnqueueOutcome | None] | None:
        result: list[EnqueueOutcome | None] | None = await self._first(
            "relay_enqueue", app=app, sender=sender, messages=messages
        )
        if result is not None and len(result) != len(messages):
            raise PluginError(
                f"hook 'relay_enqueue' returned {len(result)} outcomes for {len(messages)} "
                "messages"
            )
        return result

    async def fetch_remote_key_package(self, app: App, identity_key: bytes) -> bytes | None:
        result: bytes | None = await self._first(
            "fetch_remote_key_package", app=app, identity_key=identity_key)
        return result

    async def fetch_remote_hybrid_keys(
        self, app: App, identity_keys: Sequence[bytes]
    ) -> dict[bytes, bytes] | None:
        result: dict[bytes, bytes] | None = await self._first(
            "fetch_remote_hybrid_keys", app=app, identity_keys=identity_keys)
        return result

    async def resolve_remote_user(self, app: App, username: str, domain: str) -> Any | None:
        return await self._first("resolve_remote_user", app=app, username=username,
                                 domain=domain)

    # -- notifications -----------------------------------------------------------------------------
    def on_connection_opened(self, app: App, conn: Connection) -> None:
        self._notify("on_connection_opened", app=app, conn=conn)

    def on_connection_closed(self, app: App, conn: Connection, reason: str) -> None:
        self._notify("on_connection_closed", app=app, conn=conn, reason=reason)

    def on_handshake_completed(self, app: App, conn: Connection, seconds: float) -> None:
        self._notify("on_handshake_completed", app=app, conn=conn, seconds=seconds)

    def on_rpc_completed(
        self, app: App, method_id: int, method: str, status: int, seconds: float
    ) -> None:
        self._notify("on_rpc_completed", app=app, method_id=method_id, method=method,
                     status=status, seconds=seconds)

    def on_message_enqueued(self, app: App, event: MessageEnqueued) -> None:
        self._notify("on_message_enqueued", app=app, event=event)

    def on_message_fetched(self, app: App, event: MessagesFetched) -> None:
        self._notify("on_message_fetched", app=app, event=event)

    def on_key_package_uploaded(self, app: App, identity_key: bytes, fingerprint: bytes) -> None:
        self._notify("on_key_package_uploaded", app=app, identity_key=identity_key,
                     fingerprint=fingerprint)

    def on_login_success(self, app: App, username: str, identity_key: bytes,
                         peer: PeerInfo) -> None:
        self._notify("on_login_success", app=app, username=username,
                     identity_key=identity_key, peer=peer)

    def on_login_failure(self, app: App, username: str, peer: PeerInfo, reason: str) -> None:
        self._notify("on_login_failure", app=app, username=username, peer=peer, reason=reason)

    def on_rate_limited(self, app: App, key_kind: str, group: str, method_id: int,
                        retry_after: float) -> None:
        self._notify("on_rate_limited", app=app, key_kind=key_kind, group=group,
                     method_id=method_id, retry_after=retry_after)

    def on_storage_operation(self, app: App, operation: str, seconds: float) -> None:
        self._notify("on_storage_operation", app=app, operation=operation, seconds=seconds)

    def on_tls_certificate(self, app: App, listener: str, certificate: x509.Certificate) -> None:
        self._notify("on_tls_certificate", app=app, listener=listener, certificate=certificate)

    def on_tls_reload(self, app: App, listener: str, error: str | None) -> None:
        self._notify("on_tls_reload", app=app, listener=listener, error=error)

    async def on_config_reload(self, app: App, reload: ConfigReload) -> None:
        await self._anotify("on_config_reload", app=app, reload=reload)

    async def on_user_registered(self, app: App, username: str, identity_key: bytes) -> None:
        await self._anotify("on_user_registered", app=app, username=username,
                            identity_key=identity_key)

    async def on_account_deleted(self, app: App, identity_key: bytes,
                                 username: str | None) -> None:
        await self._anotify("on_account_deleted", app=app, identity_key=identity_key,
                            username=username)

    def has(self, name: str) -> bool:
        return bool(self._impls(name))
