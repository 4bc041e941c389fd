"""A yoyo backend scoped to one PostgreSQL schema: how the `yoyo` command line reaches the engine.

Registered as yoyo's ``postgresql+tenant`` scheme, so plain yoyo works on one tenant::

    yoyo apply --batch --database 'postgresql+tenant://app@db/app?schema=tid_cf4116b064' \
        migrations/tenant

yoyo decides what to do (its own reading of the files, its prompts); every migration, mark and
log row goes through the same engine as the invoke tasks (engine.py): a migration and its log row
commit together under the schema's advisory lock, with the search path set for that transaction
only. It also closes yoyo's traps for many schemas: the schema must be named and is quoted, a
schema that does not exist is an error rather than a fall-through to public, reads write nothing
(yoyo's own tables are read as they are, never converted), and there is no lock table (a session
advisory lock dies with its session).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg2
from psycopg2 import extensions
from psycopg2.extensions import connection as Connection
from yoyo import exceptions
from yoyo.backends.core.postgresql import PostgresqlBackend
from yoyo.connections import DatabaseURI
from yoyo.migrations import Migration, MigrationList, default_migration_table

from . import log
from .db import Params, Query, error_text
from .engine import Mark, mark_schema, migrate_schema
from .errors import LockBusy, MigrationFailed, NotReady, TenantsError, UsageError
from .loading import SqlMigration
from .log import Log
from .plan import drift
from .results import RunOptions, SchemaResult
from .server import prepare_run
from .session import MessageFailed, Session, lock_key
from .sqlfiles import is_transaction_control

MAX_IDENTIFIER_BYTES = 63
NO_SCHEMA = (
    "postgresql+tenant needs the schema to migrate: add ?schema=<name> to the database URL, "
    "e.g. ?schema=tid_cf4116b064 for a tenant, or ?schema=public for the master migrations"
)
#: What --migration-table (yoyo.ini's migration_table) may name: yoyo's default, or our log.
LOG_NAMES = (default_migration_table, log.TABLE)
#: The other sessions holding a schema's advisory lock (at session or transaction level); the
#: lock's 64-bit key is split over classid and objid.
HOLDERS_SQL = (
    "SELECT a.pid, coalesce(nullif(a.application_name, ''), 'no application name'), "
    "to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ') "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(:key, 0) "
    "AND l.pid <> pg_backend_pid() ORDER BY a.backend_start"
)
#: What yoyo's command line would end in a traceback, and we in one line.
REPORTED = (TenantsError, exceptions.LockTimeout, psycopg2.Error)

Method = TypeVar("Method", bound=Callable[..., Any])


@contextmanager
def one_line() -> Iterator[None]:
    """When yoyo's own command line is the program, end it on one of our errors as an invoke
    task ends: one ``error:`` line on stderr, exit 1. yoyo's main() catches only its own
    InvalidArgument (and prints its usage with it), so anything else a backend raises would end
    in a traceback. A program calling yoyo's API still gets the exceptions."""
    try:
        yield
    except REPORTED as exc:
        if not _yoyo_is_the_program():
            raise
        text = str(exc) if isinstance(exc, TenantsError) else error_text(exc)
        raise SystemExit(f"error: {' '.join(text.split())}") from None


def reported(method: Method) -> Method:
    """`method`, its errors reported as one_line() says."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_line():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _yoyo_is_the_program() -> bool:
    cli = sys.modules.get("yoyo.scripts.main")
    return cli is not None and getattr(sys.modules.get("__main__"), "main", None) is cli.main


def check_schema_name(name: str) -> str:
    """Refuse names PostgreSQL would truncate or reject; quoting makes anything else safe."""
    if not name or "\x00" in name or len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise NotReady(f"invalid schema name {name!r}")
    return name


class MigrationError(MigrationFailed, psycopg2.DatabaseError):
    """A migration failed and was rolled back: one of our errors and, as yoyo's API promises of
    a failing migration, a DatabaseError of the driver."""


class TenantBackend(PostgresqlBackend):
    """yoyo's PostgreSQL backend, confined to the schema named by the URI's ``schema`` argument."""

    options = RunOptions()
    locked = False
    #: Set by yoyo's connect(), from the URI's ``schema`` argument, then checked.
    schema: str
    search_path: str

    @reported
    def __init__(self, dburi: DatabaseURI, migration_table: str) -> None:
        # Before connecting: a URL without its schema, or a second history, writes nothing.
        if not dburi.args.get("schema"):
            raise UsageError(NO_SCHEMA)
        if migration_table not in LOG_NAMES:
            raise UsageError(
                f"postgresql+tenant keeps one log per schema, {log.TABLE}, which the invoke "
                f"tasks read too: it keeps no separate history in {migration_table!r} (leave "
                "out --migration-table, or migration_table in yoyo.ini)"
            )
        self.batch: int | None = None  # one batch for all yoyo applies in this process
        super().__init__(dburi, migration_table)

    def connect(self, dburi: DatabaseURI) -> Connection:
        connection = super().connect(dburi)  # takes "schema" out of the URI's arguments
        self.schema = check_schema_name(self.schema)
        self.search_path = Session(connection, self.schema, self.options).search_path
        return connection

    @reported
    def init_database(self) -> None:
        # yoyo creates a lock table and probes transactional DDL with a scratch table here.
        # PostgreSQL has transactional DDL, and our lock is an advisory lock.
        self.has_transactional_ddl = True
        found = self.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = :schema", {"schema": self.schema}
        )
        if found.fetchone() is None:
            raise NotReady(f"schema {self.schema} does not exist")
        self.options = prepare_run(self.connection, RunOptions())

    def init_connection(self, connection: Connection) -> None:
        pass  # the search path is set per transaction, never on the session

    def cursor(self) -> SchemaCursor:
        cursor = self.connection.cursor(cursor_factory=SchemaCursor)
        cursor.search_path = self.search_path
        return cursor

    def begin(self) -> None:
        super().begin()  # yoyo's own transactions see the schema too, for that transaction only
        self.execute("SELECT set_config('search_path', :path, true)", {"path": self.search_path})

    # -- locking -------------------------------------------------------------------------------

    @contextmanager
    def lock(self, timeout: float = 10) -> Iterator[None]:
        """yoyo's whole-run lock, as a session advisory lock on the schema instead of a row in a
        lock table: the server drops it when the session ends, so a killed run leaves nothing."""
        if self.locked:
            yield
            return
        key = {"key": lock_key(self.schema)}
        with one_line():
            deadline = time.monotonic() + timeout
            while not self.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(:key, 0))", key
            ).fetchone()[0]:
                if time.monotonic() > deadline:
                    raise exceptions.LockTimeout(self._lock_message(self._holders(), timeout))
                time.sleep(0.1)
        self.locked = True
        try:
            yield
        finally:
            self.locked = False
            self.execute("SELECT pg_advisory_unlock(hashtextextended(:key, 0))", key)

    @reported
    def break_lock(self) -> None:
        """There is never a stale lock to break: the schema's advisory lock ends with the session
        holding it, even a killed one. A lock held is a run still going, which is not ended
        behind its back: LockBusy names its session, and how to end it if it must be."""
        holders = self._holders()
        if holders:
            raise LockBusy(
                f"{self._lock_message(holders)}: an advisory lock ends with its session, so it "
                "is never stale; wait for that run, or end it with SELECT "
                f"pg_terminate_backend({holders[0][0]})"
            )

    def _holders(self) -> list[tuple[int, str, str]]:
        return self.execute(HOLDERS_SQL, {"key": lock_key(self.schema)}).fetchall()

    def _lock_message(
        self, holders: list[tuple[int, str, str]], waited: float | None = None
    ) -> str:
        details = [f"waited {waited:g} s"] if waited is not None else []
        details += [f"pid {pid}, {app}, connected {since}" for pid, app, since in holders]
        text = f"schema {self.schema} is locked by another run"
        return f"{text} ({'; '.join(details)})" if details else text

    # -- the log, through the engine -------------------------------------------------------------

    def ensure_internal_schema_updated(self) -> None:
        pass  # the engine makes (or converts) the log table when it first writes to it

    @reported
    def get_applied_migration_hashes(self) -> list[str]:
        return [row.migration_hash for row in self.applied().applied]

    def applied(self) -> Log:
        """The schema's log, read under its lock; nothing is written, not even a log table, and
        yoyo's own tables (an old layout) are read as they are."""
        session = Session(self.connection, self.schema, self.options)
        session.begin()
        try:
            return session.read_log(create=False)
        except MessageFailed as failed:
            raise NotReady(f"cannot read the log of schema {self.schema}: {failed}") from None
        finally:
            if session.open:
                session.rollback()

    @reported
    def to_apply(self, migrations: MigrationList) -> MigrationList:
        """What yoyo would apply, unless a migration applied here has changed since: the invoke
        tasks refuse to migrate a schema with drift, and so does the yoyo command line."""
        present = {m.hash for m in migrations}
        applied = [row for row in self.applied().applied if row.migration_hash in present]
        if problems := drift(applied, migrations):
            raise NotReady(
                f"drift in {self.schema}: {'; '.join(problems)} (restore the files, or accept "
                "them with invoke repair)"
            )
        return super().to_apply(migrations)

    @reported
    def apply_one(self, migration: Migration, force: bool = False, mark: bool = True) -> None:
        self._run(migration, "apply" if mark else log.HOOK)

    @reported
    def rollback_one(self, migration: Migration, force: bool = False) -> None:
        self._run(migration, "rollback")

    @reported
    def mark_migrations(self, migrations: Iterable[Migration]) -> None:
        self._record(migrations, "mark")

    @reported
    def unmark_migrations(self, migrations: Iterable[Migration]) -> None:
        self._record(migrations, "unmark")

    @reported
    def mark_one(self, migration: Migration, log: bool = True) -> None:
        self._record([migration], "mark")

    @reported
    def unmark_one(self, migration: Migration, log: bool = True) -> None:
        self._record([migration], "unmark")

    def _writing(self) -> RunOptions:
        """The options of a run that writes (the heads index made and kept), once."""
        if not self.options.heads:
            self.options = prepare_run(self.connection, self.options, write=True)
        return self.options

    def _run(self, migration: Migration, operation: str) -> None:
        plan = _One(_ours(migration, self.schema == "public"), operation, self)
        result = migrate_schema(self.connection, plan, SchemaResult(self.schema), self._writing())
        if result.skipped:
            raise LockBusy(str(result.failure))
        if result.failure:
            raise MigrationError(self.schema, result.failure)

    def _record(self, migrations: Iterable[Migration], operation: str) -> None:
        """Log marks (applied without running) or unmarks, in one transaction."""

        def choose(current: Log) -> list[Mark]:
            applied = {row.migration_hash for row in current.applied}
            batch = self.next_batch(current)
            return [
                (migration, operation, batch)
                for migration in migrations
                if (migration.hash in applied) == (operation == "unmark")
            ]

        mark_schema(self.connection, self.schema, self._writing(), choose)

    def next_batch(self, current: Log) -> int:
        if self.batch is None:
            self.batch = current.last_batch + 1
        return self.batch


def _ours(migration: Migration, public: bool) -> Migration:
    """yoyo's reading of a .sql file, read again the engine's way (see loading.py); a Python
    migration loaded, so that the engine knows whether it runs in a transaction."""
    if not migration.is_raw_sql() or isinstance(migration, SqlMigration):
        migration.load()
        return migration
    ours = SqlMigration(migration.id, migration.path, migration.source_dir, public)
    ours.load()
    return ours


class SchemaCursor(extensions.cursor):
    """A cursor that sees its backend's schema outside yoyo's transactions too.

    yoyo and its API's users read through ``backend.execute()`` and ``backend.cursor()`` with no
    transaction open (the connection is in autocommit). Setting the search path on the session,
    as yoyo does, would reach other clients of a transaction-pooling PgBouncer; so a statement
    sent outside a transaction runs in a short one of its own, with the search path set for it
    alone (``set_config(..., true)``), and commits as autocommit would have.
    """

    search_path = "public"

    def execute(self, query: Query, vars: Params = None) -> None:
        idle = self.connection.info.transaction_status == extensions.TRANSACTION_STATUS_IDLE
        if not idle or (isinstance(query, str) and is_transaction_control(query)):
            return super().execute(query, vars)
        super().execute("BEGIN; SELECT set_config('search_path', %s, true)", (self.search_path,))
        try:
            super().execute(query, vars)
        except BaseException:
            with contextlib.suppress(psycopg2.Error):
                self.connection.cursor().execute("ROLLBACK")
            raise
        self.connection.cursor().execute("COMMIT")  # another cursor: this one keeps its rows


class _One:
    """A plan for the yoyo command line's unit of work: one migration, if it is still to do."""

    hooks: Sequence[Migration] = ()

    def __init__(self, migration: Migration, operation: str, backend: TenantBackend) -> None:
        self.migration, self.operation, self.backend = migration, operation, backend
        self.batch: int | None = None

    def choose(self, current: Log) -> list[Migration]:
        if self.operation == log.HOOK:
            return [self.migration]
        applied = self.migration.hash in {row.migration_hash for row in current.applied}
        if self.operation == "apply":
            self.batch = self.backend.next_batch(current)
            return [] if applied else [self.migration]
        return [self.migration] if applied else []
