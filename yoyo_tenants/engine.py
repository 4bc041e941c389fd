"""The engine: how one schema is migrated, whatever the command (migrate, rollback, provision, the
yoyo CLI) and however many schemas a run has.

A schema's work is one transaction under the schema's advisory lock, with the search path and
timeouts set for that transaction only. Each migration runs inside a savepoint of its own,
followed by a guard (it left the search path and role as they were) and its log row, so a
migration and its record commit together or not at all. Everything a transaction sends waits in
the session and goes to the server in as few messages as the server can take: one for a whole
tenant on PostgreSQL; on Citus, which forwards a DDL statement's whole message to its workers,
every migration statement and savepoint alone (`RunOptions.citus`).

When a message fails, nothing is sent again: `ROLLBACK TO SAVEPOINT` undoes the migration that
was running, and the log's position under it says which one that was; the migrations before it
stay in the transaction, to be committed (migrate, rollback) or not (provisioning). A lock
timeout is retried after a pause, in a new transaction, so an app waits at most
(retries + 1) x lock_timeout behind a tenant's DDL.

A schema's work is one transaction unless PostgreSQL needs a commit inside it: after a migration
that adds an enum value (PostgreSQL hides the value from the rest of the transaction that added
it) the transaction commits with that migration's log row, and the next migration starts a new
one; a non-transactional migration runs between two. Whatever a migration leaves on the session
(a temp table, a prepared statement) stays for that schema's later migrations; before the
connection serves another schema, the pool (pool.py) cleans its whole session (db.clean_session).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from psycopg2.extensions import connection as Connection
from yoyo.migrations import Migration

from . import log
from .errors import Failure, LockBusy, TenantsError
from .log import Log
from .nontransactional import run_alone
from .plan import Plan
from .results import RunOptions, SchemaResult
from .session import (
    LOCK_NOT_AVAILABLE,
    LogMoved,
    MessageFailed,
    Session,
    Statement,
    in_transaction,
    migrations_of,
)

#: A log row that runs nothing: (migration, operation, the batch it records).
Mark = tuple[Migration, str, int | None]


def mark_schema(
    connection: Connection,
    schema: str,
    options: RunOptions,
    choose: Callable[[Log], Sequence[Mark]],
) -> Sequence[Mark]:
    """Log operations that run nothing (mark, unmark, accept) in `schema`, under its lock:
    `choose(log)` says which, as (migration, operation, batch) from the log as it is then."""
    session = Session(connection, schema, options)
    session.begin()
    marks = choose(session.read_log())
    for migration, operation, batch in marks:
        session.mark(migration, operation, batch)
    session.commit()
    return marks


# -- one schema, start to finish -----------------------------------------------------------------


@dataclass(frozen=True)
class _Again:
    """Another transaction is needed, starting from `known`: the log as the last one left it
    (checked to be still so under the lock), or None to read it under the lock."""

    known: Log | None = None


def migrate_schema(
    connection: Connection,
    plan: Plan,
    result: SchemaResult,
    options: RunOptions,
    known: Log | None = None,
    prelude: Sequence[Statement] = (),
    atomic: bool = False,
    fresh: bool = False,
) -> SchemaResult:
    """Do what `plan` chooses (see plan.py) to `result.schema`: the one way a schema is migrated
    or rolled back, by every command.

    `known`: the schema's log as a scan read it, so that a schema needing one transaction costs
    one message. `prelude`: statements run first in the first transaction (provisioning's
    registry row and CREATE SCHEMA). `atomic`: a failure keeps nothing of its transaction
    (provisioning), instead of committing the migrations before the one that failed. `fresh`:
    the prelude makes the schema and its log (provisioning), so `known` needs no check.
    """
    started = time.perf_counter()
    session = Session(connection, result.schema, options, atomic)
    try:
        while again := _round(session, plan, result, options, known, prelude, atomic, fresh):
            known, prelude, fresh = again.known, (), False
    except LockBusy as exc:
        result.skipped = True
        result.fail(str(exc))
    except TenantsError as exc:  # drift, a missing file: this schema's problem only
        if session.open:
            session.rollback()
        result.fail(str(exc))
    finally:
        result.duration = time.perf_counter() - started
    return result


def _round(
    session: Session,
    plan: Plan,
    result: SchemaResult,
    options: RunOptions,
    known: Log | None,
    prelude: Sequence[Statement],
    atomic: bool,
    fresh: bool,
) -> _Again | None:
    """One transaction of a schema's work; what the next starts from, if another is needed
    (after a migration PostgreSQL needs committed, a non-transactional one, a retry, or a log
    that moved under a scan).

    Between two transactions the schema's lock is let go: the next takes it again and first
    checks that the log ends where this one left it, so a run that got in between is noticed
    (and the log read again) rather than undone or repeated. A lock held on the session across
    them would do the same, but would stay behind on a server connection of a
    transaction-pooling PgBouncer, blocking the schema for every later run.
    """
    try:
        if known is None:
            session.begin(prelude)
            current = session.read_log()
        else:
            current = known
        todo = plan.choose(current)
        if not todo and not prelude:
            if session.open:
                session.commit()  # keeps a log table just made or converted
            return None
        if not session.open:
            session.begin(prelude)
            session.expect(current, fresh)
        for index, migration in enumerate(todo):
            if not in_transaction(migration, plan.operation):
                break
            session.run(migration, plan.operation, plan.batch)
            if session.must_commit and index + 1 < len(todo):
                break  # what it added is hidden from the rest of its transaction
        else:
            if result.migrations or session.ran:
                for hook in plan.hooks:
                    session.run(hook, log.HOOK)
        ran = migrations_of(session)
        left = session.commit()
        result.migrations += ran
    except LogMoved:
        return _Again()
    except MessageFailed as failed:
        return _after_failure(session, result, options, failed.failure, atomic)
    rest = todo[len(ran) :]
    if not rest:
        return None
    if in_transaction(rest[0], plan.operation):
        return _Again(left)
    try:
        if run_alone(session, rest[0], plan.operation, plan.batch):
            result.migrations.append(rest[0].id)
    except MessageFailed as failed:  # its statements may have half happened: never retried
        result.failure = failed.failure
        return None
    return _Again()


def _after_failure(
    session: Session, result: SchemaResult, options: RunOptions, failure: Failure, atomic: bool
) -> _Again | None:
    """Keep (or, `atomic`, drop) what ran before the failing migration; what to try again from."""
    if not session.open:  # the transaction is gone already
        if failure.migration is None and failure.sqlstate == LOCK_NOT_AVAILABLE:
            raise LockBusy(f"schema {result.schema} is locked by another run")
        result.failure = failure
        return None
    if atomic:
        session.rollback()
    else:
        ran = migrations_of(session)
        session.commit()
        result.migrations += ran
    if failure.sqlstate == LOCK_NOT_AVAILABLE and result.retries < options.retries and not atomic:
        time.sleep(options.retry_pause * 2**result.retries)
        result.retries += 1
        return _Again()
    if result.retries:
        failure = failure.with_note(f"after {result.retries} retries")
    result.failure = failure
    return None
