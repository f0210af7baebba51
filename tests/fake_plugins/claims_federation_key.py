"""A plugin that declares a key of core's [federation] table, which only the federation
plugin applies (refused)."""

from qpc_core.hookspecs import hookimpl


@hookimpl
def register_reloadable_settings(app):
    return ["federation.listen"]
