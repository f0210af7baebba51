"""``qpc store``: copy a whole store to another backend, back up the embedded database while
the server runs, or count what a store holds.

``qpc store copy --to postgres`` is the scaling guide's "migrate from SQLCipher to a shared
PostgreSQL instance": it opens the configured store (the source) and the target store the
way ``qpc run`` would (same config file, environment and plugins; ``--to-config`` for a
target configured elsewhere), checks the target is empty, copies every record (users,
sessions, key packages, hybrid keys, channels, inboxes with their next seq, queued
messages, dedup ids, plugin key/value data, append-only logs) and reads the target back to
verify it against the source (same counts, same SHA-256 over every record).

Run it with the servers stopped: a SQLCipher source is locked by a running server anyway
(the copy refuses to start), and messages a server accepts after the copy started would not
be in the target.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpc_core.errors import ConfigError, PluginError, StorageError

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.config import Settings
    from qpc_core.storage.base import Storage
    from qpc_core.storage.records import Tally


def add_arguments(p: argparse.ArgumentParser, server_options: Any) -> None:
    sub = p.add_subparsers(dest="store_command", required=True)
    cp = sub.add_parser("copy", help="copy every record into another, empty store")
    server_options(cp)
    cp.add_argument("--from", dest="source", metavar="STORAGE",
                    help='source storage (default: the configured "storage", e.g. sqlcipher)')
    cp.add_argument("--to", dest="target", metavar="STORAGE", required=True,
                    help="target storage, e.g. postgres (its plugin is loaded if installed)")
    cp.add_argument("--to-config", type=Path, metavar="FILE",
                    help="config file for the target (default: the same as --config; "
                    "environment and command-line options apply to both)")
    cp.add_argument("--no-verify", action="store_true",
                    help="skip reading the target back to compare it with the source")
    bk = sub.add_parser("backup", help="online backup of the SQLCipher database into a new file")
    server_options(bk)
    bk.add_argument("out", type=Path, help="the backup file to create (must not exist)")
    st = sub.add_parser("stats", help="count every record of a store and print its digest")
    server_options(st)
    st.add_argument("--storage", metavar="STORAGE",
                    help='storage to read (default: the configured "storage")')


def _settings(args: argparse.Namespace, config: Path | None, storage: str | None) -> Settings:
    """Settings as ``qpc run`` would build them, for ``storage``, with the plugin of that
    name added to the selection when it is installed but not selected."""
    from qpc_core.cli import _overrides
    from qpc_core.config import load_config
    from qpc_core.plugins import available_entry_points, parse_selection

    overrides = _overrides(args)
    base = load_config(config, overrides)
    name = storage or base.storage
    plugins = list(base.plugins)
    names, blocked = parse_selection(plugins)
    if name not in names and name not in blocked and name in available_entry_points():
        plugins.append(name)
    return load_config(config, {**overrides, "storage": name, "plugins": plugins})


def _check_existing_sqlcipher(settings: Settings) -> None:
    """A SQLCipher store read by these commands must exist and have a key: never create an
    empty database (a mistyped --data-dir would copy nothing and call it verified) or a
    fresh development key beside an existing one."""
    from qpc_core.builtin.sqlcipher import DEV_KEY_FILE, database_without_key

    db = settings.resolved_db_path
    if not db.is_file():
        raise StorageError(f"no database at {db} (check --config / --data-dir)")
    if database_without_key(settings) is not None:
        raise StorageError(
            f"no database key for {db}: set QPC_DB_KEY (there is no development key file "
            f"{settings.data_dir / DEV_KEY_FILE} either)")


async def _open(settings: Settings, *, existing: bool = False) -> tuple[App, Storage]:
    """Open the store ``settings`` select; ``existing``: it is read, so it must exist."""
    from qpc_core.app import App

    if existing and settings.storage == "sqlcipher":
        _check_existing_sqlcipher(settings)
    app = App(settings)
    app.data_dir.mkdir(parents=True, exist_ok=True)
    store = await app.hooks.open_storage(app)
    if store is None:
        raise PluginError(
            f"no plugin opened storage '{settings.storage}' (is its plugin installed? "
            "see `qpc plugins`)"
        )
    return app, store


def _same_store(a: Settings, b: Settings, separate_config: bool) -> bool:
    if a.storage != b.storage:
        return False
    if a.storage == "sqlcipher":
        return a.resolved_db_path.resolve() == b.resolved_db_path.resolve()
    # Another backend of the same kind is another store only with settings of its own.
    return not separate_config


def _print_counts(per_kind: list[tuple[str, int]], out: Any) -> None:
    for name, n in per_kind:
        print(f"  {name:<16} {n:>12,}", file=out)


async def _copy(args: argparse.Namespace) -> int:
    from qpc_core.storage.records import copy_store

    src_settings = _settings(args, args.config, args.source)
    dst_settings = _settings(args, args.to_config or args.config, args.target)
    if _same_store(src_settings, dst_settings, args.to_config is not None):
        raise ConfigError(
            f"config: source and target are the same {src_settings.storage} store; give the "
            "target its own settings with --to-config"
        )
    _app, source = await _open(src_settings, existing=True)
    try:
        _app2, target = await _open(dst_settings)
        try:
            print(f"copying {source.name} -> {target.name} ...", file=sys.stderr)
            last = [time.monotonic()]

            def progress(t: Tally) -> None:
                if time.monotonic() - last[0] >= 5:
                    last[0] = time.monotonic()
                    print(f"  {t.total:,} records so far", file=sys.stderr)

            report = await copy_store(source, target, verify=not args.no_verify,
                                      progress=progress)
        finally:
            await target.close()
    finally:
        await source.close()
    print(f"copied {report.total:,} records from {src_settings.storage} to "
          f"{dst_settings.storage} in {report.seconds:.1f} s")
    _print_counts(report.per_kind, sys.stdout)
    print(f"sha256 {report.digest}")
    print("verified: the target reads back identical to the source" if report.verified
          else "not verified (--no-verify)")
    return 0


async def _stats(args: argparse.Namespace) -> int:
    from qpc_core.storage.records import RECORD_TYPES, kind_name, tally

    settings = _settings(args, args.config, args.storage)
    _app, store = await _open(settings, existing=True)
    try:
        t = await tally(store)
    finally:
        await store.close()
    print(f"{settings.storage}: {t.total:,} records")
    _print_counts([(kind_name(rt), t.counts.get(kind_name(rt), 0)) for rt in RECORD_TYPES],
                  sys.stdout)
    print(f"sha256 {t.digest}")
    return 0


def _backup(args: argparse.Namespace) -> int:
    from qpc_core.builtin.sqlcipher import settings_db_key
    from qpc_core.storage.sqlcipher import online_backup

    settings = _settings(args, args.config, None)
    if settings.storage != "sqlcipher":
        raise ConfigError(
            f'config: storage: "qpc store backup" backs up the embedded SQLCipher database; '
            f"back up {settings.storage} with its own tools (for PostgreSQL: pg_dump or "
            "pg_basebackup)"
        )
    _check_existing_sqlcipher(settings)  # before the key: never generate one for nothing
    db = settings.resolved_db_path
    report = online_backup(db, settings_db_key(settings), args.out)
    print(f"backed up {db} -> {report.path} ({report.size_bytes:,} bytes, schema "
          f"{report.schema_version}, {report.queued_messages:,} queued messages) in "
          f"{report.seconds:.1f} s; integrity check ok")
    print("the backup is encrypted with the same database key (QPC_DB_KEY or data/db.key): "
          "keep the key safe, and stored apart from the backups")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.store_command == "copy":
            return asyncio.run(_copy(args))
        if args.store_command == "backup":
            return _backup(args)
        return asyncio.run(_stats(args))
    except StorageError as e:
        print(f"qpc store: error: {e}", file=sys.stderr)
        return 1
