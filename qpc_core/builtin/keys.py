"""Built-in plugin ``keys``: MLS key packages (300-301) and hybrid keys (302-304).

* Key packages: <= 1 MiB, single use, FIFO per identity, popped atomically at fetch time.
  Only the owner uploads its own packages; any identity may fetch one of anyone's.
* Hybrid keys: X25519 (32 bytes) || ML-KEM-768 encapsulation key (1184 bytes) = 1216
  bytes, one per identity, replaced on upload, not single use.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from qpc_core.errors import BadRequest, TooLarge
from qpc_core.hookspecs import hookimpl
from qpc_core.identity import check_identity_key
from qpc_core.pb import keys_pb2 as pb
from qpc_core.rpc import RpcContext, RpcMethod

if TYPE_CHECKING:
    from qpc_core.app import App

MAX_KEY_PACKAGE = 1024 * 1024
HYBRID_KEY_LEN = 32 + 1184
MAX_HYBRID_BATCH = 256


async def upload_key_package(
    ctx: RpcContext, req: pb.UploadKeyPackageRequest
) -> pb.UploadKeyPackageResponse:
    ident = check_identity_key(req.identity_key)
    ctx.require_self(ident, "key packages")
    if not req.package:
        raise BadRequest("package must not be empty")
    if len(req.package) > MAX_KEY_PACKAGE:
        raise TooLarge(f"key package of {len(req.package)} bytes exceeds 1 MiB")
    fingerprint = hashlib.sha256(req.package).digest()
    await ctx.app.storage.add_key_package(ident, req.package, fingerprint)
    ctx.app.hooks.on_key_package_uploaded(ctx.app, ident, fingerprint)
    return pb.UploadKeyPackageResponse(fingerprint=fingerprint)


async def fetch_key_package(
    ctx: RpcContext, req: pb.FetchKeyPackageRequest
) -> pb.FetchKeyPackageResponse:
    ident = check_identity_key(req.identity_key)
    app = ctx.app
    package = await app.storage.pop_key_package(ident)
    if package is None and app.hooks.implementers("fetch_remote_key_package"):
        package = await app.hooks.fetch_remote_key_package(app, ident)
    return pb.FetchKeyPackageResponse(package=package or b"")


async def _hybrid_keys(app: App, idents: list[bytes]) -> dict[bytes, bytes]:
    keys = await app.storage.get_hybrid_keys(idents)
    missing = [k for k in dict.fromkeys(idents) if k not in keys]
    if missing and app.hooks.implementers("fetch_remote_hybrid_keys"):
        found = await app.hooks.fetch_remote_hybrid_keys(app, missing) or {}
        wanted = set(missing)
        keys.update({k: v for k, v in found.items() if k in wanted})
    return keys


async def upload_hybrid_key(
    ctx: RpcContext, req: pb.UploadHybridKeyRequest
) -> pb.UploadHybridKeyResponse:
    ident = check_identity_key(req.identity_key)
    ctx.require_self(ident, "hybrid key")
    if len(req.hybrid_public_key) != HYBRID_KEY_LEN:
        raise BadRequest(
            f"hybrid_public_key must be {HYBRID_KEY_LEN} bytes (X25519 32 + ML-KEM-768 1184), "
            f"got {len(req.hybrid_public_key)}"
        )
    await ctx.app.storage.set_hybrid_key(ident, req.hybrid_public_key)
    return pb.UploadHybridKeyResponse()


async def fetch_hybrid_key(
    ctx: RpcContext, req: pb.FetchHybridKeyRequest
) -> pb.FetchHybridKeyResponse:
    ident = check_identity_key(req.identity_key)
    keys = await _hybrid_keys(ctx.app, [ident])
    return pb.FetchHybridKeyResponse(hybrid_public_key=keys.get(ident, b""))


async def fetch_hybrid_keys(
    ctx: RpcContext, req: pb.FetchHybridKeysRequest
) -> pb.FetchHybridKeysResponse:
    idents = list(req.identity_keys)
    if len(idents) > MAX_HYBRID_BATCH:
        raise TooLarge(f"at most {MAX_HYBRID_BATCH} identity keys per call")
    for k in idents:
        check_identity_key(k, "identity_keys[]")
    keys = await _hybrid_keys(ctx.app, idents)
    return pb.FetchHybridKeysResponse(
        keys=[pb.HybridKeyEntry(identity_key=k, hybrid_public_key=keys[k])
              for k in idents if k in keys]
    )


@hookimpl
def register_rpc_methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod(300, "UploadKeyPackage", pb.UploadKeyPackageRequest, upload_key_package,
                  group="keys"),
        RpcMethod(301, "FetchKeyPackage", pb.FetchKeyPackageRequest, fetch_key_package,
                  group="keys"),
        RpcMethod(302, "UploadHybridKey", pb.UploadHybridKeyRequest, upload_hybrid_key,
                  group="keys"),
        RpcMethod(303, "FetchHybridKey", pb.FetchHybridKeyRequest, fetch_hybrid_key,
                  group="keys"),
        RpcMethod(304, "FetchHybridKeys", pb.FetchHybridKeysRequest, fetch_hybrid_keys,
                  group="keys"),
    ]
