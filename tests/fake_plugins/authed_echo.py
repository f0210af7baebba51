"""Method 9101 AuthedEcho: needs a credential (auth level "authenticated"), no identity."""

from qpc_core.hookspecs import hookimpl
from qpc_core.pb import common_pb2
from qpc_core.rpc import RpcMethod


async def authed_echo(ctx, req):
    return common_pb2.HealthResponse(status="authed")


@hookimpl
def register_rpc_methods(app):
    return [RpcMethod(9101, "AuthedEcho", common_pb2.HealthRequest, authed_echo,
                      auth="authenticated")]
