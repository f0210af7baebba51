"""qpc plugin ``postgres``: a shared PostgreSQL store (``storage = "postgres"``).

Select it with ``--plugins postgres`` and ``storage = "postgres"``; the database is
``[postgres] dsn`` or ``QPC_POSTGRES_DSN``.  Several qpc servers pointed at one database
serve one user base: seqs, dedup, key packages and the directory are shared, and a message
stored by one server wakes long polls and pushes on the others (LISTEN/NOTIFY).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from qpc_core.errors import ConfigError
from qpc_core.hookspecs import hookimpl
from qpc_core.rpc import ConfigSection
from qpc_storage_postgres.config import PostgresConfig

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.storage.base import Storage

NAME = "postgres"
DSN_ENV = "QPC_POSTGRES_DSN"

log = logging.getLogger("qpc.storage.postgres")


@hookimpl
def register_config_sections(app: App) -> list[ConfigSection]:
    return [ConfigSection(NAME, PostgresConfig)]


def resolve_dsn(config: PostgresConfig) -> str:
    dsn = os.environ.get(DSN_ENV) or (config.dsn.get_secret_value() if config.dsn else "")
    if not dsn:
        raise ConfigError(
            f'config: storage = "postgres" needs a database: set {DSN_ENV} or [postgres] dsn '
            "(e.g. postgresql://qpc:PASSWORD@db.internal:5432/qpc)"
        )
    return dsn


@hookimpl
async def open_storage(app: App) -> Storage | None:
    if app.settings.storage != NAME:
        return None
    from qpc_storage_postgres.store import PostgresStorage

    config: PostgresConfig = app.plugin_config(NAME)
    store = await PostgresStorage.open(
        resolve_dsn(config), schema=config.schema_name, pool_min=config.pool_min,
        pool_max=config.pool_max, command_timeout=config.command_timeout_secs,
        connect_timeout=config.connect_timeout_secs,
    )
    log.info("storage: PostgreSQL schema %r (pool %d-%d, node %s)", config.schema_name,
             config.pool_min, config.pool_max, store.node_id)
    return store
