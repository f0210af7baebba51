"""Plugin discovery (entry-point group ``qpc``), selection, ordering and validation.

Order: core's built-in plugins first (so selected plugins can override them), then the
selected plugins in the order given by ``--plugins`` / ``plugins = [...]``.  A token
``no:NAME`` blocks a plugin (built-in or selected), pytest style.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from qpc_core import hookspecs
from qpc_core.errors import PluginError

ENTRY_POINT_GROUP = "qpc"

BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("core", "qpc_core.builtin.core"),
    ("token_auth", "qpc_core.builtin.token_auth"),
    ("sqlcipher", "qpc_core.builtin.sqlcipher"),
    ("delivery", "qpc_core.builtin.delivery"),
    ("keys", "qpc_core.builtin.keys"),
    ("directory", "qpc_core.builtin.directory"),
    ("admin", "qpc_core.builtin.admin"),
    ("audit", "qpc_core.audit"),
)


@dataclass(slots=True)
class PluginInfo:
    name: str
    module: Any
    builtin: bool
    distribution: str
    version: str
    order: int
    hooks: list[str] = field(default_factory=list)

    def label(self) -> str:
        return f"'{self.name}' ({self.distribution} {self.version})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "order": self.order,
            "hooks": self.hooks,
        }


def _core_version() -> str:
    from qpc_core import __version__

    return __version__


def available_entry_points() -> dict[str, metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in eps}


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return ("unknown", "?")
    return (dist.metadata["Name"] or "unknown", dist.version or "?")


def parse_selection(selected: list[str]) -> tuple[list[str], set[str]]:
    """Split ``["a", "no:b", "a"]`` into ordered unique names and blocked names."""
    names: list[str] = []
    blocked: set[str] = set()
    for token in selected:
        token = token.strip()
        if not token:
            continue
        if token.startswith("no:"):
            blocked.add(token[3:])
        elif token not in names:
            names.append(token)
    return names, blocked


def create_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(pm: pluggy.PluginManager, selected: list[str]) -> list[PluginInfo]:
    """Register built-ins then the selected entry points; validate; return them in order."""
    names, blocked = parse_selection(selected)
    infos: list[PluginInfo] = []
    order = 0
    builtin_names = {n for n, _ in BUILTIN_PLUGINS}
    for name, modname in BUILTIN_PLUGINS:
        if name in blocked:
            continue
        module = importlib.import_module(modname)
        infos.append(PluginInfo(name, module, True, "qpc-core", _core_version(), order))
        order += 1

    eps: dict[str, metadata.EntryPoint] | None = None
    for name in names:
        if name in blocked:
            continue
        if name in builtin_names:
            continue  # built-ins are always loaded; naming one is harmless
        if eps is None:
            eps = available_entry_points()
        ep = eps.get(name)
        if ep is None:
            known = ", ".join(sorted(eps)) or "none"
            raise PluginError(
                f"plugin '{name}' is not installed: no entry point '{name}' in group "
                f"'{ENTRY_POINT_GROUP}' (installed: {known})"
            )
        dist, version = _dist_of(ep)
        try:
            module = ep.load()
        except Exception as e:
            raise PluginError(
                f"plugin '{name}' ({dist} {version}) failed to import: {e}"
            ) from e
        infos.append(PluginInfo(name, module, False, dist, version, order))
        order += 1

    for info in infos:
        try:
            pm.register(info.module, name=info.name)
        except ValueError as e:
            raise PluginError(f"plugin {info.label()} could not be registered: {e}") from e
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {info.label()} is invalid: {e}") from e
    _validate(pm, infos)
    return infos


def _validate(pm: pluggy.PluginManager, infos: list[PluginInfo]) -> None:
    by_name = {i.name: i for i in infos}
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        plugin_name = pm.get_name(e.plugin) or "?"
        info = by_name.get(plugin_name)
        label = info.label() if info else f"'{plugin_name}'"
        raise PluginError(f"plugin {label} is invalid: {e}") from e
    for hook_name in dir(pm.hook):
        if hook_name.startswith("_"):
            continue
        caller = getattr(pm.hook, hook_name)
        want_async = hook_name in hookspecs.ASYNC_HOOKS
        for impl in caller.get_hookimpls():
            info = by_name[impl.plugin_name]
            if hook_name not in info.hooks:
                info.hooks.append(hook_name)
            fn = impl.function
            is_async = inspect.iscoroutinefunction(fn)
            if want_async and not is_async:
                raise PluginError(
                    f"plugin {info.label()}: hook '{hook_name}' must be 'async def' "
                    "(it is awaited)"
                )
            if not want_async and is_async:
                raise PluginError(
                    f"plugin {info.label()}: hook '{hook_name}' must be a plain 'def' "
                    "(it is not awaited)"
                )
    for info in infos:
        info.hooks.sort()


def module_of(obj: Any) -> ModuleType | None:
    return inspect.getmodule(obj)


def describe_installed() -> list[dict[str, Any]]:
    """Built-ins plus every installed entry point, for ``qpc plugins``.

    A plugin that fails to load is listed with its ``error`` instead of hiding the others."""
    eps = available_entry_points()
    good: list[str] = []
    broken: list[dict[str, Any]] = []
    for name, ep in sorted(eps.items()):
        try:
            load_plugins(create_plugin_manager(), [name])
            good.append(name)
        except PluginError as e:
            dist, version = _dist_of(ep)
            broken.append({"name": name, "distribution": dist, "version": version,
                           "builtin": False, "order": None, "hooks": [], "error": str(e)})
    infos = load_plugins(create_plugin_manager(), good)
    return [i.as_dict() for i in infos] + broken
