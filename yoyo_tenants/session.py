"""A session: one schema's work on one connection, one transaction at a time.

It owns, for the duration of a transaction, the schema's lock, the statements waiting to be sent
(as its message policy says: see messages.py) and the log rows they write; when a message fails
it finds which migration was running without sending anything again. What a transaction sends
to begin, to check what it was told, to guard each migration and to commit is in the first
screen of `Session`. The engine (engine.py) decides what to run; the session runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg2
from pglast import ast, parser
from psycopg2 import errorcodes, sql
from psycopg2.extensions import connection as Connection
from yoyo.migrations import Migration

from . import log, logindex
from .db import connection_lost, failure_from, iso_dates, one_row
from .errors import Failure, LogDamaged, TenantsError
from .log import Log, migration_checksum
from .messages import SEPARATOR, Part, Sender, SendFailed, policy_for
from .results import ConnectionLost, RunOptions
from .sqlfiles import Script
from .steps import Steps

#: The tool's own checks fail with SQLSTATEs of their own (class YT), so that a caller tells
#: them apart by code, never by their words.
LOG_MOVED = "YT001"  # the log is not where the caller read it
SESSION_MOVED = "YT002"  # a migration changed the search path or the role
STRINGS_CHANGED = "YT003"  # a migration changed how the server reads strings
#: A statement as the session takes it: composed with psycopg2.sql, or already text.
Statement = sql.Composable | str
COMMIT = "COMMIT"


class LogMoved(Exception):
    """The schema's log is not where the caller read it: read it again under the lock."""


class MessageFailed(Exception):
    """A message to the server failed; `failure` says where. If a migration was running, the
    ones before it are still in the transaction; otherwise the transaction is gone."""

    def __init__(self, failure: Failure):
        super().__init__(str(failure))
        self.failure = failure


class Session:
    """One schema's work on one connection: its transactions, its lock, the statements waiting to
    be sent, and the log rows they write."""

    #: The transaction, its search path and its lock, in one statement (a statement costs about
    #: as much as a short migration): a SELECT's target list runs in order, so the lock is
    #: waited for with lock_wait as its timeout; from then on migrations run, bounded in how
    #: long a statement may wait for a table lock (so the app's queries never queue behind a
    #: blocked ALTER for long) and may run. Settings are the transaction's own (true): nothing
    #: of them outlives it.
    BEGIN = sql.SQL(
        "BEGIN; SELECT set_config('search_path', {search_path}, true), "
        "set_config('yoyo_tenants.user', current_user, true), "
        "set_config('lock_timeout', {lock_wait}, true), "
        "pg_advisory_xact_lock(hashtextextended({key}, 0)), "
        "set_config('lock_timeout', {lock_timeout}, true), "
        "set_config('statement_timeout', {statement_timeout}, true)"
    )
    #: When the caller knows the log (a scan, or the transaction before): it still ends there,
    #: with as many rows as its position says (no row deleted or repeated behind its back).
    EXPECT = sql.SQL(
        "IF (SELECT coalesce(max(id), 0) <> {position} OR count(*) <> {position} FROM {log}) "
        "THEN RAISE EXCEPTION "
        "USING ERRCODE = {code}, MESSAGE = 'log moved: ' || {schema} || ' is not as it was read'; "
        "END IF"
    )
    #: Before each migration's log row: it left the search path and the role as they were (a DO
    #: block or a function can call set_config where no parser sees it).
    GUARD = sql.SQL(
        "IF current_setting('search_path') <> {search_path} THEN RAISE EXCEPTION USING "
        "ERRCODE = {code}, MESSAGE = 'the migration changed search_path to ' || "
        "current_setting('search_path'); ELSIF current_user <> "
        "current_setting('yoyo_tenants.user') THEN RAISE EXCEPTION USING ERRCODE = {code}, "
        "MESSAGE = 'the migration changed the role to ' || current_user; END IF"
    )
    #: After a Python migration, whose code may also have changed how the server reads strings
    #: in the messages that follow (a message is read whole before it runs).
    STRINGS_GUARD = sql.SQL(
        "IF current_setting('standard_conforming_strings') <> 'on' THEN RAISE EXCEPTION USING "
        "ERRCODE = {code}, MESSAGE = 'the migration changed standard_conforming_strings to ' "
        "|| current_setting('standard_conforming_strings'); END IF"
    )
    SAVEPOINT = sql.SQL("SAVEPOINT yoyo_tenants_migration")
    #: Back to the running migration's savepoint (nested ones share the name: the newest), and
    #: the log's position there, which says which migration that was.
    UNDO_MIGRATION = sql.SQL(
        "ROLLBACK TO SAVEPOINT yoyo_tenants_migration; SELECT coalesce(max(id), 0) FROM {log}"
    )
    COMMIT = sql.SQL(COMMIT)
    ROLLBACK = sql.SQL("ROLLBACK")

    def __init__(
        self, connection: Connection, schema: str, options: RunOptions, atomic: bool = False
    ) -> None:
        self.connection = connection
        self.cursor = connection.cursor()
        self.schema = schema
        self.options = options
        self.policy = policy_for(options.citus)
        self.sender = Sender(self.cursor, self.policy)
        self.log_table = sql.Identifier(schema, log.TABLE)
        # public stays on the path of tenants so that types installed there (pgvector) resolve.
        quoted = sql.Identifier(schema).as_string(connection)
        self.search_path = "public" if schema == "public" else f"{quoted}, public"
        #: A savepoint per migration keeps those before a failing one (and, in one message,
        #: says which failed); one that keeps nothing on failure may not need them.
        self.savepoints = not atomic or self.policy.savepoints_when_atomic
        self.open = False
        #: The log as the transaction found it, its position then, and the batch its rows
        #: record.
        self.base, self.start = Log([]), 0
        self._batch: int | None = None
        #: What this transaction logs, in order: each entry is one log row, numbered on from
        #: `start`. A migration is in it from the moment its savepoint is queued.
        self.ran: list[tuple[Migration, str]] = []
        self._rows: list[Part] = []  # log rows waiting for the COMMIT (no savepoints)
        #: Whether the index already says what the log said when the transaction began.
        self._indexed = True
        #: The last migration run hides its effects from the rest of the transaction (it added
        #: an enum value): the transaction must commit before the next migration runs.
        self.must_commit = False

    # -- the transaction ---------------------------------------------------------------------

    def begin(self, prelude: Sequence[Statement] = ()) -> None:
        """Open the schema's transaction under its lock (queued: it goes with what follows) and
        run `prelude` in it (provisioning's registry row and CREATE SCHEMA, say)."""
        assert not self.open
        self.open, self.ran, self.base, self.start, self._batch = True, [], Log([]), 0, None
        self._indexed, self.must_commit = True, False
        self._send(self.BEGIN.format(**self._settings()))
        for statement in prelude:
            self._send(statement, alone=_is_ddl(self._text(statement)))

    def expect(self, known: Log, fresh: bool = False) -> Log:
        """Go on from `known`, the log as the caller read it: checked under the lock (with the
        first message), LogMoved if it moved. `fresh`: the prelude made the log, just now."""
        assert self.open
        if not fresh:
            guard = self.EXPECT.format(
                log=self.log_table,
                position=sql.Literal(known.position),
                code=sql.Literal(LOG_MOVED),
                schema=sql.Literal(self.schema),
            )
            self._send(_do(guard, self.connection))
        self.base, self.start = known, known.position
        self._indexed = not fresh  # a log just made has no row yet, even with nothing run
        return known

    def read_log(self, create: bool = True) -> Log:
        """The log as it is now, read under the lock (sending what is queued); if `create`, the
        log table is made (or converted from yoyo's tables, or given its run column) when
        missing. Without `create`, yoyo's tables are read as they are."""
        assert self.open
        self._send(log.layout_sql([self.schema]))
        self._flush()
        row = self.cursor.fetchone()  # no row: no such schema (making its log will say so)
        layout = log.Layout(*row[1:]) if row else log.Layout(False, False, False)
        if layout.old and not create:
            self._send(log.old_rows_sql(self.schema))
        elif not layout.exists and not create:
            return Log([])
        else:
            for statement in log.making_sql(self.schema, layout, self.options.citus):
                self._send(statement, alone=True)
            self._send(log.rows_sql(self.schema, layout.has_run or create))
        self._flush()
        found = Log.from_rows(self.cursor.fetchall())
        if found.damage:  # what no run writes: no evidence of what the schema holds
            raise LogDamaged(self.schema, list(found.damage))
        self.base, self.start, self._indexed = found, found.position, False
        return found

    def commit(self) -> Log:
        """Commit the transaction (with its log rows and, if kept, its heads index row); the log
        as it leaves it."""
        for part in self._rows:
            self.sender.queue(part)
        self._rows = []
        after = self.base.after(self.ran, self._batch)
        after.position = self.start + len(self.ran)
        if self.options.heads and (self.ran or not self._indexed):
            self._send(logindex.upsert_sql(self.schema, after))
        self._send(self.COMMIT)
        self._flush()
        self.open = False
        iso_dates(self.connection)
        return after

    def rollback(self) -> None:
        """End the transaction, keeping nothing of it."""
        self.sender.drop()
        self._rows = []
        try:
            self.cursor.execute(self.ROLLBACK)
        finally:
            self.open, self.ran = False, []
        iso_dates(self.connection)

    # -- migrations --------------------------------------------------------------------------

    def run(self, migration: Migration, operation: str, batch: int | None = None) -> None:
        """Queue (or, for Python, run) one transactional migration in its savepoint, then its
        guard and its log row. `operation`: "apply", "rollback" or "post-apply"."""
        assert self.open and in_transaction(migration, operation)
        self.ran.append((migration, operation))
        if self.savepoints:
            self._send(self.SAVEPOINT, alone=True)
        script = script_for(migration, operation)
        if isinstance(script, Script):
            for part in self.policy.script_parts(migration, script):
                self._queue(part)
            self.must_commit = script.needs_commit
        elif script is not None:  # a Python migration: its steps run now, on this connection
            self._flush()
            self.must_commit = self._run_steps(migration, operation)
        self._row(migration, operation, batch)
        if script is True:
            # Checked now, before the next migration's text reaches the server.
            strings = self.STRINGS_GUARD.format(code=sql.Literal(STRINGS_CHANGED))
            self._send(_do(strings, self.connection))
            self._flush()

    def mark(self, migration: Migration, operation: str, batch: int | None = None) -> None:
        """Queue a log row of `operation` ("mark", "unmark") without running anything."""
        assert self.open
        self.ran.append((migration, operation))
        self._row(migration, operation, batch)

    def _row(self, migration: Migration, operation: str, batch: int | None) -> None:
        """A migration's log row, after the guard. Without savepoints (all or nothing, every
        statement alone) rows wait for the COMMIT's message rather than take a round trip
        each between DDL statements."""
        applied = operation in log.APPLIED
        if applied and batch is not None:
            self._batch = batch
        guard = self.GUARD.format(
            search_path=sql.Literal(self.search_path), code=sql.Literal(SESSION_MOVED)
        )
        row = log.insert_sql(
            self.schema,
            self.start + len(self.ran),
            self.options.rows.values(
                (
                    migration.id,
                    operation,
                    batch if applied else None,
                    migration_checksum(migration) if applied or operation == log.ACCEPT else None,
                    self.options.run,
                ),
                self.connection,
            ),
        )
        for statement in (_do(guard, self.connection), row):
            part = Part(self._text(statement))
            self.sender.queue(part) if self.savepoints else self._rows.append(part)

    def _run_steps(self, migration: Migration, operation: str) -> bool:
        """Run a Python migration's steps; whether they must commit before the next one."""
        steps = Steps(self.connection, self.schema == "public", migration.path)
        try:
            migration.process_steps(steps, step_direction(operation))
        except psycopg2.Error as exc:
            raise self._failed(SendFailed(exc, [])) from None
        except Exception as exc:  # refused SQL, or the migration's own code raised
            self.cursor.execute(sql.SQL("ROLLBACK TO SAVEPOINT yoyo_tenants_migration"))
            self.ran.pop()
            raise MessageFailed(Failure(raised(exc), migration=migration.id)) from None
        return steps.needs_commit

    def send_alone(self, text: str, migration: Migration, script: Script, offset: int) -> None:
        """Send one statement of a migration, outside any transaction; MessageFailed naming
        its file and line if it fails."""
        self._queue(Part(text, migration, script, offset, True, script.copy_data(offset)))
        self._flush()

    # -- sending -----------------------------------------------------------------------------

    def _send(self, statement: Statement, alone: bool = False) -> None:
        self._queue(Part(self._text(statement), alone=alone))

    def _queue(self, part: Part) -> None:
        try:
            self.sender.queue(part)
        except SendFailed as failed:
            raise self._failed(failed) from None

    def _flush(self) -> None:
        """Send what is queued; MessageFailed (or LogMoved) if it fails."""
        try:
            self.sender.flush()
        except SendFailed as failed:
            raise self._failed(failed) from None

    def _failed(self, failed: SendFailed) -> Exception:
        """After a message failed: find which migration was running, keep the ones before it in
        the transaction, and say what failed where."""
        exc, parts, user = failed.error, failed.parts, self.connection.info.user
        if self.connection.closed:
            self.open = False
            return ConnectionLost(
                connection_lost(exc),
                any(part.text == COMMIT for part in parts),
                self.start,
                self.start + len(self.ran),
                migrations_of(self),
            )
        migration = next((p.migration for p in parts if p.migration is not None), None)
        if not self.open:  # a non-transactional migration's statement, sent alone
            return MessageFailed(_failure_in(exc, migration, parts, user))
        if exc.pgcode == LOG_MOVED:
            self.rollback()
            return LogMoved()
        if not self.savepoints:  # every statement alone: the failing one is this message's
            self.rollback()
            return MessageFailed(_failure_in(exc, migration, parts, user))
        try:
            self.cursor.execute(self.UNDO_MIGRATION.format(log=self.log_table))
            completed = one_row(self.cursor)[0] - self.start
        except psycopg2.Error:  # no migration was running: the transaction goes
            self.rollback()
            return MessageFailed(failure_from(exc, user=user))
        migration, _ = self.ran[completed]
        self.ran = self.ran[:completed]
        return MessageFailed(_failure_in(exc, migration, parts, user))

    def _text(self, statement: Statement) -> str:
        return statement if isinstance(statement, str) else statement.as_string(self.connection)

    def _settings(self) -> dict[str, sql.Composable]:
        return {name: sql.Literal(value) for name, value in self.params().items()}

    def params(self) -> dict[str, str]:
        """The schema's search path, lock key and timeouts, as settings take them."""
        return {
            "search_path": self.search_path,
            "key": lock_key(self.schema),
            "lock_wait": _ms(self.options.wait) if self.options.wait else "1ms",
            "lock_timeout": _ms(self.options.lock_timeout),
            "statement_timeout": _ms(self.options.statement_timeout),
        }


def _do(body: sql.Composable, connection: Connection) -> sql.Composed:
    """`body` (plpgsql statements) as a DO block, dollar-quoted with a tag its text lacks."""
    text = body.as_string(connection)
    tag = "$yt$"
    while tag in text:
        tag = tag[:-1] + "_$"
    return sql.SQL("DO {tag}BEGIN {body}; END{tag}").format(tag=sql.SQL(tag), body=sql.SQL(text))


def _is_ddl(text: str) -> bool:
    """Whether one of the engine's own statements is DDL (which Citus wants alone)."""
    queries = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)
    return not all(isinstance(raw.stmt, queries) for raw in parser.parse_sql(text))


def lock_key(schema: str) -> str:
    """The advisory lock key of a schema: held by whoever migrates it."""
    return f"yoyo-tenants:{schema}"


def raised(exc: Exception) -> str:
    """What a Python migration's steps raised, in words: ours as they are, anything else (a bug
    in the migration's code) by its type too."""
    return str(exc) if isinstance(exc, TenantsError) else f"{type(exc).__name__}: {exc}"


def script_for(migration: Migration, operation: str) -> Script | bool | None:
    """What runs for `operation`: a Script for SQL, True for Python steps, None for nothing."""
    if not migration.is_raw_sql():
        return True
    if operation == "rollback":
        return getattr(migration, "rollback_script", None)
    return migration.script


def in_transaction(migration: Migration, operation: str) -> bool:
    """Whether `operation` of `migration` runs in its schema's transaction: as the file that runs
    says (a .rollback.sql is marked on its own), or as a Python migration says."""
    script = script_for(migration, operation)
    return script.transactional if isinstance(script, Script) else migration.use_transactions


def step_direction(operation: str) -> str:
    """yoyo's name for the way a migration's steps run (a post-apply hook applies)."""
    return "rollback" if operation == "rollback" else "apply"


#: Failures raised by the tool's own guards: their message is the whole story.
GUARDS = (SESSION_MOVED, STRINGS_CHANGED)


def _failure_in(
    exc: psycopg2.Error, migration: Migration | None, parts: Sequence[Part], user: str
) -> Failure:
    """The failure of `migration`, with the file and line where PostgreSQL gives a position."""
    if migration is None:
        return failure_from(exc, user=user)
    if exc.pgcode in GUARDS:
        return Failure(exc.diag.message_primary or str(exc), migration.id, exc.pgcode)
    failure = failure_from(exc, migration.id, user)
    position = exc.diag.statement_position
    start = 0
    for part in parts:
        end = start + len(part.text)
        if part.script is not None and part.migration is migration:
            if position and start < int(position) <= end + 1:
                line = part.script.line_at(part.offset + int(position) - 1 - start)
                return failure.at(str(part.script.path), line)
            if part.alone:  # a statement sent alone: the failing one
                return failure.at(str(part.script.path), part.script.line_at(part.offset))
        start = end + len(SEPARATOR)
    return failure


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def migrations_of(session: Session) -> list[str]:
    """The migrations (not hooks) the session's transaction ran."""
    return [m.id for m, operation in session.ran if operation != log.HOOK]


#: For the engine's retries: a lock not granted in time.
LOCK_NOT_AVAILABLE = errorcodes.LOCK_NOT_AVAILABLE
