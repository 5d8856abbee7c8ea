"""Composition root and adapters: Starlette app, sockets, settings, CLI. Nobody imports web.

The names below are loaded on first use: importing ``web.cli`` (the command) must not import
the whole app before it has taken SIGINT and SIGTERM (``web.cli``'s first lines).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from web.app import Coordinator, create_app
    from web.settings import Settings, SettingsError

__all__ = ["Coordinator", "Settings", "SettingsError", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("Coordinator", "create_app"):
        from web import app

        return getattr(app, name)
    if name in ("Settings", "SettingsError"):
        from web import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'web' has no attribute {name!r}")
