"""``serve`` warns at start of a role left without an API key (it could never connect)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.conftest import CLIENT_KEY, make_settings
from tests.serve_once import serving
from web.keys import unkeyed_roles

if TYPE_CHECKING:
    from pathlib import Path

ADMIN_WALLET = "0x" + "ab" * 20


def test_each_role_without_a_key_is_named(tmp_path: Path) -> None:
    assert unkeyed_roles(make_settings(tmp_path)) == []
    only_clients = make_settings(tmp_path, miner_api_keys=(), admin_api_keys=())
    assert unkeyed_roles(only_clients) == [
        "no MINER_API_KEYS: no miner can connect",
        "no ADMIN_API_KEYS (nor ADMIN_WALLET_ADDRESSES): the admin routes, /ops and /metrics "
        "(unless METRICS_PUBLIC=on) refuse everyone",
    ]
    wallets = make_settings(
        tmp_path,
        client_api_keys=(),
        admin_api_keys=(),
        admin_wallet_addresses=frozenset({ADMIN_WALLET}),
    )
    assert unkeyed_roles(wallets) == [
        "no CLIENT_API_KEYS: only wallet users' sessions can submit jobs"
    ]


def test_serve_prints_them_on_stderr_at_start(tmp_path: Path) -> None:
    with serving(tmp_path / "c.db", {"CLIENT_API_KEYS": CLIENT_KEY}) as run:
        pass
    warnings = [line for line in run.lines if line.startswith("aitbc-coordinator: warning: ")]
    assert [w.split(": ")[2] for w in warnings] == [
        "no MINER_API_KEYS",
        "no ADMIN_API_KEYS (nor ADMIN_WALLET_ADDRESSES)",
    ]
