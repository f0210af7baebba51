"""A Python client for the WebSocket bridge (the tests' and scripts' counterpart of
``static/qpc.js``): connect, authenticate, prove an identity, call any method, take pushes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message
from websockets.asyncio.client import ClientConnection, connect

from qpc_core.client.sdk import parse_response
from qpc_core.errors import error_for_status
from qpc_core.framing import PushFrame, ResponseFrame, Status
from qpc_core.identity import prove_identity_message, public_bytes
from qpc_core.pb import common_pb2, delivery_pb2
from qpc_ws_bridge import wire
from qpc_ws_bridge.bridge import host_binding

M = TypeVar("M", bound=Message)


class WsClient:
    def __init__(self, ws: ClientConnection, host: str) -> None:
        self.ws = ws
        self.host = host
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[ResponseFrame]] = {}
        self._auth: asyncio.Future[int] | None = None
        self.pushes: asyncio.Queue[PushFrame] = asyncio.Queue()
        self.identity_key: bytes | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(
        cls, url: str, *, token: str | None = None, identity: Ed25519PrivateKey | None = None,
        origin: str | None = None, ssl_context: ssl.SSLContext | None = None, **kw: Any,
    ) -> WsClient:
        """Open ``url`` (``ws://host:port/v1/ws``), send ``token`` as the auth message and
        prove ``identity`` when given."""
        ws = await connect(url, subprotocols=[wire.SUBPROTOCOL],  # type: ignore[list-item]
                           origin=origin, ssl=ssl_context, compression=None,  # type: ignore[arg-type]
                           max_size=None, **kw)
        # What proofs are bound to: the Host header this connection sent (websockets leaves
        # out a default port and any user info, as browsers do).
        c = cls(ws, ws.request.headers["Host"] if ws.request is not None else urlsplit(url).netloc)
        try:
            if token is not None:
                await c.authenticate(token.encode())
            if identity is not None:
                await c.prove_identity(identity)
        except BaseException:
            await c.close()
            raise
        return c

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    continue
                msg = wire.parse_server(data)
                if isinstance(msg, wire.AuthReply):
                    if self._auth is not None and not self._auth.done():
                        self._auth.set_result(msg.status)
                elif isinstance(msg, ResponseFrame):
                    fut = self._pending.pop(msg.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    elif msg.request_id == 0 and self._pending and msg.status != Status.OK:
                        # a protocol error on a message whose request id was unreadable
                        rid = min(self._pending)
                        self._pending.pop(rid).set_result(msg)
                else:
                    self.pushes.put_nowait(msg)
        except Exception:  # the connection ended: every waiter learns it below
            pass
        finally:
            err = ConnectionError("WebSocket closed")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            if self._auth is not None and not self._auth.done():
                self._auth.set_exception(err)
            if not self.closed.done():
                self.closed.set_result(None)

    async def send_raw(self, message: bytes) -> None:
        await self.ws.send(message)

    async def authenticate(self, token: bytes) -> None:
        self._auth = asyncio.get_running_loop().create_future()
        await self.ws.send(wire.auth_message(token))
        status = await asyncio.wait_for(self._auth, 30)
        if status != Status.OK:
            raise error_for_status(status, "auth message refused")

    async def call_raw(self, method_id: int, payload: bytes, *,
                       request_id: int | None = None) -> ResponseFrame:
        rid = next(self._ids) & 0xFFFFFFFF if request_id is None else request_id
        fut: asyncio.Future[ResponseFrame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.ws.send(wire.request_message(method_id, rid, payload))
            return await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None:
                with contextlib.suppress(Exception):
                    await self.ws.send(wire.cancel_message(rid))
            raise

    async def call(self, method_id: int, request: Message, response_type: type[M]) -> M:
        frame = await self.call_raw(method_id, request.SerializeToString())
        return parse_response(frame, response_type)

    async def prove_identity(self, identity: Ed25519PrivateKey) -> None:
        key = public_bytes(identity)
        ch = await self.call(104, common_pb2.AuthChallengeRequest(),
                             common_pb2.AuthChallengeResponse)
        sig = identity.sign(prove_identity_message(ch.nonce, key, host_binding(self.host)))
        await self.call(105, common_pb2.ProveIdentityRequest(identity_key=key, signature=sig),
                        common_pb2.ProveIdentityResponse)
        self.identity_key = key

    async def enqueue(self, recipient: bytes, payload: bytes,
                      **kw: Any) -> delivery_pb2.EnqueueResponse:
        return await self.call(200, delivery_pb2.EnqueueRequest(
            recipient_key=recipient, payload=payload, **kw), delivery_pb2.EnqueueResponse)

    async def fetch(self, limit: int = 0) -> list[delivery_pb2.Envelope]:
        r = await self.call(201, delivery_pb2.FetchRequest(
            recipient_key=self.identity_key or b"", limit=limit), delivery_pb2.FetchResponse)
        return list(r.messages)

    async def fetch_wait(self, timeout_ms: int) -> list[delivery_pb2.Envelope]:
        r = await self.call(202, delivery_pb2.FetchRequest(
            recipient_key=self.identity_key or b"", timeout_ms=timeout_ms),
            delivery_pb2.FetchResponse)
        return list(r.messages)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
