"""Shared fixtures: keys, settings factory, anyio backend (asyncio only: we ship on asyncio)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from web.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

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
