"""Built-in plugin ``sqlcipher``: the embedded default store (``storage = "sqlcipher"``).

The database key is ``db_key`` / ``QPC_DB_KEY``, used as the SQLCipher passphrase, so an
operator can open ``data/qpc.db`` with any SQLCipher 4 client (``PRAGMA key='...'``).
Without a key in development mode a random one is generated once into ``data/db.key``
(mode 0600); production refuses to start without a configured key.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from qpc_core.errors import ConfigError
from qpc_core.hookspecs import hookimpl
from qpc_core.storage.base import Storage

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.config import Settings

log = logging.getLogger("qpc.storage")

DEV_KEY_FILE = "db.key"


def dev_db_key(data_dir: Path) -> str:
    """Read or create the development database key file (0600)."""
    path = data_dir / DEV_KEY_FILE
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key
    key = secrets.token_hex(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "no db_key configured: generated a development database key in %s "
        "(set QPC_DB_KEY for production)", path,
    )
    return key


def resolve_db_key(app: App) -> str:
    return settings_db_key(app.settings)


def settings_db_key(s: Settings) -> str:
    """The database key these settings give (generating the development key if needed)."""
    if s.db_key is not None and s.db_key.get_secret_value():
        return s.db_key.get_secret_value()
    if s.production:
        raise ConfigError("config: db_key: production requires a database key (set QPC_DB_KEY)")
    return dev_db_key(s.data_dir)


@hookimpl
async def open_storage(app: App) -> Storage | None:
    s = app.settings
    if s.storage != "sqlcipher":
        return None
    from qpc_core.storage.sqlcipher import SqlCipherStorage

    path = s.resolved_db_path
    path.parent.mkdir(parents=True, exist_ok=True)

    def observe(operation: str, seconds: float) -> None:
        app.hooks.on_storage_operation(app, operation, seconds)

    storage = await SqlCipherStorage.open(
        path,
        resolve_db_key(app),
        synchronous=s.db_synchronous,
        wal_autocheckpoint=s.db_wal_autocheckpoint,
        pool_size=s.db_pool_size,
        max_batch=s.group_commit_max_batch,
        observer=observe,
    )
    log.info("storage: SQLCipher database %s (WAL, synchronous=%s, pool=%d)",
             path, s.db_synchronous, s.db_pool_size)
    return storage
