"""Method 9100 Slow: signals it started, then waits until the test releases it.
Method 9101 SlowPoll: the same, but cancelled when its client goes away (a long poll)."""

import asyncio

from qpc_core.hookspecs import hookimpl
from qpc_core.pb import common_pb2
from qpc_core.rpc import RpcMethod


async def slow(ctx, req):
    st = ctx.app.state["slow"]
    st["started"].set()
    try:
        await st["release"].wait()
    except asyncio.CancelledError:
        st["cancelled"].set()
        raise
    st["finished"].set()
    return common_pb2.HealthResponse(status="finished")


@hookimpl
def register_rpc_methods(app):
    return [
        RpcMethod(9100, "Slow", common_pb2.HealthRequest, slow, auth="none"),
        RpcMethod(9101, "SlowPoll", common_pb2.HealthRequest, slow, auth="none",
                  cancel_on_disconnect=True),
    ]


@hookimpl
async def startup(app):
    app.state["slow"] = {"started": asyncio.Event(), "release": asyncio.Event(),
                         "cancelled": asyncio.Event(), "finished": asyncio.Event()}
