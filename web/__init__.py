"""Composition root and adapters: Starlette app, sockets, settings, CLI. Nobody imports web."""

from __future__ import annotations

from web.app import Coordinator, create_app
from web.settings import Settings, SettingsError

__all__ = ["Coordinator", "Settings", "SettingsError", "create_app"]
