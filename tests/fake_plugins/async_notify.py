from qpc_core.hookspecs import hookimpl


@hookimpl
async def on_message_enqueued(app, event):  # must be sync
    return None
