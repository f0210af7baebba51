"""Sans-I/O wire layer: frames, status codes, push events. Never imports asyncio."""

from qpc_core.framing.frames import (
    AUTH_MAGIC,
    MAX_PAYLOAD,
    AuthHandshakeDecoder,
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
    encode_response,
)
from qpc_core.framing.status import PushEvent, Status

__all__ = [
    "AUTH_MAGIC",
    "MAX_PAYLOAD",
    "AuthHandshakeDecoder",
    "FrameError",
    "PushDecoder",
    "PushEvent",
    "PushFrame",
    "RequestDecoder",
    "RequestFrame",
    "ResponseDecoder",
    "ResponseFrame",
    "Status",
    "encode_auth_reply",
    "encode_auth_request",
    "encode_push",
    "encode_request",
    "encode_response",
]
