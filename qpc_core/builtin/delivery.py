"""Built-in plugin ``delivery``: store-and-forward of opaque ciphertext (methods 200-205).

Semantics (REFERENCE §5, decisions in docs/protocol.md):

* inbox = (recipient identity key, channel id); FIFO with a per-inbox u64 ``seq``;
* ``message_id`` (16 bytes) dedups within ``dedup_window_secs``;
* ``ttl_secs`` expiry, collected in the background every ``expiry_interval_secs``;
* only the identity bound to the connection may Fetch / FetchWait / Peek / Ack its inbox;
* an OK answer to Enqueue means the message is committed (group commit, see storage);
* after commit: waiters are woken, connected recipients get a NEW_MESSAGE push, and
  ``on_message_enqueued`` fires.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import nacl.bindings
from cryptography.hazmat.primitives import serialization

from qpc_core.errors import BadRequest, Forbidden, QuotaExceeded, TooLarge
from qpc_core.framing import PushEvent
from qpc_core.hookspecs import hookimpl
from qpc_core.identity import check_identity_key
from qpc_core.pb import common_pb2
from qpc_core.pb import delivery_pb2 as pb
from qpc_core.rpc import MessageEnqueued, MessagesFetched, RpcContext, RpcMethod
from qpc_core.storage.base import EnqueueOutcome, NewMessage, QueueFull, StoredMessage
from qpc_core.users import server_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from qpc_core.app import App

log = logging.getLogger("qpc.delivery")

ENQUEUE, FETCH, FETCH_WAIT, PEEK, ACK, BATCH_ENQUEUE = 200, 201, 202, 203, 204, 205
MAX_CHANNEL_ID = 64
MESSAGE_ID_LEN = 16
MAX_BATCH_RECIPIENTS = 1000
#: Optional rate-limit group counting only Enqueue/BatchEnqueue messages (per recipient);
#: applies when configured as ``[rate_limits.enqueue]``.
ENQUEUE_RATE_GROUP = "enqueue"
PROOF_CONTEXT = b"qpc-v1 delivery-proof\x00"
DUPLICATE_PROOF_CONTEXT = b"qpc-v1 duplicate-proof\x00"
#: Largest seq a store holds (signed 64-bit in SQLite and PostgreSQL); Ack clamps to it.
MAX_SEQ = 2**63 - 1
SIGNING_KEY_NAME = "delivery"
# Worst-case protobuf bytes around one payload in a FetchResponse: the repeated-field tag and
# length (1 + 5), the Envelope's seq (1 + 10) and data tag and length (1 + 5) = 23; round up.
ENVELOPE_OVERHEAD = 24
RESPONSE_SLACK = 64


def proof_digest(recipient_key: bytes, channel_id: bytes, seq: int, payload: bytes) -> bytes:
    """SHA-256 over the delivery-proof preimage (docs/protocol.md, "Delivery proof")."""
    return hashlib.sha256(
        PROOF_CONTEXT
        + recipient_key
        + struct.pack(">H", len(channel_id))
        + channel_id
        + struct.pack(">Q", seq)
        + hashlib.sha256(payload).digest()
    ).digest()


def duplicate_proof_digest(
    recipient_key: bytes, channel_id: bytes, seq: int, message_id: bytes
) -> bytes:
    """SHA-256 over the preimage of a duplicate's proof: the server vouches that this
    ``message_id`` was accepted under ``seq``, not for the retried payload, which it did not
    store (docs/protocol.md, "Delivery proof")."""
    return hashlib.sha256(
        DUPLICATE_PROOF_CONTEXT
        + recipient_key
        + struct.pack(">H", len(channel_id))
        + channel_id
        + struct.pack(">Q", seq)
        + message_id
    ).digest()


MAX_FETCH_HINTS = 100_000


class Waiter:
    """A FetchWait: its future and how much one response may carry.

    Registered (so Enqueues wake it) before it looks in the store; *parked* once that look
    found nothing.  Only a parked waiter is handed messages directly: one that is still
    looking may return stored messages, and messages handed to it would then have to be
    put back (an extra transaction each, and out of the FetchWait's answer)."""

    __slots__ = ("fut", "max_bytes", "max_count", "parked")

    def __init__(self, fut: asyncio.Future[list[StoredMessage]], max_count: int,
                 max_bytes: int) -> None:
        self.fut = fut
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.parked = False

    def park(self) -> None:
        self.parked = True


class Claim:
    """Enqueues (sharers) handing their messages to one claimed waiter."""

    __slots__ = ("count", "open", "restored", "settled", "sharers", "size", "taken", "waiter")

    def __init__(self, waiter: Waiter) -> None:
        self.waiter = waiter
        self.open = True
        self.restored = False  # the waiter left: the taken messages went back to the store
        self.count = 0  # messages offered (joined) so far
        self.size = 0
        self.sharers = 0
        self.taken: list[tuple[NewMessage, EnqueueOutcome]] = []
        self.settled: asyncio.Future[None] = waiter.fut.get_loop().create_future()


class Delivery:
    """Per-App delivery state: waiters, channel cache and the proof key."""

    def __init__(self, app: App, signing_key: Ed25519PrivateKey) -> None:
        self.app = app
        self.signing_key = signing_key
        # Same key, same (deterministic, RFC 8032) signatures; libsodium signs in about half
        # the time of the OpenSSL path, and a proof is signed per delivered message.
        seed = signing_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        # libsodium's secret key (seed + public key); the binding is called directly, without
        # the SigningKey wrapper's SignedMessage objects, once per Enqueue.
        self._sodium_sk = nacl.bindings.crypto_sign_seed_keypair(seed)[1]
        # Parked FetchWait calls per inbox.  A waiter's future resolves to the messages
        # Enqueues handed it directly, or to [] meaning "look in the store".
        self.waiters: dict[tuple[bytes, bytes], set[Waiter]] = {}
        # Inboxes whose waiter in-flight Enqueues have claimed (no push needed meanwhile).
        self.claims: dict[tuple[bytes, bytes], Claim] = {}
        # Inboxes of connected recipients that got messages stored since their last fetch:
        # their next fetch goes straight to the writer (no emptiness check on a reader).
        self.stored_since_fetch: set[tuple[bytes, bytes]] = set()
        self.channel_cache: dict[bytes, frozenset[bytes] | None] = {}
        # Bumped by every invalidation, so a lookup that was in flight meanwhile does not put
        # a member list back that the change it raced with made stale.
        self.channel_cache_gen = 0
        # Inboxes whose owner's connections (by id) were already told "new messages" and have
        # not fetched since: one NEW_MESSAGE push per inbox and connection until the next
        # Fetch/FetchWait/Peek.  A connection that appears later is told again.
        self.notified: dict[tuple[bytes, bytes], frozenset[int]] = {}
        # Only ask relay_enqueue when a plugin implements it (no await on the hot path).
        self.relays = bool(app.hooks.implementers("relay_enqueue"))

    # -- helpers ----------------------------------------------------------------------------------
    def proof(
        self, recipient: bytes, channel: bytes, out: EnqueueOutcome, payload: bytes, mid: bytes
    ) -> bytes:
        if out.duplicate:
            digest = duplicate_proof_digest(recipient, channel, out.seq, mid)
        else:
            digest = proof_digest(recipient, channel, out.seq, payload)
        return digest + nacl.bindings.crypto_sign(digest, self._sodium_sk)[:64]

    def forget_channels(self, channel: bytes | None = None) -> None:
        """Drop cached member lists (one channel, or all) after memberships changed."""
        self.channel_cache_gen += 1
        if channel is None:
            self.channel_cache.clear()
        else:
            self.channel_cache.pop(channel, None)

    async def check_channel(
        self, channel: bytes, sender: bytes, recipients: Sequence[bytes]
    ) -> None:
        if not channel:
            return
        if len(channel) > MAX_CHANNEL_ID:
            raise BadRequest(f"channel_id longer than {MAX_CHANNEL_ID} bytes")
        storage = self.app.storage
        # A shared store is read every time: another server may create the channel or
        # delete a member, so nothing of it is cached here.
        if storage.shared or channel not in self.channel_cache:
            gen = self.channel_cache_gen
            members = await storage.channel_members(channel)
            members_set = frozenset(members) if members is not None else None
            if not storage.shared and gen == self.channel_cache_gen:
                self.channel_cache[channel] = members_set
        else:
            members_set = self.channel_cache[channel]
        if members_set is None:
            return  # not a created channel: an application-level (e.g. MLS group) id
        if sender not in members_set:
            raise Forbidden("you are not a member of this channel")
        for r in recipients:
            if r not in members_set:
                raise Forbidden("recipient is not a member of this channel")

    def wake(self, recipient: bytes, channel: bytes) -> None:
        waiting = self.waiters.pop((recipient, channel), None)
        if waiting:
            for w in waiting:
                if not w.fut.done():
                    w.fut.set_result([])

    def join_claim(self, key: tuple[bytes, bytes], size: int) -> Claim | None:
        """Join (or open) the claim on a parked waiter of ``key`` for one message of ``size``
        bytes if that waiter can still take it; None means: store the message as usual."""
        c = self.claims.get(key)
        if c is None:
            waiting = self.waiters.get(key)
            if not waiting:
                return None
            for w in waiting:
                if w.parked and not w.fut.done():
                    break
            else:
                return None  # still looking in the store: store the message and wake it
            waiting.discard(w)
            if not waiting:
                del self.waiters[key]
            c = self.claims[key] = Claim(w)
        size += ENVELOPE_OVERHEAD  # as the stores count it (fetch_caps)
        if not c.open or c.count >= c.waiter.max_count or c.size + size > c.waiter.max_bytes:
            c.open = False  # FIFO: nothing after a stored message may be handed over
            return None
        c.count += 1
        c.size += size
        c.sharers += 1
        return c

    async def leave_claim(self, key: tuple[bytes, bytes], c: Claim) -> None:
        """One Enqueue is done with claim ``c``; the last one settles it.  Every sharer waits
        for that, so no Enqueue answers OK before its message was handed to a live waiter or
        put back into the store."""
        c.open = False  # arrivals after the first commit are stored (bounded wait for all)
        c.sharers -= 1
        if c.sharers == 0:
            if self.claims.get(key) is c:
                del self.claims[key]
            try:
                if c.waiter.fut.done():  # the waiter left: keep its messages after all
                    if c.taken:
                        await self._put_back(c.taken)
                        c.restored = True  # now stored: wake/notify as for stored ones
                else:
                    c.waiter.fut.set_result(
                        sorted((StoredMessage(o.seq, m.payload) for m, o in c.taken),
                               key=lambda x: x.seq)
                    )
            except BaseException as e:
                c.settled.set_exception(e)
                c.settled.exception()  # sharers see it when they await; never "unretrieved"
                raise
            else:
                c.settled.set_result(None)
        else:
            await asyncio.shield(c.settled)

    async def _put_back(self, taken: list[tuple[NewMessage, EnqueueOutcome]]) -> None:
        """Store messages a departed FetchWait was handed.  If that fails, their Enqueues
        answer with the error, and the dedup records the hand-off committed are removed
        first: otherwise a retry would be answered "duplicate" for a message never kept."""
        st = self.app.storage
        try:
            await st.restore(taken)
        except Exception:
            try:
                await st.forget_taken(taken)
            except Exception:
                log.exception(
                    "could not put back %d handed-over message(s) nor forget their message "
                    "ids: a retry of these ids is answered as a duplicate, but the messages "
                    "were not stored", len(taken),
                )
            raise

    def wake_all(self) -> None:
        """Draining: end every long poll now (they answer with what is queued)."""
        for key in list(self.waiters):
            self.wake(*key)

    def validate_common(self, payload: bytes, message_id: bytes) -> None:
        s = self.app.settings
        if not payload:
            raise BadRequest("payload must not be empty")
        limit = self.max_message()
        if len(payload) > limit:
            raise TooLarge(
                f"payload of {len(payload)} bytes exceeds the limit of {limit} bytes "
                f"(max_message_bytes={s.max_message_bytes})"
            )
        if message_id and len(message_id) != MESSAGE_ID_LEN:
            raise BadRequest("message_id must be empty or exactly 16 bytes")

    async def store(
        self, sender: bytes, messages: list[NewMessage], *, relay: bool = True
    ) -> list[EnqueueOutcome]:
        """Deliver ``messages`` (all already checked): those another server hosts through the
        ``relay_enqueue`` hook (unless ``relay`` is false: messages that arrived over
        federation), the others with :meth:`store_here`.  Public API for plugins."""
        if relay and self.relays:
            routed = await self.app.hooks.relay_enqueue(self.app, sender, messages)
            if routed is not None:
                here = [m for m, r in zip(messages, routed, strict=True) if r is None]
                stored = iter(await self.store_here(sender, here) if here else ())
                return [r if r is not None else next(stored) for r in routed]
        return await self.store_here(sender, messages)

    async def store_here(
        self, sender: bytes, messages: list[NewMessage]
    ) -> list[EnqueueOutcome]:
        """Commit ``messages`` on this server; then deliver, wake or notify.

        Hot path: when a FetchWait is parked on an empty inbox, the message is handed to it
        in the enqueue transaction itself (storage ``take``): one commit instead of an insert,
        a wake-up, a read and a deleting fetch.  Enqueues to that inbox arriving before the
        first of them commits share the claim, so a pipelining sender's burst reaches the
        waiter in one response.  If the waiter is gone by then, the messages are put back
        (``restore``) before any of those Enqueues answers: an acknowledged message is always
        either handed to a live FetchWait or stored.
        """
        s = self.app.settings
        joined: dict[tuple[bytes, bytes], Claim] = {}
        for msg in messages:
            key = (msg.recipient_key, msg.channel_id)
            if key not in joined:
                c = self.join_claim(key, len(msg.payload))
                if c is not None:
                    joined[key] = c
        outcomes: list[EnqueueOutcome] = []
        try:
            outcomes = await self.app.storage.enqueue(
                messages,
                max_depth=s.max_queue_depth,
                dedup_since=time.time() - s.dedup_window_secs,
                take=joined.keys(),
            )
            for msg, out in zip(messages, outcomes, strict=True):
                if out.taken:
                    joined[(msg.recipient_key, msg.channel_id)].taken.append((msg, out))
        except QueueFull as e:
            raise QuotaExceeded(
                f"recipient queue is full ({e.depth} messages; max_queue_depth="
                f"{s.max_queue_depth})",
                retry_after=60.0,
            ) from None
        finally:
            for key, c in joined.items():
                await self.leave_claim(key, c)
        app = self.app
        for msg, out in zip(messages, outcomes, strict=True):
            app.hooks.on_message_enqueued(
                app,
                MessageEnqueued(
                    msg.recipient_key,
                    msg.channel_id,
                    out.seq,
                    len(msg.payload),
                    sender,
                    out.duplicate,
                ),
            )
            if out.duplicate or (
                out.taken and not joined[(msg.recipient_key, msg.channel_id)].restored
            ):
                continue
            self.announce((msg.recipient_key, msg.channel_id), out.seq)
        return outcomes

    def announce(self, key: tuple[bytes, bytes], seq: int) -> None:
        """A message was stored for ``key`` (inbox) under ``seq``: wake its long poll, or
        push NEW_MESSAGE to its owner's connections (once until their next fetch)."""
        app = self.app
        recipient = key[0]
        if recipient in app.by_identity:
            hints = self.stored_since_fetch
            if len(hints) >= MAX_FETCH_HINTS:  # only a hint: bounded by clearing
                hints.clear()
            hints.add(key)
        if key in self.waiters:
            self.wake(*key)  # a long poll is already waiting: it will deliver, no push
            return
        if key in self.claims:
            return  # that FetchWait answers now; its client comes back for the rest
        conns = app.by_identity.get(recipient)
        if not conns:
            self.notified.pop(key, None)
            return
        ids = frozenset(c.connection_id for c in conns)
        if not ids <= self.notified.get(key, frozenset()):
            if len(self.notified) >= MAX_FETCH_HINTS:
                # Senders choose channel ids freely: bounded by clearing (worst case a
                # recipient gets a second NEW_MESSAGE for an inbox it was already told of).
                self.notified.clear()
            self.notified[key] = ids
            event = common_pb2.NewMessageEvent(
                recipient_key=recipient, channel_id=key[1], seq=seq
            ).SerializeToString()
            app.push(recipient, PushEvent.NEW_MESSAGE, event)

    def arrived_elsewhere(self, key: tuple[bytes, bytes] | None, seq: int) -> None:
        """Storage callback: another server stored messages for ``key`` (None: arrivals
        may have been missed, so every long poll looks in the store again)."""
        if key is None:
            self.wake_all()
        else:
            self.announce(key, seq)

    def expires_at(self, ttl_secs: int) -> float | None:
        return time.time() + ttl_secs if ttl_secs else None

    def fetch_caps(self, limit: int) -> tuple[int, int]:
        """(message limit, byte budget) so that the encoded FetchResponse always fits in one
        frame: the payloads plus ENVELOPE_OVERHEAD per message stay within the budget (the
        stores and the hand-off count it per message actually returned)."""
        max_payload = self.app.settings.max_payload_bytes
        cap_n = max(1, (max_payload // 2) // ENVELOPE_OVERHEAD)
        n = min(limit, cap_n) if limit else cap_n
        return n, max_payload - RESPONSE_SLACK

    def max_message(self) -> int:
        """Largest payload that can still be delivered in one FetchResponse."""
        s = self.app.settings
        return min(s.max_message_bytes, s.max_payload_bytes - RESPONSE_SLACK - ENVELOPE_OVERHEAD)

    def envelopes(self, msgs: list[StoredMessage]) -> pb.FetchResponse:
        return pb.FetchResponse(messages=[pb.Envelope(seq=m.seq, data=m.payload) for m in msgs])

    # -- handlers ---------------------------------------------------------------------------------
    async def enqueue(self, ctx: RpcContext, req: pb.EnqueueRequest) -> pb.EnqueueResponse:
        sender = ctx.require_identity()
        recipient = check_identity_key(req.recipient_key, "recipient_key")
        self.validate_common(req.payload, req.message_id)
        await self.check_channel(req.channel_id, sender, (recipient,))
        ctx.charge(1, "enqueues", group=ENQUEUE_RATE_GROUP)
        msg = NewMessage(
            recipient,
            req.channel_id,
            req.payload,
            req.message_id,
            self.expires_at(req.ttl_secs),
            sender,
        )
        (out,) = await self.store(sender, [msg])
        return pb.EnqueueResponse(
            seq=out.seq,
            duplicate=out.duplicate,
            delivery_proof=self.proof(recipient, req.channel_id, out, req.payload, req.message_id),
        )

    async def batch_enqueue(
        self, ctx: RpcContext, req: pb.BatchEnqueueRequest
    ) -> pb.BatchEnqueueResponse:
        sender = ctx.require_identity()
        recipients = list(req.recipient_keys)
        if not recipients:
            raise BadRequest("recipient_keys must not be empty")
        if len(recipients) > MAX_BATCH_RECIPIENTS:
            raise TooLarge(f"at most {MAX_BATCH_RECIPIENTS} recipients per BatchEnqueue")
        for r in recipients:
            check_identity_key(r, "recipient_keys[]")
        if len(set(recipients)) != len(recipients):
            raise BadRequest("recipient_keys contains duplicates")
        self.validate_common(req.payload, req.message_id)
        await self.check_channel(req.channel_id, sender, recipients)
        # Rate limits count messages: one per recipient (delivery group, and the optional
        # enqueue-only group).
        ctx.charge(len(recipients) - 1, "enqueues")
        ctx.charge(len(recipients), "enqueues", group=ENQUEUE_RATE_GROUP)
        exp = self.expires_at(req.ttl_secs)
        msgs = [
            NewMessage(r, req.channel_id, req.payload, req.message_id, exp, sender)
            for r in recipients
        ]
        outs = await self.store(sender, msgs)
        return pb.BatchEnqueueResponse(
            results=[
                pb.EnqueueResponse(
                    seq=o.seq,
                    duplicate=o.duplicate,
                    delivery_proof=self.proof(r, req.channel_id, o, req.payload, req.message_id),
                )
                for r, o in zip(recipients, outs, strict=True)
            ]
        )

    def _inbox(self, ctx: RpcContext, req: pb.FetchRequest | pb.AckRequest) -> tuple[bytes, bytes]:
        recipient = check_identity_key(req.recipient_key, "recipient_key")
        ctx.require_self(recipient)
        if len(req.channel_id) > MAX_CHANNEL_ID:
            raise BadRequest(f"channel_id longer than {MAX_CHANNEL_ID} bytes")
        return recipient, req.channel_id

    async def _take(
        self, recipient: bytes, channel: bytes, limit: int, remove: bool
    ) -> list[StoredMessage]:
        st = self.app.storage
        key = (recipient, channel)
        # Forget the push before reading, so a message stored during the read is pushed.
        self.notified.pop(key, None)
        now = time.time()
        n, cap = self.fetch_caps(limit)
        if remove:
            stored = key in self.stored_since_fetch
            self.stored_since_fetch.discard(key)
            return await st.fetch(recipient, channel, n, now=now, max_bytes=cap,
                                  likely_nonempty=stored, per_message=ENVELOPE_OVERHEAD)
        return await st.peek(recipient, channel, n, now=now, max_bytes=cap,
                             per_message=ENVELOPE_OVERHEAD)

    def _fetched(
        self, recipient: bytes, channel: bytes, msgs: list[StoredMessage], how: str
    ) -> None:
        if msgs or how == "fetch_wait":
            self.app.hooks.on_message_fetched(
                self.app,
                MessagesFetched(
                    recipient, channel, len(msgs), sum(len(m.payload) for m in msgs), how
                ),
            )

    async def fetch(self, ctx: RpcContext, req: pb.FetchRequest) -> pb.FetchResponse:
        recipient, channel = self._inbox(ctx, req)
        msgs = await self._take(recipient, channel, req.limit, True)
        self._fetched(recipient, channel, msgs, "fetch")
        return self.envelopes(msgs)

    async def peek(self, ctx: RpcContext, req: pb.FetchRequest) -> pb.FetchResponse:
        recipient, channel = self._inbox(ctx, req)
        msgs = await self._take(recipient, channel, req.limit, False)
        self._fetched(recipient, channel, msgs, "peek")
        return self.envelopes(msgs)

    async def fetch_wait(self, ctx: RpcContext, req: pb.FetchRequest) -> pb.FetchResponse:
        recipient, channel = self._inbox(ctx, req)
        timeout = min(req.timeout_ms, self.app.settings.max_fetch_wait_ms) / 1000.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = (recipient, channel)
        max_count, max_bytes = self.fetch_caps(req.limit)
        while True:
            # Register before looking so an Enqueue between the two cannot be missed.
            w = Waiter(loop.create_future(), max_count, max_bytes)
            self.waiters.setdefault(key, set()).add(w)
            try:
                msgs = await self._take(recipient, channel, req.limit, True)
                remaining = deadline - loop.time()
                if msgs or remaining <= 0 or self.app.draining:
                    break
                w.park()
                try:
                    msgs = await asyncio.wait_for(w.fut, remaining)
                except TimeoutError:
                    msgs = await self._take(recipient, channel, req.limit, True)
                    break
                if msgs:  # handed over by Enqueues: already out of the store
                    self.notified.pop(key, None)
                    break
            finally:
                waiting = self.waiters.get(key)
                if waiting is not None:
                    waiting.discard(w)
                    if not waiting:
                        del self.waiters[key]
                # Enqueues that claimed this waiter and find it done put their messages
                # back into the store, so nothing handed to a departed waiter is lost.
                if not w.fut.done():
                    w.fut.cancel()
        self._fetched(recipient, channel, msgs, "fetch_wait")
        return self.envelopes(msgs)

    async def ack(self, ctx: RpcContext, req: pb.AckRequest) -> pb.AckResponse:
        recipient, channel = self._inbox(ctx, req)
        # seq_up_to is a u64; seqs never pass MAX_SEQ, so anything above it means "all".
        removed = await self.app.storage.ack(recipient, channel, min(req.seq_up_to, MAX_SEQ))
        return pb.AckResponse(removed=removed)

    # -- background -------------------------------------------------------------------------------
    async def collector(self) -> None:
        """Garbage-collect expired messages, stale dedup ids and expired sessions."""
        s = self.app.settings
        while True:
            await asyncio.sleep(s.expiry_interval_secs)
            await self.collect_once()

    async def collect_once(self) -> int:
        st = self.app.storage
        now = time.time()
        try:
            n = await st.purge_expired(now)
            await st.purge_dedup(now - self.app.settings.dedup_window_secs)
            await st.purge_sessions(now)
        except Exception:
            log.exception("expiry collection failed")
            return 0
        if n:
            log.debug("collected %d expired messages", n)
        return n


def get(app: App) -> Delivery:
    delivery: Delivery = app.state["delivery"]
    return delivery


@hookimpl
async def startup(app: App) -> None:
    key = await server_key(app, SIGNING_KEY_NAME)
    d = app.state["delivery"] = Delivery(app, key)
    app.add_drain_callback(d.wake_all)
    app.storage.add_arrival_callback(d.arrived_elsewhere)
    app.spawn(d.collector(), "delivery-expiry-collector")


@hookimpl
async def on_account_deleted(app: App, identity_key: bytes, username: str | None) -> None:
    app.state["delivery"].forget_channels()


def _bind(app: App, name: str):  # type: ignore[no-untyped-def]
    async def handler(ctx: RpcContext, req):  # type: ignore[no-untyped-def]
        return await getattr(get(ctx.app), name)(ctx, req)

    return handler


@hookimpl
def register_rpc_methods(app: App) -> list[RpcMethod]:
    return [
        RpcMethod(ENQUEUE, "Enqueue", pb.EnqueueRequest, _bind(app, "enqueue"), group="delivery"),
        RpcMethod(FETCH, "Fetch", pb.FetchRequest, _bind(app, "fetch"), group="delivery"),
        # A long poll: stopped when its client goes away, so a departed waiter is never
        # handed messages (a waiter that is gone makes the Enqueue put them back).
        RpcMethod(
            FETCH_WAIT, "FetchWait", pb.FetchRequest, _bind(app, "fetch_wait"), group="delivery",
            cancel_on_disconnect=True,
        ),
        RpcMethod(PEEK, "Peek", pb.FetchRequest, _bind(app, "peek"), group="delivery"),
        RpcMethod(ACK, "Ack", pb.AckRequest, _bind(app, "ack"), group="delivery"),
        RpcMethod(
            BATCH_ENQUEUE,
            "BatchEnqueue",
            pb.BatchEnqueueRequest,
            _bind(app, "batch_enqueue"),
            group="delivery",
        ),
    ]
