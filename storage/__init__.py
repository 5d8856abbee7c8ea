"""Persistence: the JobStore port, the SQL store, and an in-memory reference store."""

from __future__ import annotations

from storage.base import *  # noqa: F403
from storage.base import __all__ as _base
from storage.errors import *  # noqa: F403
from storage.errors import __all__ as _errors
from storage.schema import *  # noqa: F403
from storage.schema import __all__ as _schema

__all__ = [*_base, *_errors, *_schema]
