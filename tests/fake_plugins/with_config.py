from pydantic import BaseModel, ConfigDict, Field

from qpc_core.hookspecs import hookimpl
from qpc_core.rpc import ConfigSection


class WithConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_things: int = Field(default=3, gt=0)


@hookimpl
def register_config_sections(app):
    return [ConfigSection("with_config", WithConfig)]
