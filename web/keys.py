"""Development keys: generated on the first start, kept beside the database, printed once."""

from __future__ import annotations

import json
import os
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from web.settings import Settings

__all__ = ["materialize_keys", "signing_key_path"]


def signing_key_path(settings: Settings) -> Path:
    """Where a generated receipt signing key is kept (beside the database)."""
    db = settings.database_path
    return db.with_name(db.name + ".signing-key")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def materialize_keys(settings: Settings) -> tuple[Settings, list[str]]:
    """Fill in API keys and the receipt signing key when none are configured.

    Returns the completed settings and the lines to print (empty unless keys were generated
    now: a key is printed once, on the start that created it, never again).
    """
    lines: list[str] = []
    db = settings.database_path
    if not (settings.client_api_keys or settings.miner_api_keys or settings.admin_api_keys):
        path = db.with_name(db.name + ".keys.json")
        if path.exists():
            keys = json.loads(path.read_text())
        else:
            keys = {
                role: f"{role}-{secrets.token_urlsafe(24)}" for role in ("client", "miner", "admin")
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_private(path, json.dumps(keys, indent=2) + "\n")
            lines.append(f"Generated development API keys (stored in {path}):")
            lines += [f"  {role.upper()}_API_KEYS={key}" for role, key in keys.items()]
        settings = settings.with_(
            client_api_keys=(keys["client"],),
            miner_api_keys=(keys["miner"],),
            admin_api_keys=(keys["admin"],),
        )
    if settings.receipt_signing_key_hex is None:
        path = signing_key_path(settings)
        if path.exists():
            seed = path.read_text().strip()
        else:
            seed = secrets.token_hex(32)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_private(path, seed + "\n")
            lines.append(f"Generated a receipt signing key (stored in {path}).")
        settings = settings.with_(receipt_signing_key_hex=seed)
    return settings, lines
