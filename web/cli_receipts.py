"""``aitbc-coordinator receipts verify|audit`` (docs/receipts.md).

``verify FILE`` checks receipts offline against pinned keys (``--key``, ``--keys-url``, or the
configured ones); ``audit`` re-verifies the whole receipt chain in the store and reports the
first break. Both use ``protocol.receipt_verify``, as ``POST /v1/receipts/verify`` does.
Exit status: 0 all valid, 1 something invalid, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from protocol.receipt_verify import (
    ChainAudit,
    TrustedKey,
    check_receipt,
    key_id_from_text,
    keys_from_document,
)
from storage.backends import shown_url, sqlite_url, store_for
from storage.errors import StorageError
from storage.sql import check_database
from web.http import json_error
from web.keys import KeyFileError, read_signing_key, signing_key_path
from web.rest_receipts import signing_keys
from web.settings import Settings, SettingsError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["add_receipts_commands", "database_file", "run_receipts", "settings_with_db"]

AUDIT_PAGE = 500


class _Usage(Exception):
    """Bad arguments or unreadable input: exit 2 with this one-line message."""


def database_file(text: str) -> str:
    """An ``argparse`` type for ``--db``: a file name. An empty one (``--db "$DB"`` with DB
    unset) was taken as no ``--db``, and DATABASE_URL's database was used instead."""
    if not text:
        raise argparse.ArgumentTypeError("an empty file name")
    return text


def add_receipts_commands(sub: Any) -> None:
    receipts = sub.add_parser("receipts", help="verify receipts, audit the receipt chain")
    cmds = receipts.add_subparsers(dest="receipts_command", metavar="{verify,audit}", required=True)
    verify = cmds.add_parser("verify", help="verify receipts in a JSON file, offline")
    verify.add_argument(
        "file", help="a receipt, a list of receipts, or {items|receipt: ...}; - = stdin"
    )
    verify.add_argument(
        "--key",
        action="append",
        default=[],
        help="pinned coordinator public key (64 hex or the key_id); repeatable",
    )
    verify.add_argument("--keys-url", help="pin the keys of a /v1/receipts/signing-keys URL")
    verify.add_argument(
        "--db",
        type=database_file,
        help="without --key/--keys-url: the signing key generated beside this SQLite "
        "database file (overrides DATABASE_URL)",
    )
    audit = cmds.add_parser("audit", help="re-verify the whole receipt chain in the store")
    audit.add_argument(
        "--db", type=database_file, help="SQLite database file (overrides DATABASE_URL)"
    )


def run_receipts(args: argparse.Namespace) -> int:
    try:
        if args.receipts_command == "verify":
            return _verify(args)
        return _audit(args)
    except (_Usage, SettingsError, KeyFileError) as exc:
        print(f"aitbc-coordinator receipts: {exc}", file=sys.stderr)
        return 2


def _configured_keys(settings: Settings) -> tuple[TrustedKey, ...] | None:
    """The configured keys, or those of a generated key file; None when there are none."""
    if settings.receipt_signing_key_hex is None:
        path = signing_key_path(settings)
        if not path.exists():
            return None
        settings = settings.with_(receipt_signing_key_hex=read_signing_key(path))
    return signing_keys(settings)


def _pinned(args: argparse.Namespace) -> tuple[TrustedKey, ...]:
    keys: list[TrustedKey] = []
    for text in args.key:
        try:
            keys.append(TrustedKey(key_id=key_id_from_text(text)))
        except ValueError as exc:
            raise _Usage(f"--key {text!r}: {exc}") from None
    if args.keys_url is not None:
        if not args.keys_url.strip():  # ``--keys-url "$URL"``, URL unset: not "no URL"
            raise _Usage(f"--keys-url {args.keys_url!r}: an empty URL")
        try:
            with urllib.request.urlopen(args.keys_url, timeout=10) as answer:
                keys += keys_from_document(orjson.loads(answer.read()))
        # HTTPException: a port that is no number (InvalidURL), a reply that is not HTTP
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _Usage(f"--keys-url {args.keys_url}: {exc}") from None
    if not keys:
        settings = settings_with_db(args)
        configured = _configured_keys(settings)
        if configured is None:
            # Where it looked: after ``serve --db FILE`` the key is beside FILE, not beside
            # DATABASE_URL's database, and "set RECEIPT_SIGNING_KEY_HEX" alone did not say so.
            raise _Usage(
                "no key to pin: give --key or --keys-url (no RECEIPT_SIGNING_KEY_HEX, and no "
                f"generated key at {signing_key_path(settings)}: --db names the coordinator's "
                "database)"
            )
        keys += configured
    return tuple(keys)


def _receipts_in(doc: Any) -> Sequence[Any]:
    if isinstance(doc, dict) and "signature" not in doc:
        if isinstance(doc.get("items"), list):
            return list(doc["items"])
        if isinstance(doc.get("receipt"), dict):
            return [doc["receipt"]]
    return list(doc) if isinstance(doc, list) else [doc]


def _verify(args: argparse.Namespace) -> int:
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        # orjson, as the REST route: it refuses nesting deeper than 1,024 levels, where the
        # standard parser recursed until RecursionError, or a crash of the whole process where
        # the recursion limit was raised (py_ecc, which eth-account imports, raises it to 100,000)
        doc = orjson.loads(data)
    except OSError as exc:
        raise _Usage(f"{args.file}: {exc}") from None
    except ValueError as exc:
        raise _Usage(f"{args.file}: {json_error(data, exc)}") from None
    keys = _pinned(args)
    receipts = _receipts_in(doc)
    if not receipts:  # nothing verified is no "all valid": a script must not pass on it
        print(f"aitbc-coordinator receipts: no receipts in {args.file}", file=sys.stderr)
        return 1
    bad = 0
    for n, receipt in enumerate(receipts):
        reasons = check_receipt(receipt, keys)
        name = receipt.get("receipt_id") if isinstance(receipt, dict) else None
        label = f"{name}" if isinstance(name, str) else f"#{n}"
        if reasons:
            bad += 1
            print(f"INVALID {label}: {'; '.join(reasons)}")
        else:
            print(f"OK {label}")
    return 1 if bad else 0


def settings_with_db(args: argparse.Namespace) -> Settings:
    """The environment's settings, with ``--db`` over DATABASE_URL (which is then not read)."""
    settings = Settings.from_env(without={"DATABASE_URL"} if args.db else ())
    if args.db:
        settings = settings.with_(database_url=sqlite_url(args.db))
    return settings


def _audit(args: argparse.Namespace) -> int:
    settings = settings_with_db(args)
    if not settings.is_postgres:
        if not settings.database_path.exists():
            raise _Usage(f"no database at {settings.database_path}")
        try:
            # a folder, not SQLite, from a newer build (read-only is fine: it only reads)
            check_database(settings.database_url, writable=False)
        except StorageError as exc:
            raise _Usage(str(exc)) from None
    keys = _configured_keys(settings)
    if keys is None:
        print(
            "warning: no signing key configured; signatures are checked against the key each "
            "receipt names (not pinned)"
        )
    try:
        return anyio.run(_walk, settings, keys)
    except StorageError as exc:
        raise _Usage(f"{shown_url(settings.database_url)}: {exc}") from None


async def _walk(settings: Settings, keys: tuple[TrustedKey, ...] | None) -> int:
    store = store_for(settings.database_url, exclusive=False)  # the server may run
    await store.open()
    try:
        audit = ChainAudit(keys)
        after = 0
        while page := await store.receipt_chain(after, AUDIT_PAGE):
            for seq, receipt in page:
                broken = audit.check(receipt, seq)
                if broken is not None:
                    print(
                        f"chain broken at chain_seq {broken.chain_seq} "
                        f"(receipt {broken.receipt_id}, {audit.checked - 1} receipts fine "
                        f"before it): {'; '.join(broken.reasons)}"
                    )
                    return 1
            after = page[-1][0]
        print(f"receipt chain OK: {audit.checked} receipts")
        return 0
    finally:
        await store.close()
