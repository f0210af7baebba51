"""The blobs service: UploadBlob (600), DownloadBlob (601), BlobUploadStatus (602).

State lives in three places:

* **files** (:mod:`qpc_blobs.store`): complete blobs with sidecars, and one partial file per
  unfinished upload;
* **storage kv**, namespace ``blobs`` (encrypted with the rest of the database):
  ``part:<identity><hash>`` → the unfinished upload's ``total_size``, MIME type and start time;
  ``own:<identity><hash>`` → size and time, one per blob an identity uploaded (the quota);
  ``ref:<hash><identity>`` → the reverse index, to know when nobody holds a blob any more;
  ``purge:<identity>`` → an account deletion whose blobs are still being removed (finished
  at the next start or by the collector if the server stopped in between; until it is, an
  upload from that identity first finishes it, see :meth:`BlobService._purged`);
* **memory**: one :class:`_Upload` per (identity, blob hash) being worked on, holding the
  running SHA-256 so that verifying a 50 MB blob costs nothing when its last byte arrives.

Concurrency. Every call on one (identity, hash) runs under that upload's condition lock, so
chunks are applied strictly in order. A chunk that arrives ahead of the bytes received (a
pipelining client's streams overtaking each other) waits on the condition for a bounded time.
Steps that change files or records run as shielded tasks: a call cancelled by a dropped
connection cannot leave the running hash, the file and ``received`` disagreeing; the next
call on that upload waits for the step to finish first.  Account deletion runs as a task of
its own for the same reason (see :meth:`BlobService.forget_identity`).  Lock order: purge lock
→ upload condition → per-hash lock → per-identity lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qpc_blobs.config import FRAME_OVERHEAD, MIN_CHARGE_BYTES, BlobsConfig
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
PURGE = b"purge:"
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


def charge(size: int) -> int:
    """Quota bytes a blob (or unfinished upload) of ``size`` bytes costs: at least a block."""
    return max(size, MIN_CHARGE_BYTES)


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
        #: The highest max_blob_bytes in force since start-up: the cheap first check (an
        #: upload begun under a higher limit that a reload lowered may still finish).
        self.max_blob_ceiling = cfg.max_blob_bytes
        budget = app.settings.max_payload_bytes - FRAME_OVERHEAD
        self.max_chunk = max(1, min(cfg.max_chunk_bytes, budget))
        self.download_chunk = min(cfg.download_chunk_bytes, self.max_chunk)
        self._uploads: dict[bytes, _Upload] = {}
        self._meta: OrderedDict[bytes, BlobMeta] = OrderedDict()
        self._hash_locks = KeyedLocks()
        self._ident_locks = KeyedLocks()
        self._steps: set[asyncio.Task[Any]] = set()
        self._purges: dict[bytes, asyncio.Task[int]] = {}  # identity → its latest purge
        self._purge_locks = KeyedLocks()
        # Identities whose account deletion has not been completed by a purge yet (a running,
        # failed or interrupted one: the ``purge:`` records, and purges started since).
        self._unpurged: set[bytes] = set()
        self._last_orphan_scan: float | None = None
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
        for key, _raw in await self.storage.kv_scan(NS, PURGE):
            log.info("resuming the removal of a deleted account's blobs")
            self._start_purge(key[len(PURGE):])  # in the background
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
        """Let shielded steps and account purges finish (connections are gone; storage is
        still open).  A purge still running after ``timeout`` is stopped; its ``purge:``
        record makes the next start finish it."""
        if self._steps:
            _done, pending = await asyncio.wait(set(self._steps), timeout=timeout)
            if pending:
                log.warning("%d blob writes still running at shutdown", len(pending))
                purges = pending & set(self._purges.values())
                for task in purges:
                    task.cancel()
                if purges:
                    await asyncio.wait(purges, timeout=1.0)

    async def _recover(self) -> None:
        """Finish the bookkeeping of uploads whose blob was committed just before a crash.

        Only an upload that itself completed the blob is adopted: its ``total_size`` is the
        blob's size and its partial file is gone (renamed to the blob, or dropped because
        someone else committed the same content first) or holds exactly the blob's bytes.
        Any other ``part:`` record stays a reservation: the caller's next call claims the blob
        (quota checked), or the collector removes it."""
        for key, raw in await self.storage.kv_scan(NS, PART):
            ident, h = _split(key, PART)
            meta = await self.meta(h, fresh=True)
            if meta is None:
                continue
            path = self.store.partial_path(ident, h)
            total = int(json.loads(raw)["total_size"])
            if total != meta.size or not await asyncio.to_thread(_holds_exactly, self.store,
                                                                 path, h, meta.size):
                continue
            async with self._hash_locks.hold(h), self._ident_locks.hold(ident):
                await self._add_ref(ident, h, meta.size)
            await asyncio.to_thread(self.store.discard, path)
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
        if total > self.max_blob_ceiling:
            raise self._too_large(total)
        if len(chunk) > self.max_chunk:
            raise TooLarge(f"chunk of {len(chunk)} bytes exceeds the maximum of {self.max_chunk} "
                           "bytes per call: send smaller chunks")
        if offset + len(chunk) > total:
            raise BadRequest(f"chunk [{offset}, {offset + len(chunk)}) runs past "
                             f"total_size {total}")
        mime = check_mime(req.mime_type)
        await self._purged(ident)
        async with self._slot(ident, h) as up, up.cond:
            await self._settle(up)
            if not up.loaded:
                await self._load(up)
            if up.active and offset > up.received and h not in self._meta:
                await self._wait_for_offset(up, offset)
                await self._settle(up)
            # The limit in force now, for uploads that start now (one in progress finishes
            # under the limit it began with, after a reload lowered it).
            if total > self.cfg.max_blob_bytes and not (up.active and total == up.total_size):
                raise self._too_large(total)
            return await self._step(up, self._apply(up, offset, chunk, total, mime))

    def _too_large(self, total: int) -> TooLarge:
        return TooLarge(f"blob of {total} bytes exceeds the maximum of "
                        f"{self.cfg.max_blob_bytes} bytes (blobs.max_blob_bytes)")

    def configure(self, cfg: BlobsConfig) -> None:
        """A configuration reload: size, quota and upload limits apply to uploads started from
        now on; the TTL of unfinished uploads to the next collection."""
        self.cfg = cfg
        self.max_blob_ceiling = max(self.max_blob_ceiling, cfg.max_blob_bytes)

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
            mtime = await asyncio.to_thread(_mtime, up.path)
            received, hasher = await asyncio.to_thread(self.store.load_partial, up.path)
            up.total_size = int(rec["total_size"])
            up.mime_type = str(rec.get("mime_type") or DEFAULT_MIME)
            up.created_at = float(rec.get("created_at") or 0.0)
            up.received, up.hasher = received, hasher
            # Idle since the last byte written (the file's mtime), not since this load.
            up.last_activity = max(mtime, up.created_at)
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
        if up.active and total != up.total_size:
            if offset != 0:
                raise BadRequest(f"total_size {total} differs from the {up.total_size} this "
                                 "upload started with; it must stay the same for every chunk "
                                 "(a chunk at offset 0 starts the upload over)")
            # A fresh start with another size: the caller's old partial is dropped.
            await self._discard(up)
        if not up.active:
            if offset != 0:
                raise BadRequest(f"no upload of blob {h.hex()} in progress: received 0; "
                                 "start at offset 0")
            await self._begin(up, total, mime)
            if not chunk:  # no first write will create the file: do it now
                await asyncio.to_thread(self.store.reset_partial, up.path)
        if offset > up.received:
            raise self._offset_error(up, offset)
        skip = up.received - offset
        if skip < len(chunk):  # bytes already held are accepted again and ignored
            data = memoryview(chunk)[skip:] if skip else chunk
            assert up.hasher is not None
            await asyncio.to_thread(self.store.append, up.path, up.received, data, up.hasher)
            up.received += len(data)
            up.last_activity = time.time()  # only new bytes count as activity
            up.cond.notify_all()
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
            quota, cap = self.cfg.quota_bytes_per_identity, self.cfg.max_blobs_per_identity
            if quota or cap:
                used, count = await self._holdings(ident, parts)
                if cap and count >= cap:
                    raise self._cap_error(count, cap)
                if quota and used + charge(total) > quota:
                    raise QuotaExceeded(
                        f"blob quota exceeded: {used} of {quota} bytes in use (unfinished "
                        f"uploads included); this blob needs {charge(total)} more")
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
                    cap = self.cfg.max_blobs_per_identity
                    if quota or cap:
                        used, count = await self._holdings(ident)
                        if up.active:  # that reservation becomes the blob itself
                            used -= charge(up.total_size)
                            count -= 1
                        if cap and count >= cap:
                            raise self._cap_error(count, cap)
                        if quota and used + charge(meta.size) > quota:
                            raise QuotaExceeded(
                                f"blob quota exceeded: {used} of {quota} bytes in use; this "
                                f"blob needs {charge(meta.size)} more")
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

    async def _holdings(self, ident: bytes,
                        parts: list[tuple[bytes, bytes]] | None = None) -> tuple[int, int]:
        """(bytes charged, blobs counted) for ``ident``: the blobs it holds plus its
        unfinished uploads, each charged :func:`charge` of its size."""
        if parts is None:
            parts = await self.storage.kv_scan(NS, PART + ident)
        used = sum(charge(int(json.loads(raw)["total_size"])) for _k, raw in parts)
        owns = await self.storage.kv_scan(NS, OWN + ident)
        used += sum(charge(_OWN_VALUE.unpack(raw)[0]) for _k, raw in owns)
        return used, len(parts) + len(owns)

    @staticmethod
    def _cap_error(count: int, cap: int) -> QuotaExceeded:
        return QuotaExceeded(f"blob count limit reached: {count} blobs held (unfinished uploads "
                             f"included); the limit is {cap} per identity "
                             "(blobs.max_blobs_per_identity)")

    async def usage(self, ident: bytes) -> int:
        """Quota bytes charged to ``ident`` (see :func:`charge`)."""
        async with self._ident_locks.hold(ident):
            return (await self._holdings(ident))[0]

    async def forget_identity(self, ident: bytes) -> None:
        """Account deletion: drop the identity's uploads and holdings, and every blob that
        nobody else holds any more.

        The work runs as a task of its own, so a dropped connection (which cancels the
        DeleteAccount call) cannot stop it halfway; shutdown waits for it, and a ``purge:``
        record makes the next start (or the collector) finish a purge that was cut short."""
        await asyncio.shield(self._start_purge(ident))

    def _start_purge(self, ident: bytes) -> asyncio.Task[int]:
        self._unpurged.add(ident)  # before any await: uploads from now on wait for it
        task = asyncio.ensure_future(self._purge(ident))
        self._purges[ident] = task
        self._steps.add(task)
        task.add_done_callback(lambda t: self._purge_done(ident, t))
        return task

    def _purge_done(self, ident: bytes, task: asyncio.Task[int]) -> None:
        self._steps.discard(task)
        if self._purges.get(ident) is task:
            del self._purges[ident]
        if not task.cancelled() and task.exception() is not None:
            log.warning("removing a deleted account's blobs failed (%s); the collector "
                        "tries again", task.exception())

    async def _purge(self, ident: bytes) -> int:
        """Remove ``ident``'s uploads and holdings; return how many blobs were deleted.

        Idempotent, so a purge cut short can simply run again: per blob the ``ref:`` record
        goes first, then the file if nobody else holds it, and the ``own:`` record last."""
        marker = PURGE + ident
        deleted = 0
        async with self._purge_locks.hold(ident):
            await self.storage.kv_put(NS, marker, json.dumps({"at": time.time()}).encode())
            for key, _raw in await self.storage.kv_scan(NS, PART + ident):
                _i, h = _split(key, PART)
                async with self._slot(ident, h) as up, up.cond:
                    await self._settle(up)
                    await self._step(up, self._discard(up))
            for key, _raw in await self.storage.kv_scan(NS, OWN + ident):
                _i, h = _split(key, OWN)
                async with self._hash_locks.hold(h):
                    await self.storage.kv_delete(NS, REF + h + ident)
                    if not await self.storage.kv_scan(NS, REF + h, limit=1):
                        self._meta.pop(h, None)
                        try:
                            deleted += await asyncio.to_thread(self.store.delete_blob, h)
                        except OSError as e:
                            # Nobody holds it any more (its ref: records are gone): the
                            # collector's sweep of unheld files retries the file.  One file
                            # that cannot be removed must not keep the purge, and with it the
                            # identity's uploads, blocked for good.
                            log.error("account deletion: blob %s could not be removed (%s); "
                                      "the collector retries it", h.hex()[:16], e)
                    await self.storage.kv_delete(NS, key)
            await self.storage.kv_delete(NS, marker)
            if self._purges.get(ident) is asyncio.current_task():  # no later deletion waits
                self._unpurged.discard(ident)
        if deleted:
            log.info("account deletion removed %d blobs nobody else holds", deleted)
        return deleted

    async def _purged(self, ident: bytes) -> None:
        """Return once no purge of ``ident`` is pending: before an upload or claim of an
        identity whose account deletion is not complete (a purge running, or one that failed
        or was stopped at shutdown), that purge is finished first (waited for, or run again
        here).  Otherwise the purge, resumed later, would remove what the identity stored
        after coming back (ProveIdentity needs no account; or it registers again).  Raises
        UNAVAILABLE if the purge cannot complete now: nothing is accepted from the identity
        until it has.

        Why not let the resumed purge skip records newer than the deletion instead: that
        trusts the wall clock (a clock stepped back makes a new record look old), and a
        claim of a blob the identity held before rewrites its ``own:`` record, so the
        record's time no longer says which account it belonged to."""
        if ident not in self._unpurged:
            return
        task = self._purges.get(ident)
        if task is None:  # failed, or left by a previous run and not resumed yet
            task = self._start_purge(ident)
        await asyncio.wait({task})  # a cancelled call leaves the purge running
        if ident in self._unpurged:
            raise Unavailable("the blobs of this identity's deleted account are still being "
                              "removed; try again later", retry_after=5.0)

    async def _resume_purges(self) -> int:
        """Finish purges whose ``purge:`` record outlived them; return blobs deleted."""
        tasks = [self._start_purge(key[len(PURGE):])
                 for key, _raw in await self.storage.kv_scan(NS, PURGE)
                 if key[len(PURGE):] not in self._purges]
        if not tasks:
            return 0
        await asyncio.wait(tasks)  # does not cancel them if the collector is cancelled
        return sum(t.result() for t in tasks if not t.cancelled() and t.exception() is None)

    # -- garbage collection ------------------------------------------------------------------------
    async def collect_garbage(self, now: float | None = None) -> int:
        """Finish interrupted account purges, delete unfinished uploads idle for
        ``partial_ttl_secs`` and stray files, and (at most once per ``partial_ttl_secs``)
        blobs that nobody holds; return how many uploads, blobs and files were removed."""
        now = time.time() if now is None else now
        cutoff = now - self.cfg.partial_ttl_secs
        removed = await self._resume_purges()
        keep: set[str] = set()
        uploading: Counter[bytes] = Counter()  # blob hash → unfinished upload records
        for key, raw in await self.storage.kv_scan(NS, PART):
            ident, h = _split(key, PART)
            name = self.store.partial_name(ident, h)
            keep.add(name)
            uploading[h] += 1
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
                uploading[h] -= 1
                removed += 1
                log.info("collected an abandoned upload of blob %s", h.hex())
        removed += await asyncio.to_thread(self.store.sweep, keep, cutoff)
        last = self._last_orphan_scan  # (against the TTL in force now: a reload may lower it)
        if last is None or now >= last + self.cfg.partial_ttl_secs:
            self._last_orphan_scan = now
            removed += await self._collect_unheld(cutoff, {h for h, n in uploading.items() if n})
        return removed

    async def _collect_unheld(self, cutoff: float, uploading: set[bytes]) -> int:
        """Delete blob files last written before ``cutoff`` that no ``ref:`` record names
        (left by an account purge cut short in an older version, or by hand).

        Never a blob that has an unfinished upload record (it may have been committed just
        before its holder was recorded) or one that is being uploaded or committed now: that
        is checked again under the blob's lock, which committing and claiming hold."""
        deleted = 0
        for directory in await asyncio.to_thread(self.store.blob_dirs):
            for h in await asyncio.to_thread(self.store.list_blobs, directory, cutoff):
                if h in uploading or await self.storage.kv_scan(NS, REF + h, limit=1):
                    continue
                async with self._hash_locks.hold(h):
                    if any(up.blob_hash == h for up in self._uploads.values()):
                        continue
                    if await self.storage.kv_scan(NS, REF + h, limit=1):
                        continue
                    self._meta.pop(h, None)
                    if await asyncio.to_thread(self.store.delete_blob, h):
                        deleted += 1
                        log.info("collected blob %s that nobody holds", h.hex())
        return deleted

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


def _holds_exactly(store: BlobStore, path: Path, blob_hash: bytes, size: int) -> bool:
    """True if the partial file is gone or holds exactly the ``size`` bytes of the blob."""
    if not path.exists():
        return True
    held, hasher = store.load_partial(path)
    return held == size and hasher.digest() == blob_hash


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
