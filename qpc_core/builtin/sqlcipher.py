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
import tempfile
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


def _key_file_error(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{path} is empty or unreadable: {why}. It is the development database key: restore "
        f"it, or set QPC_DB_KEY to the database's key; if there is no database yet, delete "
        f"{path} and a new key is generated"
    )


def _read_key_file(path: Path) -> str:
    """The key in an existing ``db.key`` (:class:`ConfigError` when it has none)."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except IsADirectoryError:
        raise _key_file_error(path, "it is a directory") from None
    except UnicodeDecodeError:
        raise _key_file_error(path, "it is not text") from None
    except OSError as e:
        raise _key_file_error(path, e.strerror or str(e)) from None
    if not key:
        raise _key_file_error(path, "the file is empty (was its creation interrupted?)")
    return key


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_key(data_dir: Path, path: Path, key: str) -> bool:
    """Write ``key`` to ``path`` atomically, never replacing an existing file: a temporary
    0600 file in the same directory, fsynced, then linked in under its name, then the
    directory fsynced.  False when ``path`` appeared meanwhile (another process won)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{DEV_KEY_FILE}.", suffix=".tmp", dir=data_dir)
    tmp = Path(tmp_name)  # mkstemp creates it with mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists (unlike a rename)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: rename (replaces, but whole)
            if os.path.lexists(path):
                return False
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(data_dir)
    return True


def dev_db_key(data_dir: Path) -> str:
    """Read or create the development database key file (0600).

    An existing file must hold a key (:class:`ConfigError` otherwise: a key silently
    replaced would not open the database).  A new key is written atomically, so a crash
    leaves either no file or the whole key."""
    path = data_dir / DEV_KEY_FILE
    if os.path.lexists(path):
        return _read_key_file(path)
    key = secrets.token_hex(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    if not _publish_key(data_dir, path, key):
        return _read_key_file(path)  # created by a concurrent start: use that one
    log.warning(
        "no db_key configured: generated a development database key in %s "
        "(set QPC_DB_KEY for production)", path,
    )
    return key


def database_without_key(s: Settings) -> Path | None:
    """The existing SQLCipher database these settings have no key for (no ``db_key`` and no
    development key file), or None.  A key generated now could not open it: callers refuse
    instead (``qpc run``, ``qpc store``)."""
    if s.db_key is not None and s.db_key.get_secret_value():
        return None
    if os.path.lexists(s.data_dir / DEV_KEY_FILE):
        return None
    db = s.resolved_db_path
    wal = db.with_name(db.name + "-wal")
    try:
        has_data = db.stat().st_size > 0 or wal.is_file()
    except FileNotFoundError:
        return None
    except OSError:  # cannot tell (e.g. a permission problem): do not generate a key
        return db
    return db if has_data else None


def resolve_db_key(app: App) -> str:
    return settings_db_key(app.settings)


def settings_db_key(s: Settings) -> str:
    """The database key these settings give (generating the development key if needed)."""
    if s.db_key is not None and s.db_key.get_secret_value():
        return s.db_key.get_secret_value()
    if s.production:
        raise ConfigError("config: db_key: production requires a database key (set QPC_DB_KEY)")
    db = database_without_key(s)
    if db is not None:
        raise ConfigError(
            f"config: db_key: no database key for the existing database {db}: set QPC_DB_KEY "
            f"to its key or restore {s.data_dir / DEV_KEY_FILE} (qpc generates a development "
            "key only for a new database: a new key could not open this one)"
        )
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
