"""A plugin with a config table of which one key applies while running (``greeting``) and
one does not (``port``); it records every configuration reload it is told of."""

from pydantic import BaseModel, ConfigDict

from qpc_core.hookspecs import hookimpl
from qpc_core.rpc import ConfigSection


class Greeter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    greeting: str = "hello"
    port: int = 1


@hookimpl
def register_config_sections(app):
    return [ConfigSection("greeter", Greeter)]


@hookimpl
def register_reloadable_settings(app):
    return ["greeter.greeting"]


@hookimpl
async def on_config_reload(app, reload):
    app.state.setdefault("greeter-reloads", []).append(
        (reload, app.plugin_config("greeter").greeting))
