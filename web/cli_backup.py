"""``aitbc-coordinator backup DEST``: a consistent copy of a running coordinator's SQLite store.

Copying ``coordinator.db`` with ``cp`` while the coordinator runs is not a backup: the
newest commits sit in ``coordinator.db-wal`` until a checkpoint, and a file copied while a
checkpoint writes into it can be torn. This reads the database through SQLite's online
backup API on a read-only connection: one read transaction, so the copy is the database as
of one commit, taken without holding up the coordinator's writer. The generated keys kept
beside the database (``.keys.json``, ``.signing-key``: without the signing key, receipts
already issued cannot be told from forgeries once a new one is generated) are copied beside
the backup. How to restore: docs/ops.md, "Backups".
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.errors import StorageError
from storage.sql import check_database, copy_database, sync_file
from web.cli_receipts import database_file, settings_with_db
from web.keys import key_file
from web.settings import Settings, SettingsError

if TYPE_CHECKING:
    import argparse

__all__ = ["add_backup_command", "run_backup"]

KEY_SUFFIXES = (".keys.json", ".signing-key")


class _Refused(Exception):
    """One line for stderr, exit 2."""


def add_backup_command(sub: Any) -> None:
    backup = sub.add_parser(
        "backup", help="copy the SQLite database (and its generated keys) while it runs"
    )
    backup.add_argument("dest", type=database_file, help="the backup's file (must not exist)")
    backup.add_argument(
        "--db", type=database_file, help="SQLite database file (overrides DATABASE_URL)"
    )


def run_backup(args: argparse.Namespace) -> int:
    try:
        copied = _backup(settings_with_db(args), Path(args.dest))
    except (_Refused, SettingsError) as exc:
        print(f"aitbc-coordinator backup: {exc}", file=sys.stderr)
        return 2
    for line in copied:
        print(line)
    return 0


def _backup(settings: Settings, dest: Path) -> list[str]:
    if settings.is_postgres:
        raise _Refused("this copies a SQLite database; back PostgreSQL up with pg_dump")
    source = settings.database_path
    if not source.is_file():
        raise _Refused(f"no database at {source}")
    try:
        check_database(settings.database_url, writable=False)  # ours, not a folder or junk
    except StorageError as exc:
        raise _Refused(str(exc)) from None
    beside = [(key_file(settings, suffix), Path(f"{dest}{suffix}")) for suffix in KEY_SUFFIXES]
    keys = [(path, to) for path, to in beside if path.exists()]
    for to in (dest, *(to for _, to in keys)):
        if to.exists() or to.is_symlink():
            raise _Refused(f"{to} exists: name a new file")
    partial = dest.with_name(f"{dest.name}.partial")
    try:
        copy_database(source, partial)
        sync_file(partial)
        os.replace(partial, dest)
        for path, to in keys:
            shutil.copy2(path, to)  # the mode too: 0600
            sync_file(to)
        sync_file(dest.parent)
    except (OSError, StorageError) as exc:
        partial.unlink(missing_ok=True)
        raise _Refused(f"cannot write {dest}: {exc}") from None
    size = dest.stat().st_size / 1e6
    return [
        f"backed up {source} to {dest} ({size:.1f} MB)",
        *(f"with {path} as {to}" for path, to in keys),
    ]
