"""Sans-I/O codec of the WebSocket bridge's messages (docs/protocol.md, "WebSocket bridge").

Every WebSocket message is binary and carries exactly one qpc frame behind a kind byte, so a
browser speaks the same frames as a QUIC client; the ``request_id`` the frames already carry
multiplexes calls over the one WebSocket::

    client -> server
      0x01 AUTH       | token_len u16 | token   (the QUIC auth handshake frame, unchanged)
      0x02 REQUEST    | method_id u16 | request_id u32 | len u32 | payload  (request frame)
      0x03 CANCEL     | request_id u32          (the answer is no longer wanted)
    server -> client
      0x01 AUTH_REPLY | status u8               (the QUIC auth reply, unchanged)
      0x02 RESPONSE   | status u8 | request_id u32 | len u32 | payload      (response frame)
      0x03 PUSH       | event_type u16 | len u32 | payload                  (push frame)

Parsers never raise anything but :class:`WireError`; this module never imports asyncio.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qpc_core.framing import (
    AUTH_MAGIC,
    FrameError,
    PushDecoder,
    PushFrame,
    RequestDecoder,
    RequestFrame,
    ResponseDecoder,
    ResponseFrame,
    encode_auth_reply,
    encode_auth_request,
    encode_push,
    encode_request,
)
from qpc_core.framing.frames import REQUEST_HEADER

AUTH, REQUEST, CANCEL = AUTH_MAGIC, 0x02, 0x03
AUTH_REPLY, RESPONSE, PUSH = AUTH_MAGIC, 0x02, 0x03
#: Subprotocol a client must offer (``Sec-WebSocket-Protocol``): the version of this mapping.
SUBPROTOCOL = "qpc.v1"
#: Bytes a message adds around a frame's payload at most (kind byte + request header).
OVERHEAD = 1 + REQUEST_HEADER.size
_U32 = struct.Struct(">I")


class WireError(Exception):
    """A message that is not a valid bridge message.  ``reason`` is a short token (as
    :class:`~qpc_core.framing.FrameError`'s), ``request_id`` the call it names when its
    header could be read (the error is answered on that call), else 0."""

    def __init__(self, reason: str, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Auth:
    token: bytes


@dataclass(frozen=True, slots=True)
class Cancel:
    request_id: int


@dataclass(frozen=True, slots=True)
class AuthReply:
    status: int


ClientMessage = Auth | RequestFrame | Cancel
ServerMessage = AuthReply | ResponseFrame | PushFrame


def parse_client(data: bytes, max_payload: int) -> ClientMessage:
    """One client message; payloads above ``max_payload`` are refused (``oversize``)."""
    if not data:
        raise WireError("empty", "empty message (expected a kind byte: 1 auth, 2 request, "
                        "3 cancel)")
    kind = data[0]
    if kind == REQUEST:
        body = memoryview(data)[1:]
        rid = _U32.unpack_from(body, 2)[0] if len(body) >= REQUEST_HEADER.size else 0
        dec = RequestDecoder(max_payload)
        try:
            dec.feed(bytes(body))
            return dec.finish()
        except FrameError as e:
            why = str(e).replace("stream ended", "message ended")
            raise WireError(e.reason, why, rid) from None
    if kind == AUTH:
        if len(data) < 3:
            raise WireError("truncated", "auth message shorter than its 3-byte header")
        (n,) = struct.unpack_from(">H", data, 1)
        if len(data) != 3 + n:
            raise WireError("bad_length", f"auth message announces a {n}-byte token but "
                            f"carries {len(data) - 3}")
        return Auth(bytes(data[3:]))
    if kind == CANCEL:
        if len(data) != 1 + _U32.size:
            raise WireError("bad_length", "cancel message must be 5 bytes (kind + request_id)")
        return Cancel(_U32.unpack_from(data, 1)[0])
    raise WireError("bad_kind", f"unknown message kind 0x{kind:02x} (expected 1 auth, "
                    "2 request, 3 cancel)")


def response_message(frame: bytes) -> bytes:
    """A RESPONSE message around an encoded response frame."""
    return bytes([RESPONSE]) + frame


def push_message(event_type: int, payload: bytes) -> bytes:
    return bytes([PUSH]) + encode_push(event_type, payload)


def auth_reply_message(status: int) -> bytes:
    return encode_auth_reply(status)


# -- the client side (qpc_ws_bridge.client and tests) ------------------------------------------

def auth_message(token: bytes) -> bytes:
    return encode_auth_request(token)


def request_message(method_id: int, request_id: int, payload: bytes) -> bytes:
    return bytes([REQUEST]) + encode_request(method_id, request_id, payload)


def cancel_message(request_id: int) -> bytes:
    return bytes([CANCEL]) + _U32.pack(request_id)


def parse_server(data: bytes) -> ServerMessage:
    if not data:
        raise WireError("empty", "empty message")
    kind, body = data[0], bytes(data[1:])
    try:
        if kind == AUTH_REPLY:
            if len(body) != 1:
                raise WireError("bad_length", "auth reply must be 2 bytes")
            return AuthReply(body[0])
        if kind == RESPONSE:
            rdec = ResponseDecoder()
            rdec.feed(body)
            return rdec.finish()
        if kind == PUSH:
            pdec = PushDecoder()
            pdec.feed(body)
            return pdec.finish()
    except FrameError as e:
        raise WireError(e.reason, str(e)) from None
    raise WireError("bad_kind", f"unknown message kind 0x{kind:02x}")
