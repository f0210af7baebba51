"""A plugin that declares a key of another plugin's table (blobs.max_chunk_bytes), which
only the blobs plugin could apply."""

from qpc_core.hookspecs import hookimpl


@hookimpl
def register_reloadable_settings(app):
    return ["blobs.max_chunk_bytes"]
