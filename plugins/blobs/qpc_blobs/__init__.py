"""qpc plugin ``blobs``: content-addressed, resumable, chunked blob storage.

Methods 600 UploadBlob, 601 DownloadBlob and 602 BlobUploadStatus (see README.md).  Hook
implementations only: the logic is in :mod:`qpc_blobs.service`, the files in
:mod:`qpc_blobs.store`, the client side in :mod:`qpc_blobs.client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qpc_blobs.config import BlobsConfig
from qpc_core.errors import ConfigError
from qpc_core.hookspecs import hookimpl
from qpc_core.pb import blobs_pb2 as pb
from qpc_core.rpc import ConfigSection, RpcContext, RpcMethod

if TYPE_CHECKING:
    from qpc_blobs.service import BlobService
    from qpc_core.app import App
    from qpc_core.config import ConfigReload

NAME = "blobs"  # entry point = --plugins token = config table = app.state key = kv namespace
UPLOAD_BLOB, DOWNLOAD_BLOB, BLOB_UPLOAD_STATUS = 600, 601, 602


def _service(app: App) -> BlobService:
    svc: BlobService = app.state[NAME]
    return svc


def _h(name: str) -> Any:
    async def handler(ctx: RpcContext, req: Any) -> Any:
        return await getattr(_service(ctx.app), name)(ctx, req)

    handler.__name__ = name
    return handler


@hookimpl
def register_config_sections(app: App) -> list[ConfigSection]:
    return [ConfigSection(NAME, BlobsConfig)]


@hookimpl
def register_rpc_methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod(UPLOAD_BLOB, "UploadBlob", pb.UploadBlobRequest, _h("upload"),
                  group="blobs", auth="identity"),
        RpcMethod(DOWNLOAD_BLOB, "DownloadBlob", pb.DownloadBlobRequest, _h("download"),
                  group="blobs", auth="identity"),
        RpcMethod(BLOB_UPLOAD_STATUS, "BlobUploadStatus", pb.BlobUploadStatusRequest,
                  _h("status"), group="blobs", auth="identity"),
    ]


#: Keys of ``[blobs]`` applied while running (SIGHUP), to uploads started from then on:
#: each is read where it is used.  Chunk sizes, reordering, GC timing and sole_node are
#: fixed at start-up.
RELOADABLE = ("max_blob_bytes", "quota_bytes_per_identity", "max_blobs_per_identity",
              "max_partial_uploads_per_identity", "partial_ttl_secs")


@hookimpl
def register_reloadable_settings(app: App) -> list[str]:
    return [f"{NAME}.{key}" for key in RELOADABLE]


@hookimpl
async def on_config_reload(app: App, reload: ConfigReload) -> None:
    svc: BlobService | None = app.state.get(NAME)
    if svc is not None and reload.changed(NAME):
        svc.configure(app.plugin_config(NAME))


@hookimpl
async def startup(app: App) -> None:
    from qpc_blobs.service import BlobService

    config: BlobsConfig = app.plugin_config(NAME)
    if app.storage.shared and not config.sole_node:
        raise ConfigError(
            "config: blobs: the store is shared by several servers, but blob contents live in "
            "this server's data_dir and blob locks in its memory, so only one server may run "
            "blobs: set [blobs] sole_node = true on that server and leave blobs out on the "
            "others"
        )
    svc = BlobService(app, config)
    await svc.start()
    app.state[NAME] = svc


@hookimpl
async def shutdown(app: App) -> None:
    svc = app.state.get(NAME)
    if svc is not None:
        await svc.close()


@hookimpl
async def on_account_deleted(app: App, identity_key: bytes, username: str | None) -> None:
    await _service(app).forget_identity(identity_key)
