"""Sans-I/O frame codec for the qpc wire protocol (REFERENCE §2).

Three frame kinds, all big-endian:

* request  (client -> server, bidi stream): ``method_id u16 | request_id u32 | len u32 | payload``
* response (server -> client, bidi stream): ``status u8 | request_id u32 | len u32 | payload``
* push     (server -> client, uni stream):  ``event_type u16 | len u32 | payload``

Each stream carries exactly one frame.  Decoders are fed bytes as they arrive and report
``None`` until a whole frame is present.  The payload length is checked against the limit as
soon as the header is complete, before any of the body is buffered.  Decoders never raise
anything but :class:`FrameError`.

This module must not import asyncio: it is pure bytes in, frames out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Generic, TypeVar

MAX_PAYLOAD = 4 * 1024 * 1024
"""Hard protocol maximum for a frame payload (4 MiB)."""

REQUEST_HEADER = struct.Struct(">HII")
RESPONSE_HEADER = struct.Struct(">BII")
PUSH_HEADER = struct.Struct(">HI")
AUTH_MAGIC = 0x01

__all__ = [
    "AUTH_MAGIC",
    "MAX_PAYLOAD",
    "AuthHandshakeDecoder",
    "FrameError",
    "PushDecoder",
    "PushFrame",
    "RequestDecoder",
    "RequestFrame",
    "ResponseDecoder",
    "ResponseFrame",
    "encode_auth_reply",
    "encode_auth_request",
    "encode_push",
    "encode_request",
    "encode_response",
]


class FrameError(Exception):
    """A protocol violation in the byte stream (garbage, oversize, truncated, trailing bytes).

    ``reason`` is a short machine-friendly token (``oversize``, ``truncated``, ``trailing``,
    ``bad_magic``, ``bad_length``) and ``str(exc)`` a sentence for humans.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RequestFrame:
    method_id: int
    request_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ResponseFrame:
    status: int
    request_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PushFrame:
    event_type: int
    payload: bytes


def _check_len(length: int, limit: int) -> None:
    if length > limit:
        raise FrameError("oversize", f"payload length {length} exceeds the limit of {limit} bytes")


def encode_request(
    method_id: int, request_id: int, payload: bytes, *, max_payload: int = MAX_PAYLOAD
) -> bytes:
    _check_len(len(payload), max_payload)
    return REQUEST_HEADER.pack(method_id, request_id, len(payload)) + payload


def encode_response(
    status: int, request_id: int, payload: bytes, *, max_payload: int = MAX_PAYLOAD
) -> bytes:
    _check_len(len(payload), max_payload)
    return RESPONSE_HEADER.pack(status, request_id, len(payload)) + payload


def encode_push(event_type: int, payload: bytes, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    _check_len(len(payload), max_payload)
    return PUSH_HEADER.pack(event_type, len(payload)) + payload


def encode_auth_request(token: bytes) -> bytes:
    """The optional connection handshake: ``0x01 | token_len u16 | token``."""
    if len(token) > 0xFFFF:
        raise FrameError("oversize", "auth token longer than 65535 bytes")
    return bytes([AUTH_MAGIC]) + struct.pack(">H", len(token)) + token


def encode_auth_reply(status: int) -> bytes:
    return bytes([AUTH_MAGIC, status])


F = TypeVar("F")


class _Decoder(Generic[F]):
    """Incremental single-frame decoder.

    Feed with :meth:`feed`; call :meth:`finish` when the stream's FIN arrives.  ``feed``
    returns the frame once complete; bytes beyond the frame are a ``trailing`` error.
    """

    _header: struct.Struct

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = min(max_payload, MAX_PAYLOAD)
        self._buf = bytearray()
        self._need: int | None = None  # total frame size once the header is known
        self.frame: F | None = None

    def feed(self, data: bytes) -> F | None:
        if not data:
            return self.frame
        if self.frame is not None:
            raise FrameError("trailing", f"{len(data)} unexpected bytes after the frame")
        self._buf += data
        hsize = self._header.size
        if self._need is None:
            if len(self._buf) < hsize:
                return None
            length = self._header.unpack_from(self._buf, 0)[-1]
            _check_len(length, self.max_payload)
            self._need = hsize + length
        if len(self._buf) < self._need:
            return None
        if len(self._buf) > self._need:
            extra = len(self._buf) - self._need
            raise FrameError("trailing", f"{extra} unexpected bytes after the frame")
        fields = self._header.unpack_from(self._buf, 0)
        payload = bytes(self._buf[hsize:])
        self._buf = bytearray()
        self.frame = self._make(fields, payload)
        return self.frame

    def finish(self) -> F:
        """The peer finished its side: the frame must be complete."""
        if self.frame is None:
            have = len(self._buf)
            if self._need is None:
                raise FrameError(
                    "truncated", f"stream ended after {have} bytes, inside the frame header"
                )
            raise FrameError("truncated", f"stream ended after {have} of {self._need} frame bytes")
        return self.frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _make(self, fields: tuple[int, ...], payload: bytes) -> F:  # pragma: no cover
        raise NotImplementedError


class RequestDecoder(_Decoder[RequestFrame]):
    _header = REQUEST_HEADER

    def _make(self, fields: tuple[int, ...], payload: bytes) -> RequestFrame:
        return RequestFrame(fields[0], fields[1], payload)


class ResponseDecoder(_Decoder[ResponseFrame]):
    _header = RESPONSE_HEADER

    def _make(self, fields: tuple[int, ...], payload: bytes) -> ResponseFrame:
        return ResponseFrame(fields[0], fields[1], payload)


class PushDecoder(_Decoder[PushFrame]):
    _header = PUSH_HEADER

    def _make(self, fields: tuple[int, ...], payload: bytes) -> PushFrame:
        return PushFrame(fields[0], payload)


class AuthHandshakeDecoder:
    """Decoder for the ``0x01 | len u16 | token`` connection handshake."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.token: bytes | None = None

    def feed(self, data: bytes) -> bytes | None:
        if self.token is not None:
            if data:
                raise FrameError("trailing", "unexpected bytes after the auth handshake")
            return self.token
        self._buf += data
        if self._buf and self._buf[0] != AUTH_MAGIC:
            raise FrameError(
                "bad_magic", f"auth handshake must start with 0x01, got {self._buf[0]:#04x}"
            )
        if len(self._buf) < 3:
            return None
        need = 3 + struct.unpack_from(">H", self._buf, 1)[0]
        if len(self._buf) < need:
            return None
        if len(self._buf) > need:
            raise FrameError("trailing", "unexpected bytes after the auth handshake")
        self.token = bytes(self._buf[3:])
        return self.token

    def finish(self) -> bytes:
        if self.token is None:
            raise FrameError("truncated", "stream ended inside the auth handshake")
        return self.token
