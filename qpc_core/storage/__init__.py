"""Storage interface and the built-in SQLCipher backend.

``SqlCipherStorage`` is imported lazily so that a deployment using another backend does not
need the ``sqlcipher3`` extension module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qpc_core.errors import StorageError
from qpc_core.storage.base import (
    AlreadyExists,
    EnqueueOutcome,
    NewMessage,
    QueueFull,
    SessionRecord,
    Storage,
    StoredMessage,
    UserRecord,
    WrongKey,
)

if TYPE_CHECKING:
    from qpc_core.storage.sqlcipher import SqlCipherStorage

__all__ = [
    "AlreadyExists",
    "EnqueueOutcome",
    "NewMessage",
    "QueueFull",
    "SessionRecord",
    "SqlCipherStorage",
    "Storage",
    "StorageError",
    "StoredMessage",
    "UserRecord",
    "WrongKey",
]


def __getattr__(name: str) -> Any:
    if name == "SqlCipherStorage":
        from qpc_core.storage.sqlcipher import SqlCipherStorage

        return SqlCipherStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
