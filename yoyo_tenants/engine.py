"""The engine: how one schema is migrated, whatever the command (migrate, rollback, provision, the
yoyo CLI) and however many schemas a run has.

A schema's work is one transaction under the schema's advisory lock, with the search path and
timeouts set for that transaction only. Each migration runs inside a savepoint of its own,
followed by a guard (it left the search path and role as they were) and its log row, so a
migration and its record commit together or not at all. Everything a transaction sends waits in
the session and goes to the server in as few messages as the server can take: one for a whole
tenant on PostgreSQL; on Citus, which forwards a DDL statement's whole message to its workers,
every migration statement and savepoint alone (`RunOptions.statement_per_message`).

When a message fails, nothing is sent again: `ROLLBACK TO SAVEPOINT` undoes the migration that
was running, and the log's position under it says which one that was; the migrations before it
stay in the transaction, to be committed (migrate, rollback) or not (provisioning). A lock
timeout is retried after a pause, in a new transaction, so an app waits at most
(retries + 1) x lock_timeout behind a tenant's DDL. After every transaction the session's
settings and role are reset, so nothing a migration set reaches the next schema.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

import psycopg2
from psycopg2 import extensions, sql
from yoyo.migrations import Migration

from . import heads, log
from .db import connection_lost, failure_from
from .errors import Failure, LockBusy, NotReady, TenantsError
from .log import Log, log_identity, migration_checksum
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
#: After a Python migration, whose code may also have changed how the server reads strings in
#: the messages that follow (a message is read whole before it runs, so within one it cannot).
STRINGS_GUARD_SQL = (
    "SELECT CASE WHEN current_setting('standard_conforming_strings') = 'on' THEN 0 "
    f"ELSE ('{GUARD_MARK}the migration changed standard_conforming_strings to ' "
    "|| current_setting('standard_conforming_strings'))::int END"
)
#: Whatever a migration set on the session goes with its transaction: the next schema on this
#: connection starts as the connection did.
RESET_SQL = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL"
#: Before the first migration, when the caller knows the log from a scan: it is still there.
MOVED = "log moved"
POSITION_GUARD_SQL = sql.SQL(
    "SELECT CASE WHEN coalesce(max(id), 0) = %(position)s THEN 0 "
    f"ELSE ('{GUARD_MARK}{MOVED} to ' || coalesce(max(id), 0))::int END FROM {{log}}"
)
INVALID_INDEXES_SQL = (
    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE NOT i.indisvalid AND c.relnamespace = to_regnamespace(quote_ident(%s)) "
    "ORDER BY c.relname"
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


#: A statement as the engine takes it: composed with psycopg2.sql, or already text.
Statement = sql.Composable | str


class Direction(str, Enum):
    APPLY = "apply"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class RunOptions:
    """How a run treats locks, timeouts, drift, failures and the server's messages."""

    #: Seconds to wait for a schema another run holds; then the schema is skipped.
    lock_wait: float | None = None
    #: Seconds a migration statement may wait for a table lock before it gives up (0: forever).
    #: Short, so that an ALTER queued behind a long app transaction does not queue the app's
    #: own traffic behind it.
    lock_timeout: float = 5.0
    #: Seconds a migration statement may run (0: no limit).
    statement_timeout: float = 0.0
    #: How often a migration that hit lock_timeout is retried, with doubling pauses.
    retries: int = 2
    retry_pause: float = 0.5
    #: Apply to schemas whose applied migrations' files changed or vanished.
    allow_drift: bool = False
    #: Send every migration statement and savepoint in a message of its own (Citus).
    statement_per_message: bool = False
    #: The run the log rows name (see runs.py); None for provisioning.
    run: int | None = None
    #: Keep public.yoyo_tenants_heads up to date with each log written (see heads.py).
    heads: bool = False
    #: Drop invalid indexes (left by an interrupted CREATE INDEX CONCURRENTLY) before running a
    #: non-transactional migration, which rebuilds them.
    repair_invalid_indexes: bool = False

    @property
    def wait(self) -> float:
        return 60.0 if self.lock_wait is None else self.lock_wait


class Outcome(str, Enum):
    """What a run did to a schema (the values are the words reports use)."""

    DONE = "done"
    UP_TO_DATE = "up to date"
    FAILED = "failed"
    SKIPPED = "skipped"  # locked by another run
    NOT_STARTED = "not started"  # the run stopped first
    UNKNOWN = "unknown"  # the connection broke as it committed, and no log could be read since


@dataclass
class SchemaResult:
    """What one run did (or, in a dry run, would do) to one schema."""

    schema: str
    org_id: str | None = None
    migrations: list[str] = field(default_factory=list)  # applied or rolled back, in order
    failure: Failure | None = None
    skipped: bool = False  # locked by another run, or not started because the run stopped
    duration: float = 0.0
    sql: list[str] = field(default_factory=list)  # dry runs: what would be executed
    retries: int = 0
    #: The connection broke while the schema's COMMIT was on its way: what it would have made.
    in_doubt: ConnectionLost | None = None

    @property
    def outcome(self) -> Outcome:
        if self.in_doubt:
            return Outcome.UNKNOWN
        if self.failure and self.skipped:
            return Outcome.SKIPPED
        if self.failure:
            return Outcome.FAILED
        if self.skipped:
            return Outcome.NOT_STARTED
        return Outcome.DONE if self.migrations else Outcome.UP_TO_DATE

    def fail(self, message: str, **fields) -> None:
        self.failure = Failure(message, **fields)


class ConnectionLost(Exception):
    """The connection broke during a message. Unless that message carried the COMMIT, nothing
    of the transaction stays; if it did, whether it landed is for the log to tell: it did if
    the log has reached `position`, with `migrations` applied (or rolled back)."""

    def __init__(self, reason: str, committing: bool, start: int, position: int, migrations):
        super().__init__(reason)
        self.reason, self.committing = reason, committing
        self.start, self.position, self.migrations = start, position, migrations


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


class Session:
    """One schema's work on one connection, from BEGIN to COMMIT: its transaction, its lock, the
    statements waiting to be sent, and the log rows they will write."""

    def __init__(self, connection, schema: str, options: RunOptions):
        self.connection = connection
        self.cursor = connection.cursor()
        self.schema = schema
        self.options = options
        self.log_table = sql.Identifier(schema, log.TABLE)
        # public stays on the path of tenants so that types installed there (pgvector) resolve.
        quoted = sql.Identifier(schema).as_string(connection)
        self.search_path = "public" if schema == "public" else f"{quoted}, public"
        self.open = False
        #: The log's position when the transaction began.
        self.start = 0
        #: What this transaction logs, in order: each entry is one log row, numbered on from
        #: `start`. A migration is in it from the moment its savepoint is queued.
        self.ran: list[tuple[Migration, str]] = []
        self._parts: list[_Part] = []
        self._insert: str | None = None  # made when the first log row is
        #: The log as the transaction found it, and the batch its rows record.
        self.base: Log = Log([])
        self._batch: int | None = None
        #: Whether the index already says what the log said when the transaction began.
        self._indexed = True

    # -- the transaction ---------------------------------------------------------------------

    def begin(
        self, known: Log | None = None, prelude: Sequence[Statement] = (), read: bool = True
    ) -> Log:
        """Open the schema's transaction under its lock, run `prelude` in it, and return the
        schema's log as it is under the lock.

        With `known` (read by a scan a moment ago) nothing is sent yet: the lock, the prelude and
        a guard that the log is still at known.position go out with the first migration, and
        LogMoved is raised then if it is not. Without, the log is read under the lock now (and
        made, or converted from yoyo's tables, if need be), unless not `read`.
        """
        assert not self.open
        self.open, self.ran, self.base, self._batch = True, [], Log([]), None
        self._indexed = True
        self._queue(self._mogrify(BEGIN_SQL, self._session_params()))
        for statement in prelude:
            self._queue(self._text(statement), alone=True)
        if known is not None:
            guard = POSITION_GUARD_SQL.format(log=self.log_table)
            self._queue(self._mogrify(guard, {"position": known.position}))
            self.base, self.start = known, known.position
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
            self._queue(self._text(log.create_sql(self.schema)), alone=True)
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

    def commit(self) -> None:
        if self.options.heads and (self.ran or not self._indexed):
            self._queue(self._mogrify(heads.UPSERT_SQL, self._head()))
        self._queue("COMMIT; " + RESET_SQL)
        self.flush()
        self.open = False
        self._reset_datestyle()

    def _head(self) -> dict:
        """The schema's row in the heads index, as this transaction leaves its log."""
        after = self.base.after(self.ran, self._batch)
        return {
            "schema": self.schema,
            "log": self.log_table.as_string(self.connection),
            "position": self.start + len(self.ran),
            "applied": heads.digest_of(after.applied),
            "batch": after.last_batch,
        }

    def rollback(self) -> None:
        """End the transaction, keeping nothing of it."""
        self._parts = []
        try:
            self.cursor.execute("ROLLBACK; " + RESET_SQL)
        finally:
            self.open, self.ran = False, []
        self._reset_datestyle()

    # -- migrations --------------------------------------------------------------------------

    def run(self, migration: Migration, operation: str, batch: int | None = None) -> None:
        """Queue (or, for Python, run) one transactional migration in its savepoint, then its
        guard and its log row. `operation`: "apply", "rollback" or "post-apply"."""
        assert self.open and migration.use_transactions
        self.ran.append((migration, operation))
        self._queue(f"SAVEPOINT {SAVEPOINT}", alone=True)
        script = _script(migration, operation)
        if isinstance(script, Script):
            self._queue_script(migration, script)
        elif script is not None:  # a Python migration: its steps run now, on this connection
            self.flush()
            self._run_steps(migration, operation)
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
            self._insert = self._text(
                log.INSERT_SQL.format(log=self.log_table, stamp=sql.SQL(stamp))
            )
        row_id = self.start + len(self.ran)
        self._queue(f"{self._insert}{row_id}, {self._values(values)}")

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
        if self.options.statement_per_message:
            for offset, text in script.statements():
                self._queue(text, migration, script, offset, alone=True)
        else:
            self._queue(script.text, migration, script)

    def _run_steps(self, migration: Migration, operation: str) -> None:
        steps = Steps(self.connection, self.schema == "public", migration.path)
        try:
            migration.process_steps(steps, _step_direction(operation))
        except psycopg2.Error as exc:
            raise self._failed(exc, []) from None
        except TenantsError as exc:  # a step's SQL was refused before it ran
            self.cursor.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
            self.ran.pop()
            raise MessageFailed(Failure(str(exc), migration=migration.id)) from None

    # -- sending -----------------------------------------------------------------------------

    def _queue(self, text: str, migration=None, script=None, offset=0, alone=False) -> None:
        if alone and self.options.statement_per_message:
            self.flush()
            self._parts.append(_Part(text, migration, script, offset, alone))
            self.flush()
        else:
            self._parts.append(_Part(text, migration, script, offset, alone))

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
                _migrations(self),
            )
        migration = next((p.migration for p in parts if p.migration is not None), None)
        if not self.open:  # a non-transactional migration's statement, sent alone
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

    def _session_params(self) -> dict[str, str]:
        return {
            "search_path": self.search_path,
            "key": lock_key(self.schema),
            "lock_wait": _ms(self.options.wait) if self.options.wait else "1ms",
            "lock_timeout": _ms(self.options.lock_timeout),
            "statement_timeout": _ms(self.options.statement_timeout),
        }

    def _reset_datestyle(self) -> None:
        # psycopg2 sets DateStyle to ISO at connect on servers that default to another, and
        # reads dates that way; RESET ALL undoes it.
        if not (self.connection.get_parameter_status("DateStyle") or "ISO").startswith("ISO"):
            self.cursor.execute("SET DateStyle TO 'ISO'")

    # -- non-transactional migrations ------------------------------------------------------------

    def run_alone(self, migration: Migration, operation: str, batch: int | None) -> bool:
        """Run a non-transactional migration (CREATE INDEX CONCURRENTLY and friends) outside any
        transaction, each statement in a message of its own, with the search path, timeouts and
        the schema's lock held on the session meanwhile and given back after; then log it.
        Returns False if a concurrent run did it first.

        (Behind a transaction-pooling PgBouncer, session state is not safe: see the README.)
        """
        assert not self.open
        params = self._session_params()
        self.cursor.execute(
            "SELECT set_config('lock_timeout', %(lock_wait)s, false); "
            "SELECT pg_advisory_lock(hashtextextended(%(key)s, 0))",
            params,
        )
        try:
            applied = {row.migration_hash for row in self.begin().applied}
            if operation != log.HOOK and (migration.hash in applied) != (operation == "rollback"):
                self.rollback()
                return False
            self.commit()
            self._run_on_session(migration, operation, params)
            self.begin()
            self.mark(migration, operation, batch)
            self.commit()
            return True
        finally:
            self.cursor.execute(
                RESET_SQL + "; SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0))", params
            )

    def _invalid_indexes(self, migration: Migration) -> None:
        """An interrupted CREATE INDEX CONCURRENTLY (a crash, kill -9, a failed unique build)
        leaves an invalid index behind, which the migration's second try would trip over or,
        with IF NOT EXISTS, silently keep: name it, or drop it when asked to."""
        self.cursor.execute(INVALID_INDEXES_SQL, (self.schema,))
        for (name,) in self.cursor.fetchall():
            drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(self.schema, name)
            )
            if not self.options.repair_invalid_indexes:
                raise MessageFailed(
                    Failure(
                        f"index {self.schema}.{name} is invalid, left by an interrupted "
                        f"CREATE INDEX CONCURRENTLY: run {self._text(drop)}, or run again "
                        "with --repair-invalid-indexes (drops it; the migration builds it anew)",
                        migration=migration.id,
                    )
                )
            self.cursor.execute(drop)

    def _run_on_session(self, migration: Migration, operation: str, params) -> None:
        self._invalid_indexes(migration)
        self.cursor.execute(
            "SELECT pg_backend_pid(), set_config('search_path', %(search_path)s, false),"
            " set_config('lock_timeout', %(lock_timeout)s, false),"
            " set_config('statement_timeout', %(statement_timeout)s, false)",
            params,
        )
        pid = self.cursor.fetchone()[0]
        script = _script(migration, operation)
        try:
            if isinstance(script, Script):
                for offset, text in script.statements():
                    self._parts.append(_Part(text, migration, script, offset, alone=True))
                    self.flush()
            elif script is not None:
                steps = Steps(self.connection, self.schema == "public", migration.path)
                try:
                    migration.process_steps(steps, _step_direction(operation))
                except psycopg2.Error as exc:
                    failure = failure_from(exc, migration.id, self.connection.info.user)
                    raise MessageFailed(failure) from None
            if self.connection.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
                raise MessageFailed(
                    Failure(
                        "it ended inside a transaction block: end it with COMMIT",
                        migration=migration.id,
                    )
                )
        finally:
            if self.connection.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
                self.cursor.execute("ROLLBACK")  # a block of its own that failed, or was left open
            self.cursor.execute(RESET_SQL + "; SELECT pg_backend_pid()")
        if self.cursor.fetchone()[0] != pid:
            # A transaction-pooling PgBouncer handed us another server connection between
            # statements: the session settings (and lock) did not follow. Say so loudly.
            raise NotReady(
                f"{migration.id} is non-transactional, and its statements ran on different "
                "server connections (a transaction-pooling PgBouncer?): run it over a direct "
                "connection"
            )


def server_options(
    connection, options: RunOptions, citus: str = "auto", write: bool = False
) -> RunOptions:
    """`options` fitted to the server, checked once per run: every statement alone on a Citus
    coordinator (`citus`: "auto" detects it, "on" forces it, "off" forbids it), and, for a run
    that writes, the heads index kept (made the first time). NotReady when the server would read
    migration files otherwise than they were checked, or the index exists but this user may not
    keep it."""
    cursor = connection.cursor()
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus'), "
        "current_setting('standard_conforming_strings'), "
        "to_regclass('public.yoyo_tenants_heads') IS NOT NULL, "
        "has_table_privilege(to_regclass('public.yoyo_tenants_heads'), 'INSERT') "
        "AND has_table_privilege(to_regclass('public.yoyo_tenants_heads'), 'UPDATE')"
    )
    has_citus, strings, indexed, may_index = cursor.fetchone()
    if strings != "on":
        raise NotReady(
            "standard_conforming_strings is off for this database or user, so the server would "
            "read backslashes in migration files otherwise than they were checked: turn it on "
            "(ALTER DATABASE ... SET standard_conforming_strings = on, the default)"
        )
    if write and indexed and not may_index:
        raise NotReady(
            "the user may not keep public.yoyo_tenants_heads, the index of every schema's log: "
            "GRANT INSERT, UPDATE ON public.yoyo_tenants_heads to it"
        )
    if write and not indexed:
        indexed = heads.ensure(cursor)
    per_message = has_citus if citus == "auto" else citus == "on"
    return replace(options, statement_per_message=per_message, heads=write and indexed)


#: Quoted values of log rows, by (migration id, operation, batch, checksum, run) and encoding.
_row_values: dict[tuple, str] = {}
ROW_VALUES_KEPT = 10_000


def lock_key(schema: str) -> str:
    """The advisory lock key of a schema: held by whoever migrates it."""
    return f"yoyo-tenants:{schema}"


def _script(migration: Migration, operation: str) -> Script | bool | None:
    """What runs for `operation`: a Script for SQL, True for Python steps, None for nothing."""
    if not migration.is_raw_sql():
        return True
    if operation == "rollback":
        return getattr(migration, "rollback_script", None)
    return migration.script


def _step_direction(operation: str) -> str:
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


def mark_schema(connection, schema: str, options: RunOptions, choose) -> list:
    """Log operations that run nothing (mark, unmark, accept) in `schema`, under its lock:
    `choose(log)` says which, as (migration, operation, batch) from the log as it is then."""
    session = Session(connection, schema, options)
    marks = choose(session.begin())
    for migration, operation, batch in marks:
        session.mark(migration, operation, batch)
    session.commit()
    return marks


# -- one schema, start to finish -----------------------------------------------------------------


def migrate_schema(
    connection,
    plan,
    result: SchemaResult,
    options: RunOptions = RunOptions(),
    known: Log | None = None,
    prelude: Sequence[str] = (),
    atomic: bool = False,
) -> SchemaResult:
    """Do what `plan` chooses (see plan.py) to `result.schema`: the one way a schema is migrated
    or rolled back, by every command.

    `known`: the schema's log as a scan read it, so that a schema needing one transaction costs
    one message. `prelude`: statements run first in the first transaction (provisioning's
    registry row and CREATE SCHEMA). `atomic`: a failure keeps nothing of its transaction
    (provisioning), instead of committing the migrations before the one that failed.
    """
    started = time.perf_counter()
    session = Session(connection, result.schema, options)
    try:
        while _round(session, plan, result, options, known, prelude, atomic):
            known, prelude = None, ()
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


def _round(session: Session, plan, result, options, known, prelude, atomic) -> bool:
    """One transaction of a schema's work; True if another is needed (after a non-transactional
    migration, a retry, or a log that moved under a scan)."""
    try:
        current = session.begin(prelude=prelude) if known is None else known
        todo = plan.choose(current)
        if not todo and not prelude:
            if session.open:
                session.commit()  # keeps a log table just made or converted
            return False
        if not session.open:
            session.begin(known=current, prelude=prelude)
        for migration in todo:
            if not migration.use_transactions:
                break
            session.run(migration, plan.operation, plan.batch)
        else:
            if result.migrations or session.ran:
                for hook in plan.hooks:
                    session.run(hook, log.HOOK)
        ran = _migrations(session)
        session.commit()
        result.migrations += ran
    except LogMoved:
        return True
    except MessageFailed as failed:
        return _after_failure(session, result, options, failed.failure, atomic)
    rest = todo[len(ran) :]
    if not rest or rest[0].use_transactions:
        return False
    try:
        if session.run_alone(rest[0], plan.operation, plan.batch):
            result.migrations.append(rest[0].id)
    except MessageFailed as failed:  # its statements may have half happened: never retried
        result.failure = failed.failure
        return False
    return True


def _after_failure(session: Session, result, options, failure: Failure, atomic: bool) -> bool:
    """Keep (or, `atomic`, drop) what ran before the failing migration; True to try again."""
    if not session.open:  # no migration was running: the transaction is gone already
        if failure.sqlstate == LOCK_NOT_AVAILABLE:
            raise LockBusy(f"schema {result.schema} is locked by another run")
        result.failure = failure
        return False
    if atomic:
        session.rollback()
    else:
        ran = _migrations(session)
        session.commit()
        result.migrations += ran
    if failure.sqlstate == LOCK_NOT_AVAILABLE and result.retries < options.retries and not atomic:
        time.sleep(options.retry_pause * 2**result.retries)
        result.retries += 1
        return True
    if result.retries:
        failure = failure.with_note(f"after {result.retries} retries")
    result.failure = failure
    return False


def _migrations(session: Session) -> list[str]:
    """The migrations (not hooks) the session's transaction ran."""
    return [m.id for m, operation in session.ran if operation != log.HOOK]
