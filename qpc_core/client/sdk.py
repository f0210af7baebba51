"""The async Python client SDK.

    async with await QpcClient.connect("127.0.0.1", 7000, ca_cert="data/ca-cert.pem",
                                       token="devtoken", identity=key) as c:
        print(await c.health())
        await c.enqueue(peer_key, b"ciphertext")

``connect`` runs the connection auth handshake when a token is given and, when an identity
key is given, proves it (AuthChallenge + ProveIdentity) unless the token already bound one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError, Message

from qpc_core.errors import Internal, RpcError, error_for_status
from qpc_core.framing import (
    MAX_PAYLOAD,
    FrameError,
    PushDecoder,
    PushFrame,
    ResponseDecoder,
    ResponseFrame,
    Status,
    encode_auth_request,
    encode_request,
)
from qpc_core.identity import (
    certificate_binding,
    prove_identity_message,
    public_bytes,
    verify_signature,
)
from qpc_core.pb import common_pb2, delivery_pb2, directory_pb2, keys_pb2
from qpc_core.transport.backend import (
    Backend,
    DatagramDrain,
    TurnBatching,
    load_backend,
    peer_certificate_der,
)

M = TypeVar("M", bound=Message)

ALPN = "qpc"
#: Pushes kept for the application to read; beyond this the oldest are dropped (they are
#: hints: the messages themselves stay in the server's store).
MAX_QUEUED_PUSHES = 1024
#: Longest raw (unframed) reply accepted: the connection auth handshake's answer is a few
#: bytes; a server sending more is broken or hostile.
MAX_RAW_REPLY = MAX_PAYLOAD + 16


class ConnectionLost(RpcError):
    """The QUIC connection ended before the answer arrived."""

    status = Status.UNAVAILABLE


class ProofError(Exception):
    """A delivery proof did not verify against the pinned server key."""


if TYPE_CHECKING:
    _ProtocolBase = QuicConnectionProtocol
else:
    _ProtocolBase = object


class _ClientLogic(TurnBatching, _ProtocolBase):
    """The client side of one connection, written against the asyncio protocol API that
    aioquic and qh3 1.x share (events are told apart by class name, since each library has
    its own event classes); :func:`client_protocol_class` binds it to a library."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiters: dict[int, tuple[ResponseDecoder | bytearray, asyncio.Future[Any]]] = {}
        self.push_decoders: dict[int, PushDecoder] = {}
        # Pushes are hints: an application that never reads them (or a server that floods
        # them) must not grow this without bound; beyond it the oldest are dropped.
        self.pushes: asyncio.Queue[PushFrame] = asyncio.Queue()
        self.pushes_dropped = 0
        self.closed_reason: str | None = None
        self._drain: DatagramDrain | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._drain = DatagramDrain(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drain is not None:
            self._drain.close()
            self._drain = None
        super().connection_lost(exc)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._receive(data, addr)
        if self._drain is not None:
            self._drain.drain(self._receive)

    def _receive(self, data: bytes | str, addr: Any) -> None:
        self.receive_batched(data, addr, self._waiting)

    def _waiting(self) -> bool:
        """Calls are outstanding (the next request may carry the ACK) and no answer or push is
        partly received (bulk data needs the prompt ACK)."""
        if not self.waiters:
            return False
        for dec, _fut in self.waiters.values():
            if (len(dec) if isinstance(dec, bytearray) else dec.buffered) > 0:
                return False
        return not any(d.buffered > 0 for d in self.push_decoders.values())

    def quic_event_received(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "StreamDataReceived":
            sid = event.stream_id
            if sid & 0x2:  # server-opened uni stream: a push
                dec = self.push_decoders.get(sid)
                if dec is None:
                    dec = self.push_decoders[sid] = PushDecoder()
                try:
                    dec.feed(event.data)
                    if event.end_stream:
                        frame = dec.finish()
                        del self.push_decoders[sid]
                        if self.pushes.qsize() >= MAX_QUEUED_PUSHES:
                            self.pushes.get_nowait()
                            self.pushes_dropped += 1
                        self.pushes.put_nowait(frame)
                except FrameError:
                    self.push_decoders.pop(sid, None)
                return
            entry = self.waiters.get(sid)
            if entry is None:
                return
            dec_or_buf, fut = entry
            try:
                if isinstance(dec_or_buf, bytearray):
                    dec_or_buf += event.data
                    if len(dec_or_buf) > MAX_RAW_REPLY:
                        raise FrameError("oversize", f"reply longer than {MAX_RAW_REPLY} bytes")
                    if event.end_stream:
                        del self.waiters[sid]
                        if not fut.done():
                            fut.set_result(bytes(dec_or_buf))
                    return
                dec_or_buf.feed(event.data)
                if event.end_stream:
                    del self.waiters[sid]
                    if not fut.done():
                        fut.set_result(dec_or_buf.finish())
            except FrameError as e:
                self.waiters.pop(sid, None)
                if not fut.done():
                    fut.set_exception(Internal(f"malformed response: {e}"))
        elif kind == "StreamReset":
            entry = self.waiters.pop(event.stream_id, None)
            if entry is not None and not entry[1].done():
                entry[1].set_exception(ConnectionLost(f"stream reset ({event.error_code})"))
        elif kind == "ConnectionTerminated":
            self.closed_reason = event.reason_phrase or f"error {event.error_code}"
            for _sid, (_d, fut) in list(self.waiters.items()):
                if not fut.done():
                    fut.set_exception(ConnectionLost(f"connection closed: {self.closed_reason}"))
            self.waiters.clear()

    async def wait_connected(self) -> None:
        try:
            await super().wait_connected()  # type: ignore[misc]
        except asyncio.CancelledError:
            # Given up on (a connect timeout): the library still fails its handshake waiter
            # later, which nobody would then read ("exception was never retrieved").
            waiter = getattr(self, "_connected_waiter", None)
            if waiter is not None:
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    async def roundtrip(self, data: bytes, raw: bool = False) -> Any:
        if self.closed_reason is not None:
            raise ConnectionLost(f"connection closed: {self.closed_reason}")
        sid = self._quic.get_next_available_stream_id()
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.waiters[sid] = (bytearray() if raw else ResponseDecoder(), fut)
        self._quic.send_stream_data(sid, data, end_stream=True)
        self.send_soon()  # requests issued in the same loop turn share packets
        try:
            return await fut
        except asyncio.CancelledError:
            # Given up (a timeout): forget the call and tell the server not to answer, so
            # neither side keeps its state (a server that never answers grew this forever).
            if self.waiters.pop(sid, None) is not None and self.closed_reason is None:
                with contextlib.suppress(Exception):
                    self._quic.stop_stream(sid, 0)
                    self.send_soon()
            raise


class _ClientProtocol(_ClientLogic, QuicConnectionProtocol):
    """The client connection on aioquic (the default)."""


#: QUIC library of the SDK when ``connect`` is not told: ``QPC_CLIENT_QUIC_BACKEND`` or aioquic.
CLIENT_BACKEND_ENV = "QPC_CLIENT_QUIC_BACKEND"


def client_protocol_class(backend: Backend) -> type[_ClientLogic]:
    if backend.name == "aioquic":
        return _ClientProtocol
    return cast(type[_ClientLogic], backend.bind(_ClientLogic))


def client_backend(name: str | None = None) -> Backend:
    """The QUIC library for client connections: ``name``, else ``QPC_CLIENT_QUIC_BACKEND``,
    else aioquic.  ``qh3`` (1.x, ``pip install 'qpc-core[fast]'``) runs the same client logic
    on compiled cryptography and buffers."""
    return load_backend(name or os.environ.get(CLIENT_BACKEND_ENV) or "aioquic")


def client_configuration(
    *,
    ca_cert: str | Path | None = None,
    insecure: bool = False,
    server_name: str = "localhost",
    idle_timeout: float = 300.0,
    backend: Backend | None = None,
) -> Any:
    """A client QuicConfiguration (of the backend's library; aioquic when not given)."""
    conf_class = (backend or client_backend("aioquic")).configuration_class
    cfg = conf_class(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=server_name,
        idle_timeout=idle_timeout,
        max_stream_data=8 * 1024 * 1024,
        max_data=32 * 1024 * 1024,
    )
    if insecure:
        cfg.verify_mode = ssl.CERT_NONE
    elif ca_cert is not None:
        data = Path(ca_cert).read_bytes()
        if b"-----BEGIN" not in data:  # DER: aioquic wants PEM text
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            data = x509.load_der_x509_certificate(data).public_bytes(Encoding.PEM)
        cfg.load_verify_locations(cadata=data)
    return cfg


class QpcClient:
    """One QUIC connection to a qpc server.  Create with :meth:`connect`."""

    def __init__(
        self,
        proto: _ClientLogic,
        stack: contextlib.AsyncExitStack,
        identity: Ed25519PrivateKey | None,
    ) -> None:
        self._proto = proto
        self._stack = stack
        self._ids = itertools.count(1)
        self.identity = identity
        self.identity_key: bytes | None = public_bytes(identity) if identity else None
        self.server_signing_key: bytes | None = None
        self.on_server_key: Callable[[bytes], None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        token: str | bytes | None = None,
        identity: Ed25519PrivateKey | None = None,
        ca_cert: str | Path | None = None,
        insecure: bool = False,
        server_name: str = "localhost",
        pinned_signing_key: bytes | None = None,
        prove: bool = True,
        timeout: float = 10.0,
        idle_timeout: float = 300.0,
        quic_backend: str | None = None,
        configuration: Any | None = None,
    ) -> QpcClient:
        """``quic_backend``: "aioquic" or "qh3" (default: ``QPC_CLIENT_QUIC_BACKEND``, else
        aioquic).  ``configuration``: a ready client ``QuicConfiguration`` of that library
        (e.g. with a client certificate, or another ALPN); ``ca_cert``, ``insecure``,
        ``server_name`` and ``idle_timeout`` are then not used."""
        backend = client_backend(quic_backend)
        cfg = configuration or client_configuration(
            ca_cert=ca_cert,
            insecure=insecure,
            server_name=server_name,
            idle_timeout=idle_timeout,
            backend=backend,
        )
        stack = contextlib.AsyncExitStack()
        try:
            proto = await asyncio.wait_for(
                stack.enter_async_context(
                    backend.connect(
                        host,
                        port,
                        configuration=cfg,
                        create_protocol=client_protocol_class(backend),
                        wait_connected=True,
                    )
                ),
                timeout,
            )
        except BaseException:
            await stack.aclose()
            raise
        client = cls(proto, stack, identity)  # type: ignore[arg-type]
        client.server_signing_key = pinned_signing_key
        try:
            if token is not None:
                await client.handshake(token)
                if identity is not None and prove:
                    who = await client.whoami()
                    if not who.identity_key:
                        await client.prove_identity()
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> QpcClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._proto.close()
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    @property
    def pushes(self) -> asyncio.Queue[PushFrame]:
        return self._proto.pushes

    @property
    def protocol(self) -> _ClientLogic:
        return self._proto

    # -- raw calls --------------------------------------------------------------------------------
    async def handshake(self, token: str | bytes) -> None:
        """Run the connection auth handshake; raises Unauthenticated when refused."""
        tok = token.encode() if isinstance(token, str) else token
        reply: bytes = await self._proto.roundtrip(encode_auth_request(tok), raw=True)
        if len(reply) != 2 or reply[0] != 0x01:
            raise Internal(f"malformed auth handshake reply: {reply!r}")
        if reply[1] != Status.OK:
            why = ("too many refused tokens from this address; retry later"
                   if reply[1] == Status.RATE_LIMITED else "invalid token")
            raise error_for_status(reply[1], f"auth handshake refused: {why}")

    async def call_raw(self, method_id: int, payload: bytes) -> ResponseFrame:
        rid = next(self._ids) & 0xFFFFFFFF
        frame: ResponseFrame = await self._proto.roundtrip(encode_request(method_id, rid, payload))
        return frame

    async def call(self, method_id: int, request: Message, response_type: type[M]) -> M:
        frame = await self.call_raw(method_id, request.SerializeToString())
        return parse_response(frame, response_type)

    # -- core -------------------------------------------------------------------------------------
    async def health(self) -> common_pb2.HealthResponse:
        return await self.call(802, common_pb2.HealthRequest(), common_pb2.HealthResponse)

    async def whoami(self) -> common_pb2.WhoAmIResponse:
        return await self.call(106, common_pb2.WhoAmIRequest(), common_pb2.WhoAmIResponse)

    async def prove_identity(self) -> None:
        if self.identity is None or self.identity_key is None:
            raise ValueError("no identity key to prove")
        ch = await self.call(
            104, common_pb2.AuthChallengeRequest(), common_pb2.AuthChallengeResponse
        )
        sig = self.identity.sign(
            prove_identity_message(ch.nonce, self.identity_key, self.server_cert_binding()))
        await self.call(
            105,
            common_pb2.ProveIdentityRequest(identity_key=self.identity_key, signature=sig),
            common_pb2.ProveIdentityResponse,
        )

    def server_cert_binding(self) -> bytes:
        """SHA-256 of the certificate the server presented on this connection (empty when the
        QUIC library does not expose it)."""
        der = peer_certificate_der(self._proto._quic)
        return certificate_binding(der) if der is not None else b""

    async def signing_key(self) -> bytes:
        """The server's delivery-proof key: pinned on first use."""
        if self.server_signing_key is None:
            key = (await self.health()).signing_key
            self.server_signing_key = key
            if self.on_server_key is not None:
                self.on_server_key(key)
        return self.server_signing_key

    # -- delivery ---------------------------------------------------------------------------------
    async def verify_proof(
        self,
        resp: delivery_pb2.EnqueueResponse,
        recipient: bytes,
        channel: bytes,
        payload: bytes,
        message_id: bytes = b"",
    ) -> None:
        """A fresh message's proof covers its payload; a duplicate's covers the message id
        (the server kept the first payload sent under it, not this one)."""
        from qpc_core.builtin.delivery import duplicate_proof_digest, proof_digest

        proof = resp.delivery_proof
        if len(proof) != 96:
            raise ProofError(f"delivery proof must be 96 bytes, got {len(proof)}")
        if resp.duplicate:
            if not message_id:
                raise ProofError("a duplicate without a message id cannot be verified")
            digest = duplicate_proof_digest(recipient, channel, resp.seq, message_id)
        else:
            digest = proof_digest(recipient, channel, resp.seq, payload)
        if proof[:32] != digest:
            raise ProofError("delivery proof digest does not match the message")
        if not verify_signature(await self.signing_key(), proof[32:], digest):
            raise ProofError("delivery proof signature does not verify with the pinned key")

    async def enqueue(
        self,
        recipient: bytes,
        payload: bytes,
        *,
        channel: bytes = b"",
        ttl_secs: int = 0,
        message_id: bytes | None = None,
        verify: bool = True,
    ) -> delivery_pb2.EnqueueResponse:
        mid = message_id if message_id is not None else new_message_id()
        resp = await self.call(
            200,
            delivery_pb2.EnqueueRequest(
                recipient_key=recipient,
                payload=payload,
                channel_id=channel,
                ttl_secs=ttl_secs,
                message_id=mid,
            ),
            delivery_pb2.EnqueueResponse,
        )
        if verify:
            await self.verify_proof(resp, recipient, channel, payload, mid)
        return resp

    async def batch_enqueue(
        self,
        recipients: Sequence[bytes],
        payload: bytes,
        *,
        channel: bytes = b"",
        ttl_secs: int = 0,
        message_id: bytes | None = None,
        verify: bool = True,
    ) -> list[delivery_pb2.EnqueueResponse]:
        mid = message_id if message_id is not None else new_message_id()
        resp = await self.call(
            205,
            delivery_pb2.BatchEnqueueRequest(
                recipient_keys=list(recipients),
                payload=payload,
                channel_id=channel,
                ttl_secs=ttl_secs,
                message_id=mid,
            ),
            delivery_pb2.BatchEnqueueResponse,
        )
        out = list(resp.results)
        if verify:
            for r, res in zip(recipients, out, strict=True):
                await self.verify_proof(res, r, channel, payload, mid)
        return out

    def _me(self, recipient: bytes | None) -> bytes:
        key = recipient or self.identity_key
        if key is None:
            raise ValueError("no identity key")
        return key

    async def fetch(
        self, *, channel: bytes = b"", limit: int = 0, recipient: bytes | None = None
    ) -> list[delivery_pb2.Envelope]:
        resp = await self.call(
            201,
            delivery_pb2.FetchRequest(
                recipient_key=self._me(recipient), channel_id=channel, limit=limit
            ),
            delivery_pb2.FetchResponse,
        )
        return list(resp.messages)

    async def fetch_wait(
        self,
        timeout_ms: int,
        *,
        channel: bytes = b"",
        limit: int = 0,
        recipient: bytes | None = None,
    ) -> list[delivery_pb2.Envelope]:
        resp = await self.call(
            202,
            delivery_pb2.FetchRequest(
                recipient_key=self._me(recipient),
                channel_id=channel,
                limit=limit,
                timeout_ms=timeout_ms,
            ),
            delivery_pb2.FetchResponse,
        )
        return list(resp.messages)

    async def peek(
        self, *, channel: bytes = b"", limit: int = 0, recipient: bytes | None = None
    ) -> list[delivery_pb2.Envelope]:
        resp = await self.call(
            203,
            delivery_pb2.FetchRequest(
                recipient_key=self._me(recipient), channel_id=channel, limit=limit
            ),
            delivery_pb2.FetchResponse,
        )
        return list(resp.messages)

    async def ack(
        self, seq_up_to: int, *, channel: bytes = b"", recipient: bytes | None = None
    ) -> int:
        resp = await self.call(
            204,
            delivery_pb2.AckRequest(
                recipient_key=self._me(recipient), channel_id=channel, seq_up_to=seq_up_to
            ),
            delivery_pb2.AckResponse,
        )
        return resp.removed

    # -- keys -------------------------------------------------------------------------------------
    async def upload_key_package(self, package: bytes) -> bytes:
        resp = await self.call(
            300,
            keys_pb2.UploadKeyPackageRequest(identity_key=self._me(None), package=package),
            keys_pb2.UploadKeyPackageResponse,
        )
        return resp.fingerprint

    async def fetch_key_package(self, identity_key: bytes) -> bytes:
        resp = await self.call(
            301,
            keys_pb2.FetchKeyPackageRequest(identity_key=identity_key),
            keys_pb2.FetchKeyPackageResponse,
        )
        return resp.package

    async def upload_hybrid_key(self, public_key: bytes) -> None:
        await self.call(
            302,
            keys_pb2.UploadHybridKeyRequest(
                identity_key=self._me(None), hybrid_public_key=public_key
            ),
            keys_pb2.UploadHybridKeyResponse,
        )

    async def fetch_hybrid_key(self, identity_key: bytes) -> bytes:
        resp = await self.call(
            303,
            keys_pb2.FetchHybridKeyRequest(identity_key=identity_key),
            keys_pb2.FetchHybridKeyResponse,
        )
        return resp.hybrid_public_key

    async def fetch_hybrid_keys(self, identity_keys: Sequence[bytes]) -> dict[bytes, bytes]:
        resp = await self.call(
            304,
            keys_pb2.FetchHybridKeysRequest(identity_keys=list(identity_keys)),
            keys_pb2.FetchHybridKeysResponse,
        )
        return {e.identity_key: e.hybrid_public_key for e in resp.keys}

    # -- directory --------------------------------------------------------------------------------
    async def resolve_user(self, username: str) -> directory_pb2.ResolveUserResponse:
        return await self.call(
            500,
            directory_pb2.ResolveUserRequest(username=username),
            directory_pb2.ResolveUserResponse,
        )

    async def resolve_identity(self, identity_key: bytes) -> directory_pb2.ResolveIdentityResponse:
        return await self.call(
            501,
            directory_pb2.ResolveIdentityRequest(identity_key=identity_key),
            directory_pb2.ResolveIdentityResponse,
        )

    async def create_channel(self, members: Sequence[bytes]) -> tuple[bytes, bool]:
        resp = await self.call(
            400,
            directory_pb2.CreateChannelRequest(member_keys=list(members)),
            directory_pb2.CreateChannelResponse,
        )
        return resp.channel_id, resp.was_new

    async def delete_account(self) -> None:
        await self.call(
            950, directory_pb2.DeleteAccountRequest(), directory_pb2.DeleteAccountResponse
        )


def parse_response(frame: ResponseFrame, response_type: type[M]) -> M:
    """An answer as its message, or the error it carries raised (any transport's client)."""
    if frame.status != Status.OK:
        raise decode_error(frame)
    try:
        return response_type.FromString(frame.payload)
    except DecodeError as e:
        raise Internal(f"malformed {response_type.__name__} from server: {e}") from None


def decode_error(frame: ResponseFrame) -> RpcError:
    try:
        err = common_pb2.Error.FromString(frame.payload)
        message = err.message or Status(frame.status).name
        retry = err.retry_after_ms / 1000.0 if err.retry_after_ms else None
    except (DecodeError, ValueError):
        message, retry = f"status {frame.status}", None
    return error_for_status(frame.status, message, retry)


def new_message_id() -> bytes:
    """A UUIDv7 (RFC 9562): 48-bit unix milliseconds, version 7, random bits."""
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    rand = bytearray(os.urandom(10))
    rand[0] = 0x70 | (rand[0] & 0x0F)
    rand[2] = 0x80 | (rand[2] & 0x3F)
    return ms.to_bytes(6, "big") + bytes(rand)
