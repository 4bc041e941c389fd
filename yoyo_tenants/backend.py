"""A yoyo backend scoped to one PostgreSQL schema.

Registered as yoyo's ``postgresql+tenant`` scheme, so plain yoyo works on one tenant::

    yoyo apply --batch --database 'postgresql+tenant://app@db/app?schema=tid_cf4116b064' \
        migrations/tenant

It closes the traps yoyo's PostgreSQL backend has when one migration set serves many schemas
(see shared/YOYO-NOTES.md):

* the schema name is quoted, and a schema that does not exist is an error, never a fall-through
  to ``public``;
* ``search_path`` is set inside each transaction (``set_config(..., true)``), never on the session,
  so nothing leaks through a transaction-pooling PgBouncer;
* the schema's migration log is one table in the schema, always named with it (see log.py);
* a migration and its log row commit together, on one connection, under a transaction-level
  advisory lock on the schema, which the server releases if the client dies;
* each applied migration records its batch (for "roll back the last run") and a checksum of its
  files (to notice a migration edited after it was applied).
"""

from __future__ import annotations

import getpass
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import cache

from psycopg2 import sql
from yoyo import exceptions
from yoyo.backends.core.postgresql import PostgresqlBackend
from yoyo.migrations import Migration, default_migration_table

from . import log
from .deferred import DeferringConnection
from .errors import LockBusy, NotReady
from .log import AppliedMigration, Log, migration_checksum

MAX_IDENTIFIER_BYTES = 63


def check_schema_name(name: str) -> str:
    """Refuse names PostgreSQL would truncate or reject; quoting makes anything else safe."""
    if not name or "\x00" in name or len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise NotReady(f"invalid schema name {name!r}")
    return name


class _Quoter:
    def __init__(self, quote):
        self.quote = quote

    def __getattr__(self, name):
        return self.quote(name)


def _tolerates_errors(steps) -> bool:
    """Whether any of yoyo's steps (or steps in their groups) has ignore_errors set."""
    for step in steps or ():
        if getattr(step, "ignore_errors", None):
            return True
        inner = getattr(step, "step", None)
        if _tolerates_errors(getattr(inner, "steps", None)):
            return True
    return False


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


@cache
def _log_identity() -> dict[str, str]:
    # yoyo looks these up for every log row; socket.getfqdn() alone can take milliseconds.
    return {
        "username": getpass.getuser()[: log.USERNAME_WIDTH],
        "hostname": socket.getfqdn()[: log.HOSTNAME_WIDTH],
    }


class TenantBackend(PostgresqlBackend):
    """yoyo's PostgreSQL backend, confined to the schema named by the URI's ``schema`` argument."""

    schema = "public"
    #: The batch number recorded with each applied migration; set per run, or the next one free.
    batch: int | None = None
    #: Seconds to wait for another run's lock on the schema before giving up.
    lock_wait = 60.0
    #: Seconds a migration statement may wait for a table lock, and may run (0: no limit).
    lock_timeout = 5.0
    statement_timeout = 0.0
    _elide_savepoints = False

    lock_sql = (
        "SELECT set_config('search_path', %(search_path)s, true); "
        "SELECT set_config('lock_timeout', %(wait)s, true); "
        "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0)); "
        # From here on the migrations run: bound how long a statement may wait for a table lock
        # (so the app's queries never queue behind a blocked ALTER for long) and may run.
        "SELECT set_config('lock_timeout', %(lock_timeout)s, true), "
        "set_config('statement_timeout', %(statement_timeout)s, true)"
    )
    one_message_sql = (
        "BEGIN; SELECT set_config('search_path', %(search_path)s, true), "
        "set_config('lock_timeout', %(lock_timeout)s, true), "
        "set_config('statement_timeout', %(statement_timeout)s, true), "
        # Never waits: if another run holds the schema, this fails, and the careful path waits.
        "1 / pg_try_advisory_xact_lock(hashtextextended(%(key)s, 0))::int"
    )

    def __init__(self, dburi, migration_table=default_migration_table):
        self._elided: set[str] = set()
        self._names: dict[str, str] = {}
        self._records: list[bytes] | None = None
        self._messages: dict[tuple[Migration, ...], tuple[bytes, str]] = {}
        super().__init__(dburi, migration_table)
        self.use_schema(self.schema)

    # -- scope ---------------------------------------------------------------------------------

    def connect(self, dburi):
        # yoyo passes the URI's arguments to psycopg2.connect; add our connection class.
        args = {**dburi.args, "connection_factory": DeferringConnection}
        connection = super().connect(dburi._replace(args=args))  # pops "schema" into self.schema
        self.schema = self.schema or "public"
        return connection

    def use_schema(self, schema: str, tables_ready: bool = False) -> None:
        """Point this backend (and its connection) at another schema, between transactions.

        `tables_ready` says the schema's migration tables are known to be up to date, sparing a
        round of CREATE TABLE IF NOT EXISTS per schema in runs over many schemas.
        """
        assert not self._in_transaction
        self.schema = check_schema_name(schema)
        self.batch = None
        self._internal_schema_updated = tables_ready
        # Quoted once per schema: at thousands of schemas, quoting is a good part of the client's
        # work. Every statement naming these runs with parameters, where % is special.
        quoted = sql.Identifier(schema).as_string(self.connection)
        self._names = {
            name: f"{quoted}.{table}".replace("%", "%%")
            for name, table in (
                ("log", f'"{log.TABLE}"'),
                ("old", f'"{log.OLD_TABLE}"'),
                ("version", '"_yoyo_version"'),
            )
        }
        # public stays second so that extension types installed there (pgvector) resolve.
        self._search_path = "public" if schema == "public" else f"{quoted}, public"

    def format_sql(self, s, **kwargs):
        # As yoyo's, without defining a class on every call.
        return s.format(self, quoted=_Quoter(self.quote_identifier), **kwargs)

    @property
    def search_path(self) -> str:
        return self._search_path

    def qualified(self, table: str) -> str:
        return sql.Identifier(self.schema, table).as_string(self.connection)

    def _sql(self, template: str) -> str:
        return template.format(**self._names)

    def init_database(self):
        # yoyo creates a lock table and probes transactional DDL with a scratch table here, for
        # every schema. PostgreSQL has transactional DDL, and our lock is an advisory lock.
        self.has_transactional_ddl = True
        found = self.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = :schema", {"schema": self.schema}
        )
        if found.fetchone() is None:
            raise NotReady(f"schema {self.schema} does not exist")

    def init_connection(self, connection):
        # Deliberately nothing: the search_path is set per transaction in begin().
        pass

    def begin(self):
        assert not self._in_transaction
        self._in_transaction = True
        self.cursor().execute(
            "BEGIN; SELECT set_config('search_path', %s, true)", (self.search_path,)
        )

    @contextmanager
    def schema_transaction(
        self, wait: float | None = None, read: bool = True
    ) -> Iterator[list[AppliedMigration]]:
        """A transaction on this schema under its advisory lock; yields its applied migrations
        (if `read`: the schema may not exist yet).

        For runs over many schemas: BEGIN, the search path, the lock and the read of the log go
        out as one message, and the log rows of what was applied go out with the COMMIT, so a
        schema with one pending migration costs three round trips.
        """
        assert not self._in_transaction
        self._in_transaction = True
        self._records = []
        try:
            yield self._lock(wait, read, begin=True)
            records, self._records = self._records, None
            self.cursor().execute(b"; ".join([*records, b"COMMIT"]))
            self._in_transaction = False
        except BaseException:
            self._records = None
            self.rollback()
            raise

    def apply_in_one_message(
        self,
        migrations: Sequence[Migration],
        position: int,
        batch: int,
        prelude: bytes = b"",
    ) -> bool:
        """Apply plain SQL `migrations` and log them in one message and one transaction, if the
        schema's log is still at `position` (nothing changed since the caller read it).

        The message: BEGIN; the search path and timeouts, and the schema's lock taken without
        waiting, in one statement; `prelude` (provisioning registers the tenant there); the log
        table if the schema has none; the migrations' files as they are; their log rows, guarded;
        COMMIT. One round trip instead of one per statement is what makes a deploy to thousands
        of tenants cheap.

        Returns False, having changed nothing, if anything failed (the lock was held, the log
        moved, a statement failed): the caller then takes the careful path, one savepoint per
        migration and a lock it waits for, which says which migration failed and why.
        """
        assert not self._in_transaction
        cursor = self.cursor()
        parts = [cursor.mogrify(self.one_message_sql, self._lock_params()), prelude]
        if not self._internal_schema_updated:
            parts.append(self._sql(log.CREATE_SQL).encode())
        body, rows = self._message_parts(tuple(migrations))
        parts += [
            body,
            cursor.mogrify(
                self._sql(log.GUARDED_INSERT_SQL) + rows,
                {"position": position, "batch": batch, **_log_identity()},
            ),
            b"COMMIT",
        ]
        try:
            cursor.execute(b";\n".join(part for part in parts if part))
        except self.DatabaseError:
            cursor.execute("ROLLBACK")
            return False
        self._internal_schema_updated = True
        return True

    def _message_parts(self, migrations: tuple[Migration, ...]) -> tuple[bytes, str]:
        """The parts of a one-message apply that are the same in every schema, made once a run:
        the files' text, and the VALUES of their log rows (for mogrify: % is escaped)."""
        parts = self._messages.get(migrations)
        if parts is None:
            cursor = self.cursor()
            encoding = self.connection.encoding_name

            def literal(value: str) -> str:
                return cursor.mogrify("%s", (value,)).decode(encoding).replace("%", "%%")

            # A newline before each separator: a file may end in a -- comment.
            body = "\n;\n".join(m.source for m in migrations) + "\n"
            rows = ", ".join(
                log.APPLIED_ROW_SQL.format(
                    k=k, migration_id=literal(m.id), checksum=literal(migration_checksum(m))
                )
                for k, m in enumerate(migrations, 1)
            )
            parts = self._messages[migrations] = (body.encode(encoding), rows)
        return parts

    def list_tables(self, **kwargs):
        return super(PostgresqlBackend, self).list_tables(schema=self.schema, **kwargs)

    # -- locking -------------------------------------------------------------------------------

    def lock_schema(self, wait: float | None = None, read: bool = True) -> list[AppliedMigration]:
        """Take this schema's advisory lock for the current transaction, waiting at most `wait`
        seconds, and (if `read`) return the schema's applied migrations as they are under it."""
        assert self._in_transaction
        return self._lock(wait, read)

    def _lock(self, wait: float | None, read: bool, begin: bool = False) -> list[AppliedMigration]:
        # One round trip (BEGIN, the lock, the log) once the log table is known to be there: at
        # thousands of schemas, round trips are what a run costs.
        ready = self._internal_schema_updated
        wait = self.lock_wait if wait is None else wait
        statements = [*(["BEGIN"] if begin else []), self.lock_sql]
        if read and ready:
            statements.append(self._sql(log.ROWS_SQL))
        cursor = self.cursor()
        try:
            cursor.execute(
                "; ".join(statements), {**self._lock_params(), "wait": _ms(wait) if wait else "1ms"}
            )
        except self.driver.errors.LockNotAvailable as exc:
            raise LockBusy(f"schema {self.schema} is locked by another run") from exc
        if not read:
            return []
        if not ready:
            self.create_internal_tables()
            cursor = self.execute(self._sql(log.ROWS_SQL))
        return Log.from_rows(cursor.fetchall()).applied

    def _lock_params(self) -> dict[str, str]:
        return {
            "search_path": self.search_path,
            "key": self._key,
            "lock_timeout": _ms(self.lock_timeout),
            "statement_timeout": _ms(self.statement_timeout),
        }

    @contextmanager
    def lock(self, timeout=10):
        """yoyo's whole-run lock, as a session advisory lock instead of a row in yoyo_lock.

        The server drops it when the session ends, so a killed run leaves nothing to break.
        """
        if self._is_locked:
            yield
            return
        deadline = time.monotonic() + timeout
        while not self.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(:key, 0))", {"key": self._key}
        ).fetchone()[0]:
            if time.monotonic() > deadline:
                raise exceptions.LockTimeout(f"schema {self.schema} is locked by another run")
            time.sleep(0.1)
        self._is_locked = True
        try:
            yield
        finally:
            self._is_locked = False
            self.execute("SELECT pg_advisory_unlock(hashtextextended(:key, 0))", {"key": self._key})

    def create_lock_table(self):
        pass

    def break_lock(self):
        pass  # advisory locks die with their session; there is nothing to break

    @property
    def _key(self) -> str:
        return f"yoyo-tenants:{self.schema}"

    # -- bookkeeping ---------------------------------------------------------------------------

    def ensure_internal_schema_updated(self):
        if self._internal_schema_updated:
            return
        if self._in_transaction:
            self.create_internal_tables()
        else:
            with self.transaction():
                self.create_internal_tables()
        self._internal_schema_updated = True

    def create_internal_tables(self) -> None:
        """Create the schema's log table if it is not there, or convert yoyo's tables to it."""
        old = self.execute("SELECT to_regclass(:old)", {"old": self.qualified(log.OLD_TABLE)})
        self.execute(self._sql(log.UPGRADE_SQL if old.fetchone()[0] else log.CREATE_SQL))
        self._internal_schema_updated = True

    def applied(self) -> list[AppliedMigration]:
        """The schema's applied migrations, oldest first."""
        self.ensure_internal_schema_updated()
        return Log.from_rows(self.execute(self._sql(log.ROWS_SQL)).fetchall()).applied

    def get_applied_migration_hashes(self):
        return [m.migration_hash for m in self.applied()]

    def next_batch(self) -> int:
        self.ensure_internal_schema_updated()
        return self.execute(self._sql(log.NEXT_BATCH_SQL)).fetchone()[0]

    def mark_one(self, migration, log=True):
        # `yoyo mark`: recorded as applied (with batch and checksum) without running it.
        self.ensure_internal_schema_updated()
        self.record(migration, "mark")

    def unmark_one(self, migration, log=True):
        self.ensure_internal_schema_updated()
        self.record(migration, "unmark")

    def log_migration(self, migration, operation):
        self.record(migration, operation)

    def get_log_data(self, migration=None, operation="apply"):
        # yoyo's own looks up the user and the host's FQDN for every row.
        return {
            "migration_id": migration.id if migration else None,
            **_log_identity(),
            "created_at_utc": datetime.now(timezone.utc).replace(tzinfo=None),
            "operation": operation,
        }

    # -- applying ------------------------------------------------------------------------------

    def apply_one(self, migration: Migration, force=False, mark=True):
        """Apply one migration: its steps, its log row and its mark commit together.

        (yoyo runs the steps on a second connection and records them afterwards in separate
        transactions, so a crash in between leaves a schema migrated but unrecorded.)
        """
        migration.load()
        if not migration.use_transactions:
            return self._without_transaction(migration, "apply", force, mark)
        with self.transaction():
            applied = self.lock_schema()
            if mark and migration.hash in {row.migration_hash for row in applied}:
                return  # a concurrent run applied it while we waited for the lock
            self.apply_in_transaction(migration, force=force, mark=mark)

    def apply_in_transaction(self, migration: Migration, force=False, mark=True) -> None:
        """Apply inside the caller's transaction; a failure rolls back to this migration's start."""
        self._in_savepoint(migration, "apply", force, mark)

    def rollback_one(self, migration: Migration, force=False):
        migration.load()
        if not migration.use_transactions:
            return self._without_transaction(migration, "rollback", force, mark=True)
        with self.transaction():
            applied = self.lock_schema()
            if migration.hash not in {row.migration_hash for row in applied}:
                return  # a concurrent run rolled it back while we waited
            self.rollback_in_transaction(migration, force=force)

    def rollback_in_transaction(self, migration: Migration, force=False) -> None:
        self._in_savepoint(migration, "rollback", force, mark=True)

    def _in_savepoint(self, migration: Migration, direction: str, force, mark) -> None:
        self.ensure_internal_schema_updated()
        with self.transaction():  # a savepoint: the migration boundary
            # yoyo wraps the steps, and each step, in savepoints of their own; unless a step may
            # fail without failing the migration, this one savepoint does their work.
            self._elide_savepoints = not force and not _tolerates_errors(migration.steps)
            try:
                migration.process_steps(self, direction, force=force)
            finally:
                self._elide_savepoints = False
            self.record(migration, direction if mark else log.HOOK)

    def savepoint(self, id):
        if self._elide_savepoints:
            self._elided.add(id)
        else:  # sent with the migration's first statement: see deferred.py
            self.connection.defer(f"SAVEPOINT {self.quote_identifier(id)}")

    def savepoint_rollback(self, id):
        statement = f"SAVEPOINT {self.quote_identifier(id)}"
        if id in self._elided:
            self._elided.discard(id)  # the migration's own savepoint rolls back instead
        elif statement in self.connection.deferred:
            self.connection.deferred.remove(statement)  # never sent: nothing to undo
        else:
            super().savepoint_rollback(id)

    def commit(self):
        super().commit()
        self._elided.clear()

    def rollback(self):
        # A savepoint still waiting to be sent would fail in an aborted transaction and take
        # the ROLLBACK down with it.
        self.connection.deferred.clear()
        super().rollback()
        self._elided.clear()

    def record(self, migration: Migration, operation: str) -> None:
        """Log `operation` ("apply", "rollback", "mark", "unmark" or "post-apply"): one
        statement, sent now, or in a schema_transaction with its COMMIT."""
        params = {**self.get_log_data(migration, operation), "batch": None, "checksum": None}
        if operation in log.APPLIED:
            if self.batch is None:
                self.batch = self.next_batch()
            params.update(batch=self.batch, checksum=migration_checksum(migration))
        if self._records is not None:
            self._records.append(self.cursor().mogrify(self._sql(log.INSERT_SQL), params))
        else:
            self.cursor().execute(self._sql(log.INSERT_SQL), params)

    def _without_transaction(self, migration: Migration, direction: str, force, mark) -> None:
        # CREATE INDEX CONCURRENTLY and friends cannot run in a transaction block, so neither can
        # a transaction-level lock or search_path: both are taken on the session for the steps
        # and given back right after. (Behind a transaction-pooling PgBouncer, session state is
        # not safe: see the README on non-transactional migrations.)
        try:
            with self.lock(timeout=self.lock_wait):
                with self.transaction():
                    applied = migration.hash in self.get_applied_migration_hashes()
                # Skip it if a concurrent run got there first.
                if not mark or applied == (direction == "rollback"):
                    self._run_steps_on_session(migration, direction, force)
                    with self.transaction():
                        self.record(migration, direction if mark else log.HOOK)
        except exceptions.LockTimeout as exc:
            raise LockBusy(str(exc)) from None

    def _run_steps_on_session(self, migration: Migration, direction: str, force) -> None:
        pid = self.execute(
            "SELECT pg_backend_pid(), set_config('search_path', :path, false),"
            " set_config('lock_timeout', :lock_timeout, false),"
            " set_config('statement_timeout', :statement_timeout, false)",
            {
                "path": self.search_path,
                "lock_timeout": _ms(self.lock_timeout),
                "statement_timeout": _ms(self.statement_timeout),
            },
        ).fetchone()[0]
        try:
            migration.process_steps(self, direction, force=force)
        finally:
            cursor = self.execute(
                "RESET search_path; RESET lock_timeout; RESET statement_timeout; "
                "SELECT pg_backend_pid()"
            )
        if cursor.fetchone()[0] != pid:
            # A transaction-pooling PgBouncer handed us another server connection between
            # statements: the session settings (and lock) did not follow. Say so loudly.
            raise NotReady(
                f"{migration.id} is non-transactional, and its statements ran on different "
                "server connections (a transaction-pooling PgBouncer?): run it over a direct "
                "connection"
            )
