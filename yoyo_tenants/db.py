"""Connections: resolving settings to a server, opening connections and backends, and turning
database errors into messages a user can act on (never showing a password)."""

from __future__ import annotations

from collections.abc import Mapping

import psycopg2
from yoyo.connections import DatabaseURI

from . import embedded
from .backend import TenantBackend
from .errors import ConnectionFailed
from .settings import Settings, describe, printable

SCHEME = "postgresql+tenant"

# SQLSTATEs with advice beyond PostgreSQL's own words.
_HINTS = {
    "0A000": "install pgvector on the server (Debian: postgresql-NN-pgvector; built into RDS)",
    "58P01": "install pgvector on the server (Debian: postgresql-NN-pgvector; built into RDS)",
    "42501": "the database user lacks a privilege this migration needs",
    "55P03": "a lock was not granted in time: another session holds it; retry later",
    "57014": "the statement ran longer than statement_timeout",
}


def server_params(settings: Settings) -> dict[str, str]:
    """libpq parameters for the configured server, starting the embedded one if none is set."""
    if settings.embedded:
        return embedded.ensure_running(settings.data_dir)
    return dict(settings.connection)


def connect(params: Mapping[str, str]):
    """An autocommit psycopg2 connection, or ConnectionFailed with libpq's reason."""
    try:
        connection = psycopg2.connect(**params)
    except (psycopg2.OperationalError, UnicodeDecodeError) as exc:
        raise connection_failed(params, exc) from None
    connection.autocommit = True
    return connection


def open_backend(params: Mapping[str, str], schema: str = "public") -> TenantBackend:
    """A TenantBackend on its own connection, scoped to `schema`."""
    args = {key: str(value) for key, value in params.items() if key != "dbname"}
    args["schema"] = schema
    uri = DatabaseURI(SCHEME, None, None, None, None, params.get("dbname"), args)
    try:
        return TenantBackend(uri)
    except (psycopg2.OperationalError, UnicodeDecodeError) as exc:
        raise connection_failed(params, exc) from None


def connection_failed(params: Mapping[str, str], exc: Exception) -> ConnectionFailed:
    """One line naming the connection by its parameters (never the password) and libpq's reason.

    libpq's reasons name the host, port, user and database, never the password; the settings
    refuse a DATABASE_URL that libpq would misread into putting part of a password in one of
    those. So nothing is masked here: replacing a short password in the text mangles words.
    """
    if isinstance(exc, UnicodeDecodeError):
        # libpq's message quoted a name the server cut mid-character (63 bytes).
        reason = "the server refused it, in a message that is not valid UTF-8"
    else:
        reason = printable(" ".join(str(exc).split()).removeprefix("FATAL: "))
    return ConnectionFailed(f"cannot connect to {describe(params)}: {reason}")


def error_text(exc: BaseException) -> str:
    """One line for a failed statement: PostgreSQL's message, plus advice where we have some."""
    message = getattr(exc, "pgerror", None) or str(exc)
    first = " ".join(message.strip().splitlines()[0].split()).removeprefix("ERROR: ")
    hint = _HINTS.get(getattr(exc, "pgcode", None) or "")
    return f"{first} ({hint})" if hint else first
