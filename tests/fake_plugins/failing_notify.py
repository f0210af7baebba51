"""A plugin whose notifications always fail, and which records hook calls."""

from qpc_core.hookspecs import hookimpl

CALLS: list[str] = []


@hookimpl
def on_message_enqueued(app, event):
    CALLS.append("enqueued")
    raise RuntimeError("boom")


@hookimpl
def on_connection_opened(app, conn):
    raise RuntimeError("boom")


@hookimpl
async def startup(app):
    CALLS.append("startup")


@hookimpl
async def shutdown(app):
    CALLS.append("shutdown")
