"""The exception tree shared by core and plugins.

Raise a :class:`RpcError` subclass from an RPC handler to fail only that call: the client
gets the status and the message, the connection stays up.  Anything else raised by a handler
is logged with its traceback and answered with ``INTERNAL`` and no exception text.
"""

from __future__ import annotations

from qpc_core.framing.status import Status


class QpcError(Exception):
    """Base of every qpc exception."""


class ConfigError(QpcError):
    """Invalid configuration; the message names the config path (``section.key: problem``)."""


class PluginError(QpcError):
    """A plugin could not be found, imported, validated or registered."""


class StorageError(QpcError):
    """The storage backend failed or could not be opened (wrong key, corrupt file...)."""


class RpcError(QpcError):
    """Fails one RPC with ``status``; ``retry_after`` (seconds) rides along when set."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(RpcError):
    status = Status.BAD_REQUEST


class Unauthenticated(RpcError):
    status = Status.UNAUTHENTICATED


class Forbidden(RpcError):
    status = Status.FORBIDDEN


class NotFound(RpcError):
    status = Status.NOT_FOUND


class Conflict(RpcError):
    status = Status.CONFLICT


class TooLarge(RpcError):
    status = Status.TOO_LARGE


class RateLimited(RpcError):
    status = Status.RATE_LIMITED


class Unimplemented(RpcError):
    status = Status.UNIMPLEMENTED


class Unavailable(RpcError):
    status = Status.UNAVAILABLE


class Internal(RpcError):
    status = Status.INTERNAL


class QuotaExceeded(RpcError):
    status = Status.QUOTA_EXCEEDED


class ProtocolViolation(RpcError):
    """Client side: the server rejected the bytes of a stream (bad or oversize frame)."""

    status = Status.PROTOCOL_ERROR


_BY_STATUS: dict[int, type[RpcError]] = {
    cls.status: cls
    for cls in (
        BadRequest, Unauthenticated, Forbidden, NotFound, Conflict, TooLarge, RateLimited,
        Unimplemented, Unavailable, Internal, QuotaExceeded, ProtocolViolation,
    )
}


def error_for_status(status: int, message: str, retry_after: float | None = None) -> RpcError:
    """Client side: turn a non-OK response into the matching exception."""
    cls = _BY_STATUS.get(status, Internal)
    err = cls(message, retry_after=retry_after)
    err.status = Status(status) if status in Status._value2member_map_ else Status.INTERNAL
    return err
