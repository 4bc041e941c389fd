"""A session: one schema's work on one connection, from BEGIN to COMMIT.

It owns, for the duration, the schema's transaction and advisory lock, the statements waiting
to be sent (as few messages as the server can take), and the log rows they will write; when a
message fails it finds which migration was running without sending anything again. The engine
(engine.py) decides what to run; the session runs it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2
from psycopg2 import extensions, sql
from yoyo.migrations import Migration

from . import heads, log
from .db import connection_lost, failure_from, iso_dates
from .errors import Failure, TenantsError
from .log import Log, log_identity, migration_checksum
from .results import ConnectionLost, RunOptions
from .scripts import Script
from .steps import Steps

#: The savepoint each migration runs in. Nested ones share the name: ROLLBACK TO goes to the newest.
SAVEPOINT = "yoyo_tenants_migration"
LOCK_NOT_AVAILABLE = "55P03"
#: A guard failing puts this in its error (a cast of it to int), so it reads as ours.
GUARD_MARK = "yoyo-tenants guard: "

#: The schema's transaction, its search path and its lock, in one statement (a statement costs
#: about as much as a short migration): a SELECT's target list runs in order, so the lock is
#: waited for with lock_wait as its timeout; from then on migrations run, bounded in how long
#: a statement may wait for a table lock (so the app's queries never queue behind a blocked
#: ALTER for long) and may run.
BEGIN_SQL = (
    "BEGIN; "
    "SELECT set_config('search_path', %(search_path)s, true), "
    "set_config('yoyo_tenants.user', current_user, true), "
    "set_config('lock_timeout', %(lock_wait)s, true), "
    "pg_advisory_xact_lock(hashtextextended(%(key)s, 0)), "
    "set_config('lock_timeout', %(lock_timeout)s, true), "
    "set_config('statement_timeout', %(statement_timeout)s, true)"
)
#: Each migration's log row is stamped through this guard: if the migration changed the search
#: path or the role (a DO block or a function can call set_config where no parser sees it), the
#: cast fails, naming what changed, and the row is never written. The message is built from
#: settings read at run time: PostgreSQL folds a constant cast when it plans.
GUARDED_NOW_SQL = (
    "CASE WHEN current_setting('search_path') = %(search_path)s "
    "AND current_user = current_setting('yoyo_tenants.user') "
    "THEN timezone('UTC', statement_timestamp()) "
    f"ELSE ('{GUARD_MARK}the migration changed ' || CASE "
    "WHEN current_setting('search_path') <> %(search_path)s "
    "THEN 'search_path to ' || current_setting('search_path') "
    "ELSE 'the role to ' || current_user END)::timestamp END"
)
NOW_SQL = "timezone('UTC', statement_timestamp())"
#: After a Python migration, whose code may also have changed how the server reads strings in
#: the messages that follow (a message is read whole before it runs, so within one it cannot).
STRINGS_GUARD_SQL = (
    "SELECT CASE WHEN current_setting('standard_conforming_strings') = 'on' THEN 0 "
    f"ELSE ('{GUARD_MARK}the migration changed standard_conforming_strings to ' "
    "|| current_setting('standard_conforming_strings'))::int END"
)
#: The settings a non-transactional migration runs with are the session's (see alone.py): given
#: back after it. (Between schemas, the runner cleans the whole session: see db.clean_session.)
RESET_SQL = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL"
#: Before the first migration, when the caller knows the log from a scan: it is still there.
MOVED = "log moved"
POSITION_GUARD_SQL = sql.SQL(
    "SELECT CASE WHEN coalesce(max(id), 0) = %(position)s THEN 0 "
    f"ELSE ('{GUARD_MARK}{MOVED} to ' || coalesce(max(id), 0))::int END FROM {{log}}"
)
LAYOUT_SQL = (
    "SELECT to_regclass(%(log)s) IS NOT NULL, EXISTS (SELECT 1 FROM pg_attribute "
    "WHERE attrelid = to_regclass(%(log)s) AND attname = 'run' AND NOT attisdropped), "
    "to_regclass(%(old)s) IS NOT NULL"
)
#: yoyo's table of applied migrations (an old layout) as log rows, in yoyo's order.
OLD_ROWS_SQL = sql.SQL(
    "SELECT row_number() OVER (ORDER BY applied_at_utc, migration_id), migration_id, 'apply', "
    "applied_at_utc, NULL::integer, NULL::text, NULL::bigint FROM {old}"
)


#: How the engine's own statements that are not DDL begin (those may share a message on Citus).
QUERIES = ("SELECT", "INSERT", "UPDATE", "DELETE")
#: A statement as the engine takes it: composed with psycopg2.sql, or already text.
Statement = sql.Composable | str


class LogMoved(Exception):
    """The schema's log is not where the caller read it: read it again under the lock."""


class MessageFailed(Exception):
    """A message to the server failed; `failure` says where. If a migration was running, the
    ones before it are still in the transaction; otherwise the transaction is gone."""

    def __init__(self, failure: Failure):
        super().__init__(str(failure))
        self.failure = failure


@dataclass
class _Part:
    """A piece of a message, and where its text came from (to turn positions into lines)."""

    text: str
    migration: Migration | None = None
    script: Script | None = None
    offset: int = 0  # where `text` starts in the script
    alone: bool = False  # a statement Citus must get in a message of its own
    data: str | None = None  # a COPY ... FROM stdin's data: the statement is sent by itself


class Session:
    """One schema's work on one connection, from BEGIN to COMMIT: its transaction, its lock, the
    statements waiting to be sent, and the log rows they will write."""

    def __init__(self, connection, schema: str, options: RunOptions, atomic: bool = False):
        self.connection = connection
        self.cursor = connection.cursor()
        self.schema = schema
        self.options = options
        self.log_table = sql.Identifier(schema, log.TABLE)
        # public stays on the path of tenants so that types installed there (pgvector) resolve.
        quoted = sql.Identifier(schema).as_string(connection)
        self.search_path = "public" if schema == "public" else f"{quoted}, public"
        self.open = False
        #: A savepoint per migration keeps those before a failing one (and, in one message,
        #: says which failed). All or nothing on Citus, where every statement goes alone and so
        #: names itself when it fails, needs none: a round trip less per migration.
        self.savepoints = not (atomic and options.citus)
        #: The log's position when the transaction began.
        self.start = 0
        #: What this transaction logs, in order: each entry is one log row, numbered on from
        #: `start`. A migration is in it from the moment its savepoint is queued.
        self.ran: list[tuple[Migration, str]] = []
        self._parts: list[_Part] = []
        self._insert: str | None = None  # made when the first log row is
        self._guard: str | None = None  # on Citus, a statement of its own
        self._rows: list[str] = []  # log rows waiting for the COMMIT (see _queue_row)
        #: The log as the transaction found it, and the batch its rows record.
        self.base: Log = Log([])
        self._batch: int | None = None
        #: Whether the index already says what the log said when the transaction began.
        self._indexed = True
        #: The last migration run hides its effects from the rest of the transaction (it added
        #: an enum value): the transaction must commit before the next migration runs.
        self.must_commit = False

    # -- the transaction ---------------------------------------------------------------------

    def begin(
        self,
        known: Log | None = None,
        prelude: Sequence[Statement] = (),
        read: bool = True,
        fresh: bool = False,
    ) -> Log:
        """Open the schema's transaction under its lock, run `prelude` in it, and return the
        schema's log as it is under the lock.

        With `known` (read by a scan a moment ago) nothing is sent yet: the lock, the prelude and
        a guard that the log is still at known.position go out with the first migration, and
        LogMoved is raised then if it is not. Without, the log is read under the lock now (and
        made, or converted from yoyo's tables, if need be), unless not `read`. `fresh`: the
        prelude makes the schema and its log, so there is no log to check.
        """
        assert not self.open
        self.open, self.ran, self.base, self._batch = True, [], Log([]), None
        self._indexed, self.must_commit = True, False
        self._queue(self._mogrify(BEGIN_SQL, self.params()))
        for statement in prelude:
            text = self._text(statement)
            self._queue(text, alone=not text.lstrip().upper().startswith(QUERIES))
        if known is not None:
            if not fresh:
                guard = POSITION_GUARD_SQL.format(log=self.log_table)
                self._queue(self._mogrify(guard, {"position": known.position}))
            self.base, self.start = known, known.position
            self._indexed = not fresh  # a log just made has no row yet, even with nothing run
            return known
        if not read:
            return Log([])
        self.base = self.read_log(create=True)
        self.start = self.base.position
        self._indexed = False  # read under the lock: the index is put right at commit
        return self.base

    def read_log(self, create: bool) -> Log:
        """The log as it is now, in this transaction (sending what is queued); if `create`, the
        log table is made (or converted from yoyo's tables, or given its run column) when
        missing."""
        names = {
            "log": self.log_table.as_string(self.connection),
            "old": sql.Identifier(self.schema, log.OLD_TABLE).as_string(self.connection),
        }
        self._queue(self._mogrify(LAYOUT_SQL, names))
        self.flush()
        exists, has_run, old = self.cursor.fetchone()
        if old and not create:
            return self._read_old()
        if old and create:
            self._queue(self._text(log.upgrade_sql(self.schema)), alone=True)
        elif not exists and create:
            for statement in log.create_sql(self.schema, self.options.citus):
                self._queue(self._text(statement), alone=True)
        elif not exists:
            return Log([])
        elif not has_run and create:
            self._queue(self._text(log.add_run_sql(self.schema)), alone=True)
        has_run = has_run or create
        self._queue(self._text(log.rows_sql(self.schema, has_run)))
        self.flush()
        return Log.from_rows(self.cursor.fetchall())

    def _read_old(self) -> Log:
        """What yoyo's tables say is applied, read as they are: only a run that writes converts
        them (a read that did would leave plain yoyo unable to read its own schema)."""
        old = sql.Identifier(self.schema, log.OLD_TABLE)
        self._queue(self._text(OLD_ROWS_SQL.format(old=old)))
        self.flush()
        return Log.from_rows(self.cursor.fetchall())

    def commit(self) -> Log:
        """Commit the transaction; the log as it leaves it."""
        for text in self._rows:
            self._queue(text)
        self._rows = []
        after = self.base.after(self.ran, self._batch)
        after.position = self.start + len(self.ran)
        if self.options.heads and (self.ran or not self._indexed):
            self._queue(self._mogrify(heads.UPSERT_SQL, self._head(after)))
        self._queue("COMMIT")
        self.flush()
        self.open = False
        iso_dates(self.connection)
        return after

    def _head(self, after: Log) -> dict:
        """The schema's row in the heads index, as this transaction leaves its log."""
        return {
            "schema": self.schema,
            "log": self.log_table.as_string(self.connection),
            "position": after.position,
            "applied": heads.digest_of(after.applied),
            "batch": after.last_batch,
        }

    def rollback(self) -> None:
        """End the transaction, keeping nothing of it."""
        self._parts, self._rows = [], []
        try:
            self.cursor.execute("ROLLBACK")
        finally:
            self.open, self.ran = False, []
        iso_dates(self.connection)

    # -- migrations --------------------------------------------------------------------------

    def run(self, migration: Migration, operation: str, batch: int | None = None) -> None:
        """Queue (or, for Python, run) one transactional migration in its savepoint, then its
        guard and its log row. `operation`: "apply", "rollback" or "post-apply"."""
        assert self.open and migration.use_transactions
        self.ran.append((migration, operation))
        if self.savepoints:
            self._queue(f"SAVEPOINT {SAVEPOINT}", alone=True)
        script = script_for(migration, operation)
        if isinstance(script, Script):
            self._queue_script(migration, script)
            self.must_commit = script.needs_commit
        elif script is not None:  # a Python migration: its steps run now, on this connection
            self.flush()
            self.must_commit = self._run_steps(migration, operation)
        self._queue_row(migration, operation, batch)
        if script is True:
            # Checked now, before the next migration's text reaches the server.
            self._queue(STRINGS_GUARD_SQL)
            self.flush()

    def mark(self, migration: Migration, operation: str, batch: int | None = None) -> None:
        """Queue a log row of `operation` ("mark", "unmark") without running anything."""
        assert self.open
        self.ran.append((migration, operation))
        self._queue_row(migration, operation, batch)

    def _queue_row(self, migration: Migration, operation: str, batch: int | None) -> None:
        applied = operation in log.APPLIED
        if applied and batch is not None:
            self._batch = batch
        values = (
            migration.id,
            operation,
            batch if applied else None,
            migration_checksum(migration) if applied or operation == log.ACCEPT else None,
            self.options.run,
        )
        if self._insert is None:
            stamp = self._mogrify(GUARDED_NOW_SQL, {"search_path": self.search_path})
            if self.options.citus:
                # Citus runs an INSERT into a distributed table on its worker, where this
                # transaction's settings are not: the guard runs on the coordinator, alone.
                self._guard, stamp = f"SELECT {stamp}", NOW_SQL
            self._insert = self._text(
                log.INSERT_SQL.format(log=self.log_table, stamp=sql.SQL(stamp))
            )
        row = [self._guard] if self._guard else []
        row.append(f"{self._insert}{self.start + len(self.ran)}, {self._values(values)}")
        if self.savepoints:
            for text in row:
                self._queue(text)
        else:
            # All or nothing on Citus: the rows (and their guards) wait for the COMMIT's message
            # rather than take a round trip each between DDL statements that must go alone.
            self._rows += row

    def _values(self, values: tuple) -> str:
        """A row's values after its number, quoted once for all the schemas of a run: at
        thousands of schemas, quoting is most of what the client does."""
        key = (values, self.connection.encoding)
        text = _row_values.get(key)
        if text is None:
            names = ("migration_id", "operation", "batch", "checksum", "run")
            params = {**dict(zip(names, values, strict=True)), **log_identity()}
            text = _row_values[key] = self._mogrify(log.VALUES_SQL, params)
            if len(_row_values) > ROW_VALUES_KEPT:
                _row_values.clear()
        return text

    def _queue_script(self, migration: Migration, script: Script) -> None:
        if self.options.citus:
            for offset, text in script.statements():
                self._queue(text, migration, script, offset, True, script.copy_data(offset))
        else:
            for offset, text, data in script.pieces():
                self._queue(text, migration, script, offset, data is not None, data)

    def _run_steps(self, migration: Migration, operation: str) -> bool:
        """Run a Python migration's steps; whether they must commit before the next one."""
        steps = Steps(self.connection, self.schema == "public", migration.path)
        try:
            migration.process_steps(steps, step_direction(operation))
        except psycopg2.Error as exc:
            raise self._failed(exc, []) from None
        except Exception as exc:  # refused SQL, or the migration's own code raised
            self.cursor.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
            self.ran.pop()
            raise MessageFailed(Failure(raised(exc), migration=migration.id)) from None
        return steps.needs_commit

    # -- sending -----------------------------------------------------------------------------

    def _queue(
        self, text: str, migration=None, script=None, offset=0, alone=False, data=None
    ) -> None:
        part = _Part(text, migration, script, offset, alone, data)
        if data is not None:  # COPY ... FROM stdin: the statement alone, then its data
            self.flush()
            self._copy(part)
        elif alone and self.options.citus:
            self.flush()
            self._parts.append(part)
            self.flush()
        else:
            self._parts.append(part)

    def flush(self) -> None:
        """Send what is queued, as one message; MessageFailed (or LogMoved) if it fails."""
        parts, self._parts = self._parts, []
        if not parts:
            return
        # A newline before each separator: a file may end in a -- comment.
        message = "\n;\n".join(part.text for part in parts)
        try:
            self.cursor.execute(message)
        except psycopg2.Error as exc:
            raise self._failed(exc, parts) from None

    def _copy(self, part: _Part) -> None:
        """Send a COPY ... FROM stdin and its data, as psql does."""
        try:
            self.cursor.copy_expert(part.text, io.StringIO(part.data))
        except psycopg2.Error as exc:
            raise self._failed(exc, [part]) from None

    def _failed(self, exc: psycopg2.Error, parts: list[_Part]) -> Exception:
        """After `exc` failed a message: find which migration was running, keep the ones before
        it in the transaction, and say what failed where."""
        if self.connection.closed:
            self.open = False
            committing = any(part.text.startswith("COMMIT") for part in parts)
            return ConnectionLost(
                connection_lost(exc),
                committing,
                self.start,
                self.start + len(self.ran),
                migrations_of(self),
            )
        migration = next((p.migration for p in parts if p.migration is not None), None)
        if not self.open:  # a non-transactional migration's statement, sent alone
            return MessageFailed(_failure_in(exc, migration, parts, self.connection.info.user))
        if not self.savepoints:  # every statement alone: the failing one is this message's
            self.rollback()
            return MessageFailed(_failure_in(exc, migration, parts, self.connection.info.user))
        try:
            self.cursor.execute(
                sql.SQL("ROLLBACK TO SAVEPOINT {}; SELECT coalesce(max(id), 0) FROM {}").format(
                    sql.Identifier(SAVEPOINT), self.log_table
                )
            )
            completed = self.cursor.fetchone()[0] - self.start
        except psycopg2.Error:
            completed = None  # no migration was running: the transaction goes
        if completed is None:
            self.rollback()
            if _guard_reason(exc).startswith(MOVED):
                return LogMoved()
            return MessageFailed(failure_from(exc, user=self.connection.info.user))
        migration, _ = self.ran[completed]
        self.ran = self.ran[:completed]
        return MessageFailed(_failure_in(exc, migration, parts, self.connection.info.user))

    def _text(self, statement: Statement) -> str:
        return statement if isinstance(statement, str) else statement.as_string(self.connection)

    def _mogrify(self, statement, params) -> str:
        return self.cursor.mogrify(statement, params).decode(_encoding(self.connection))

    def params(self) -> dict[str, str]:
        """The schema's search path, lock key and timeouts, as statements take them."""
        return {
            "search_path": self.search_path,
            "key": lock_key(self.schema),
            "lock_wait": _ms(self.options.wait) if self.options.wait else "1ms",
            "lock_timeout": _ms(self.options.lock_timeout),
            "statement_timeout": _ms(self.options.statement_timeout),
        }

    def send_alone(self, text: str, migration: Migration, script: Script, offset: int) -> None:
        """Send one statement of a migration, outside any transaction; MessageFailed naming
        its file and line if it fails."""
        part = _Part(text, migration, script, offset, True, script.copy_data(offset))
        if part.data is not None:
            self._copy(part)
            return
        self._parts.append(part)
        self.flush()


#: Quoted values of log rows, by (migration id, operation, batch, checksum, run) and encoding.
_row_values: dict[tuple, str] = {}
ROW_VALUES_KEPT = 10_000


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


def step_direction(operation: str) -> str:
    """yoyo's name for the way a migration's steps run (a post-apply hook applies)."""
    return "rollback" if operation == "rollback" else "apply"


def _failure_in(exc: psycopg2.Error, migration: Migration | None, parts, user) -> Failure:
    """The failure of `migration`, with the file and line where PostgreSQL gives a position."""
    if migration is None:
        return failure_from(exc, user=user)
    failure = failure_from(exc, migration.id, user)
    if GUARD_MARK in failure.message:
        return Failure(_guard_reason(exc), migration=migration.id)
    position = getattr(getattr(exc, "diag", None), "statement_position", None)
    start = 0
    for part in parts:
        end = start + len(part.text)
        if part.script is not None and part.migration is migration:
            if position and start < int(position) <= end + 1:
                line = part.script.line_at(part.offset + int(position) - 1 - start)
                return failure.at(str(part.script.path), line)
            if part.alone:  # a statement sent alone: the failing one
                return failure.at(str(part.script.path), part.script.line_at(part.offset))
        start = end + len("\n;\n")
    return failure


def _guard_reason(exc) -> str:
    text = getattr(getattr(exc, "diag", None), "message_primary", None) or str(exc)
    return text.split(GUARD_MARK, 1)[-1].rstrip('"')


def _encoding(connection) -> str:
    return extensions.encodings.get(connection.encoding, "utf-8")


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def migrations_of(session: Session) -> list[str]:
    """The migrations (not hooks) the session's transaction ran."""
    return [m.id for m, operation in session.ran if operation != log.HOOK]
