"""Non-transactional migrations: CREATE INDEX CONCURRENTLY and friends, which cannot run in a
transaction block, so neither can a transaction-level lock or search path.

Such a migration runs outside any transaction, each statement in a message of its own, with the
schema's search path, timeouts and advisory lock held on the session meanwhile and given back
after; then it is logged in a transaction of its own. (Behind a transaction-pooling PgBouncer,
session state is not safe: see docs/production-safety.md.)
"""

from __future__ import annotations

import psycopg2
from psycopg2 import extensions, sql
from yoyo.migrations import Migration

from . import log
from .db import failure_from, iso_dates, one_row
from .errors import Failure, NotReady
from .session import MessageFailed, Session, raised, script_for, step_direction
from .sqlfiles import Script
from .steps import Steps

#: The settings such a migration runs with are the session's, given back after it. (Between
#: schemas the pool cleans the whole session: see db.clean_session.)
RESET_SQL = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL"
INVALID_INDEXES_SQL = (
    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE NOT i.indisvalid AND c.relnamespace = to_regnamespace(quote_ident(%s)) "
    "ORDER BY c.relname"
)


def run_alone(session: Session, migration: Migration, operation: str, batch: int | None) -> bool:
    """Run `migration` for `operation` on the session, then log it. False if a concurrent run
    did it first."""
    assert not session.open
    params = session.params()
    cursor = session.cursor
    cursor.execute(
        "SELECT set_config('lock_timeout', %(lock_wait)s, false); "
        "SELECT pg_advisory_lock(hashtextextended(%(key)s, 0))",
        params,
    )
    try:
        session.begin()
        applied = {row.migration_hash for row in session.read_log().applied}
        if operation != log.HOOK and (migration.hash in applied) != (operation == "rollback"):
            session.rollback()
            return False
        session.commit()
        _run_on_session(session, migration, operation, params)
        session.begin()
        session.read_log()
        session.mark(migration, operation, batch)
        session.commit()
        return True
    finally:
        cursor.execute(
            RESET_SQL + "; SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0))", params
        )
        iso_dates(session.connection)


def _invalid_indexes(session: Session, migration: Migration) -> None:
    """An interrupted CREATE INDEX CONCURRENTLY (a crash, kill -9, a failed unique build) leaves
    an invalid index behind, which the migration's second try would trip over or, with IF NOT
    EXISTS, silently keep: name it, or drop it when asked to."""
    cursor = session.cursor
    cursor.execute(INVALID_INDEXES_SQL, (session.schema,))
    for (name,) in cursor.fetchall():
        drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier(session.schema, name)
        )
        if not session.options.repair_invalid_indexes:
            raise MessageFailed(
                Failure(
                    f"index {session.schema}.{name} is invalid, left by an interrupted "
                    f"CREATE INDEX CONCURRENTLY: run {drop.as_string(cursor)}, or run again "
                    "with --repair-invalid-indexes (drops it; the migration builds it anew)",
                    migration=migration.id,
                )
            )
        cursor.execute(drop)


def _run_on_session(
    session: Session, migration: Migration, operation: str, params: dict[str, str]
) -> None:
    _invalid_indexes(session, migration)
    cursor, connection = session.cursor, session.connection
    cursor.execute(
        "SELECT pg_backend_pid(), set_config('search_path', %(search_path)s, false),"
        " set_config('lock_timeout', %(lock_timeout)s, false),"
        " set_config('statement_timeout', %(statement_timeout)s, false)",
        params,
    )
    pid = one_row(cursor)[0]
    script = script_for(migration, operation)
    try:
        if isinstance(script, Script):
            for offset, text in script.statements():
                session.send_alone(text, migration, script, offset)
        elif script is not None:
            steps = Steps(connection, session.schema == "public", migration.path, False)
            try:
                migration.process_steps(steps, step_direction(operation))
            except psycopg2.Error as exc:
                failure = failure_from(exc, migration.id, connection.info.user)
                raise MessageFailed(failure) from None
            except Exception as exc:  # refused SQL, or the migration's own code raised
                raise MessageFailed(Failure(raised(exc), migration=migration.id)) from None
        if connection.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
            raise MessageFailed(
                Failure(
                    "it ended inside a transaction block: end it with COMMIT",
                    migration=migration.id,
                )
            )
    finally:
        if connection.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
            cursor.execute("ROLLBACK")  # a block of its own that failed, or was left open
        cursor.execute(RESET_SQL + "; SELECT pg_backend_pid()")
        iso_dates(connection)
    if one_row(cursor)[0] != pid:
        # A transaction-pooling PgBouncer handed us another server connection between
        # statements: the session settings (and lock) did not follow. Say so loudly.
        raise NotReady(
            f"{migration.id} is non-transactional, and its statements ran on different "
            "server connections (a transaction-pooling PgBouncer?): run it over a direct "
            "connection"
        )
