"""Server side of the key-transparency log: appends, indexes, signed tree heads, RPCs.

State
    * the Merkle tree: storage log ``kt_log`` (:class:`~qpc_kt_log.store.KtTreeStore`);
    * derived indexes in kv namespace ``kt_log`` (rebuilt from the log when behind):

      ==================  =========================================================
      ``n:<username>``    u64 leaf index || identity key   (newest binding of a name)
      ``k:<key>``         u64 leaf index || username       (newest binding of a key)
      ``r:<key>``         u64 leaf index || reason         (the key's revocation)
      ``m:indexed``       u64: entries ``< this`` are reflected in the indexes
      ==================  =========================================================

Appends are serialised by one :class:`asyncio.Lock`.  Each append writes the log entries
(one transaction, leaf and nodes together), then the index rows, then ``m:indexed``.  A crash
between those leaves ``m:indexed`` behind the log; start-up (and any later locked operation)
re-reads the entries after it and rewrites their index rows, which is idempotent.

Cancelling a task that is appending or writing index rows (a client resetting its stream)
does not release the lock early: the queued writes are waited for first (see
:func:`~qpc_kt_log.store.finish_despite_cancellation`), so the next appender never builds on
a frontier a still-queued write is about to change.

A binding is appended from a hook (registration, or ``log_on_resolve`` backfill) only if the
directory, re-read under the lock, still maps the name to that key: a stale directory read
must not log a deleted key as the name's newest binding.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qpc_core.errors import BadRequest, Conflict, NotFound, StorageError
from qpc_core.identity import check_identity_key, public_bytes
from qpc_core.pb import directory_pb2 as pb
from qpc_core.rpc import RpcContext
from qpc_core.users import resolve_identity
from qpc_kt_log.config import KtLogConfig
from qpc_kt_log.records import (
    KIND_BINDING,
    REVOCATION_REASONS,
    LeafRecord,
    sth_signed_bytes,
)
from qpc_kt_log.store import KtTreeStore, StoredEntry, finish_despite_cancellation

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.kt_log")

NAME = "kt_log"
KV = "kt_log"
INDEXED = b"m:indexed"
REINDEX_PAGE = 2000
_U64 = struct.Struct(">Q")


def _name_key(username: str) -> bytes:
    return b"n:" + username.encode("utf-8")


def _key_key(identity_key: bytes) -> bytes:
    return b"k:" + identity_key


def _rev_key(identity_key: bytes) -> bytes:
    return b"r:" + identity_key


def entry_pb(entry: StoredEntry) -> pb.KtEntry:
    r = entry.record
    return pb.KtEntry(index=entry.index, kind=r.kind, username=r.username,
                      identity_key=r.identity_key, reason=r.reason, leaf_hash=entry.leaf_hash,
                      timestamp_ms=r.timestamp_ms)


class KtLogService:
    """One per App (``app.state["kt_log"]``).  Create, then ``await start()``."""

    def __init__(self, app: App, config: KtLogConfig, signing_key: Ed25519PrivateKey) -> None:
        self.app = app
        self.config = config
        self.tree = KtTreeStore(app.storage, cache_nodes=config.node_cache_size)
        self._signing_key = signing_key
        self.public_key = public_bytes(signing_key)
        self._lock = asyncio.Lock()
        self._indexed = 0
        self._sth: pb.SignedTreeHead | None = None
        self._sth_signed_at = 0.0
        self.clock: Callable[[], float] = time.time  # unix seconds; replaceable in tests

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lock:
            await self.tree.load()
            raw = await self.app.storage.kv_get(KV, INDEXED)
            self._indexed = _U64.unpack(raw)[0] if raw else 0
            if self._indexed > self.tree.size:
                raise StorageError(
                    f"kt_log: the indexes cover {self._indexed} entries but the log holds only "
                    f"{self.tree.size}: the log was truncated or replaced"
                )
            await self._reindex_locked()
        sth = self.current_sth()
        log.info("kt_log: %d leaves, root %s", sth.tree_size, sth.root_hash.hex())

    async def _ready_locked(self) -> None:
        await self.tree.ensure_current()
        await self._reindex_locked()

    async def _catch_up(self) -> None:
        """Before answering from the indexes: make sure they cover the whole log."""
        if self._indexed < self.tree.size:
            async with self._lock:
                await self._ready_locked()

    async def _reindex_locked(self) -> None:
        size = self.tree.size
        if self._indexed >= size:
            return
        log.warning("kt_log: indexing entries %d..%d (an earlier append was interrupted)",
                    self._indexed, size - 1)
        start = self._indexed
        while start < size:
            end = min(size, start + REINDEX_PAGE)
            entries = await self.tree.read_entries(start, end)
            await self._write_index(start, [e.record for e in entries])
            start = end

    async def _write_index(self, first: int, records: Sequence[LeafRecord]) -> None:
        """Write the index rows of ``records`` (leaves from ``first``), then ``m:indexed``.

        Cancellation-safe: a cancelled caller still waits for the writes to finish, so no
        row from this call can commit after a later one (which may hold a newer binding)."""
        await finish_despite_cancellation(
            asyncio.ensure_future(self._put_index_rows(first, records)))

    async def _put_index_rows(self, first: int, records: Sequence[LeafRecord]) -> None:
        items: dict[bytes, bytes] = {}
        for index, r in enumerate(records, first):
            leaf = _U64.pack(index)
            if r.kind == KIND_BINDING:
                items[_name_key(r.username)] = leaf + r.identity_key
                items[_key_key(r.identity_key)] = leaf + r.username.encode("utf-8")
            else:
                items[_rev_key(r.identity_key)] = leaf + r.reason.encode("utf-8")
        storage = self.app.storage
        await asyncio.gather(*(storage.kv_put(KV, k, v) for k, v in items.items()))
        end = first + len(records)
        await storage.kv_put(KV, INDEXED, _U64.pack(end))  # only after every row committed
        self._indexed = end

    async def _append_locked(self, records: Sequence[LeafRecord]) -> range:
        await self._ready_locked()
        rng = await self.tree.append(records)
        try:
            await self._write_index(rng.start, records)
        except Exception:
            # The leaves are committed; the indexes are rebuilt before the next operation.
            log.exception("kt_log: index update after appending leaves %d..%d failed",
                          rng.start, rng.stop - 1)
        return rng

    # -- signed tree heads -------------------------------------------------------------------
    def current_sth(self) -> pb.SignedTreeHead:
        """A signed head of the whole committed tree (re-signed when the tree grew or the
        cached head is older than ``sth_max_age_secs``).  Do not mutate the result."""
        size = self.tree.size
        sth = self._sth
        now = self.clock()
        if (sth is None or sth.tree_size != size
                or now - self._sth_signed_at > self.config.sth_max_age_secs):
            root = self.tree.root()
            ts = int(now * 1000)
            if sth is not None and ts < sth.timestamp_ms:
                ts = sth.timestamp_ms  # never go back in time within a process
            sig = self._signing_key.sign(sth_signed_bytes(size, root, ts))
            sth = pb.SignedTreeHead(tree_size=size, root_hash=root, timestamp_ms=ts,
                                    signature=sig, public_key=self.public_key)
            self._sth, self._sth_signed_at = sth, now
        return sth

    # -- appends ---------------------------------------------------------------------------
    async def _latest_binding(self, username: str) -> tuple[int, bytes] | None:
        raw = await self.app.storage.kv_get(KV, _name_key(username))
        if raw is None:
            return None
        return _U64.unpack_from(raw)[0], raw[_U64.size:]

    async def log_binding(self, username: str, identity_key: bytes) -> int:
        """Make (username, key) the newest binding of ``username``; return its leaf index.

        Appends a binding leaf unless the log's newest binding for the name already has this
        key: a first registration, or a key rotation (the name had a different key).  Does
        not consult the directory (see :meth:`log_directory_binding`)."""
        leaf = await self._log_binding(username, identity_key, check_directory=False)
        assert leaf is not None
        return leaf

    async def log_directory_binding(self, username: str, identity_key: bytes) -> int | None:
        """Like :meth:`log_binding`, for a binding read from the directory earlier (a hook).

        Before appending, the directory is read again under the append lock: if it no
        longer maps ``username`` to ``identity_key`` (the account was deleted, or the name
        re-registered with another key, since the caller's read) nothing is appended and
        ``None`` is returned.  Otherwise a stale read would log an old key as the name's
        newest binding."""
        return await self._log_binding(username, identity_key, check_directory=True)

    async def _log_binding(self, username: str, identity_key: bytes, *,
                           check_directory: bool) -> int | None:
        check_identity_key(identity_key)
        async with self._lock:
            await self._ready_locked()
            current = await self._latest_binding(username)
            if current is not None and current[1] == identity_key:
                return current[0]
            if check_directory:
                user = await self.app.storage.get_user_by_name(username)
                if user is None or user.identity_key != identity_key:
                    log.info("kt_log: not logging '%s' -> %s…: the directory no longer has "
                             "this binding", username, identity_key.hex()[:16])
                    return None
            rng = await self._append_locked([LeafRecord.binding(username, identity_key,
                                                                self._now_ms())])
            if current is not None:
                log.info("kt_log: key rotation for '%s' logged at leaf %d", username, rng.start)
            return rng.start

    async def revoke(self, identity_key: bytes, reason: str) -> int:
        """Append a revocation leaf; return its index.  ``CONFLICT`` when already revoked,
        ``NOT_FOUND`` when the key was never bound (in the log or the directory)."""
        if reason not in REVOCATION_REASONS:
            raise BadRequest(f"reason must be one of {', '.join(REVOCATION_REASONS)}")
        check_identity_key(identity_key)
        storage = self.app.storage
        async with self._lock:
            await self._ready_locked()
            if await storage.kv_get(KV, _rev_key(identity_key)) is not None:
                raise Conflict("this identity key is already revoked")
            ts = self._now_ms()
            records: list[LeafRecord] = []
            if await storage.kv_get(KV, _key_key(identity_key)) is None:
                user = (await resolve_identity(self.app, identity_key)
                        if self.config.log_on_resolve else None)
                if user is None:
                    raise NotFound("this identity key has no binding in the key-transparency log")
                records.append(LeafRecord.binding(user.username, identity_key, ts))
            records.append(LeafRecord.revocation(identity_key, reason, ts))
            rng = await self._append_locked(records)
            return rng.stop - 1

    # -- proofs ----------------------------------------------------------------------------
    async def inclusion(self, leaf_index: int) -> pb.KtInclusion:
        """Inclusion proof of ``leaf_index`` against the current signed tree head."""
        sth = self.current_sth()
        path = await self.tree.inclusion_proof(leaf_index, sth.tree_size)
        return pb.KtInclusion(leaf_index=leaf_index, tree_size=sth.tree_size, audit_path=path,
                              sth=sth)

    async def prove_binding(self, username: str, identity_key: bytes) -> pb.KtInclusion | None:
        await self._catch_up()
        current = await self._latest_binding(username)
        if current is not None and current[1] == identity_key:
            leaf: int | None = current[0]
        elif self.config.log_on_resolve:
            # None when the directory changed since the caller read it: no proof, rather
            # than logging a stale key as the name's newest binding.
            leaf = await self.log_directory_binding(username, identity_key)
        else:
            leaf = None
        return None if leaf is None else await self.inclusion(leaf)

    async def revocation(self, identity_key: bytes) -> tuple[int, str] | None:
        await self._catch_up()
        raw = await self.app.storage.kv_get(KV, _rev_key(identity_key))
        if raw is None:
            return None
        return _U64.unpack_from(raw)[0], raw[_U64.size:].decode("utf-8")

    async def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        size = self.tree.size
        if old_size > new_size:
            raise BadRequest(f"old_size {old_size} must not exceed new_size {new_size}")
        if new_size > size:
            raise BadRequest(f"new_size {new_size} is beyond the tree size {size}")
        return await self.tree.consistency_proof(old_size, new_size)

    async def audit(self, start: int, end: int) -> pb.AuditKeyTransparencyResponse:
        sth = self.current_sth()
        size = sth.tree_size
        if start > size:
            raise BadRequest(f"start {start} is beyond the tree size {size}")
        if end == 0:
            end = start + self.config.max_audit_page
        elif end < start:
            raise BadRequest(f"start {start} must not exceed end {end}")
        end = min(end, start + self.config.max_audit_page, size)
        entries = await self.tree.read_entries(start, end) if end > start else []
        return pb.AuditKeyTransparencyResponse(
            entries=[entry_pb(e) for e in entries], tree_size=size, sth=sth)


# -- RPC handlers (registered by the plugin's __init__) -------------------------------------


def service(app: App) -> KtLogService:
    svc: KtLogService = app.state[NAME]
    return svc


async def revoke_key(ctx: RpcContext, req: pb.RevokeKeyRequest) -> pb.RevokeKeyResponse:
    key = check_identity_key(req.identity_key)
    if req.reason not in REVOCATION_REASONS:
        raise BadRequest(f"reason must be one of {', '.join(REVOCATION_REASONS)}")
    ctx.require_self(key, "identity key")
    leaf = await service(ctx.app).revoke(key, req.reason)
    return pb.RevokeKeyResponse(leaf_index=leaf)


async def check_revocation(
    ctx: RpcContext, req: pb.CheckRevocationRequest
) -> pb.CheckRevocationResponse:
    key = check_identity_key(req.identity_key)
    svc = service(ctx.app)
    found = await svc.revocation(key)
    if found is None:
        return pb.CheckRevocationResponse(revoked=False)
    leaf, reason = found
    return pb.CheckRevocationResponse(revoked=True, reason=reason,
                                      inclusion=await svc.inclusion(leaf))


async def audit_log(
    ctx: RpcContext, req: pb.AuditKeyTransparencyRequest
) -> pb.AuditKeyTransparencyResponse:
    return await service(ctx.app).audit(req.start, req.end)


async def get_sth(
    ctx: RpcContext, req: pb.GetSignedTreeHeadRequest
) -> pb.GetSignedTreeHeadResponse:
    return pb.GetSignedTreeHeadResponse(sth=service(ctx.app).current_sth())


async def get_consistency_proof(
    ctx: RpcContext, req: pb.GetConsistencyProofRequest
) -> pb.GetConsistencyProofResponse:
    proof = await service(ctx.app).consistency(req.old_size, req.new_size)
    return pb.GetConsistencyProofResponse(proof=proof)
