"""Settings from the environment.

Invalid values stop the start with a one-line message naming the variable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from dispatcher.exchange import canonical_address
from dispatcher.ledger import is_wallet_address
from protocol.receipt_verify import TrustedKey, key_id_from_text
from protocol.receipts import load_signing_key
from protocol.types import iso_time, parse_instant
from storage.backends import is_postgres_url, sqlite_file

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

__all__ = ["Settings", "SettingsError", "check_rotation", "url_host"]


class SettingsError(ValueError):
    """One-line message naming the offending variable."""


def _keys(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "").strip()
    if raw.startswith("["):
        import orjson

        try:
            # orjson refuses nesting deeper than 1,024 levels (a ValueError), where the standard
            # parser recursed until RecursionError: a traceback instead of one line.
            items = orjson.loads(raw)
        except ValueError as exc:
            raise SettingsError(f"{name}: not a JSON array or comma-separated list") from exc
        if not isinstance(items, list) or not all(isinstance(k, str) for k in items):
            raise SettingsError(f"{name}: must be a list of strings")
    else:
        items = raw.split(",")
    keys = tuple(k.strip() for k in items if k.strip())
    for k in keys:
        if len(k) < 8:
            raise SettingsError(f"{name}: every key must have at least 8 characters")
        if not (k.isascii() and k.isprintable()):  # read back from headers as latin-1
            raise SettingsError(
                f"{name}: a key must be printable ASCII (HTTP headers carry no other text)"
            )
    return keys


# How a number is written in a setting: ASCII digits, with one "." at most (surrounding
# whitespace is ignored). ``float()`` also took "1e3", "+8000", "8_000", "inf" and digits of
# other scripts (fullwidth "8000"), and rounded: "3.0000000000000001" was 3, an integer setting.
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z", re.ASCII)


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    if not _DECIMAL.match(text):
        raise SettingsError(f"{name}: {raw!r} is not a number (digits, and a '.' if any)")
    _check_range(name, text, Decimal(text), lo, hi)
    return float(text)


def _check_range(name: str, text: str, value: Decimal, lo: float, hi: float) -> None:
    """The value as written is shown: a float of it could read as another number (1e+30, or
    1.09951e+12 for 1099511627776.4, which looks within the bounds)."""
    if not Decimal(repr(lo)) <= value <= Decimal(repr(hi)):
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise SettingsError(f"{name}: must be between {_shown(lo)} and {_shown(hi)}, got {shown}")


def _shown(value: float) -> str:
    """A number written out whole (``:g`` writes 67108864 as 6.71089e+07)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e18 else f"{value:g}"


def _integer(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    if not _DECIMAL.match(text):
        raise SettingsError(f"{name}: {raw!r} is not a whole number (digits only)")
    value = Decimal(text)
    if value != value.to_integral_value():  # "8000.0" is 8000, as the wire protocol reads it
        raise SettingsError(f"{name}: must be an integer, got {text}")
    _check_range(name, text, value, lo, hi)
    return int(value)


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise SettingsError(f"{name}: must be on or off, got {raw!r}")


def _tls_files(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """TLS_CERT_FILE and TLS_KEY_FILE: both or neither (files are read at ``serve``'s start)."""
    cert = env.get("TLS_CERT_FILE", "").strip() or None
    key = env.get("TLS_KEY_FILE", "").strip() or None
    if (cert is None) != (key is None):
        given, missing = (
            ("TLS_CERT_FILE", "TLS_KEY_FILE")
            if key is None
            else (
                "TLS_KEY_FILE",
                "TLS_CERT_FILE",
            )
        )
        raise SettingsError(f"{missing}: must be set too when {given} is")
    return cert, key


def _unix_time(name: str, text: str) -> int:
    try:
        seconds = int(parse_instant(text))
    except ValueError:
        raise SettingsError(
            f"{name}: {text!r} is not Unix seconds or an ISO-8601 time like 2026-01-31T00:00:00Z"
        ) from None
    # Published as an integer and shown as a date: one beyond 64 bits made every
    # GET /v1/receipts/signing-keys a 500 (the JSON encoder refuses it).
    if not _FIRST_INSTANT <= seconds <= _LAST_INSTANT:
        raise SettingsError(f"{name}: {text!r} is not a time from year 1 to 9999")
    return seconds


_FIRST_INSTANT = -62135596800  # 0001-01-01T00:00:00Z
_LAST_INSTANT = 253402300799  # 9999-12-31T23:59:59Z


def _previous_keys(env: Mapping[str, str], name: str) -> tuple[TrustedKey, ...]:
    """``PUBLIC_KEY@FROM/UNTIL`` entries, comma-separated; ``FROM`` may be empty."""
    keys = []
    for entry in (e.strip() for e in env.get(name, "").split(",")):
        if not entry:
            continue
        key, _, window = entry.partition("@")
        start, slash, until = window.partition("/")
        if not slash or not until.strip():
            raise SettingsError(f"{name}: {entry!r} needs a validity PUBLIC_KEY@FROM/UNTIL")
        try:
            key_id = key_id_from_text(key)
        except ValueError as exc:
            raise SettingsError(f"{name}: {key.strip()!r}: {exc}") from None
        valid_from = _unix_time(name, start.strip()) if start.strip() else None
        valid_until = _unix_time(name, until.strip())
        if valid_from is not None and valid_from > valid_until:
            raise SettingsError(f"{name}: {entry!r} ends before it starts")
        keys.append(TrustedKey(key_id=key_id, valid_from=valid_from, valid_until=valid_until))
    return tuple(keys)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    database_url: str = "sqlite:///./coordinator.db"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Serve HTTPS and wss:// with this certificate chain and its unencrypted private key (PEM).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    client_api_keys: tuple[str, ...] = ()
    miner_api_keys: tuple[str, ...] = ()
    admin_api_keys: tuple[str, ...] = ()
    receipt_signing_key_hex: str | None = None
    receipt_previous_keys: tuple[TrustedKey, ...] = ()
    job_ttl_seconds: float = 900.0
    heartbeat_interval_seconds: float = 10.0
    heartbeat_timeout_seconds: float = 30.0
    sqlite_synchronous: str = "NORMAL"
    max_attempts: int = 3
    accept_timeout_seconds: float = 10.0
    resume_grace_seconds: float = 15.0
    max_frame_bytes: int = 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    rate_limit_per_minute: int = 0
    rest_job_lease_seconds: float = 600.0
    max_poll_wait_seconds: float = 25.0
    terminal_retention_bytes: int = 256 << 20
    max_progress_bytes: int = 64 << 20
    # Submits one client socket may have unanswered before it is read no further.
    max_pending_submits: int = 1000
    # Miner ids one miner key may bind (each is kept for good).
    max_miner_ids_per_key: int = 100_000
    # A client's live (queued or running) jobs, held in memory until they end.
    max_active_jobs_per_client: int = 100_000
    max_active_bytes_per_client: int = 1 << 30
    environment: str = "development"
    metrics_public: bool = False
    # uvicorn's line per HTTP request at log level info (about 20 µs each).
    access_log: bool = True
    # Wait for the database's owner lock instead of refusing to start (docs/configuration.md).
    standby: bool = False
    # How long ``serve`` waits at start for a PostgreSQL server it cannot connect to yet.
    database_wait_seconds: float = 30.0
    # Days an ended job and its events are kept in the store (0: for good); receipts stay.
    job_retention_days: float = 0.0
    # Wallet users, billing and the exchange (docs/wallet.md)
    billing: bool = False
    session_ttl_hours: float = 24.0
    btc_to_aitbc_rate: str = "100000"
    bitcoin_xpub: str | None = None
    # Wallets whose logged-in users are also admins (lowercased 0x addresses).
    admin_wallet_addresses: frozenset[str] = frozenset()
    bitcoin_address: str | None = None
    esplora_url: str | None = None
    esplora_poll_seconds: float = 30.0
    btc_confirmations: int = 1
    payment_ttl_seconds: float = 3600.0
    # The most pending exchange payments one payer (ledger account) may have at a time.
    max_pending_payments: int = 5

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, without: Collection[str] = ()
    ) -> Settings:
        """``without``: variables a command-line option overrides, read as unset (an invalid
        value of one, such as Kubernetes' API_PORT=tcp://… for a Service named ``api``,
        stopped a start that did not use it)."""
        env = os.environ if env is None else env
        if without:
            env = {k: v for k, v in env.items() if k not in without}
        if env.get("API_KEYS", "").strip():
            # The seed document's one key list: ignored, it left the operator's key refused
            # (401) while the start generated development keys in its place.
            raise SettingsError(
                "API_KEYS: not read by this coordinator (a key serves one role): list each key "
                "in CLIENT_API_KEYS, MINER_API_KEYS or ADMIN_API_KEYS, and unset API_KEYS"
            )
        url = _database_url(env.get("DATABASE_URL", "sqlite:///./coordinator.db").strip())
        port = _integer(env, "API_PORT", 8000, 0, 65535)
        sync = env.get("SQLITE_SYNCHRONOUS", "").strip().upper() or "NORMAL"
        if sync not in ("NORMAL", "FULL"):
            raise SettingsError("SQLITE_SYNCHRONOUS: must be NORMAL or FULL")
        signing = env.get("RECEIPT_SIGNING_KEY_HEX", "").strip() or None
        if signing is not None:
            try:
                load_signing_key(signing)
            except ValueError:
                raise SettingsError(
                    "RECEIPT_SIGNING_KEY_HEX: must be 64 hex digits (a 32-byte Ed25519 seed)"
                ) from None
        interval = _number(env, "HEARTBEAT_INTERVAL_SECONDS", 10, 0.05, 3600)
        timeout = _number(env, "HEARTBEAT_TIMEOUT_SECONDS", 30, 0.05, 3600)
        if timeout < interval:
            raise SettingsError(
                "HEARTBEAT_TIMEOUT_SECONDS: must not be shorter than HEARTBEAT_INTERVAL_SECONDS"
            )
        cert, key = _tls_files(env)
        settings = cls(
            database_url=url,
            api_host=env.get("API_HOST", "127.0.0.1").strip() or "127.0.0.1",
            api_port=port,
            tls_cert_file=cert,
            tls_key_file=key,
            client_api_keys=_keys(env, "CLIENT_API_KEYS"),
            miner_api_keys=_keys(env, "MINER_API_KEYS"),
            admin_api_keys=_keys(env, "ADMIN_API_KEYS"),
            receipt_signing_key_hex=signing,
            receipt_previous_keys=_previous_keys(env, "RECEIPT_PREVIOUS_KEYS"),
            job_ttl_seconds=_number(env, "JOB_TTL_SECONDS", 900, 1, 7 * 86400),
            heartbeat_interval_seconds=interval,
            heartbeat_timeout_seconds=timeout,
            sqlite_synchronous=sync,
            max_attempts=_integer(env, "MAX_ATTEMPTS", 3, 1, 100),
            accept_timeout_seconds=_number(env, "ACCEPT_TIMEOUT_SECONDS", 10, 0.01, 3600),
            resume_grace_seconds=_number(env, "RESUME_GRACE_SECONDS", 15, 0, 3600),
            max_frame_bytes=_integer(env, "WS_MAX_FRAME_BYTES", 1024 * 1024, 1024, 64 << 20),
            max_body_bytes=_integer(env, "MAX_BODY_BYTES", 1024 * 1024, 1024, 64 << 20),
            rate_limit_per_minute=_integer(env, "RATE_LIMIT_PER_MINUTE", 0, 0, 1_000_000),
            rest_job_lease_seconds=_number(env, "REST_JOB_LEASE_SECONDS", 600, 1, 7 * 86400),
            max_poll_wait_seconds=_number(env, "MAX_POLL_WAIT_SECONDS", 25, 1, 300),
            terminal_retention_bytes=_integer(
                env, "TERMINAL_RETENTION_BYTES", 256 << 20, 0, 1 << 40
            ),
            max_progress_bytes=_integer(env, "MAX_PROGRESS_BYTES", 64 << 20, 1024, 1 << 40),
            max_pending_submits=_integer(env, "MAX_PENDING_SUBMITS", 1000, 1, 100_000),
            max_miner_ids_per_key=_integer(env, "MAX_MINER_IDS_PER_KEY", 100_000, 1, 100_000_000),
            max_active_jobs_per_client=_integer(
                env, "MAX_ACTIVE_JOBS_PER_CLIENT", 100_000, 1, 100_000_000
            ),
            max_active_bytes_per_client=_integer(
                env, "MAX_ACTIVE_BYTES_PER_CLIENT", 1 << 30, 1024, 1 << 40
            ),
            environment=env.get("ENVIRONMENT", "").strip() or "development",
            metrics_public=_switch(env, "METRICS_PUBLIC", False),
            access_log=_switch(env, "ACCESS_LOG", True),
            standby=_switch(env, "STANDBY", False),
            database_wait_seconds=_number(env, "DATABASE_WAIT_SECONDS", 30, 0, 3600),
            job_retention_days=_number(env, "JOB_RETENTION_DAYS", 0, 0, 36500),
        ).with_(**_wallet_settings(env))
        _check_keys(settings, env.get("SECRET_KEY", "").strip())
        return settings

    @property
    def is_postgres(self) -> bool:
        return is_postgres_url(self.database_url)

    @property
    def database_path(self) -> Path:
        """The SQLite database file, beside which its generated keys are kept. On PostgreSQL,
        ``<database name>`` in the working directory: the same files go there."""
        if self.is_postgres:
            return Path(urlsplit(self.database_url).path.lstrip("/"))
        return Path(sqlite_file(self.database_url))

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``http://[::1]:8000``)."""
    return f"[{host}]" if ":" in host else host


def check_rotation(settings: Settings, now: float) -> None:
    """A coordinator about to sign receipts publishes its key (``RECEIPT_SIGNING_KEY_HEX``, or
    the one generated beside the database) as valid from the newest previous key's ``UNTIL``:
    one still to come would make every receipt it signs until then fail verification
    (``UNTIL`` is when the old key stopped signing)."""
    for key in settings.receipt_previous_keys:
        if key.valid_until is not None and key.valid_until > now:
            raise SettingsError(
                f"RECEIPT_PREVIOUS_KEYS: {key.key_id} is valid until "
                f"{iso_time(key.valid_until)}, which has not come yet: the current key would "
                "vouch only from then, so every receipt signed before would fail verification "
                "(UNTIL is when the old key stopped signing)"
            )


def _database_url(url: str) -> str:
    if "\x00" in unquote(url):  # no file name or connection parameter holds one
        raise SettingsError("DATABASE_URL: must not contain NUL (%00)")
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url
    if is_postgres_url(url):
        try:
            parts = urlsplit(url)
            # libpq's spellings, as asyncpg reads them: several hosts (``a:5432,b:5432``, tried
            # in turn), or none before the path and ``?host=DIR`` (a Unix socket's directory).
            hosts = parts.netloc.rpartition("@")[2]
            for host in hosts.split(","):
                urlsplit(f"//{host}").port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise SettingsError(f"DATABASE_URL: not a valid PostgreSQL URL ({exc})") from None
        name = parts.path.lstrip("/")
        has_host = hosts.strip(",") or any(k == "host" and v for k, v in parse_qsl(parts.query))
        if has_host and name and "/" not in name:
            return url
    raise SettingsError(
        "DATABASE_URL: must be sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE "
        "(or postgresql://USER@/DATABASE?host=SOCKET_DIRECTORY)"
    )


def _check_keys(settings: Settings, secret: str) -> None:
    """No key serves two roles. Upstream's ``SECRET_KEY`` signs nothing here (no JWTs): as
    upstream, it is only checked not to be an API key (a secret pasted in the wrong place)."""
    roles = (
        ("CLIENT_API_KEYS", settings.client_api_keys),
        ("ADMIN_API_KEYS", settings.admin_api_keys),
        ("MINER_API_KEYS", settings.miner_api_keys),
    )
    for i, (name, keys) in enumerate(roles):
        for other, other_keys in roles[:i]:
            if set(keys) & set(other_keys):
                raise SettingsError(f"{name}: a key is also configured in {other}")
        if secret and secret in keys:
            raise SettingsError(f"SECRET_KEY: equals a key of {name}")


def _wallet_settings(env: Mapping[str, str]) -> dict[str, object]:
    rate = env.get("BTC_TO_AITBC_RATE", "100000").strip() or "100000"
    # Written as every number setting is ("1e3", "+5", "1_000" were taken too).
    ok = bool(_DECIMAL.match(rate)) and 0 < Decimal(rate) <= 10**9
    if not ok or Decimal(rate).quantize(Decimal("1e-8")) != Decimal(rate):
        raise SettingsError("BTC_TO_AITBC_RATE: must be a positive decimal (at most 8 places)")
    xpub = env.get("BITCOIN_XPUB", "").strip() or None
    if xpub is not None:
        from web.exchange import AddressBook, XpubError

        try:
            AddressBook(xpub)
        except XpubError as exc:
            raise SettingsError(str(exc)) from None
    address = env.get("BITCOIN_ADDRESS", "").strip() or None
    if address is not None:
        from web.exchange import is_bitcoin_address

        if not is_bitcoin_address(address):
            raise SettingsError(
                "BITCOIN_ADDRESS: not a Bitcoin address only its key can spend (P2PKH, P2SH, "
                "P2WPKH, P2WSH or P2TR, checksum included): payers would be shown it"
            )
        address = canonical_address(address)  # as Esplora lists outputs and wallets show it
    esplora = env.get("ESPLORA_URL", "").strip().rstrip("/") or None
    if esplora is not None and not _http_url(esplora):
        raise SettingsError("ESPLORA_URL: must be an http:// or https:// URL")
    return {
        "billing": _switch(env, "BILLING", False),
        "session_ttl_hours": _number(env, "SESSION_TTL_HOURS", 24, 0.01, 24 * 365),
        "btc_to_aitbc_rate": rate,
        "bitcoin_xpub": xpub,
        "bitcoin_address": address,
        "esplora_url": esplora,
        "esplora_poll_seconds": _number(env, "ESPLORA_POLL_SECONDS", 30, 1, 86400),
        "btc_confirmations": _integer(env, "BTC_CONFIRMATIONS", 1, 0, 1000),
        "payment_ttl_seconds": _number(env, "PAYMENT_TTL_SECONDS", 3600, 60, 30 * 86400),
        "max_pending_payments": _integer(env, "MAX_PENDING_PAYMENTS", 5, 1, 10_000),
        "admin_wallet_addresses": _wallets(env, "ADMIN_WALLET_ADDRESSES"),
    }


def _http_url(url: str) -> bool:
    """An http(s) URL with a host, and a port that is a number (if any), as the payment watcher's
    client reads it: one it refuses (``http://[::1``, ``http://h:x``) raised ``InvalidURL``,
    which the watcher does not catch, out of its first poll with a payment pending, into the
    task group that runs the dispatcher."""
    import httpx

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number, or beyond 65535
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _wallets(env: Mapping[str, str], name: str) -> frozenset[str]:
    """A comma-separated list of wallet addresses (0x and 40 hex digits), lowercased."""
    out = set()
    for item in env.get(name, "").split(","):
        address = item.strip()
        if not address:
            continue
        if not is_wallet_address(address):
            raise SettingsError(
                f"{name}: {address!r} is not a wallet address (0x and 40 hex digits)"
            )
        out.add(address.lower())
    return frozenset(out)
