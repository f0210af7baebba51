"""App: configuration + plugin manager + lifecycle.  One plugin manager per App."""

from __future__ import annotations

import asyncio
import difflib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from qpc_core import __version__
from qpc_core.config import (
    CORE_RELOADABLE,
    ConfigReload,
    Settings,
    apply_log_level,
    changed_settings,
    default_rate_limits,
    is_reloadable,
    merge_settings,
    validation_error_to_config_error,
)
from qpc_core.errors import ConfigError, PluginError, StorageError
from qpc_core.hooks import Hooks
from qpc_core.plugins import PluginInfo, create_plugin_manager, load_plugins
from qpc_core.ratelimit import RateLimiter
from qpc_core.rpc import Connection, RpcMethod, Transport
from qpc_core.storage.base import Storage

log = logging.getLogger("qpc.app")

SHUTDOWN_REASON = "server shutting down"


#: Rate-limit groups that only the core charges (through ``RpcContext.charge(group=...)``),
#: never a method's own group.
RESERVED_RATE_GROUPS = frozenset({"enqueue"})


class App:
    """A qpc server instance.

    ``App(settings)`` loads and validates plugins; ``await app.start()`` opens storage, runs
    ``startup`` hooks and starts the listeners; ``await app.stop()`` drains and shuts down.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = __version__
        self.pm = create_plugin_manager()
        self.plugins: list[PluginInfo] = load_plugins(self.pm, settings.plugins)
        self.hooks = Hooks(self.pm, self.plugins)
        self.methods: dict[int, tuple[str, RpcMethod]] = {}
        self.transports: list[tuple[str, Transport]] = []
        self._plugin_config: dict[str, Any] = {}
        self._storage: Storage | None = None
        self.rate_limiter = RateLimiter(settings.rate_limits,
                                        ip_factor=settings.rate_limit_ip_factor)
        self.started_at = time.time()
        self.draining = False
        self.started = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop_requested: asyncio.Event | None = None
        self._reload_lock = asyncio.Lock()
        #: Process exit status for ``qpc run``: 1 when the server stopped because of a failure.
        self.exit_code = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connections: set[Connection] = set()
        self.by_identity: dict[bytes, set[Connection]] = {}
        self.state: dict[str, Any] = {}  # plugins keep their per-App state here, by name
        self._drain_callbacks: list[Callable[[], None]] = []
        #: ``() -> Settings``: reads the configuration again (file, environment, the command
        #: line's flags) for :meth:`reload_config`; ``qpc run`` sets it.  None: SIGHUP
        #: reloads certificates only.
        self.config_source: Callable[[], Settings] | None = None
        #: What the last configuration reload did (None: none ran yet).
        self.last_config_reload: ConfigReload | None = None
        self._config_sections = self.hooks.register_config_sections(self)
        self.validate_config()
        self._collect_methods()
        self.reloadable_settings: frozenset[str] = CORE_RELOADABLE | self._declared_reloadable()

    # -- configuration ----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def validate_config(self) -> None:
        """Validate production rules and every plugin's config table; raise ConfigError."""
        self._plugin_config = self._validated(self.settings)

    def _validated(self, s: Settings) -> dict[str, Any]:
        """Check ``s`` as start-up does (production rules, the federation plugin, every
        plugin's table); return the validated plugin tables.  Raises ConfigError."""
        if s.production:
            problems = s.production_problems()
            if problems:
                raise ConfigError(
                    "refusing to start in production mode:\n  " + "\n  ".join(problems)
                )
        if s.federation.enabled and all(p.name != "federation" for p in self.plugins):
            raise ConfigError(
                "config: federation.enabled = true, but the 'federation' plugin is not loaded: "
                "add it to --plugins (it is the distribution qpc-federation)"
            )
        tables = s.plugin_tables
        validated: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for plugin, section in self._config_sections:
            if section.name in owners:
                raise PluginError(f"config table [{section.name}] is claimed by both plugin "
                                  f"'{owners[section.name]}' and plugin '{plugin}'")
            owners[section.name] = plugin
            raw = tables.get(section.name, {})
            if not isinstance(raw, dict):
                raise ConfigError(f"config: {section.name}: expected a table")
            try:
                model = section.model
                if isinstance(model, type) and issubclass(model, BaseModel):
                    validated[section.name] = model.model_validate(raw)
                else:
                    validated[section.name] = model(**raw)
            except ValidationError as e:
                raise validation_error_to_config_error(e, prefix=section.name) from None
        for name in tables:
            if name not in owners:
                log.warning("config: table [%s] is not used by any loaded plugin", name)
        return validated

    def _declared_reloadable(self) -> frozenset[str]:
        """The keys plugins apply on a reload (``register_reloadable_settings``): each a
        dotted key of the plugin's own table.  Core's settings are core's to declare; core's
        ``[federation]`` table belongs to the plugin of that name."""
        owners = {section.name: plugin for plugin, section in self._config_sections}
        out: set[str] = set()
        for plugin, key in self.hooks.register_reloadable_settings(self):
            where = f"plugin '{plugin}': register_reloadable_settings: "
            if not isinstance(key, str) or "" in key.split("."):
                raise PluginError(where + f"expected dotted config keys, got {key!r}")
            head = key.split(".")[0]
            field = Settings.model_fields.get(head)
            if field is not None:
                table = (isinstance(field.annotation, type)
                         and issubclass(field.annotation, BaseModel))
                if not table or "." not in key:
                    raise PluginError(where + f"'{key}' is a core setting; core decides "
                                      "whether it applies while running")
                owner = head  # core validates [federation] for the plugin of that name
            else:
                owner = owners.get(head, plugin)
            if owner != plugin:
                raise PluginError(where + f"'{key}' belongs to the '{owner}' plugin, which "
                                  "alone applies it")
            out.add(key)
        return frozenset(out)

    @property
    def config_restart_pending(self) -> tuple[str, ...]:
        """Changed settings that wait for a restart (see :meth:`reload_config`)."""
        last = self.last_config_reload
        return last.restart_pending if last is not None else ()

    def plugin_config(self, name: str) -> Any:
        """The validated config model of the table ``name`` (see register_config_sections)."""
        return self._plugin_config[name]

    def _collect_methods(self) -> None:
        for plugin, method in self.hooks.register_rpc_methods(self):
            existing = self.methods.get(method.method_id)
            if existing is not None:
                raise PluginError(
                    f"method {method.method_id} is claimed by both plugin '{existing[0]}' "
                    f"({existing[1].name}) and plugin '{plugin}' ({method.name})"
                )
            if method.group in RESERVED_RATE_GROUPS:
                raise PluginError(
                    f"method {method.method_id} ({method.name}) of plugin '{plugin}' uses the "
                    f"rate-limit group '{method.group}', which is reserved (it counts "
                    "messages sent with Enqueue/BatchEnqueue); choose another group"
                )
            self.methods[method.method_id] = (plugin, method)
        self._check_rate_groups(self.settings)

    def _check_rate_groups(self, settings: Settings) -> None:
        """A ``[rate_limits.<group>]`` the operator added must name a group some loaded
        method uses (or ``default`` / ``enqueue``): a misspelt group applied no limit at
        all, silently.  (The built-in defaults may name groups of plugins not loaded.)"""
        used = {m.group for _plugin, m in self.methods.values()}
        used |= {"default", *RESERVED_RATE_GROUPS}
        added = set(settings.rate_limits) - set(default_rate_limits())
        known = ", ".join(sorted(used))
        for g in sorted(added - used):
            near = difflib.get_close_matches(g, sorted(used), 1)
            if near:  # a misspelt group: refused
                raise ConfigError(
                    f"config: rate_limits: no loaded method uses the group '{g}' (did you mean "
                    f"'{near[0]}'?); groups in use: {known}"
                )
            # Perhaps a group of a plugin this server does not load (a config shared by
            # servers with different plugins): said, not refused.
            log.warning("config: rate_limits.%s: no loaded method uses this group (groups in "
                        "use: %s)", g, known)

    # -- storage ---------------------------------------------------------------------------------
    @property
    def storage(self) -> Storage:
        if self._storage is None:
            raise StorageError("storage is not open")
        return self._storage

    @property
    def has_storage(self) -> bool:
        return self._storage is not None

    # -- tasks -----------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a tracked background task; it is cancelled and awaited at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def add_drain_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when draining starts (e.g. to end long polls early)."""
        self._drain_callbacks.append(callback)

    # -- in-flight accounting (gauge server_in_flight_rpcs) ----------------------------------------
    def rpc_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def rpc_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    # -- connections and push ----------------------------------------------------------------------
    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.hooks.on_connection_opened(self, conn)

    def connection_closed(self, conn: Connection, reason: str) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        ident = conn.identity_key
        if ident is not None:
            self.unbind_identity(conn, ident)
        self.hooks.on_connection_closed(self, conn, reason)

    def bind_identity(self, conn: Connection, identity_key: bytes) -> None:
        self.by_identity.setdefault(identity_key, set()).add(conn)

    def unbind_identity(self, conn: Connection, identity_key: bytes) -> None:
        conns = self.by_identity.get(identity_key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_identity[identity_key]

    def push(self, identity_key: bytes, event_type: int, payload: bytes) -> int:
        """Push an event to every open connection of ``identity_key``; return how many."""
        conns = self.by_identity.get(identity_key)
        if not conns:
            return 0
        n = 0
        for conn in list(conns):
            try:
                conn.push(event_type, payload)
                n += 1
            except Exception:
                log.debug("push to connection %s failed", conn.connection_id, exc_info=True)
        return n

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        storage = await self.hooks.open_storage(self)
        if storage is None:
            raise PluginError(
                f"no plugin opened storage '{self.settings.storage}' (is its plugin selected?)"
            )
        self._storage = storage
        storage.add_failure_callback(self._storage_failed)
        try:
            await self.hooks.startup(self)
            self.transports = self.hooks.register_transports(self)
            for plugin, transport in self.transports:
                try:
                    await transport.start(self)
                except OSError as e:
                    raise PluginError(
                        f"plugin '{plugin}': listener '{transport.name}' could not start: {e}"
                    ) from e
        except BaseException:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for _plugin, transport in self.transports:
                try:
                    await transport.close("start-up failed")
                except Exception:
                    log.exception("listener '%s' failed to close", transport.name)
            await self._close_storage()
            raise
        self.started = True
        for _plugin, transport in self.transports:
            cert = getattr(transport, "tls_certificate", None)
            if cert is not None:
                self.hooks.on_tls_certificate(self, transport.name, cert)
        loop = asyncio.get_running_loop()
        log.info("qpc %s started with plugins: %s (event loop: %s)", self.version,
                 ", ".join(p.name for p in self.plugins), type(loop).__module__)

    def _storage_failed(self, error: BaseException) -> None:
        if self.exit_code:
            return
        self.exit_code = 1
        log.critical("storage failed for good (%s): stopping the server so that its supervisor "
                     "restarts it; no call was acknowledged without its data committed", error)
        self.request_stop()

    async def reload_tls(self) -> dict[str, str | None]:
        """Read every listener's certificate and key files again (SIGHUP): new connections
        get the new pair, established ones keep theirs.  A listener whose files are bad
        keeps its old pair and logs why.  Returns listener name -> error (None: reloaded);
        listeners without anything to reload are left out.  Reloads run one after the other
        (a second SIGHUP during one reads the files again after it)."""
        async with self._reload_lock:
            return await self._reload_tls()

    async def _reload_tls(self) -> dict[str, str | None]:
        results: dict[str, str | None] = {}
        for _plugin, transport in self.transports:
            reload = getattr(transport, "reload_tls", None)
            if reload is None or self.draining:
                continue
            try:
                cert = await reload()
            except ConfigError as e:
                results[transport.name] = str(e)
                log.error("listener '%s': certificate not reloaded, still serving the old "
                          "one: %s", transport.name, e)
            except Exception as e:
                results[transport.name] = f"{type(e).__name__}: {e}"
                log.exception("listener '%s': certificate reload failed, still serving the "
                              "old one", transport.name)
            else:
                if cert is None:
                    continue
                results[transport.name] = None
                log.info("listener '%s': certificate reloaded (subject %s, expires %s); "
                         "new connections get it", transport.name,
                         cert.subject.rfc4514_string(), f"{cert.not_valid_after_utc:%Y-%m-%d}")
                self.hooks.on_tls_certificate(self, transport.name, cert)
            self.hooks.on_tls_reload(self, transport.name, results[transport.name])
        return results

    async def reload_config(self) -> ConfigReload:
        """Read the configuration again (:attr:`config_source`) and apply what can change
        while running: the settings in :attr:`reloadable_settings` take their new values,
        every other changed setting keeps the value it started with and is named in the
        result (and the log) as waiting for a restart.  A configuration that start-up would
        refuse changes nothing.  Then ``on_config_reload`` (plugins apply their part)."""
        async with self._reload_lock:
            return await self._reload_config()

    async def _reload_config(self) -> ConfigReload:
        old = self.settings
        if self.config_source is None or self.draining:
            return ConfigReload(old)
        try:
            read = await asyncio.to_thread(self.config_source)
            self._validated(read)  # the whole file as start-up would take it
            self._check_rate_groups(read)
            changed = changed_settings(old, read)
            live = [k for k in changed if is_reloadable(k, self.reloadable_settings)]
            restart = [k for k in changed if k not in live]
            new = merge_settings(old, read, live) if live else old
            plugin_config = self._validated(new)
            if live:
                self.hooks.check_reload(self, new)
        except (ConfigError, PluginError) as e:
            result = ConfigReload(old, error=str(e),
                                  restart_pending=self.config_restart_pending)
            log.error("configuration not reloaded, the running one stays: %s", e)
        except Exception as e:  # a bug, or something the readers did not foresee: refused
            result = ConfigReload(old, error=f"{type(e).__name__}: {e}",
                                  restart_pending=self.config_restart_pending)
            log.exception("configuration not reloaded, the running one stays")
        else:
            self.settings = new
            self._plugin_config = plugin_config
            if "rate_limits" in live or "rate_limit_ip_factor" in live:
                self.rate_limiter.configure(new.rate_limits, ip_factor=new.rate_limit_ip_factor)
            if "log_level" in live:
                apply_log_level(new.log_level)
            result = ConfigReload(old, applied=tuple(live), restart_pending=tuple(restart))
            if live:
                log.info("configuration reloaded: applied %s", ", ".join(live))
            else:
                log.info("configuration reloaded: no setting that applies while running "
                         "changed")
            if restart:
                log.warning("configuration: changed but applied only by a restart (the "
                            "running values stay until then): %s", ", ".join(restart))
        self.last_config_reload = result
        await self.hooks.on_config_reload(self, result)
        return result

    async def reload(self) -> tuple[ConfigReload, dict[str, str | None]]:
        """SIGHUP: :meth:`reload_config`, then :meth:`reload_tls` (certificate paths may
        have changed).  One reload at a time."""
        async with self._reload_lock:
            try:
                config = await self._reload_config()
            finally:  # a renewed certificate is taken whatever became of the configuration
                tls = await self._reload_tls()
        return config, tls

    def _reload_signal(self) -> None:
        log.info("SIGHUP: reloading the configuration and TLS certificates")
        self.spawn(self.reload(), "reload")

    def request_stop(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve_forever(self) -> None:
        """Start, run until SIGTERM/SIGINT (or :meth:`request_stop`), then stop gracefully."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
                pass
        try:
            # Before start-up: a SIGHUP's default action would end the process (a reload
            # during start-up reloads the listeners already started; the others read the
            # files when they start).
            loop.add_signal_handler(signal.SIGHUP, self._reload_signal)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass
        await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            log.info("shutting down: draining in-flight requests")
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):  # pragma: no cover
                    pass

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, drain, close connections, shutdown hooks."""
        if self.draining:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        drain_until = loop.time() + self.settings.drain_timeout_secs
        for cb in self._drain_callbacks:
            try:
                cb()
            except Exception:
                log.exception("drain callback failed")
        for _plugin, transport in self.transports:
            try:
                await transport.stop_accepting()
            except Exception:
                log.exception("listener '%s' failed to stop accepting", transport.name)
        if self.in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_secs)
            except TimeoutError:
                log.warning("drain timeout: %d requests still in flight", self.in_flight)
        # Answers written by now must reach their clients before the connections close (a
        # Fetch answer's messages are already gone from the queue): wait until they are
        # acknowledged, within the same drain timeout.
        for _plugin, transport in self.transports:
            flush = getattr(transport, "flush", None)
            if flush is None:
                continue
            try:
                await flush(max(0.0, drain_until - loop.time()))
            except Exception:
                log.exception("listener '%s' failed to flush", transport.name)
        for _plugin, transport in reversed(self.transports):
            try:
                await transport.close(SHUTDOWN_REASON)
            except Exception:
                log.exception("listener '%s' failed to close", transport.name)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.hooks.shutdown(self)
        await self._close_storage()
        self.started = False
        log.info("qpc stopped")

    async def _close_storage(self) -> None:
        if self._storage is not None:
            try:
                await self._storage.close()
            finally:
                self._storage = None

    def method_table(self) -> list[dict[str, Any]]:
        return [
            {"id": mid, "name": m.name, "plugin": p, "group": m.group, "auth": m.auth}
            for mid, (p, m) in sorted(self.methods.items())
        ]
