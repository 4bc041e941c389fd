"""Applying and rolling back migrations, one schema at a time or many at once.

The unit of work is one schema: one transaction under the schema's advisory lock, a savepoint per
migration. A failing migration is rolled back to its savepoint and the migrations before it commit,
so every schema is always at a migration boundary, even if the process is killed. Many schemas run
on a bounded pool of worker connections, one connection per worker for the whole run.

The common case, plain SQL migrations, is first tried in one message per schema (one round trip,
no savepoints); if anything in it fails, nothing of it stays and the schema takes the careful
way above, which names the migration that failed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import psycopg2
from psycopg2 import sql
from yoyo.migrations import Migration, MigrationList, topological_sort

from . import log
from .backend import TenantBackend
from .db import error_text, open_backend
from .errors import LockBusy, MigrationsMissing, TenantsError, UsageError
from .log import AppliedMigration, Log
from .plan import drift

LOCK_NOT_AVAILABLE = "55P03"
#: Schemas per query when reading many schemas' migration tables at once: planning a UNION ALL
#: grows faster than its size (measured: 1000 schemas in chunks of 100 read in 0.09 s, of 500 in
#: 0.12-0.16 s, on a fresh connection).
SCAN_CHUNK = 100


@dataclass(frozen=True)
class RunOptions:
    """How a run treats locks, timeouts, drift and failures."""

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


@dataclass
class SchemaResult:
    """What one run did (or, in a dry run, would do) to one schema."""

    schema: str
    org_id: str | None = None
    migrations: list[str] = field(default_factory=list)  # applied or rolled back, in order
    failed_migration: str | None = None
    error: str | None = None
    skipped: bool = False  # locked by another run, or not started because the run stopped
    duration: float = 0.0
    sql: list[str] = field(default_factory=list)  # dry runs: what would be executed
    retries: int = 0

    @property
    def status(self) -> str:
        if self.error and self.skipped:
            return "skipped"
        if self.error:
            return "failed"
        if self.skipped:
            return "not started"
        return "done" if self.migrations else "up to date"


@dataclass
class RunResult:
    """What a run did to every schema it touched."""

    direction: str  # "apply" or "rollback"
    schemas: list[SchemaResult] = field(default_factory=list)
    jobs: int = 1
    interrupted: bool = False
    duration: float = 0.0
    dry_run: bool = False

    @property
    def failed(self) -> list[SchemaResult]:
        return [r for r in self.schemas if r.status in ("failed", "skipped", "not started")]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def count(self, status: str) -> int:
        return sum(1 for r in self.schemas if r.status == status)


@dataclass(frozen=True)
class RollbackTarget:
    """Which applied migrations to undo: the last batch (default), the last N, or all after one."""

    steps: int | None = None
    to: str | None = None

    def __post_init__(self):
        if self.steps is not None and self.to is not None:
            raise UsageError("give --steps or --to, not both")
        if self.steps is not None and self.steps < 1:
            raise UsageError("--steps must be at least 1")

    def select(self, applied: Sequence[AppliedMigration]) -> list[AppliedMigration]:
        """The rows to roll back, newest first."""
        if self.to is not None:
            ids = [row.migration_id for row in applied]
            if self.to not in ids:
                raise UsageError(f"migration {self.to} is not applied")
            chosen = applied[ids.index(self.to) + 1 :]
        elif self.steps is not None:
            chosen = applied[-self.steps :]
        else:
            last = max((row.batch for row in applied), default=None)
            chosen = [row for row in applied if row.batch == last]
        return list(reversed(chosen))


# -- one schema ----------------------------------------------------------------------------------


def apply_schema(
    backend: TenantBackend,
    migrations: MigrationList,
    result: SchemaResult,
    options: RunOptions = RunOptions(),
    known: Log | None = None,
) -> SchemaResult:
    """Apply the migrations pending in `result.schema`: a transaction, a savepoint per migration.

    A migration that fails rolls back to its savepoint and the ones before it commit. One that
    timed out waiting for a table lock is retried after a pause, outside any transaction, so the
    app's queries are never queued behind it for long.

    `known` is what a scan read from the schema's log a moment ago: if the pending migrations are
    plain SQL, they are first tried in a single message, guarded by a check that the log has not
    moved since (see TenantBackend.apply_in_one_message).
    """
    if known is not None and _one_message(backend, migrations, result, options, known):
        return result
    batch = None

    def choose(applied: list[AppliedMigration]) -> list[Migration]:
        nonlocal batch
        if not options.allow_drift and (problems := drift(applied, migrations)):
            result.error = f"drift in {result.schema}: {'; '.join(problems)}"
            result.error += " (fix the files, or pass --allow-drift)"
            return []
        if batch is None:  # one batch for the whole run, even when it takes several transactions
            batch = next_batch(applied)
        backend.batch = batch
        return pending(migrations, applied)

    def after() -> None:
        for hook in migrations.post_apply:
            backend.apply_in_transaction(hook, mark=False)

    return _migrate(
        backend, result, options, choose, backend.apply_in_transaction, backend.apply_one, after
    )


def _one_message(backend, migrations, result, options, known: Log) -> bool:
    """The common case in one round trip; False (with nothing changed) to take the long way."""
    todo = _one_message_todo(migrations, known.applied, options.allow_drift)
    if not todo:
        return False
    started = time.perf_counter()
    batch = next_batch(known.applied)
    if not backend.apply_in_one_message(todo, known.position, batch):
        return False
    result.migrations = [m.id for m in todo]
    result.duration = time.perf_counter() - started
    return True


_one_message_plans: WeakKeyDictionary[MigrationList, dict] = WeakKeyDictionary()


def _one_message_todo(
    migrations: MigrationList, applied: Sequence[AppliedMigration], allow_drift: bool
) -> list[Migration]:
    """What to apply in one message to a schema whose log says `applied`; [] if it does not fit
    one message or the schema has drift. The same for every schema whose log reads alike, so
    worked out once a run for each such log, not once per schema."""
    plans = _one_message_plans.setdefault(migrations, {})
    key = (allow_drift, tuple((row.migration_id, row.checksum) for row in applied))
    todo = plans.get(key)
    if todo is None:
        todo = pending(migrations, applied)
        if not fits_one_message(todo, migrations) or (
            not allow_drift and drift(applied, migrations)
        ):
            todo = []
        plans[key] = todo
    return todo


def fits_one_message(todo: Sequence[Migration], migrations: MigrationList) -> bool:
    """Whether `todo` can go in one message: plain SQL, in a transaction, and no post-apply hook
    (hooks are Python or SQL run after every apply, in their own savepoints)."""
    return (
        bool(todo)
        and not migrations.post_apply
        and all(m.use_transactions and m.is_raw_sql() for m in todo)
    )


def rollback_schema(
    backend: TenantBackend,
    migrations: MigrationList,
    result: SchemaResult,
    target: RollbackTarget,
    options: RunOptions = RunOptions(),
) -> SchemaResult:
    """Roll back the `target` migrations of `result.schema`, newest first, as apply_schema does."""
    by_hash = {m.hash: m for m in migrations}
    chosen = None

    def choose(applied: list[AppliedMigration]) -> list[Migration]:
        nonlocal chosen
        if chosen is None:  # the target is chosen once, by the first transaction
            rows = target.select(applied)
            if missing := [r.migration_id for r in rows if r.migration_hash not in by_hash]:
                raise MigrationsMissing(
                    f"cannot roll back {', '.join(missing)} in {result.schema}: no such file"
                )
            chosen = [row.migration_hash for row in rows]
        still_applied = {row.migration_hash for row in applied}
        return [by_hash[h] for h in chosen if h in still_applied]

    return _migrate(
        backend, result, options, choose, backend.rollback_in_transaction, backend.rollback_one
    )


def _migrate(backend, result, options, choose, in_transaction, alone, after=None) -> SchemaResult:
    """The loop both directions share: under the schema's lock, `choose` what to do from the
    applied migrations, do it with `in_transaction` one savepoint each, and leave any
    non-transactional migration to `alone`, after the transaction commits; then go round again
    for what remains, or to retry a migration that hit the lock timeout."""
    started = time.perf_counter()
    try:
        while True:
            error = deferred = None
            with backend.schema_transaction(options.lock_wait) as applied:
                todo = choose(applied)
                if not todo:
                    break
                for migration in todo:
                    if not migration.use_transactions:
                        deferred = migration
                        break
                    if error := _step(backend, migration, result, in_transaction):
                        break
                if not error and not deferred and after and result.migrations:
                    after()
            if deferred and not error:
                error = _step(backend, deferred, result, alone)
            if error:
                if not _retry(error, result, options):
                    return _failed(backend, result, error)
            elif deferred is None:
                break
    except LockBusy as exc:
        result.skipped, result.error = True, str(exc)
    finally:
        result.duration = time.perf_counter() - started
    return result


def next_batch(applied: Sequence[AppliedMigration]) -> int:
    """The batch a run records with what it applies to a schema whose log says `applied`."""
    return max((row.batch for row in applied), default=0) + 1


def pending(migrations: MigrationList, applied: Sequence[AppliedMigration]) -> list[Migration]:
    """The migrations not in `applied`, in the order yoyo would apply them."""
    done = {row.migration_hash for row in applied}
    return list(topological_sort(m for m in migrations if m.hash not in done))


class _StepError(Exception):
    def __init__(self, migration: Migration, error: Exception):
        self.migration, self.error = migration, error


def _step(backend: TenantBackend, migration: Migration, result: SchemaResult, action):
    """Run one migration; return a _StepError on a database error, else record it as done."""
    try:
        action(migration)
    except backend.DatabaseError as exc:
        return _StepError(migration, exc)
    result.migrations.append(migration.id)
    return None


def _retry(failure: _StepError, result: SchemaResult, options: RunOptions) -> bool:
    """Pause and say yes if `failure` was a lock timeout and retries are left."""
    if getattr(failure.error, "pgcode", None) != LOCK_NOT_AVAILABLE:
        return False
    if result.retries >= options.retries:
        return False
    time.sleep(options.retry_pause * 2**result.retries)
    result.retries += 1
    return True


def _failed(backend: TenantBackend, result: SchemaResult, failure: _StepError) -> SchemaResult:
    result.failed_migration = failure.migration.id
    result.error = explain(backend, failure.error)
    if result.retries:
        result.error += f" (after {result.retries} retries)"
    return result


def explain(backend: TenantBackend, exc: Exception) -> str:
    """The database's message, and what to do when the cause is a missing pgvector."""
    text = error_text(exc)
    if getattr(exc, "pgcode", None) == "42704":  # undefined_object, e.g. type "vector"
        installed = backend.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        if installed.fetchone() is None:
            text += (
                " (the vector extension is not installed: run invoke migrate-master, which runs "
                "CREATE EXTENSION vector WITH SCHEMA public, as a user allowed to create it)"
            )
    return text


# -- many schemas --------------------------------------------------------------------------------


@dataclass
class SchemaState:
    """A schema as read by `scan`."""

    exists: bool = False
    tables_ready: bool = False  # its log table is there, in the current layout
    old_layout: bool = False  # it keeps yoyo's tables, which a run converts (see log.UPGRADE_SQL)
    log: Log = field(default_factory=lambda: Log([]))

    @property
    def applied(self) -> list[AppliedMigration]:
        return self.log.applied

    @property
    def applied_hashes(self) -> set[str]:
        return {row.migration_hash for row in self.applied}


def scan(cursor, schemas: Sequence[str]) -> dict[str, SchemaState]:
    """Read the migration logs of many schemas in a few queries (one per SCAN_CHUNK schemas)."""
    states = {schema: SchemaState() for schema in schemas}
    cursor.execute(
        """
        SELECT n.nspname, a.attname IS NOT NULL,
            EXISTS (SELECT 1 FROM pg_class o WHERE o.relnamespace = n.oid AND o.relname = %s)
        FROM pg_namespace n
        LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %s
        LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped
        WHERE n.nspname = ANY(%s)
        """,
        (log.OLD_TABLE, log.TABLE, log.LAYOUT_COLUMN, list(schemas)),
    )
    for name, ready, old in cursor.fetchall():
        states[name].exists, states[name].tables_ready, states[name].old_layout = True, ready, old
    ready = [schema for schema in schemas if states[schema].tables_ready]
    rows: dict[str, list[tuple]] = {schema: [] for schema in ready}
    for start in range(0, len(ready), SCAN_CHUNK):
        selects = [
            sql.SQL("SELECT {}, " + log.COLUMNS + " FROM {}").format(
                sql.Literal(schema), sql.Identifier(schema, log.TABLE)
            )
            for schema in ready[start : start + SCAN_CHUNK]
        ]
        cursor.execute(sql.SQL(" UNION ALL ").join(selects))
        for schema, *row in cursor.fetchall():
            rows[schema].append(row)
    for schema in ready:
        states[schema].log = Log.from_rows(rows[schema])
    return states


class Stop(threading.Event):
    """Set to stop starting new schemas; `signalled` says a SIGINT or SIGTERM asked for it."""

    signalled = False


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """A Stop set by SIGINT or SIGTERM: stop starting new schemas, let running ones finish."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        stop.signalled = True
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_schemas(
    params: Mapping[str, str],
    work: Iterable[SchemaResult],
    action: Callable[[TenantBackend, SchemaResult], SchemaResult],
    *,
    direction: str,
    jobs: int,
    fail_fast: bool = False,
    options: RunOptions = RunOptions(),
    tables_ready: Callable[[str], bool] = lambda schema: False,
    on_result: Callable[[SchemaResult], None] | None = None,
) -> RunResult:
    """Run `action` on each schema of `work` over at most `jobs` worker connections."""
    work = list(work)
    run = RunResult(direction, jobs=jobs)
    started = time.perf_counter()
    queue = iter(work)
    take = threading.Lock()

    def worker() -> None:
        """Take schemas one at a time until none are left, on one connection for them all."""
        backend = None
        try:
            while (result := _next(queue, take)) is not None:
                if stop.is_set():
                    result.skipped = True
                    continue
                if backend is None:
                    backend = open_backend(params, result.schema)
                    backend.lock_timeout = options.lock_timeout
                    backend.statement_timeout = options.statement_timeout
                backend.use_schema(result.schema, tables_ready(result.schema))
                try:
                    action(backend, result)
                except TenantsError as exc:  # about this schema only: the rest go on
                    result.error = str(exc)
                except psycopg2.Error as exc:
                    # Outside any one migration (a deadlock at commit, a dropped connection):
                    # this schema failed and its transaction is gone; the next schema gets a
                    # fresh connection.
                    result.error = error_text(exc)
                    backend.connection.close()
                    backend = None
                if result.error and fail_fast:
                    stop.set()
                if on_result:
                    on_result(result)
        except BaseException:
            stop.set()  # a worker that cannot connect ends the run
            raise
        finally:
            if backend is not None:
                backend.connection.close()

    with stop_on_signals() as stop:
        workers = max(1, min(jobs, len(work)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(worker) for _ in range(workers)]:
                future.result()
        run.interrupted = stop.signalled
    run.schemas = work
    run.duration = time.perf_counter() - started
    return run


def _next(queue: Iterator[SchemaResult], lock: threading.Lock) -> SchemaResult | None:
    with lock:
        return next(queue, None)
