"""Applying and rolling back migrations, one schema at a time or many at once.

The unit of work is one schema: one transaction under the schema's advisory lock, a savepoint per
migration. A failing migration is rolled back to its savepoint and the migrations before it commit,
so every schema is always at a migration boundary, even if the process is killed. Many schemas run
on a bounded pool of worker connections, one connection per worker for the whole run.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from psycopg2 import sql
from yoyo.migrations import Migration, MigrationList

from .backend import AppliedMigration, TenantBackend
from .db import error_text, open_backend
from .errors import LockBusy, MigrationsMissing, UsageError

#: Schemas per catalog query when reading many schemas' migration tables at once.
SCAN_CHUNK = 500


@dataclass
class SchemaResult:
    """What one run did to one schema."""

    schema: str
    org_id: str | None = None
    migrations: list[str] = field(default_factory=list)  # applied or rolled back, in order
    failed_migration: str | None = None
    error: str | None = None
    skipped: bool = False  # locked by another run, or not started because the run stopped
    duration: float = 0.0

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
    lock_wait: float | None = None,
) -> SchemaResult:
    """Apply `migrations` pending in `result.schema`, in one transaction with a savepoint each."""
    started = time.perf_counter()
    try:
        batch = None
        while True:
            deferred = None  # a non-transactional migration: runs after this transaction commits
            with backend.transaction():
                backend.lock_schema(lock_wait)
                applied = backend.applied()
                pending = backend.to_apply(migrations)
                if not pending:
                    break
                if batch is None:
                    batch = max((row.batch for row in applied), default=0) + 1
                backend.batch = batch
                for migration in pending:
                    migration.load()
                    if not migration.use_transactions:
                        deferred = migration
                        break
                    if not _step(backend, migration, result, backend.apply_in_transaction):
                        return result
                if not deferred and result.migrations:
                    for hook in migrations.post_apply:
                        backend.apply_in_transaction(hook, mark=False)
            if deferred is None:
                break
            if not _step(backend, deferred, result, backend.apply_one):
                return result
    except LockBusy as exc:
        result.skipped, result.error = True, str(exc)
    finally:
        result.duration = time.perf_counter() - started
    return result


def rollback_schema(
    backend: TenantBackend,
    migrations: MigrationList,
    result: SchemaResult,
    target: RollbackTarget,
    lock_wait: float | None = None,
) -> SchemaResult:
    """Roll back the `target` migrations of `result.schema`, newest first."""
    started = time.perf_counter()
    by_hash = {m.hash: m for m in migrations}
    try:
        with backend.transaction():
            backend.lock_schema(lock_wait)
            chosen = target.select(backend.applied())
            missing = [row.migration_id for row in chosen if row.migration_hash not in by_hash]
            if missing:
                raise MigrationsMissing(
                    f"cannot roll back {', '.join(missing)} in {result.schema}: no such file"
                )
            for row in chosen:
                migration = by_hash[row.migration_hash]
                migration.load()
                if not migration.use_transactions:
                    raise UsageError(f"{migration.id} is non-transactional: roll it back alone")
                if not _step(backend, migration, result, backend.rollback_in_transaction):
                    break
    except LockBusy as exc:
        result.skipped, result.error = True, str(exc)
    finally:
        result.duration = time.perf_counter() - started
    return result


def _step(backend: TenantBackend, migration: Migration, result: SchemaResult, action) -> bool:
    """Run one migration; on a database error record it in `result` and return False."""
    try:
        action(migration)
    except backend.DatabaseError as exc:
        result.failed_migration, result.error = migration.id, explain(backend, exc)
        return False
    result.migrations.append(migration.id)
    return True


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
    """A schema's migration table as read by `scan`."""

    exists: bool = False
    tables_ready: bool = False  # our migration table, with its batch and checksum columns
    applied: list[tuple[str, str, str | None]] = field(default_factory=list)  # hash, id, checksum


def scan(cursor, schemas: Sequence[str]) -> dict[str, SchemaState]:
    """Read the migration tables of many schemas in a few queries (one per SCAN_CHUNK schemas)."""
    states = {schema: SchemaState() for schema in schemas}
    cursor.execute(
        """
        SELECT n.nspname, a.attname IS NOT NULL
        FROM pg_namespace n
        LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = '_yoyo_migration'
        LEFT JOIN pg_attribute a
            ON a.attrelid = c.oid AND a.attname = 'checksum' AND NOT a.attisdropped
        WHERE n.nspname = ANY(%s)
        """,
        (list(schemas),),
    )
    for name, ready in cursor.fetchall():
        states[name].exists, states[name].tables_ready = True, ready
    ready = [schema for schema in schemas if states[schema].tables_ready]
    for start in range(0, len(ready), SCAN_CHUNK):
        selects = [
            sql.SQL("SELECT {}, migration_hash, migration_id, checksum FROM {}").format(
                sql.Literal(schema), sql.Identifier(schema, "_yoyo_migration")
            )
            for schema in ready[start : start + SCAN_CHUNK]
        ]
        cursor.execute(sql.SQL(" UNION ALL ").join(selects))
        for schema, *row in cursor.fetchall():
            states[schema].applied.append(tuple(row))
    return states


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM: stop starting new schemas, let running ones finish."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
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
    tables_ready: Callable[[str], bool] = lambda schema: False,
    on_result: Callable[[SchemaResult], None] | None = None,
) -> RunResult:
    """Run `action` on each schema of `work` over at most `jobs` worker connections."""
    work = list(work)
    run = RunResult(direction, jobs=jobs)
    started = time.perf_counter()
    local = threading.local()
    backends: list[TenantBackend] = []
    lock = threading.Lock()

    def run_one(result: SchemaResult) -> SchemaResult:
        if stop.is_set():
            result.skipped = True
            return result
        backend = getattr(local, "backend", None)
        if backend is None:
            backend = local.backend = open_backend(params, result.schema)
            with lock:
                backends.append(backend)
        backend.use_schema(result.schema, tables_ready(result.schema))
        try:
            action(backend, result)
        except (MigrationsMissing, UsageError) as exc:  # about this schema only: the rest go on
            result.error = str(exc)
        if result.error and fail_fast:
            stop.set()
        if on_result:
            on_result(result)
        return result

    with stop_on_signals() as stop:
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(work)))) as pool:
                run.schemas = list(pool.map(run_one, work))
        finally:
            for backend in backends:
                backend.connection.close()
        run.interrupted = stop.is_set() and not fail_fast
    run.duration = time.perf_counter() - started
    return run
