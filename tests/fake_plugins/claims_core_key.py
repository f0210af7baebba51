"""A plugin that tries to declare a core setting as applied while running (refused)."""

from qpc_core.hookspecs import hookimpl


@hookimpl
def register_reloadable_settings(app):
    return ["max_connections"]
