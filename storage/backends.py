"""Which store a ``DATABASE_URL`` names: SQLite (``sqlite:///PATH``, the embedded default) or
PostgreSQL (``postgresql://…``). Light to import: a backend's driver loads when it is chosen."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from storage.postgres import PostgresJobStore
    from storage.sql import DatabasesJobStore

__all__ = [
    "POSTGRES_SCHEMES",
    "check_store",
    "is_postgres_url",
    "shown_url",
    "sqlite_file",
    "sqlite_url",
    "store_for",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


def is_postgres_url(url: str) -> bool:
    return url.startswith(POSTGRES_SCHEMES)


def store_for(
    url: str, *, synchronous: str = "NORMAL", exclusive: bool = True
) -> DatabasesJobStore | PostgresJobStore:
    """The (unopened) store for ``url``; ``synchronous`` is SQLite's, ``exclusive`` both's."""
    if is_postgres_url(url):
        from storage.postgres import PostgresJobStore

        return PostgresJobStore(url, exclusive=exclusive)
    from storage.sql import DatabasesJobStore

    return DatabasesJobStore(url, synchronous=synchronous, exclusive=exclusive)


def check_store(url: str) -> None:
    """Before serving: a one-line ``StorageError`` when ``url`` cannot be this coordinator's
    database (see ``storage.sql.check_database`` and ``storage.postgres.check_postgres``)."""
    if is_postgres_url(url):
        from storage.postgres import check_postgres

        check_postgres(url)
    else:
        from storage.sql import check_database

        check_database(url)


# libpq's query parameters that carry a secret (asyncpg reads both): shown as ``***``.
_SECRET_PARAMETERS = re.compile(r"([?&](?:ssl)?password=)[^&#]*")


def shown_url(url: str) -> str:
    """``url`` as messages and logs may show it: a password becomes ``***``, in the user
    part and in the query (``?password=``, ``sslpassword=``)."""
    url = _SECRET_PARAMETERS.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    credentials, at, place = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{place}"


def sqlite_url(path: str) -> str:
    """The ``DATABASE_URL`` of the SQLite file ``path`` (``--db``): characters a URL reads
    otherwise (``#``, ``?``, ``%``, a space) are escaped, so that the store opens that file."""
    return "sqlite:///" + quote(path)


def sqlite_file(url: str) -> str:
    """The file a ``sqlite:///`` URL names, as the store reads it (unescaped, without a query)."""
    from storage.sql import database_file

    return database_file(url)
