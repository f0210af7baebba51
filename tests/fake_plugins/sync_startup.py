from qpc_core.hookspecs import hookimpl


@hookimpl
def startup(app):  # must be async
    return None
