"""Runs: every command that migrates or rolls back schemas is a run, numbered in
`public.yoyo_tenants_runs`, and each log row it writes names it.

That is what lets `rollback-tenants` undo a deploy, in every tenant it reached and nowhere
else, however far each tenant's own history goes back. Provisioning is not a run (its log rows
name none): a new org's base tables are never "the last deploy".
"""

from __future__ import annotations

import contextlib

from psycopg2 import errors, sql
from psycopg2.extensions import cursor as Cursor

from .db import one_row, public_table
from .log import log_identity

TABLE = sql.Identifier("public", "yoyo_tenants_runs")
CREATE_SQL = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {runs} ("
    "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "command TEXT NOT NULL, "
    "started_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
    "username TEXT, "
    "hostname TEXT)"
).format(runs=TABLE)
START_SQL = sql.SQL(
    "INSERT INTO {runs} (command, username, hostname) "
    "VALUES (%(command)s, %(username)s, %(hostname)s) RETURNING id"
).format(runs=TABLE)
LATEST_SQL = sql.SQL("SELECT id FROM {runs} WHERE command = %s ORDER BY id DESC").format(runs=TABLE)


def start(cursor: Cursor, command: str) -> int:
    """Register a run of `command` (making the runs table the first time); its id."""
    if not public_table(cursor, "yoyo_tenants_runs"):
        with contextlib.suppress(errors.UniqueViolation):  # another run made it a moment ago
            cursor.execute(CREATE_SQL)
    cursor.execute(START_SQL, {"command": command, **log_identity()})
    return one_row(cursor)[0]


def of_command(cursor: Cursor, command: str) -> list[int]:
    """The runs of `command`, newest first ([] when no run was ever registered)."""
    if not public_table(cursor, "yoyo_tenants_runs"):
        return []
    cursor.execute(LATEST_SQL, (command,))
    return [row[0] for row in cursor.fetchall()]
