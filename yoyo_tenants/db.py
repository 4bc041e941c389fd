"""Connections: resolving settings to a server, opening connections, and turning
database errors into messages a user can act on (never showing a password).

Errors are told apart by SQLSTATE (psycopg2.errorcodes), never by their words; PostgreSQL's words
only choose the wording of a hint (the object a missing privilege is on, the missing type being
pgvector's), and never what the tool does next.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg2
from psycopg2 import errorcodes, sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from psycopg2.extensions import make_dsn

from . import embedded
from .errors import ConnectionFailed, Failure
from .settings import Settings, describe, printable

# SQLSTATEs with advice beyond PostgreSQL's own words.
_HINTS = {
    errorcodes.LOCK_NOT_AVAILABLE: "a lock was not granted in time: another session holds it; "
    "retry later",
}
#: What a missing pgvector fails with: its type, its files on the server, or its extension.
_MISSING = (
    errorcodes.UNDEFINED_OBJECT,
    errorcodes.UNDEFINED_FILE,
    errorcodes.FEATURE_NOT_SUPPORTED,
)
#: What psycopg2's cursors take as a statement, and as its parameters.
Query = str | bytes | sql.Composable
Params = Sequence[Any] | Mapping[str, Any] | None
PGVECTOR_HINT = (
    "pgvector is missing: install it on the server (Debian: postgresql-NN-pgvector; built into "
    "RDS), then run invoke migrate-master, which runs CREATE EXTENSION vector WITH SCHEMA public"
)


def server_params(settings: Settings) -> dict[str, str]:
    """libpq parameters for the configured server, starting the embedded one if none is set."""
    if settings.embedded:
        return embedded.ensure_running(settings.data_dir)
    return dict(settings.connection)


def connect(params: Mapping[str, str]) -> Connection:
    """An autocommit psycopg2 connection, or ConnectionFailed with libpq's reason."""
    try:
        # As psycopg2.connect(**params) does, without taking a parameter for one of its own
        # arguments (dsn, connection_factory, cursor_factory).
        connection = psycopg2.connect(make_dsn(**params))
    except (psycopg2.OperationalError, UnicodeDecodeError) as exc:
        raise connection_failed(params, exc) from None
    connection.autocommit = True
    return connection


def public_table(cursor: Cursor, name: str) -> bool:
    """Whether `public.<name>` is there (the registry, the runs table, the heads index)."""
    cursor.execute("SELECT to_regclass('public.' || quote_ident(%s)) IS NOT NULL", (name,))
    return one_row(cursor)[0]


def one_row(cursor: Cursor) -> tuple[Any, ...]:
    """The row of a query that always returns one (a SELECT of expressions or aggregates, an
    INSERT ... RETURNING of one row)."""
    row = cursor.fetchone()
    assert row is not None, "the query returns one row"
    return row


def clean_session(connection: Connection) -> None:
    """Leave nothing of one schema's work on the connection for the next: the server's own reset
    (DISCARD ALL: settings, role, temp tables, prepared statements, LISTEN, session advisory
    locks, WITH HOLD cursors, sequence state, cached plans), as PgBouncer cleans a server
    connection before another client gets it. A message of its own: PostgreSQL runs it only
    outside a transaction block."""
    connection.cursor().execute("DISCARD ALL")
    iso_dates(connection)


def iso_dates(connection: Connection) -> None:
    """Dates as psycopg2 reads them. It sets DateStyle to ISO at connect on servers that default
    to another; a reset (DISCARD ALL, RESET ALL) or a migration's own SET DateStyle undoes that,
    and a log read afterwards would fail on its first timestamp. Free unless it changed: the
    server reports DateStyle whenever it does."""
    if not (connection.get_parameter_status("DateStyle") or "ISO").startswith("ISO"):
        connection.cursor().execute("SET DateStyle TO 'ISO'")


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


def error_text(exc: BaseException, migration: str | None = None, user: str | None = None) -> str:
    """One line for a failed statement: PostgreSQL's message, plus advice where we have some
    (`migration`: the migration that was running, if one was; `user`: who ran it)."""
    message = getattr(exc, "pgerror", None) or str(exc)
    first = " ".join(message.strip().splitlines()[0].split()).removeprefix("ERROR: ")
    hint = _hint(exc, migration, user)
    return f"{first} ({hint})" if hint else first


def failure_from(
    exc: BaseException, migration: str | None = None, user: str | None = None
) -> Failure:
    """A failed statement as a Failure value."""
    text = error_text(exc, migration, user)
    return Failure(text, migration=migration, sqlstate=getattr(exc, "pgcode", None))


def _hint(exc: BaseException, migration: str | None, user: str | None) -> str | None:
    code = getattr(exc, "pgcode", None)
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) or ""
    # The missing object is pgvector's: its type, or the extension's files on the server.
    if code in _MISSING and ('"vector"' in primary or "/vector." in primary):
        return PGVECTOR_HINT
    if code == errorcodes.INSUFFICIENT_PRIVILEGE:
        return _privilege_hint(primary, migration, user or "the migrating user")
    return _HINTS.get(code or "")


#: PostgreSQL's words for a missing privilege (the object's name caught), and what grants it.
_GRANTS = (
    (r"permission denied for schema (.+)", "GRANT USAGE, CREATE ON SCHEMA {0} TO {user}"),
    (
        r"permission denied for (?:table|relation) (.+)",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON {0} TO {user}",
    ),
    (r"permission denied for sequence (.+)", "GRANT USAGE, SELECT ON SEQUENCE {0} TO {user}"),
    (r"permission denied for database (.+)", "GRANT CREATE ON DATABASE {0} TO {user}"),
    (
        r"must be owner of (?:table|relation) (.+)",
        "ALTER TABLE {0} OWNER TO {user} (changing a table takes its owner)",
    ),
    (
        r'permission denied to create extension "(.+)"',
        "a superuser must run CREATE EXTENSION {0} WITH SCHEMA public",
    ),
)


def _privilege_hint(message: str, migration: str | None, user: str) -> str:
    """What to grant, where PostgreSQL's message names the object; the user, and whether a
    migration needed it, either way."""
    who = f"{user} lacks a privilege" + (f" migration {migration} needs" if migration else "")
    for pattern, grant in _GRANTS:
        if found := re.fullmatch(pattern, message):
            return f"{who}: {grant.format(*found.groups(), user=user)}"
    return who


def connection_lost(exc: BaseException) -> str:
    """Why a connection in use broke, in words: the server's own reason where it sent one."""
    code = getattr(exc, "pgcode", None)
    if code == errorcodes.ADMIN_SHUTDOWN:
        return "the server shut down (terminating connection due to administrator command)"
    if code in (errorcodes.CRASH_SHUTDOWN, errorcodes.CANNOT_CONNECT_NOW):
        return "the server crashed or is restarting"
    first = next(iter(str(exc).strip().splitlines()), "").strip()  # libpq's reason
    return f"the connection was lost ({first or type(exc).__name__})"
