"""Server side of the key-transparency log: appends, indexes, signed tree heads, RPCs.

State, all in the store (so every server sharing a PostgreSQL store runs the same log):
    * the Merkle tree: storage log ``kt_log`` (:class:`~qpc_kt_log.store.KtTreeStore`);
    * derived indexes in kv namespace ``kt_log``:

      ==================  =========================================================
      ``n:<username>``    u64 leaf index || identity key   (newest binding of a name)
      ``k:<key>``         u64 leaf index || username       (newest binding of a key)
      ``r:<key>``         u64 leaf index || reason         (the key's revocation)
      ``m:indexed``       u64: entries ``< this`` are reflected in the indexes
      ==================  =========================================================

    * the signed tree heads handed out: storage log ``kt_log.sth`` (serialized
      ``SignedTreeHead``, newest last), so heads never go back in size or time, whichever
      server signed them and across restarts.

An append writes its entries and their index rows (and ``m:indexed``) in one transaction,
and only if the log still has the size the entries were built for
(``log_append(expected_first=, kv_puts=)``).  Another server may have appended meanwhile;
then nothing was written, and the whole operation runs again on the refreshed log, its
checks included (already revoked? already bound?).  So two servers never log the same
revocation twice, and the indexes always describe exactly the log they were committed with.
Within one process appends are serialised by an :class:`asyncio.Lock`.

Indexes behind ``m:indexed`` exist only in logs written by earlier qpc versions (which wrote
the rows after the entries): start-up re-reads the entries after it and rewrites their rows,
each page only if the log has not moved meanwhile.

Every head handed out is the newest stored head or a newer one, so a client never sees a
smaller or older head from one server than it saw from another.  On a shared store a head
request or audit page first takes in what other servers appended (one ``log_size`` read,
more only when it grew); a proof uses the newest stored head when it covers the leaf.

Cancelling a task that is appending (a client resetting its stream) does not release the
lock early: the queued write is waited for first (see
:func:`~qpc_kt_log.store.finish_despite_cancellation`).

A binding is appended from a hook (registration, or ``log_on_resolve`` backfill) only if the
directory, re-read under the lock, still maps the name to that key: a stale directory read
must not log a deleted key as the name's newest binding.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qpc_core.errors import BadRequest, Conflict, NotFound, StorageError, Unavailable
from qpc_core.identity import check_identity_key, public_bytes
from qpc_core.pb import directory_pb2 as pb
from qpc_core.rpc import RpcContext
from qpc_core.storage.base import LogMoved
from qpc_core.users import resolve_identity
from qpc_kt_log.config import KtLogConfig
from qpc_kt_log.records import (
    KIND_BINDING,
    REVOCATION_REASONS,
    LeafRecord,
    sth_signed_bytes,
)
from qpc_kt_log.store import KtTreeStore, StoredEntry

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.kt_log")

NAME = "kt_log"
KV = "kt_log"
INDEXED = b"m:indexed"
STH_LOG = "kt_log.sth"
FUTURE_HEAD_WARN_MS = 60_000  # a newest head dated this far ahead: a clock jumped
HEAD_PAGE = 64  # heads read at once when looking for the newest (usually one or two)
LOG_LOCK = "kt_log.append"
#: Tries of one append (or head) when other servers keep appending first.
APPEND_ATTEMPTS = 8
REINDEX_PAGE = 2000
_U64 = struct.Struct(">Q")
T = TypeVar("T")


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


@dataclass(slots=True)
class KtStats:
    """Counters for the metrics (since start)."""

    appended: int = 0  # leaves this server appended
    conflicts: int = 0  # appends refused because another server appended first
    head_store_failures: int = 0  # new heads the store refused (the stored one was served)


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
        # Other servers may append to the same log (a shared PostgreSQL store): reads then
        # look at the stored size first.  Set from the storage; tests may set it.
        self.shared = app.storage.shared
        self._head: pb.SignedTreeHead | None = None  # newest entry of STH_LOG
        self._head_next = 0  # STH_LOG's size when _head was read
        self._future_warned_at = -3600.0
        self.stats = KtStats()
        self._refused: str | None = None
        self.clock: Callable[[], float] = time.time  # unix seconds; replaceable in tests

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        async with self.app.storage.exclusive(LOG_LOCK), self._lock:
            await self.tree.load()
            self._indexed = await self._stored_indexed()
            await self._reindex_locked()
        await self._read_head()
        sth = await self.sth()
        log.info("kt_log: %d leaves, root %s", sth.tree_size, sth.root_hash.hex())

    async def _stored_indexed(self) -> int:
        """How many of the entries this process holds the stored indexes cover."""
        raw = await self.app.storage.kv_get(KV, INDEXED)
        indexed: int = _U64.unpack(raw)[0] if raw else 0
        if indexed > self.tree.size:
            # Another server may have appended since this process read the log.
            size = await self.app.storage.log_size(self.tree.log_name)
            if size < indexed:
                raise self._refuse(
                    f"kt_log: the indexes cover {indexed} entries but the log holds only "
                    f"{size}: the log was truncated or replaced")
            return self.tree.size
        return indexed

    async def _refresh_locked(self) -> None:
        """Take in what other servers appended, and make sure the indexes cover it."""
        await self.tree.refresh()
        if self._indexed < self.tree.size:  # also when an earlier call stopped half-way
            self._indexed = max(self._indexed, await self._stored_indexed())
        await self._reindex_locked()

    async def sync(self) -> None:
        """Take in what other servers appended before this call: on a shared store one
        ``log_size`` read when nothing was.  Elsewhere this process is the only writer, and
        this reads nothing unless an append's outcome is unknown (reload)."""
        tree = self.tree
        if not tree.stale and self._indexed >= tree.size and (
                not self.shared or await self.app.storage.log_size(tree.log_name) <= tree.size):
            return
        async with self._lock:
            await self._refresh_locked()

    async def _reindex_locked(self) -> None:
        """Rewrite the index rows of entries an earlier version appended without them."""
        while self._indexed < self.tree.size:
            size = self.tree.size
            log.warning("kt_log: indexing entries %d..%d (written without their index rows)",
                        self._indexed, size - 1)
            try:
                start = self._indexed
                while start < size:
                    end = min(size, start + REINDEX_PAGE)
                    entries = await self.tree.read_entries(start, end)
                    await self.tree.write_rows_if_unmoved(
                        self._index_rows(start, [e.record for e in entries]))
                    self._indexed = start = end
            except LogMoved:
                # Another server appended (with its rows, after indexing what it found):
                # take in its entries and what the stored indexes now cover, and go on from
                # there, never rewriting older rows over its newer ones.
                await self.tree.refresh()
                self._indexed = max(self._indexed, await self._stored_indexed())

    def _index_rows(self, first: int, records: Sequence[LeafRecord]
                    ) -> list[tuple[str, bytes, bytes]]:
        """The index rows of ``records`` (leaves from ``first``), then ``m:indexed``."""
        items: dict[bytes, bytes] = {}
        for index, r in enumerate(records, first):
            leaf = _U64.pack(index)
            if r.kind == KIND_BINDING:
                items[_name_key(r.username)] = leaf + r.identity_key
                items[_key_key(r.identity_key)] = leaf + r.username.encode("utf-8")
            else:
                items[_rev_key(r.identity_key)] = leaf + r.reason.encode("utf-8")
        items[INDEXED] = _U64.pack(first + len(records))
        return [(KV, k, v) for k, v in items.items()]

    async def _append_locked(self, records: Sequence[LeafRecord]) -> range:
        """Append ``records`` with their index rows (LogMoved: nothing written)."""
        before = self.tree.size
        try:
            rng = await self.tree.append(
                records, rows=lambda first: self._index_rows(first, records))
        except asyncio.CancelledError:
            # The caller went away; the write finished first and, if the store adopted it,
            # its rows committed with it.
            if not self.tree.stale and self.tree.size == before + len(records):
                self._indexed = self.tree.size
                self.stats.appended += len(records)
            raise
        self._indexed = rng.stop
        self.stats.appended += len(records)
        return rng

    async def _appending(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` (checks, then one ``_append_locked``) under the lock, again on the
        refreshed log each time another server appended first (bounded)."""
        # The store's exclusive section keeps other servers' appends out while this one
        # checks and writes (expected_first alone is what keeps the log correct).  It is
        # taken first: waiting for another server's append must not hold this process's
        # lock, which head requests need (lock order: exclusive, then _lock).
        async with self.app.storage.exclusive(LOG_LOCK), self._lock:
            for _attempt in range(APPEND_ATTEMPTS):
                self._check_not_refused()
                if self.shared:
                    await self._refresh_locked()
                else:
                    await self._ready_locked()
                try:
                    return await op()
                except LogMoved as e:
                    self.stats.conflicts += 1
                    log.info("kt_log: %s; checking again on the grown log", e)
            raise Unavailable("the key-transparency log is busy (other servers kept appending "
                              "first): retry")

    async def _ready_locked(self) -> None:
        await self.tree.ensure_current()
        await self._reindex_locked()

    # -- signed tree heads -------------------------------------------------------------------
    async def _read_head(self) -> tuple[pb.SignedTreeHead | None, int]:
        """Read the newest stored head and STH_LOG's size (remembered too, unless a newer
        one is known): one query (the heads from the last one known on), two when nothing
        is known yet or many were stored since."""
        storage, known = self.app.storage, self._head_next
        read: tuple[pb.SignedTreeHead | None, int] | None = None
        if known:
            raw = await storage.log_read(STH_LOG, known - 1, known - 1 + HEAD_PAGE)
            if 0 < len(raw) < HEAD_PAGE:
                read = pb.SignedTreeHead.FromString(raw[-1]), known - 1 + len(raw)
        if read is None:
            size = await storage.log_size(STH_LOG)
            if size < known:
                raise self._refuse(f"kt_log: the stored signed heads went from {known} to "
                                   f"{size}: they were truncated or replaced")
            raw = await storage.log_read(STH_LOG, size - 1, size) if size else []
            read = (pb.SignedTreeHead.FromString(raw[0]) if raw else None), size
        self._set_head(*read)
        return read

    def _set_head(self, head: pb.SignedTreeHead | None, next_index: int) -> None:
        """Remember ``head`` as STH_LOG's entry ``next_index - 1`` unless a newer one is
        already known (concurrent readers and signers within this process)."""
        if next_index >= self._head_next:
            self._head, self._head_next = head, next_index

    def _current(self, head: pb.SignedTreeHead | None) -> bool:
        """``head`` is of the tree this process holds, and fresh enough to hand out."""
        return (head is not None and not self.tree.stale and head.tree_size == self.tree.size
                and head.root_hash == self.tree.root()
                and self.clock() - head.timestamp_ms / 1000 <= self.config.sth_max_age_secs)

    async def sth(self, *, covering: int | None = None) -> pb.SignedTreeHead:
        """A signed head of the whole committed tree (``covering=None``), or the newest
        stored head if it includes leaf ``covering`` (for a proof; on a shared store this
        spares the reads that look for other servers' appends).  Signed again when the tree
        grew or the newest head is older than ``sth_max_age_secs``; each head is stored
        before it is handed out, with a timestamp no older than the previous one's, so
        heads never go back in size or time.  Never signs a tree that does not extend the
        newest stored head.  Do not mutate the result."""
        self._check_not_refused()
        if covering is None:
            await self.sync()
        if self.shared:
            await self._read_head()
        head = self._head
        if head is not None and self._current(head) and (
                covering is None or covering < head.tree_size):
            return head
        if covering is not None:
            await self.sync()
        # Signing: under the append lock, so the size, the root and the newest stored head
        # this decides on cannot change while it reads (one signer per process at a time).
        async with self._lock:
            for _attempt in range(APPEND_ATTEMPTS):
                self._check_not_refused()
                if self.shared:
                    # The head first, kept here (other requests may read newer ones into
                    # self._head meanwhile): the tree read next then covers it.
                    head, at = await self._read_head()
                    await self._refresh_locked()
                else:
                    await self._ready_locked()  # reload if an append's outcome is unknown
                    head, at = self._head, self._head_next
                size, root = self.tree.size, self.tree.root()
                if head is not None:
                    if head.tree_size > size:
                        raise self._refuse(
                            f"kt_log: a head was signed for {head.tree_size} leaves but the "
                            f"stored log holds {size}: it was truncated or replaced")
                    at_head = (root if head.tree_size == size
                               else await self.tree.root_at(head.tree_size))
                    if head.root_hash != at_head:
                        raise self._refuse(
                            f"kt_log: the stored head of size {head.tree_size} has another root "
                            "than the stored log at that size: the log was rewritten")
                    if self._current(head):
                        if self._head_next > at:
                            continue  # a newer head was read meanwhile: hand out no older
                        return head
                now_ms = int(self.clock() * 1000)
                ts = now_ms
                if head is not None and head.timestamp_ms > now_ms:
                    ts = head.timestamp_ms  # never back in time
                    if head.timestamp_ms - now_ms > FUTURE_HEAD_WARN_MS:  # not mere skew
                        self._warn_future_head(head.timestamp_ms - now_ms)
                new = pb.SignedTreeHead(
                    tree_size=size, root_hash=root, timestamp_ms=ts, public_key=self.public_key,
                    signature=self._signing_key.sign(sth_signed_bytes(size, root, ts)))
                try:
                    await self.app.storage.log_append(
                        STH_LOG, [new.SerializeToString()], expected_first=at)
                except LogMoved:
                    await self._read_head()  # another server stored one first
                    continue
                except Exception:
                    if head is None:
                        raise
                    if self._head_next > at:
                        continue  # a newer stored head was read meanwhile: decide again
                    # The store cannot take a new head: hand out the newest stored one (it
                    # is the newest any client can have seen), older or smaller as it is.
                    self.stats.head_store_failures += 1
                    log.exception("kt_log: storing a new signed head failed; serving the "
                                  "stored head of size %d", head.tree_size)
                    return head
                self._set_head(new, at + 1)
                return new
        raise Unavailable("the key-transparency log is busy (other servers kept signing "
                          "heads first): retry")

    def _refuse(self, reason: str) -> StorageError:
        """The stored log or heads contradict what was handed out: say so loudly, keep it
        (``refused``, the ``kt_log_refused`` metric), and return the error to raise."""
        if self._refused is None:
            log.critical("%s", reason)
        self._refused = reason
        return StorageError(reason)

    def _check_not_refused(self) -> None:
        """Once refused, the log takes no appends and hands out no heads (until a restart,
        which checks the store again)."""
        reason = self.refused
        if reason is not None:
            raise StorageError(reason)

    @property
    def refused(self) -> str | None:
        """Why this server refuses the stored log (rewritten, truncated), or None."""
        return self.tree.broken or self._refused

    @property
    def head(self) -> pb.SignedTreeHead | None:
        """The newest stored head this server knows (not read from the store)."""
        return self._head

    def _warn_future_head(self, ahead_ms: int) -> None:
        now = time.monotonic()
        if now - self._future_warned_at >= 3600:
            self._future_warned_at = now
            log.error(
                "kt_log: the newest signed head is dated %.0f s ahead of this server's clock "
                "(a clock that jumped forward, here or on another server sharing the store); "
                "new heads keep that time until the clock catches up, and until then "
                "clients checking the age of heads cannot tell a stale head from a fresh "
                "one", ahead_ms / 1000)

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

        async def op() -> int | None:
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

        return await self._appending(op)

    async def revoke(self, identity_key: bytes, reason: str) -> int:
        """Append a revocation leaf; return its index.  ``CONFLICT`` when already revoked,
        ``NOT_FOUND`` when the key was never bound (in the log or the directory)."""
        if reason not in REVOCATION_REASONS:
            raise BadRequest(f"reason must be one of {', '.join(REVOCATION_REASONS)}")
        check_identity_key(identity_key)
        storage = self.app.storage

        async def op() -> int:
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

        return await self._appending(op)

    # -- proofs ----------------------------------------------------------------------------
    async def inclusion(self, leaf_index: int) -> pb.KtInclusion:
        """Inclusion proof of ``leaf_index`` against the newest signed tree head."""
        sth = await self.sth(covering=leaf_index)
        if leaf_index >= sth.tree_size:  # only when a new head could not be stored
            raise Unavailable("the key-transparency log cannot sign a head that covers this "
                              "leaf yet: retry")
        path = await self.tree.inclusion_proof(leaf_index, sth.tree_size)
        return pb.KtInclusion(leaf_index=leaf_index, tree_size=sth.tree_size, audit_path=path,
                              sth=sth)

    async def _indexes_ready(self) -> None:
        """Before reading the indexes.  On a shared store they are always those of the
        stored log (written with it), so nothing to do; here, reload if an append's outcome
        is unknown."""
        if not self.shared:
            await self.sync()

    async def prove_binding(self, username: str, identity_key: bytes) -> pb.KtInclusion | None:
        await self._indexes_ready()
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
        await self._indexes_ready()
        raw = await self.app.storage.kv_get(KV, _rev_key(identity_key))
        if raw is None:
            return None
        return _U64.unpack_from(raw)[0], raw[_U64.size:].decode("utf-8")

    async def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        if old_size > new_size:
            raise BadRequest(f"old_size {old_size} must not exceed new_size {new_size}")
        if new_size > self.tree.size:
            await self.sync()
        size = self.tree.size
        if new_size > size:
            raise BadRequest(f"new_size {new_size} is beyond the tree size {size}")
        return await self.tree.consistency_proof(old_size, new_size)

    async def audit(self, start: int, end: int) -> pb.AuditKeyTransparencyResponse:
        sth = await self.sth()
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
    return pb.GetSignedTreeHeadResponse(sth=await service(ctx.app).sth())


async def get_consistency_proof(
    ctx: RpcContext, req: pb.GetConsistencyProofRequest
) -> pb.GetConsistencyProofResponse:
    proof = await service(ctx.app).consistency(req.old_size, req.new_size)
    return pb.GetConsistencyProofResponse(proof=proof)
