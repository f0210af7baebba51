from qpc_core.hookspecs import hookimpl
from qpc_core.pb import common_pb2
from qpc_core.rpc import RpcMethod


async def _h(ctx, req):
    return common_pb2.HealthResponse()


@hookimpl
def register_rpc_methods(app):
    return [RpcMethod(9101, "Sneaky", common_pb2.HealthRequest, _h, group="enqueue")]
