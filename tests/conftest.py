"""Shared fixtures: keys, settings factory, anyio backend (asyncio only: we ship on asyncio),
and ``postgres_url`` (a fresh database on a real PostgreSQL server, tests/postgres.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings as hypothesis_settings

from web.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.postgres"]

# ``make coverage`` runs the pure layers' tests with this profile: the same examples every run,
# so 100% branch coverage does not depend on the random draw (the usual runs stay random).
hypothesis_settings.register_profile("coverage", derandomize=True)

CLIENT_KEY = "client-key-aaaaaaaaaaaa"
CLIENT_KEY_2 = "client-key-bbbbbbbbbbbb"
MINER_KEY = "miner-key-aaaaaaaaaaaaa"
MINER_KEY_2 = "miner-key-bbbbbbbbbbbbb"
ADMIN_KEY = "admin-key-aaaaaaaaaaaaa"
SIGNING_SEED = "11" * 32


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    base = Settings(
        database_url=f"sqlite:///{tmp_path / 'coordinator.db'}",
        client_api_keys=(CLIENT_KEY, CLIENT_KEY_2),
        miner_api_keys=(MINER_KEY, MINER_KEY_2),
        admin_api_keys=(ADMIN_KEY,),
        receipt_signing_key_hex=SIGNING_SEED,
    )
    return base.with_(**overrides)


@pytest.fixture
def argument_parsers(monkeypatch: pytest.MonkeyPatch) -> list[argparse.ArgumentParser]:
    """Every ``ArgumentParser`` that parses arguments during the test, in order (a command's
    own parser first): for tests of what ``--help`` says."""
    parsers: list[argparse.ArgumentParser] = []
    parse = argparse.ArgumentParser.parse_args

    def spy(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parsers.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    return parsers
