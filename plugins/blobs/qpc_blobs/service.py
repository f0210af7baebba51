"""The blobs service: UploadBlob (600), DownloadBlob (601), BlobUploadStatus (602).

State lives in three places:

* **files** (:mod:`qpc_blobs.store`): complete blobs with sidecars, and one partial file per
  unfinished upload;
* **storage kv**, namespace ``blobs`` (encrypted with the rest of the database):
  ``part:<identity><hash>`` → the unfinished upload's ``total_size``, MIME type and start time;
  ``own:<identity><hash>`` → size and time, one per blob an identity uploaded (the quota);
  ``ref:<hash><identity>`` → the reverse index, to know when nobody holds a blob any more;
* **memory**: one :class:`_Upload` per (identity, blob hash) being worked on, holding the
  running SHA-256 so that verifying a 50 MB blob costs nothing when its last byte arrives.

Concurrency. Every call on one (identity, hash) runs under that upload's condition lock, so
chunks are applied strictly in order. A chunk that arrives ahead of the bytes received (a
pipelining client's streams overtaking each other) waits on the condition for a bounded time.
Steps that change files or records run as shielded tasks: a call cancelled by a dropped
connection cannot leave the running hash, the file and ``received`` disagreeing; the next
call on that upload waits for the step to finish first.  Lock order: upload condition →
per-hash lock → per-identity lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qpc_blobs.config import FRAME_OVERHEAD, BlobsConfig
from qpc_blobs.store import DEFAULT_MIME, BlobMeta, BlobStore, Hasher
from qpc_core.errors import (
    BadRequest,
    Conflict,
    NotFound,
    QuotaExceeded,
    TooLarge,
    Unavailable,
)
from qpc_core.pb import blobs_pb2 as pb
from qpc_core.rpc import RpcContext

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.blobs")

NS = "blobs"
PART = b"part:"
OWN = b"own:"
REF = b"ref:"
HASH_LEN = 32
MAX_MIME_LEN = 255
_OWN_VALUE = struct.Struct(">Qd")  # size, created_at
_META_CACHE = 4096

T = TypeVar("T")


def check_hash(value: bytes, name: str) -> bytes:
    if len(value) != HASH_LEN:
        raise BadRequest(f"{name} must be the 32-byte SHA-256 of the blob, got {len(value)} bytes")
    return value


def check_mime(value: str) -> str:
    if not value:
        return DEFAULT_MIME
    if len(value) > MAX_MIME_LEN or not value.isascii() or not value.isprintable():
        raise BadRequest(f"mime_type must be printable ASCII of at most {MAX_MIME_LEN} characters")
    return value


def not_found(blob_hash: bytes) -> NotFound:
    return NotFound(f"E027 BLOB_NOT_FOUND: no blob {blob_hash.hex()}")


class KeyedLocks:
    """One asyncio lock per key, created on demand and dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


@dataclass(eq=False)
class _Upload:
    """One (identity, blob hash): its unfinished upload if any, and who is working on it."""

    identity: bytes
    blob_hash: bytes
    path: Path
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    users: int = 0  # calls holding this object (it is forgotten when 0 and not active)
    loaded: bool = False  # the fields below reflect storage
    active: bool = False  # an unfinished upload exists
    total_size: int = 0
    mime_type: str = DEFAULT_MIME
    created_at: float = 0.0
    received: int = 0
    hasher: Hasher | None = None
    last_activity: float = 0.0
    waiters: int = 0  # chunks waiting for earlier bytes
    busy: asyncio.Task[Any] | None = None  # a shielded step still running

    @property
    def key(self) -> bytes:
        return PART + self.identity + self.blob_hash


class BlobService:
    """Per-App blob logic (``app.state["blobs"]``)."""

    def __init__(self, app: App, cfg: BlobsConfig) -> None:
        self.app = app
        self.cfg = cfg
        self.store = BlobStore(app.data_dir / "blobs")
        budget = app.settings.max_payload_bytes - FRAME_OVERHEAD
        self.max_chunk = max(1, min(cfg.max_chunk_bytes, budget))
        self.download_chunk = min(cfg.download_chunk_bytes, self.max_chunk)
        self._uploads: dict[bytes, _Upload] = {}
        self._meta: OrderedDict[bytes, BlobMeta] = OrderedDict()
        self._hash_locks = KeyedLocks()
        self._ident_locks = KeyedLocks()
        self._steps: set[asyncio.Task[Any]] = set()
        self._gc_started = 0
        self._gc_finished = 0
        self._gc_cond = asyncio.Condition()
        self._draining = False

    @property
    def storage(self) -> Any:
        return self.app.storage

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        stale = await asyncio.to_thread(self.store.setup)
        if stale:
            log.info("removed %d temporary blob files left by an interrupted write", stale)
        await self._recover()
        self.app.spawn(self._gc_loop(), name="blobs-gc")
        self.app.add_drain_callback(self._on_drain)

    def _on_drain(self) -> None:
        """Chunks waiting for earlier bytes give up now: those bytes can no longer arrive."""
        self._draining = True
        if any(up.waiters for up in self._uploads.values()):
            self.app.spawn(self._wake_waiters(), name="blobs-drain")

    async def _wake_waiters(self) -> None:
        for up in list(self._uploads.values()):
            if up.waiters:
                async with up.cond:
                    up.cond.notify_all()

    async def close(self, timeout: float = 30.0) -> None:
        """Let shielded steps finish (connections are gone; storage is still open)."""
        if self._steps:
            _done, pending = await asyncio.wait(set(self._steps), timeout=timeout)
            if pending:
                log.warning("%d blob writes still running at shutdown", len(pending))

    async def _recover(self) -> None:
        """Finish the bookkeeping of uploads whose blob was committed just before a crash."""
        for key, _raw in await self.storage.kv_scan(NS, PART):
            ident, h = _split(key, PART)
            meta = await self.meta(h, fresh=True)
            if meta is None:
                continue
            async with self._hash_locks.hold(h), self._ident_locks.hold(ident):
                await self._add_ref(ident, h, meta.size)
            await asyncio.to_thread(self.store.discard, self.store.partial_path(ident, h))
            await self.storage.kv_delete(NS, key)
            log.info("recovered the upload of blob %s committed before a restart", h.hex())

    # -- metadata --------------------------------------------------------------------------------
    async def meta(self, blob_hash: bytes, *, fresh: bool = False) -> BlobMeta | None:
        """The metadata of a complete blob, ``None`` if there is none."""
        if not fresh:
            cached = self._meta.get(blob_hash)
            if cached is not None:
                self._meta.move_to_end(blob_hash)
                return cached
        meta = await asyncio.to_thread(self.store.read_meta, blob_hash)
        if meta is None:
            self._meta.pop(blob_hash, None)
        else:
            self._remember(blob_hash, meta)
        return meta

    def _remember(self, blob_hash: bytes, meta: BlobMeta) -> None:
        self._meta[blob_hash] = meta
        self._meta.move_to_end(blob_hash)
        while len(self._meta) > _META_CACHE:
            self._meta.popitem(last=False)

    # -- RPC handlers ----------------------------------------------------------------------------
    async def upload(self, ctx: RpcContext, req: pb.UploadBlobRequest) -> pb.UploadBlobResponse:
        ident = ctx.require_identity()
        h = check_hash(req.blob_hash, "blob_hash")
        total, offset, chunk = req.total_size, req.offset, req.chunk
        if total > self.cfg.max_blob_bytes:
            raise TooLarge(f"blob of {total} bytes exceeds the maximum of "
                           f"{self.cfg.max_blob_bytes} bytes (blobs.max_blob_bytes)")
        if len(chunk) > self.max_chunk:
            raise TooLarge(f"chunk of {len(chunk)} bytes exceeds the maximum of {self.max_chunk} "
                           "bytes per call: send smaller chunks")
        if offset + len(chunk) > total:
            raise BadRequest(f"chunk [{offset}, {offset + len(chunk)}) runs past "
                             f"total_size {total}")
        mime = check_mime(req.mime_type)
        async with self._slot(ident, h) as up, up.cond:
            await self._settle(up)
            if not up.loaded:
                await self._load(up)
            if up.active and offset > up.received and h not in self._meta:
                await self._wait_for_offset(up, offset)
                await self._settle(up)
            return await self._step(up, self._apply(up, offset, chunk, total, mime))

    async def status(self, ctx: RpcContext,
                     req: pb.BlobUploadStatusRequest) -> pb.BlobUploadStatusResponse:
        ident = ctx.require_identity()
        h = check_hash(req.blob_hash, "blob_hash")
        meta = await self.meta(h)
        if meta is not None:
            return pb.BlobUploadStatusResponse(received=meta.size, total_size=meta.size,
                                               complete=True)
        up = self._uploads.get(ident + h)
        if up is not None and up.loaded:
            if not up.active:
                return pb.BlobUploadStatusResponse()
            return pb.BlobUploadStatusResponse(received=up.received, total_size=up.total_size)
        raw = await self.storage.kv_get(NS, PART + ident + h)
        if raw is None:
            return pb.BlobUploadStatusResponse()
        total = int(json.loads(raw)["total_size"])
        held = await asyncio.to_thread(self.store.partial_size,
                                       self.store.partial_path(ident, h))
        return pb.BlobUploadStatusResponse(received=min(held, total), total_size=total)

    async def download(self, ctx: RpcContext,
                       req: pb.DownloadBlobRequest) -> pb.DownloadBlobResponse:
        ctx.require_identity()
        h = check_hash(req.blob_id, "blob_id")
        meta = await self.meta(h)
        if meta is None:
            raise not_found(h)
        if req.offset > meta.size:
            raise BadRequest(f"offset {req.offset} is past the end of blob {h.hex()} "
                             f"({meta.size} bytes)")
        length = min(req.length or self.download_chunk, self.max_chunk, meta.size - req.offset)
        chunk = b""
        if length:
            try:
                chunk = await asyncio.to_thread(self.store.read_range, h, req.offset, length)
            except FileNotFoundError:
                self._meta.pop(h, None)
                raise not_found(h) from None
        return pb.DownloadBlobResponse(chunk=chunk, offset=req.offset, total_size=meta.size,
                                       mime_type=meta.mime_type)

    # -- upload steps (run under up.cond) -------------------------------------------------
    @contextlib.asynccontextmanager
    async def _slot(self, ident: bytes, h: bytes) -> AsyncIterator[_Upload]:
        key = ident + h
        up = self._uploads.get(key)
        if up is None:
            up = self._uploads[key] = _Upload(ident, h, self.store.partial_path(ident, h))
        up.users += 1
        try:
            yield up
        finally:
            up.users -= 1
            if (up.users == 0 and not up.active and up.busy is None
                    and self._uploads.get(key) is up):
                del self._uploads[key]

    async def _step(self, up: _Upload, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion even if this call is cancelled (see module doc)."""
        task = asyncio.ensure_future(coro)
        self._steps.add(task)
        task.add_done_callback(lambda t: self._step_done(up, t))
        up.busy = task
        return await asyncio.shield(task)

    def _step_done(self, up: _Upload, task: asyncio.Task[Any]) -> None:
        self._steps.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here; the awaiting call re-raises it
        if up.busy is task:
            up.busy = None
            key = up.identity + up.blob_hash
            if up.users == 0 and not up.active and self._uploads.get(key) is up:
                del self._uploads[key]  # its call was cancelled before the step ended

    async def _settle(self, up: _Upload) -> None:
        """Wait for a step a cancelled call left running, then wake chunk waiters."""
        task = up.busy
        if task is not None:
            await asyncio.wait({task})
            up.cond.notify_all()

    async def _load(self, up: _Upload) -> None:
        raw = await self.storage.kv_get(NS, up.key)
        if raw is None:
            up.active = False
        else:
            rec = json.loads(raw)
            received, hasher = await asyncio.to_thread(self.store.load_partial, up.path)
            up.total_size = int(rec["total_size"])
            up.mime_type = str(rec.get("mime_type") or DEFAULT_MIME)
            up.created_at = float(rec.get("created_at") or 0.0)
            up.received, up.hasher = received, hasher
            up.last_activity = time.time()
            up.active = True
            if received > up.total_size:  # cannot happen through this code: start over
                await self._discard(up)
        up.loaded = True

    async def _wait_for_offset(self, up: _Upload, offset: int) -> None:
        if offset - up.received > self.cfg.reorder_window_bytes or up.waiters >= 64:
            raise self._offset_error(up, offset)
        up.waiters += 1
        try:
            async with asyncio.timeout(self.cfg.reorder_wait_secs):
                await up.cond.wait_for(
                    lambda: self._draining or not up.active or offset <= up.received)
        except TimeoutError:
            raise self._offset_error(up, offset) from None
        finally:
            up.waiters -= 1
        if self._draining and up.active and offset > up.received:
            raise Unavailable("server shutting down", retry_after=1.0)

    @staticmethod
    def _offset_error(up: _Upload, offset: int) -> BadRequest:
        return BadRequest(
            f"offset {offset} is past the {up.received} bytes received for blob "
            f"{up.blob_hash.hex()}: received {up.received}; continue at offset {up.received}"
        )

    async def _apply(self, up: _Upload, offset: int, chunk: bytes, total: int,
                     mime: str) -> pb.UploadBlobResponse:
        h = up.blob_hash
        meta = self._meta.get(h) if up.active else await self.meta(h)
        if meta is not None:
            return await self._claim(up, meta, total)
        if not up.active:
            if offset != 0:
                raise BadRequest(f"no upload of blob {h.hex()} in progress: received 0; "
                                 "start at offset 0")
            await self._begin(up, total, mime)
            if not chunk:  # no first write will create the file: do it now
                await asyncio.to_thread(self.store.reset_partial, up.path)
        elif total != up.total_size:
            raise BadRequest(f"total_size {total} differs from the {up.total_size} this upload "
                             "started with; it must stay the same for every chunk")
        if offset > up.received:
            raise self._offset_error(up, offset)
        skip = up.received - offset
        if skip < len(chunk):  # bytes already held are accepted again and ignored
            data = memoryview(chunk)[skip:] if skip else chunk
            assert up.hasher is not None
            await asyncio.to_thread(self.store.append, up.path, up.received, data, up.hasher)
            up.received += len(data)
            up.cond.notify_all()
        up.last_activity = time.time()
        if up.received == up.total_size:
            return await self._finish(up)
        return pb.UploadBlobResponse(received=up.received)

    async def _begin(self, up: _Upload, total: int, mime: str) -> None:
        ident = up.identity
        async with self._ident_locks.hold(ident):
            parts = await self.storage.kv_scan(NS, PART + ident)
            limit = self.cfg.max_partial_uploads_per_identity
            if len(parts) >= limit:
                raise QuotaExceeded(f"{len(parts)} unfinished blob uploads (the limit is "
                                    f"{limit}): finish them or let them expire first")
            quota = self.cfg.quota_bytes_per_identity
            if quota:
                used = await self._usage(ident, parts)
                if used + total > quota:
                    raise QuotaExceeded(
                        f"blob quota exceeded: {used} of {quota} bytes in use (unfinished "
                        f"uploads included); this blob needs {total} more")
            now = time.time()
            rec = {"total_size": total, "mime_type": mime, "created_at": now}
            await self.storage.kv_put(NS, up.key, json.dumps(rec).encode())
        up.total_size, up.mime_type, up.created_at = total, mime, now
        up.received, up.hasher, up.last_activity = 0, hashlib.sha256(), now
        up.active = True  # the file is created (or a stray one emptied) by the first write

    async def _finish(self, up: _Upload) -> pb.UploadBlobResponse:
        h = up.blob_hash
        assert up.hasher is not None
        digest = up.hasher.digest()
        if digest != h:
            await self._discard(up)
            raise BadRequest(
                f"SHA-256 of the {up.total_size} bytes received is {digest.hex()}, not "
                f"blob_hash {h.hex()}: the upload was rejected and its data removed; "
                "upload again from offset 0")
        async with self._hash_locks.hold(h):
            meta = await self.meta(h, fresh=True)
            if meta is None:
                meta = BlobMeta(size=up.total_size, mime_type=up.mime_type,
                                created_at=time.time())
                await asyncio.to_thread(self.store.commit, up.path, h, meta)
                self._remember(h, meta)
                log.debug("blob %s stored (%d bytes)", h.hex(), meta.size)
            else:  # someone else finished the same content first
                await asyncio.to_thread(self.store.discard, up.path)
            async with self._ident_locks.hold(up.identity):
                await self._add_ref(up.identity, h, meta.size)
                await self.storage.kv_delete(NS, up.key)
        self._forget(up)
        return pb.UploadBlobResponse(blob_id=h, received=meta.size, complete=True)

    async def _claim(self, up: _Upload, meta: BlobMeta, total: int) -> pb.UploadBlobResponse:
        """The blob exists: count it for this identity (once) and drop its own partial."""
        h, ident = up.blob_hash, up.identity
        if total != meta.size:
            raise BadRequest(f"blob {h.hex()} is stored with {meta.size} bytes; total_size "
                             f"{total} cannot belong to it")
        async with self._hash_locks.hold(h):
            if await self.meta(h, fresh=True) is None:
                raise Conflict(f"blob {h.hex()} was deleted meanwhile: upload it again "
                               "from offset 0")
            async with self._ident_locks.hold(ident):
                if await self.storage.kv_get(NS, OWN + ident + h) is None:
                    quota = self.cfg.quota_bytes_per_identity
                    if quota:
                        used = await self._usage(ident)
                        if up.active:  # that reservation becomes the blob itself
                            used -= up.total_size
                        if used + meta.size > quota:
                            raise QuotaExceeded(
                                f"blob quota exceeded: {used} of {quota} bytes in use; this "
                                f"blob needs {meta.size} more")
                    await self._add_ref(ident, h, meta.size)
        if up.active:
            await self._discard(up)
        return pb.UploadBlobResponse(blob_id=h, received=meta.size, complete=True)

    async def _discard(self, up: _Upload) -> None:
        """Delete an unfinished upload: its file first, then its record."""
        await asyncio.to_thread(self.store.discard, up.path)
        await self.storage.kv_delete(NS, up.key)
        self._forget(up)

    def _forget(self, up: _Upload) -> None:
        up.active = False
        up.received, up.total_size, up.hasher = 0, 0, None
        up.loaded = True
        up.cond.notify_all()

    # -- ownership and quota -----------------------------------------------------------------------
    async def _add_ref(self, ident: bytes, h: bytes, size: int) -> None:
        """Record that ``ident`` holds ``h`` (idempotent; caller holds hash + identity locks).

        The reverse index is written first: a crash in between leaves a blob that is kept
        longer than needed, never one deleted while someone still holds it."""
        await self.storage.kv_put(NS, REF + h + ident, b"\x01")
        await self.storage.kv_put(NS, OWN + ident + h, _OWN_VALUE.pack(size, time.time()))

    async def _usage(self, ident: bytes,
                     parts: list[tuple[bytes, bytes]] | None = None) -> int:
        """Bytes charged to ``ident``: blobs it holds plus its unfinished uploads' sizes."""
        if parts is None:
            parts = await self.storage.kv_scan(NS, PART + ident)
        used = sum(int(json.loads(raw)["total_size"]) for _k, raw in parts)
        for _k, raw in await self.storage.kv_scan(NS, OWN + ident):
            used += _OWN_VALUE.unpack(raw)[0]
        return used

    async def usage(self, ident: bytes) -> int:
        async with self._ident_locks.hold(ident):
            return await self._usage(ident)

    async def forget_identity(self, ident: bytes) -> None:
        """Account deletion: drop the identity's uploads and holdings, and every blob that
        nobody else holds any more."""
        for key, _raw in await self.storage.kv_scan(NS, PART + ident):
            _i, h = _split(key, PART)
            async with self._slot(ident, h) as up, up.cond:
                await self._settle(up)
                await self._step(up, self._discard(up))
        deleted = 0
        for key, _raw in await self.storage.kv_scan(NS, OWN + ident):
            _i, h = _split(key, OWN)
            async with self._hash_locks.hold(h):
                await self.storage.kv_delete(NS, key)
                await self.storage.kv_delete(NS, REF + h + ident)
                if not await self.storage.kv_scan(NS, REF + h, limit=1):
                    self._meta.pop(h, None)
                    deleted += await asyncio.to_thread(self.store.delete_blob, h)
        if deleted:
            log.info("account deletion removed %d blobs nobody else holds", deleted)

    # -- garbage collection ------------------------------------------------------------------------
    async def collect_garbage(self, now: float | None = None) -> int:
        """Delete unfinished uploads idle for ``partial_ttl_secs`` and stray files; return
        how many uploads and files were removed."""
        now = time.time() if now is None else now
        cutoff = now - self.cfg.partial_ttl_secs
        keep: set[str] = set()
        removed = 0
        for key, raw in await self.storage.kv_scan(NS, PART):
            ident, h = _split(key, PART)
            name = self.store.partial_name(ident, h)
            keep.add(name)
            async with self._slot(ident, h) as up, up.cond:
                await self._settle(up)
                if up.loaded:
                    if not up.active or up.waiters or up.last_activity > cutoff:
                        continue
                else:
                    mtime = await asyncio.to_thread(_mtime, up.path)
                    created = float(json.loads(raw).get("created_at") or 0.0)
                    if max(mtime, created) > cutoff:
                        continue
                await self._step(up, self._discard(up))
                keep.discard(name)
                removed += 1
                log.info("collected an abandoned upload of blob %s", h.hex())
        removed += await asyncio.to_thread(self.store.sweep, keep, cutoff)
        return removed

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gc_interval_secs)
            await self.gc_pass()

    async def gc_pass(self) -> None:
        self._gc_started += 1
        try:
            await self.collect_garbage()
        except Exception:
            log.exception("blob garbage collection failed")
        finally:
            self._gc_finished += 1
            async with self._gc_cond:
                self._gc_cond.notify_all()

    async def wait_for_gc_pass(self) -> None:
        """Return after a whole collector pass that started after this call."""
        target = self._gc_started + 1
        async with self._gc_cond:
            await self._gc_cond.wait_for(lambda: self._gc_finished >= target)


def _split(key: bytes, prefix: bytes) -> tuple[bytes, bytes]:
    """(first 32-byte key, second 32-byte key) after ``prefix``."""
    rest = key[len(prefix):]
    return rest[:HASH_LEN], rest[HASH_LEN:]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
