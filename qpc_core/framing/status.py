"""Response status codes and push event types (documented in docs/protocol.md)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """The ``status u8`` of a response frame. ``OK`` is the only success."""

    OK = 0
    BAD_REQUEST = 1
    UNAUTHENTICATED = 2
    FORBIDDEN = 3
    NOT_FOUND = 4
    CONFLICT = 5
    TOO_LARGE = 6
    RATE_LIMITED = 7
    UNIMPLEMENTED = 8
    UNAVAILABLE = 9
    INTERNAL = 10
    PROTOCOL_ERROR = 11
    QUOTA_EXCEEDED = 12


class PushEvent(IntEnum):
    """The ``event_type u16`` of a push frame on a server-opened uni stream."""

    NEW_MESSAGE = 1
    SESSION_REVOKED = 2
    SERVER_SHUTTING_DOWN = 3
