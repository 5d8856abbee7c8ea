"""Settings from the environment, first-start key generation, and the CLI's refusal to start."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from tests.serve_once import serve_once
from web import cli
from web.cli import main
from web.keys import materialize_keys, signing_key_path
from web.settings import Settings, SettingsError

if TYPE_CHECKING:
    from pathlib import Path

VARIABLES = (
    "DATABASE_URL",
    "API_HOST",
    "API_PORT",
    "CLIENT_API_KEYS",
    "MINER_API_KEYS",
    "ADMIN_API_KEYS",
    "RECEIPT_SIGNING_KEY_HEX",
    "RECEIPT_PREVIOUS_KEYS",
    "JOB_TTL_SECONDS",
    "HEARTBEAT_INTERVAL_SECONDS",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "SQLITE_SYNCHRONOUS",
    "MAX_ATTEMPTS",
    "ACCEPT_TIMEOUT_SECONDS",
    "RESUME_GRACE_SECONDS",
    "WS_MAX_FRAME_BYTES",
    "TERMINAL_RETENTION_BYTES",
    "MAX_PROGRESS_BYTES",
    "ENVIRONMENT",
    "STANDBY",
)


@pytest.fixture
def serve_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main(["serve", ...])`` in this process, from an environment without the settings'
    variables: a server that starts stops at once (SIGTERM, as a supervisor would)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    build = cli.build_server

    def signalled(*args: Any, **kwargs: Any) -> Any:
        server = build(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)
        return server

    monkeypatch.setattr(cli, "build_server", signalled)


# ---- Settings.from_env --------------------------------------------------------------------


def test_defaults_from_an_empty_environment() -> None:
    """No variables set: the documented defaults."""
    s = Settings.from_env({})
    assert s == Settings()
    assert s.api_port == 8000
    assert s.sqlite_synchronous == "NORMAL"
    assert s.receipt_signing_key_hex is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://aitbc:s3cret@db.internal:5432/coordinator",
        "postgres://aitbc@db.internal/coordinator",
        "postgresql+asyncpg://aitbc@127.0.0.1/coordinator",
        # libpq's: a Unix socket's directory (no host before the path), several hosts
        "postgresql://aitbc@/coordinator?host=/var/run/postgresql",
        "postgresql://aitbc@db1.internal:5432,db2.internal:5433/coordinator"
        "?target_session_attrs=read-write",
        "postgresql://aitbc@[::1]:5432,db2/coordinator?sslmode=verify-full",
    ],
)
def test_a_postgresql_url_is_taken_and_its_local_files_are_named_after_the_database(
    url: str,
) -> None:
    """Generated keys of a PostgreSQL coordinator are kept in the working directory, named
    after the database (``coordinator.keys.json``), as SQLite's are beside its file."""
    s = Settings.from_env({"DATABASE_URL": url})
    assert s.database_url == url
    assert s.is_postgres
    assert s.database_path.as_posix() == "coordinator"
    assert not Settings.from_env({"DATABASE_URL": "sqlite:///c.db"}).is_postgres


def test_values_are_parsed() -> None:
    """Numbers, key lists (comma-separated or JSON) and choices are read from the environment."""
    s = Settings.from_env(
        {
            "DATABASE_URL": "sqlite:///data/c.db",
            "API_PORT": "9000",
            "CLIENT_API_KEYS": " client-one-key , client-two-key ,",
            "MINER_API_KEYS": '["miner-one-key"]',
            "RECEIPT_SIGNING_KEY_HEX": "AB" * 32,
            "JOB_TTL_SECONDS": "60",
            "HEARTBEAT_INTERVAL_SECONDS": "5",
            "HEARTBEAT_TIMEOUT_SECONDS": "5",
            "SQLITE_SYNCHRONOUS": "full",
            "MAX_ATTEMPTS": "5",
            "TERMINAL_RETENTION_BYTES": "1048576",
            "MAX_PROGRESS_BYTES": "4096",
        }
    )
    assert s.database_path.as_posix() == "data/c.db"
    assert s.api_port == 9000
    assert s.client_api_keys == ("client-one-key", "client-two-key")
    assert s.miner_api_keys == ("miner-one-key",)
    assert s.admin_api_keys == ()
    assert s.receipt_signing_key_hex == "AB" * 32
    assert (s.job_ttl_seconds, s.heartbeat_interval_seconds, s.heartbeat_timeout_seconds) == (
        60,
        5,
        5,
    )
    assert s.sqlite_synchronous == "FULL"
    assert s.max_attempts == 5
    assert s.terminal_retention_bytes == 1 << 20
    assert s.max_progress_bytes == 4096


def test_previous_receipt_keys_are_parsed() -> None:
    """PUBLIC_KEY@FROM/UNTIL entries: hex or key id; Unix seconds or ISO-8601; FROM optional."""
    kid = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    hex_key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    s = Settings.from_env(
        {
            "RECEIPT_PREVIOUS_KEYS": f" {hex_key}@/2023-11-14T22:13:20Z ,"
            f"{kid}@1600000000/2023-11-15, "
        }
    )
    assert [(k.key_id, k.valid_from, k.valid_until) for k in s.receipt_previous_keys] == [
        (kid, None, 1_700_000_000),
        (kid, 1_600_000_000, 1_700_006_400),
    ]


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"API_PORT": "http"}, "API_PORT"),
        ({"API_PORT": "70000"}, "API_PORT"),
        ({"API_PORT": "-1"}, "API_PORT"),
        ({"API_PORT": "80.5"}, "API_PORT"),
        ({"JOB_TTL_SECONDS": "0"}, "JOB_TTL_SECONDS"),
        ({"JOB_TTL_SECONDS": "soon"}, "JOB_TTL_SECONDS"),
        ({"JOB_TTL_SECONDS": "nan"}, "JOB_TTL_SECONDS"),
        ({"JOB_TTL_SECONDS": "1e12"}, "JOB_TTL_SECONDS"),
        ({"HEARTBEAT_INTERVAL_SECONDS": "0"}, "HEARTBEAT_INTERVAL_SECONDS"),
        ({"HEARTBEAT_INTERVAL_SECONDS": "often"}, "HEARTBEAT_INTERVAL_SECONDS"),
        ({"HEARTBEAT_TIMEOUT_SECONDS": "inf"}, "HEARTBEAT_TIMEOUT_SECONDS"),
        (
            {"HEARTBEAT_INTERVAL_SECONDS": "20", "HEARTBEAT_TIMEOUT_SECONDS": "10"},
            "HEARTBEAT_TIMEOUT_SECONDS",
        ),
        ({"RECEIPT_SIGNING_KEY_HEX": "zz" * 32}, "RECEIPT_SIGNING_KEY_HEX"),
        ({"RECEIPT_SIGNING_KEY_HEX": "ab" * 16}, "RECEIPT_SIGNING_KEY_HEX"),
        ({"RECEIPT_SIGNING_KEY_HEX": "ab" * 33}, "RECEIPT_SIGNING_KEY_HEX"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32}, "RECEIPT_PREVIOUS_KEYS"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32 + "@1700000000"}, "RECEIPT_PREVIOUS_KEYS"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32 + "@1/"}, "RECEIPT_PREVIOUS_KEYS"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 31 + "@/1700000000"}, "RECEIPT_PREVIOUS_KEYS"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32 + "@/yesterday"}, "RECEIPT_PREVIOUS_KEYS"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32 + "@20/10"}, "RECEIPT_PREVIOUS_KEYS"),
        # beyond 64 bits: every GET /v1/receipts/signing-keys was a 500
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32 + "@/1e23"}, "RECEIPT_PREVIOUS_KEYS"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32 + "@-1e20/1"}, "RECEIPT_PREVIOUS_KEYS"),
        ({"RECEIPT_PREVIOUS_KEYS": "ab" * 32 + "@/253402300800"}, "RECEIPT_PREVIOUS_KEYS"),
        # the payment watcher's client refused these (InvalidURL, uncaught) at its first
        # poll with a payment pending
        ({"ESPLORA_URL": "http://[::1"}, "ESPLORA_URL"),
        ({"ESPLORA_URL": "http://esplora:x/api"}, "ESPLORA_URL"),
        ({"ESPLORA_URL": "http://esplora:99999/api"}, "ESPLORA_URL"),
        ({"ESPLORA_URL": "http:///api"}, "ESPLORA_URL"),
        ({"DATABASE_URL": "mysql://db/coordinator"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://db"}, "DATABASE_URL"),  # no database named
        ({"DATABASE_URL": "postgresql:///coordinator"}, "DATABASE_URL"),  # no host
        ({"DATABASE_URL": "postgresql://db:port/coordinator"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://a:5432,b:x/coordinator"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u@/coordinator?host="}, "DATABASE_URL"),  # no host
        ({"DATABASE_URL": "sqlite://relative.db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///x%00y.db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://db/coord%00inator"}, "DATABASE_URL"),
        ({"SQLITE_SYNCHRONOUS": "OFF"}, "SQLITE_SYNCHRONOUS"),
        ({"SQLITE_SYNCHRONOUS": "EXTRA"}, "SQLITE_SYNCHRONOUS"),
        ({"CLIENT_API_KEYS": "short"}, "CLIENT_API_KEYS"),
        ({"MINER_API_KEYS": "long-enough-key,tiny"}, "MINER_API_KEYS"),
        ({"ADMIN_API_KEYS": "[not json"}, "ADMIN_API_KEYS"),
        ({"ADMIN_API_KEYS": "[1, 2]"}, "ADMIN_API_KEYS"),
        # nested deeper than the parser recurses: a RecursionError traceback, not one line
        ({"CLIENT_API_KEYS": "[" * 100_000}, "CLIENT_API_KEYS"),
        ({"MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS"),
        ({"ACCEPT_TIMEOUT_SECONDS": "-1"}, "ACCEPT_TIMEOUT_SECONDS"),
        ({"RESUME_GRACE_SECONDS": "x"}, "RESUME_GRACE_SECONDS"),
        ({"WS_MAX_FRAME_BYTES": "10"}, "WS_MAX_FRAME_BYTES"),
        ({"TERMINAL_RETENTION_BYTES": "-1"}, "TERMINAL_RETENTION_BYTES"),
        ({"MAX_PROGRESS_BYTES": "100"}, "MAX_PROGRESS_BYTES"),
        ({"METRICS_PUBLIC": "maybe"}, "METRICS_PUBLIC"),
        ({"STANDBY": "later"}, "STANDBY"),
        (
            {"CLIENT_API_KEYS": "shared-key-123", "MINER_API_KEYS": "shared-key-123"},
            "MINER_API_KEYS",
        ),
        (
            {"ADMIN_API_KEYS": "shared-key-123", "MINER_API_KEYS": "shared-key-123"},
            "MINER_API_KEYS",
        ),
        (
            {"CLIENT_API_KEYS": "shared-key-123", "ADMIN_API_KEYS": "shared-key-123"},
            "ADMIN_API_KEYS",
        ),
        ({"MINER_API_KEYS": "miner-key-123", "SECRET_KEY": "miner-key-123"}, "SECRET_KEY"),
    ],
)
def test_invalid_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    """An invalid value raises SettingsError with a one-line message starting with its name."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert message.startswith(f"{variable}:")
    assert "\n" not in message


@pytest.mark.parametrize(
    "env",
    [
        {"CLIENT_API_KEYS": "clé-secrète-1"},
        {"MINER_API_KEYS": '["miner-key-\\u00e9t\\u00e9"]'},
        {"ADMIN_API_KEYS": '["admin-key\\u0007-1"]'},
    ],
)
def test_a_key_an_http_header_cannot_carry_is_refused(env: dict[str, str]) -> None:
    """Headers are read as latin-1, so a key with "é" sent as X-Api-Key or Bearer (its UTF-8
    bytes) never matched: every REST call and socket handshake was 401 / 4401 while the
    socket's auth frame (JSON) took it. Such a key now stops the start, naming the variable."""
    [(name, _)] = env.items()
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value) == (
        f"{name}: a key must be printable ASCII (HTTP headers carry no other text)"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"WS_MAX_FRAME_BYTES": "100000000"},
            "WS_MAX_FRAME_BYTES: must be between 1024 and 67108864, got 100000000",
        ),
        (
            {"TERMINAL_RETENTION_BYTES": "2000000000000"},
            "TERMINAL_RETENTION_BYTES: must be between 0 and 1099511627776, got 2000000000000",
        ),
        (
            {"RATE_LIMIT_PER_MINUTE": "1234567"},
            "RATE_LIMIT_PER_MINUTE: must be between 0 and 1000000, got 1234567",
        ),
        (
            {"HEARTBEAT_INTERVAL_SECONDS": "0.01"},
            "HEARTBEAT_INTERVAL_SECONDS: must be between 0.05 and 3600, got 0.01",
        ),
        (
            {"TERMINAL_RETENTION_BYTES": "1099511627776.4"},
            "TERMINAL_RETENTION_BYTES: must be an integer, got 1099511627776.4",
        ),
        (
            {"API_PORT": "99999999999999999999999999"},
            "API_PORT: must be between 0 and 65535, got 99999999999999999999999999",
        ),
        (
            {"JOB_TTL_SECONDS": "604800.0000000001"},
            "JOB_TTL_SECONDS: must be between 1 and 604800, got 604800.0000000001",
        ),
    ],
)
def test_a_value_out_of_range_names_the_exact_bounds(env: dict[str, str], message: str) -> None:
    """The bounds and the value are written out whole: with ``%g`` a limit of 64 MiB read
    "6.71089e+07", which is not the limit (67,108,864) and misleads whoever sets it next. The
    value is shown as written: as a float, 1099511627776.4 read "1.09951e+12" (which looks
    within the bounds) and a 26-digit port "1e+26"."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("API_PORT", "1e3"),
        ("API_PORT", "+8000"),
        ("API_PORT", "-0"),
        ("API_PORT", "8_000"),
        ("API_PORT", "\uff18\uff10\uff10\uff10"),  # fullwidth digits
        ("API_PORT", "nan"),
        ("API_PORT", "1e400"),
        ("MAX_ATTEMPTS", "3.0000000000000001"),
        ("MAX_ATTEMPTS", "1e1"),
        ("TERMINAL_RETENTION_BYTES", "1099511627776.00001"),
        ("WS_MAX_FRAME_BYTES", "1 048 576"),
        ("JOB_TTL_SECONDS", "1e400"),
        ("JOB_TTL_SECONDS", "-inf"),
        ("HEARTBEAT_INTERVAL_SECONDS", "1e-400"),
        ("ESPLORA_POLL_SECONDS", "+30"),
        ("SESSION_TTL_HOURS", "\u0662\u0664"),  # Arabic-Indic digits
        ("BTC_TO_AITBC_RATE", "1e3"),
        ("BTC_TO_AITBC_RATE", "1_000"),
        ("BTC_TO_AITBC_RATE", "+5"),
    ],
)
def test_a_number_is_digits_and_a_point_only(variable: str, raw: str) -> None:
    """``float()`` read the settings' numbers: API_PORT=1e3 started on port 1000, and
    exponents, signs, underscores, "inf" and other scripts' digits were all taken, and an
    integer setting was rounded (MAX_ATTEMPTS=3.0000000000000001 was 3). A number is now
    ASCII digits with one "." at most (an integer's fraction, if any, is zero); anything else
    is one line naming the variable."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: raw})
    message = str(info.value)
    assert message.startswith(f"{variable}:")
    assert "\n" not in message


def test_a_number_may_have_surrounding_space_and_an_integer_a_zero_fraction() -> None:
    s = Settings.from_env(
        {
            "API_PORT": " 9000\n",
            "MAX_ATTEMPTS": "5.0",
            "JOB_TTL_SECONDS": "60.",
            "HEARTBEAT_INTERVAL_SECONDS": ".5",
        }
    )
    assert (s.api_port, s.max_attempts, s.job_ttl_seconds, s.heartbeat_interval_seconds) == (
        9000,
        5,
        60,
        0.5,
    )


@pytest.mark.parametrize(
    ("raw", "public"), [("", False), ("on", True), ("TRUE", True), ("1", True), ("off", False)]
)
def test_metrics_public_switch(raw: str, public: bool) -> None:
    """METRICS_PUBLIC accepts on/off (and true/false, 1/0); default off."""
    assert Settings.from_env({"METRICS_PUBLIC": raw}).metrics_public is public


@pytest.mark.parametrize(
    ("raw", "logged"), [("", True), ("on", True), ("OFF", False), ("0", False)]
)
def test_access_log_switch(raw: str, logged: bool) -> None:
    """ACCESS_LOG: uvicorn's line per HTTP request, on by default."""
    assert Settings.from_env({"ACCESS_LOG": raw}).access_log is logged


def test_job_retention_days() -> None:
    """JOB_RETENTION_DAYS: 0 (keep every job) by default; days, fractions allowed."""
    assert Settings.from_env({}).job_retention_days == 0
    assert Settings.from_env({"JOB_RETENTION_DAYS": "30"}).job_retention_days == 30
    assert Settings.from_env({"JOB_RETENTION_DAYS": "0.5"}).job_retention_days == 0.5
    with pytest.raises(SettingsError, match="JOB_RETENTION_DAYS"):
        Settings.from_env({"JOB_RETENTION_DAYS": "36501"})


def test_standby_switch() -> None:
    assert Settings.from_env({}).standby is False
    assert Settings.from_env({"STANDBY": "on"}).standby is True


@pytest.mark.parametrize(
    "env",
    [
        {"API_KEYS": "my-key-12345"},
        {"API_KEYS": "my-key-12345", "CLIENT_API_KEYS": "client-key-1"},
        {"API_KEYS": '["my-key-12345"]', "MINER_API_KEYS": "miner-key-123"},
    ],
)
def test_the_seed_docs_api_keys_is_refused_naming_the_role_variables(env: dict[str, str]) -> None:
    """The seed document's single ``API_KEYS`` (an upstream operator's .env may still set it)
    was ignored without a word: set alone, the start generated development keys and every
    request with the operator's key was 401 ``Invalid API key``. A key serves one role here:
    the start stops with one line naming the variables to use instead."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value) == (
        "API_KEYS: not read by this coordinator (a key serves one role): list each key in "
        "CLIENT_API_KEYS, MINER_API_KEYS or ADMIN_API_KEYS, and unset API_KEYS"
    )
    assert Settings.from_env({**env, "API_KEYS": " "}).api_port == 8000  # empty: not set


def test_a_secret_key_that_is_no_api_key_is_accepted() -> None:
    settings = Settings.from_env({"MINER_API_KEYS": "miner-key-123", "SECRET_KEY": "other-1"})
    assert settings.miner_api_keys == ("miner-key-123",)


def test_the_same_key_may_repeat_within_one_role() -> None:
    """A key listed twice for one role is not a conflict between roles."""
    s = Settings.from_env({"CLIENT_API_KEYS": "client-key-1,client-key-1"})
    assert s.client_api_keys == ("client-key-1", "client-key-1")


# ---- materialize_keys ---------------------------------------------------------------------


def test_keys_are_generated_once_and_printed_once(tmp_path: Path) -> None:
    """The first start generates and prints keys; the next start reuses them silently."""
    base = Settings(database_url=f"sqlite:///{tmp_path / 'c.db'}")
    first, lines = materialize_keys(base)
    assert lines
    assert all(line.strip() for line in lines)
    assert len(first.client_api_keys) == len(first.miner_api_keys) == len(first.admin_api_keys) == 1
    assert first.receipt_signing_key_hex is not None
    assert len(bytes.fromhex(first.receipt_signing_key_hex)) == 32
    printed = "\n".join(lines)
    for key in (*first.client_api_keys, *first.miner_api_keys, *first.admin_api_keys):
        assert key in printed
    assert first.receipt_signing_key_hex not in printed  # the signing seed is never printed

    second, lines_again = materialize_keys(base)
    assert lines_again == []
    assert second == first

    roles = {*first.client_api_keys} | {*first.miner_api_keys} | {*first.admin_api_keys}
    assert len(roles) == 3
    for path in (tmp_path / "c.db.keys.json", tmp_path / "c.db.signing-key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads((tmp_path / "c.db.keys.json").read_text())
    assert stored["client"] == first.client_api_keys[0]


def test_configured_keys_are_kept(tmp_path: Path) -> None:
    """Configured keys and signing key are used as they are; nothing is generated."""
    base = Settings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        client_api_keys=("client-key-xyz",),
        receipt_signing_key_hex="22" * 32,
    )
    settings, lines = materialize_keys(base)
    assert (settings, lines) == (base, [])
    assert list(tmp_path.iterdir()) == []


def test_keys_go_beside_the_database_in_a_new_directory(tmp_path: Path) -> None:
    """The key files are created next to the database, making its directory if needed."""
    base = Settings(database_url=f"sqlite:///{tmp_path / 'nested' / 'c.db'}")
    _, lines = materialize_keys(base)
    assert lines
    assert (tmp_path / "nested" / "c.db.keys.json").exists()
    assert (tmp_path / "nested" / "c.db.signing-key").exists()


def test_a_database_reached_through_a_link_keeps_one_set_of_keys(tmp_path: Path) -> None:
    """Keys go beside the database file itself: through a symlink or by its own path, a
    coordinator finds the same keys, so one database's receipts are signed by one key."""
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "c.db"
    link = tmp_path / "link.db"
    link.symlink_to(real)
    by_link, lines = materialize_keys(Settings(database_url=f"sqlite:///{link}"))
    assert lines
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "c.db.keys.json",
        "c.db.signing-key",
    ]
    by_path, lines_again = materialize_keys(Settings(database_url=f"sqlite:///{real}"))
    assert lines_again == []
    assert by_path.with_(database_url=by_link.database_url) == by_link
    assert (
        signing_key_path(by_link) == signing_key_path(by_path) == real.with_name("c.db.signing-key")
    )


def test_keys_an_older_build_kept_beside_the_link_are_still_used(tmp_path: Path) -> None:
    """Before keys followed the link, they were written beside it: a start through the same
    link keeps using them rather than generating (and signing with) new ones."""
    (tmp_path / "data").mkdir()
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "data" / "c.db")
    (tmp_path / "link.db.signing-key").write_text("33" * 32 + "\n")
    keys = {"client": "client-k", "miner": "miner-k", "admin": "admin-k"}
    (tmp_path / "link.db.keys.json").write_text(json.dumps(keys))
    settings, lines = materialize_keys(Settings(database_url=f"sqlite:///{link}"))
    assert lines == []
    assert settings.receipt_signing_key_hex == "33" * 32
    assert settings.client_api_keys == ("client-k",)
    assert list((tmp_path / "data").iterdir()) == []


# ---- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("API_PORT", "not-a-port"),
        ("DATABASE_URL", "mysql://db/x"),
        ("HEARTBEAT_TIMEOUT_SECONDS", "0"),
        ("CLIENT_API_KEYS", "short"),
    ],
)
def test_serve_with_an_invalid_setting_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    value: str,
) -> None:
    """``serve`` with a bad variable prints one line naming it and returns 2 (no server)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'c.db'}")
    monkeypatch.setenv(variable, value)
    # --port overrides API_PORT, which is then not read (test_an_option_overrides_…)
    assert main(["serve"] if variable == "API_PORT" else ["serve", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert variable in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing was created: no keys, no database


@pytest.mark.parametrize("configured", [True, False], ids=["configured", "generated"])
@pytest.mark.parametrize(("until", "code"), [("2999-01-01T00:00:00Z", 2), ("1700000000", 0)])
def test_serve_refuses_a_previous_key_valid_until_a_time_to_come(
    serve_stops_at_once: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    until: str,
    code: int,
    configured: bool,
) -> None:
    """The current key is published as valid from the newest UNTIL: with one to come (a typo
    in the year, a rotation time set ahead) serve started, and every receipt it signed was
    refused by /v1/receipts/verify and receipts audit ('completed_at is outside the signing
    key's validity period'). serve now refuses it with one line; a past UNTIL starts. The
    same for a signing key generated on the first start (the check was skipped for it)."""
    old = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    if configured:
        monkeypatch.setenv("RECEIPT_SIGNING_KEY_HEX", "11" * 32)
    monkeypatch.setenv("RECEIPT_PREVIOUS_KEYS", f"{old}@/{until}")
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "c.db")]) == code
    err = capsys.readouterr().err
    if code == 2:
        assert err == (
            "aitbc-coordinator: invalid setting: RECEIPT_PREVIOUS_KEYS: "
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo is valid until "
            "2999-01-01T00:00:00.000Z, which has not come yet: the current key would vouch "
            "only from then, so every receipt signed before would fail verification "
            "(UNTIL is when the old key stopped signing)\n"
        )
        assert list(tmp_path.iterdir()) == []
    else:
        assert err == ""


def test_an_option_overrides_its_variable_even_an_invalid_one(
    serve_stops_at_once: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """``--port``, ``--host`` and ``--db`` override API_PORT, API_HOST and DATABASE_URL, but
    the variables were read (and refused) first: under Kubernetes, a Service named ``api``
    sets API_PORT=tcp://10.0.0.7:80 in every pod of its namespace, and ``serve --port 8000``
    exited 2 on it; so did ``--db x.db`` in a shell whose DATABASE_URL was another program's."""
    monkeypatch.setenv("API_PORT", "tcp://10.0.0.7:80")
    monkeypatch.setenv("API_HOST", "")
    monkeypatch.setenv("DATABASE_URL", "mysql://db/x")
    db = tmp_path / "c.db"
    assert main(["serve", "--host", "127.0.0.1", "--port", "0", "--db", str(db)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    [line] = [x for x in out.splitlines() if x.startswith("AITBC")]
    assert line.startswith("AITBC coordinator on http://127.0.0.1:")
    assert str(db) in line
    monkeypatch.setenv("API_PORT", "8000")  # a variable no option overrides is still read
    monkeypatch.setenv("MAX_ATTEMPTS", "0")
    assert main(["serve", "--port", "0", "--db", str(db)]) == 2
    assert "MAX_ATTEMPTS" in capsys.readouterr().err


def test_serve_names_an_ipv6_listen_address_in_brackets(
    serve_stops_at_once: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``serve --host ::1`` printed ``http://::1:PORT``, which no browser or curl takes."""
    db = tmp_path / "c.db"
    assert main(["serve", "--host", "::1", "--port", "0", "--db", str(db)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("AITBC")]
    assert line.startswith("AITBC coordinator on http://[::1]:")


def test_serve_on_a_port_in_use_exits_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The port is bound before anything starts: one line naming it, no keys, no app."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port), "--db", str(tmp_path / "c.db")])
    assert code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"aitbc-coordinator: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert not [p for p in tmp_path.iterdir() if "key" in p.name]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--port", "99999"], "argument --port: 99999 is not between 0 and 65535"),
        (["serve", "--port", "-1"], "argument --port: -1 is not between 0 and 65535"),
        (["serve", "--port", "http"], "argument --port: 'http' is not a port number"),
        (["serve", "--port", "+80"], "argument --port: '+80' is not a port number"),
        (["serve", "--port", "8_000"], "argument --port: '8_000' is not a port number"),
        (
            ["demo", "--port", "\uff18\uff10"],
            "argument --port: '\uff18\uff10' is not a port number",
        ),
        (["serve", "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["demo", "--port", "70000"], "argument --port: 70000 is not between 0 and 65535"),
        # An empty --db (``--db "$DB"`` with DB unset) served DATABASE_URL's database instead.
        (["serve", "--db", "", "--port", "70000"], "argument --db: an empty file name"),
        (["receipts", "audit", "--db", ""], "argument --db: an empty file name"),
    ],
)
def test_bad_arguments_exit_2_with_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    """A port out of range or an unknown log level is a usage error (exit 2) before anything
    starts: no traceback from the bind (``OverflowError``) or from ``logging`` after the keys
    were generated and printed."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'c.db'}")
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a command the CLI exits with a usage error."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args", [["--rate", "0"], ["--miners", "-1"], ["--rate", "nan"], ["--rate", "inf"]]
)
def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """``demo`` with a non-positive rate or negative miner count exits 2 before starting."""
    assert main(["demo", "--port", "0", *args]) == 2
    assert "--miners must be >= 0 and --rate > 0" in capsys.readouterr().err


@pytest.mark.parametrize("duration", ["-5", "nan"])
def test_demo_rejects_a_negative_duration(
    capsys: pytest.CaptureFixture[str], duration: str
) -> None:
    """``demo --duration -5`` (or nan) ran until Ctrl-C, as 0 does: it exits 2 before starting."""
    assert main(["demo", "--port", "0", "--duration", duration]) == 2
    assert capsys.readouterr().err == (
        "aitbc-coordinator demo: --duration must be >= 0 seconds (0: until Ctrl-C)\n"
    )


def test_demo_on_a_port_in_use_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--port", str(port), "--duration", "1"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"aitbc-coordinator demo: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.parametrize("missing", ["keys", "signing key"])
def test_a_standby_never_generates_keys(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    missing: str,
) -> None:
    """A standby takes over with the primary's credentials and signing key, or not at all:
    one line, exit 2, nothing written."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if missing == "signing key":
        monkeypatch.setenv("CLIENT_API_KEYS", "client-key-123")
    assert main(["serve", "--port", "0", "--standby", "--db", str(tmp_path / "c.db")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("aitbc-coordinator: STANDBY: ")
    expected = "c.db.keys.json" if missing == "keys" else "c.db.signing-key"
    assert expected in line
    assert not [p for p in tmp_path.iterdir() if "key" in p.name]


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("c.db.keys.json", '{"client": "client-key-1", "miner": "miner-key-1"'),  # cut short
        ("c.db.keys.json", '{"client": "client-key-1", "miner": "miner-key-1"}'),  # no admin
        ("c.db.keys.json", '["client-key-1"]'),
        # A hand edit: one key in two roles (a client would be an admin), or one no HTTP header
        # carries. Each was served; the variables refuse them both.
        (
            "c.db.keys.json",
            '{"client": "same-key-1", "miner": "miner-key-1", "admin": "same-key-1"}',
        ),
        (
            "c.db.keys.json",
            '{"client": "client-ключ", "miner": "miner-key-1", "admin": "admin-key-1"}',
        ),
        ("c.db.keys.json", b"\xff\xfe"),
        ("c.db.keys.json", "[" * 100_000),  # deeper than the parser recurses
        ("c.db.keys.json", None),  # a folder
        ("c.db.signing-key", "not hex\n"),
        ("c.db.signing-key", "11" * 31 + "\n"),
        ("c.db.signing-key", None),
    ],
)
def test_a_damaged_key_file_stops_serve_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    file: str,
    content: str | bytes | None,
) -> None:
    """The generated key files are read again on later starts: a damaged one is one line naming
    it and exit 2 (it was a traceback), and nothing is generated in its place."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    materialize_keys(Settings(database_url=f"sqlite:///{tmp_path / 'c.db'}"))
    path = tmp_path / file
    path.unlink()
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "c.db")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("aitbc-coordinator: ")
    assert str(path) in line
    assert [p for p in sorted(p.name for p in tmp_path.iterdir()) if "key" in p] == [
        p for p in before if "key" in p
    ]


def test_a_signal_while_the_server_is_built_is_a_clean_stop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``serve`` takes SIGTERM/SIGINT from just before it builds the app (about 0.2 s) to its
    exit; one that came while the app was built, before uvicorn took the signals over, went up
    out of ``main`` as a ``_Stopped`` traceback (exit 1). Now: nothing served, exit 0."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    build = cli.build_server

    def signalled(*args: Any, **kwargs: Any) -> Any:
        server = build(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # runs the handler ``serve`` installed
        return server

    monkeypatch.setattr(cli, "build_server", signalled)
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "c.db")]) == 0
    assert capsys.readouterr().err == ""


# The console script's code (``from web.cli import main``), run under the command's name, with
# SIGNAL raised while ``uvicorn`` is imported: the app's imports take seconds on a cold start.
_SIGNAL_WHILE_IMPORTING = """
import builtins, signal, sys
sys.argv = ["aitbc-coordinator", "serve", "--port", "0", "--db", sys.argv[2]]
real, signum = builtins.__import__, getattr(signal, sys.argv_signal)
def importing(name, *args, **kwargs):
    if name == "uvicorn":
        signal.raise_signal(signum)
    return real(name, *args, **kwargs)
builtins.__import__ = importing
from web.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_command_imports_the_app_is_a_clean_stop(
    tmp_path: Path, signum: str
) -> None:
    """``serve`` took the signals only once it had imported the app and read its settings: a
    SIGINT before that was a KeyboardInterrupt traceback, a SIGTERM killed it (-15). Now:
    nothing served, nothing said, exit 0, as for one while the app is built."""
    code = _SIGNAL_WHILE_IMPORTING.replace("sys.argv_signal", repr(signum))
    done = subprocess.run(
        [sys.executable, "-c", code, "-", str(tmp_path / "c.db")],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("configured", ["none", "api keys"])
def test_a_key_file_that_cannot_be_written_stops_serve_with_one_line_and_leaves_nothing(
    tmp_path: Path, configured: str
) -> None:
    """A first start on a full disk (here: a file size limit) was a traceback, and left the key
    file it had begun, cut short: every later start refused it as damaged, the disk freed or
    not. Now it is one line naming the file, exit 2, no key file; the next start generates."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    if configured == "api keys":  # only the signing key is generated
        env.update(CLIENT_API_KEYS="client-key-1", MINER_API_KEYS="miner-key-1")
    db = tmp_path / "c.db"
    # Files may grow to 64 bytes: the owner lock's pid fits, no key file does.
    done = serve_once(db, env, max_file_bytes=64)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    written = "c.db.keys.json" if configured == "none" else "c.db.signing-key"
    assert line == f"aitbc-coordinator: cannot write {tmp_path / written}: File too large"
    assert [p.name for p in tmp_path.iterdir() if "key" in p.name] == []
    settings, lines = materialize_keys(Settings(database_url=f"sqlite:///{db}"))
    assert lines
    assert settings.receipt_signing_key_hex is not None


def test_api_keys_generated_by_a_start_the_signing_key_stops_are_not_lost(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A first start generates and stores the API keys, then the signing key; when that write
    failed (here: a dangling link in its place), the start stopped before printing the keys,
    and the next start reused their file without printing them: nobody was told where they
    were. Now the one line says."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    signing = tmp_path / "c.db.signing-key"
    signing.symlink_to(tmp_path / "gone")
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "c.db")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"aitbc-coordinator: cannot write {signing}: File exists (the API keys generated by "
        f"this start are stored in {tmp_path / 'c.db.keys.json'})\n"
    )


def test_a_standby_uses_the_keys_the_primary_stored(tmp_path: Path) -> None:
    base = Settings(database_url=f"sqlite:///{tmp_path / 'c.db'}")
    primary, _ = materialize_keys(base)
    standby, lines = materialize_keys(base.with_(standby=True))
    assert lines == []
    assert standby == primary.with_(standby=True)
