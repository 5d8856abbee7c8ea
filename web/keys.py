"""Development keys: generated on the first start, kept beside the database, printed once."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from typing import TYPE_CHECKING

import orjson

from protocol.receipts import load_signing_key

if TYPE_CHECKING:
    from pathlib import Path

    from web.settings import Settings

__all__ = [
    "KeyFileError",
    "KeysMissing",
    "key_file",
    "materialize_keys",
    "read_signing_key",
    "signing_key_path",
    "unkeyed_roles",
]

ROLES = ("client", "miner", "admin")


class KeyFileError(Exception):
    """Keys cannot be had: one line naming the file."""


class KeysMissing(KeyFileError):
    """A standby found neither configured keys nor the primary's stored ones."""


def key_file(settings: Settings, suffix: str) -> Path:
    """The file beside the database that ends in ``suffix`` (``.keys.json``, ``.signing-key``).

    Beside the database file itself: a database reached through a symlink keeps its keys next
    to the file the link names, so every path to one database finds the same keys (as every
    path finds the same owner lock). Keys that an older build wrote beside the link are still
    used where no keys are beside the file.
    """
    given = settings.database_path
    beside_given = given.with_name(given.name + suffix)
    real = given.resolve()
    beside_real = real.with_name(real.name + suffix)
    if beside_given.resolve() == beside_real:  # no link on the way: keep the path as given
        return beside_given
    return beside_given if beside_given.exists() and not beside_real.exists() else beside_real


def signing_key_path(settings: Settings) -> Path:
    """Where a generated receipt signing key is kept (beside the database)."""
    return key_file(settings, ".signing-key")


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` (mode 0600) holding ``text``, whole or not at all: a file cut short (a
    full disk, a crash) would be refused as damaged by every later start. The text is synced
    in a temporary file beside it, which is then linked into place (never over a file that
    exists); ``KeyFileError`` names the file when that fails."""
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(temp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the new name too survives a power cut
        finally:
            os.close(folder)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def materialize_keys(settings: Settings) -> tuple[Settings, list[str]]:
    """Fill in API keys and the receipt signing key when none are configured.

    Returns the completed settings and the lines to print (empty unless keys were generated
    now: a key is printed once, on the start that created it, never again).
    """
    lines: list[str] = []
    generated: Path | None = None  # where API keys generated now are stored
    if not (settings.client_api_keys or settings.miner_api_keys or settings.admin_api_keys):
        path = key_file(settings, ".keys.json")
        if settings.standby and not path.exists():
            raise KeysMissing(_missing("no API keys are configured", path))
        if path.exists():
            keys = _read_api_keys(path)
        else:
            keys = {role: f"{role}-{secrets.token_urlsafe(24)}" for role in ROLES}
            _write_private(path, json.dumps(keys, indent=2) + "\n")
            generated = path
            lines.append(f"Generated development API keys (stored in {path}):")
            lines += [f"  {role.upper()}_API_KEYS={key}" for role, key in keys.items()]
        settings = settings.with_(
            client_api_keys=(keys["client"],),
            miner_api_keys=(keys["miner"],),
            admin_api_keys=(keys["admin"],),
        )
    if settings.receipt_signing_key_hex is None:
        path = signing_key_path(settings)
        if settings.standby and not path.exists():
            raise KeysMissing(_missing("RECEIPT_SIGNING_KEY_HEX is not set", path))
        if path.exists():
            seed = read_signing_key(path)
        else:
            seed = secrets.token_hex(32)
            try:
                _write_private(path, seed + "\n")
            except KeyFileError as exc:
                if generated is None:
                    raise
                # The start stops before the keys are printed, and the next one reuses the
                # file without printing them: say where they are.
                raise KeyFileError(
                    f"{exc} (the API keys generated by this start are stored in {generated})"
                ) from None
            lines.append(f"Generated a receipt signing key (stored in {path}).")
        settings = settings.with_(receipt_signing_key_hex=seed)
    return settings, lines


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _read_api_keys(path: Path) -> dict[str, str]:
    """The generated API keys stored in ``path``: ``KeyFileError`` unless it holds a JSON object
    with a key for each role."""
    try:
        keys = orjson.loads(_read(path))  # the standard parser recursed until RecursionError
    except ValueError:
        keys = None
    if not isinstance(keys, dict) or not all(
        isinstance(keys.get(role), str) and keys[role].strip() for role in ROLES
    ):
        raise KeyFileError(
            f"{path} is damaged: it must be a JSON object with a key for each of client, miner "
            "and admin (restore it, or set the *_API_KEYS variables)"
        )
    # As the *_API_KEYS variables are checked (web.settings): a key in two roles (a hand edit)
    # made every client an admin, and one no HTTP header carries was served all the same.
    found = [keys[role] for role in ROLES]
    if len(set(found)) < len(found) or not all(k.isascii() and k.isprintable() for k in found):
        raise KeyFileError(
            f"{path} is damaged: its keys must differ from role to role and be printable ASCII "
            "(restore it, or set the *_API_KEYS variables)"
        )
    return {role: keys[role] for role in ROLES}


def read_signing_key(path: Path) -> str:
    """The generated receipt signing seed stored in ``path``: ``KeyFileError`` unless it is 64
    hex digits."""
    seed = _read(path).strip()
    try:
        load_signing_key(seed)
    except ValueError:
        raise KeyFileError(
            f"{path} is damaged: it must hold a 32-byte Ed25519 seed as 64 hex digits "
            "(restore it, or set RECEIPT_SIGNING_KEY_HEX)"
        ) from None
    return seed


def _missing(what: str, path: Path) -> str:
    # A standby generating keys of its own would take over with credentials no miner or
    # client holds, and sign receipts with a key nobody pinned.
    return (
        f"STANDBY: {what} and {path} does not exist: a standby uses the primary's keys "
        "(set them in the environment, or start it where the primary keeps its key files)"
    )


def unkeyed_roles(settings: Settings) -> list[str]:
    """Warnings for the roles left without an API key when only some were configured (none
    at all means generated keys): that role then cannot connect, with no sign of why."""
    said = []
    if not settings.miner_api_keys:
        said.append("no MINER_API_KEYS: no miner can connect")
    if not settings.client_api_keys:
        said.append("no CLIENT_API_KEYS: only wallet users' sessions can submit jobs")
    if not settings.admin_api_keys and not settings.admin_wallet_addresses:
        said.append(
            "no ADMIN_API_KEYS (nor ADMIN_WALLET_ADDRESSES): the admin routes, /ops and "
            "/metrics (unless METRICS_PUBLIC=on) refuse everyone"
        )
    return said
