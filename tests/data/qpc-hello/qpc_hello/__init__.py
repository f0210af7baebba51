"""Example third-party plugin: method 9001 Hello echoes the caller's name back."""

from qpc_core.hookspecs import hookimpl
from qpc_core.pb import common_pb2
from qpc_core.rpc import RpcMethod


async def hello(ctx, req):
    return common_pb2.HealthResponse(status="hello", version=ctx.app.version)


@hookimpl
def register_rpc_methods(app):
    return [RpcMethod(9001, "Hello", common_pb2.HealthRequest, hello, group="default",
                      auth="none")]


@hookimpl
async def startup(app):
    app.state["hello"] = "started"
