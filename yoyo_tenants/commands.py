"""The commands, as plain functions: what the invoke tasks call, and what programs and tests call.

Each takes the `Settings` and returns what it did; each raises a `TenantsError` on a failure the
user can act on. None of them prints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from yoyo import exceptions as yoyo_exceptions
from yoyo.migrations import MigrationList, read_migrations

from . import registry, scaffold
from .db import connect, server_params
from .errors import NotReady, UsageError
from .log import migration_checksum
from .plan import drift, migration_sql
from .registry import Tenant
from .runner import (
    RollbackTarget,
    RunOptions,
    RunResult,
    SchemaResult,
    SchemaState,
    apply_schema,
    rollback_schema,
    run_schemas,
    scan,
)
from .settings import Settings

#: Tenants migrated at once unless --jobs says otherwise.
DEFAULT_JOBS = min(8, 2 * (os.cpu_count() or 2))
PUBLIC = "public"
OLD_LAYOUT = "keeps yoyo's migration tables, which the next migrate converts to one log"

OnResult = Callable[[SchemaResult], None]


#: Migration folders already read: path -> (what its files were, what they said).
_loaded: dict[Path, tuple[tuple, MigrationList]] = {}
#: Files changed this recently are read again: a file rewritten within the file system's clock
#: tick keeps its time stamp (git calls such entries racy).
RACY_NS = 2_000_000_000


def load_migrations(directory: Path) -> MigrationList:
    """Read and parse every migration in `directory`, once for all the schemas of a run.

    Kept while the folder's files stay as they are, so a program that provisions tenants as
    organizations sign up parses them once, not at every signup (yoyo's SQL parsing costs about
    as much as creating a tenant's tables).
    """
    if not directory.is_dir():
        raise NotReady(f"migrations folder {directory} does not exist")
    directory = directory.resolve()
    files = _files(directory)
    cached = _loaded.get(directory)
    if cached and cached[0] == files:
        return cached[1]
    migrations = _read(directory)
    if all(time.time_ns() - mtime > RACY_NS for _, _, mtime in files):
        _loaded[directory] = (files, migrations)
    return migrations


def _files(directory: Path) -> tuple:
    entries = [(e.name, e.stat()) for e in os.scandir(directory) if e.is_file()]
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in entries))


def _read(directory: Path) -> MigrationList:
    migrations = read_migrations(str(directory))
    for migration in [*migrations, *migrations.post_apply]:
        try:
            migration.load()
        except yoyo_exceptions.BadMigration as exc:
            raise NotReady(f"cannot load migration {migration.path}: {exc.args[-1]}") from None
        migration_checksum(migration)  # now, before worker threads share the migrations
    return migrations


def run_options(settings: Settings, **options: Any) -> RunOptions:
    """RunOptions from the settings' timeouts, overridden by keyword (see RunOptions' fields)."""
    options = {key: value for key, value in options.items() if value is not None}
    options.setdefault("lock_timeout", settings.lock_timeout)
    options.setdefault("statement_timeout", settings.statement_timeout)
    return RunOptions(**options)


# -- master --------------------------------------------------------------------------------------


def migrate_master(settings: Settings, dry_run: bool = False, **options: Any) -> RunResult:
    """Apply pending master migrations to the public schema.

    `options` are RunOptions fields: lock_wait, lock_timeout, statement_timeout, retries, ...
    """
    migrations = load_migrations(settings.master_dir)
    opts = run_options(settings, **options)
    run = partial(apply_schema, migrations=migrations, options=opts)
    plan = partial(plan_apply, migrations=migrations, allow_drift=opts.allow_drift)
    return _run_public(settings, run, plan if dry_run else None, "apply", opts)


def rollback_master(
    settings: Settings,
    steps: int | None = None,
    to: str | None = None,
    dry_run: bool = False,
    **options: Any,
) -> RunResult:
    """Roll back the public schema's last batch, its last `steps` migrations, or all after `to`."""
    migrations = load_migrations(settings.master_dir)
    target = RollbackTarget(steps=steps, to=to)
    opts = run_options(settings, **options)
    run = partial(rollback_schema, migrations=migrations, target=target, options=opts)
    plan = partial(plan_rollback, migrations=migrations, target=target)
    return _run_public(settings, run, plan if dry_run else None, "rollback", opts)


def _run_public(settings: Settings, action, plan, direction: str, options: RunOptions):
    params = server_params(settings)
    if plan:
        return _dry_run(params, [Tenant(None, PUBLIC)], plan, direction)
    return run_schemas(
        params,
        [SchemaResult(PUBLIC)],
        lambda backend, result: action(backend, result=result),
        direction=direction,
        jobs=1,
        options=options,
    )


# -- tenants -------------------------------------------------------------------------------------


def migrate_tenants(
    settings: Settings,
    tenant: str | None = None,
    jobs: int = DEFAULT_JOBS,
    fail_fast: bool = False,
    dry_run: bool = False,
    on_result: OnResult | None = None,
    **options: Any,
) -> RunResult:
    """Apply pending tenant migrations to every registered tenant (or to the one org id given).

    Which tenants are behind is read for all of them in a few queries; only those are connected
    to, over at most `jobs` worker connections (plus this one). `options` are RunOptions fields.
    """
    migrations = load_migrations(settings.tenant_dir)
    opts = run_options(settings, **options)
    hashes = {m.hash for m in migrations}

    def needs_work(state: SchemaState) -> bool:
        return not state.tables_ready or not hashes <= state.applied_hashes

    return _run_tenants(
        settings,
        tenant,
        needs_work,
        lambda backend, result, state: apply_schema(
            backend, migrations, result, opts, known=state.log
        ),
        partial(plan_apply, migrations=migrations, allow_drift=opts.allow_drift)
        if dry_run
        else None,
        RunResult("apply", jobs=jobs),
        fail_fast,
        opts,
        on_result,
    )


def rollback_tenants(
    settings: Settings,
    tenant: str | None = None,
    steps: int | None = None,
    to: str | None = None,
    jobs: int = DEFAULT_JOBS,
    fail_fast: bool = False,
    dry_run: bool = False,
    on_result: OnResult | None = None,
    **options: Any,
) -> RunResult:
    """Roll back each tenant's last batch (or `steps` migrations, or all after `to`)."""
    migrations = load_migrations(settings.tenant_dir)
    target = RollbackTarget(steps=steps, to=to)
    opts = run_options(settings, **options)
    return _run_tenants(
        settings,
        tenant,
        lambda state: bool(state.applied) or state.old_layout,
        lambda backend, result, state: rollback_schema(backend, migrations, result, target, opts),
        partial(plan_rollback, migrations=migrations, target=target) if dry_run else None,
        RunResult("rollback", jobs=jobs),
        fail_fast,
        opts,
        on_result,
    )


def _run_tenants(settings, org_id, needs_work, action, plan, run, fail_fast, options, on_result):
    if run.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    params = server_params(settings)
    connection = connect(params)
    try:
        cursor = connection.cursor()
        tenants = (
            [registry.get_tenant(cursor, org_id)]
            if org_id is not None
            else registry.list_tenants(cursor)
        )
        if plan:
            return _dry_run(params, tenants, plan, run.direction, cursor)
        states = scan(cursor, [t.schema for t in tenants])
        idle, work = {}, []
        for t in tenants:
            result = SchemaResult(t.schema, t.org_id)
            if not states[t.schema].exists:
                result.error = f"schema {t.schema} of {t.org_id} does not exist"
                idle[t.schema] = result
            elif needs_work(states[t.schema]):
                work.append(result)
            else:
                idle[t.schema] = result
        done = run_schemas(
            params,
            work,
            lambda backend, result: action(backend, result, states[result.schema]),
            direction=run.direction,
            jobs=run.jobs,
            fail_fast=fail_fast,
            options=options,
            tables_ready=lambda schema: states[schema].tables_ready,
            on_result=on_result,
        )
    finally:
        connection.close()
    by_schema = {r.schema: r for r in done.schemas}
    done.schemas = [by_schema.get(t.schema) or idle[t.schema] for t in tenants]
    return done


# -- dry runs ------------------------------------------------------------------------------------


def plan_apply(
    state: SchemaState, result: SchemaResult, migrations: MigrationList, allow_drift: bool = False
) -> None:
    if not allow_drift and (problems := drift(state.applied, migrations)):
        result.error = f"drift in {result.schema}: {'; '.join(problems)} (would be refused)"
        return
    for migration in migrations:
        if migration.hash not in state.applied_hashes:
            result.migrations.append(migration.id)
            result.sql += [f"-- {migration.id}", *migration_sql(migration, "apply")]


def plan_rollback(
    state: SchemaState, result: SchemaResult, migrations: MigrationList, target: RollbackTarget
) -> None:
    files = {m.hash: m for m in migrations}
    for row in target.select(state.applied):
        result.migrations.append(row.migration_id)
        if row.migration_hash not in files:
            result.error = f"cannot roll back {row.migration_id}: no such file"
            return
        result.sql += [
            f"-- {row.migration_id}",
            *migration_sql(files[row.migration_hash], "rollback"),
        ]


def _dry_run(params, tenants, plan, direction: str, cursor=None) -> RunResult:
    """What a run would do, read from the catalog in a few queries; nothing is written."""
    started = time.perf_counter()
    connection = None
    if cursor is None:
        connection = connect(params)
        cursor = connection.cursor()
    try:
        states = scan(cursor, [t.schema for t in tenants])
    finally:
        if connection is not None:
            connection.close()
    run = RunResult(direction, dry_run=True)
    for t in tenants:
        result = SchemaResult(t.schema, t.org_id)
        if not states[t.schema].exists:
            result.error = f"schema {t.schema} does not exist"
        elif states[t.schema].old_layout:
            result.error = f"{t.schema} keeps yoyo's tables, which a real run converts first"
        else:
            try:
                plan(states[t.schema], result)
            except UsageError as exc:
                result.error = str(exc)
        run.schemas.append(result)
    run.duration = time.perf_counter() - started
    return run


# -- status --------------------------------------------------------------------------------------


@dataclass
class SchemaStatus:
    schema: str
    org_id: str | None
    exists: bool
    applied: list[str]
    pending: list[str]
    unknown: list[str]  # applied, but no such file any more
    changed: list[str] = field(default_factory=list)  # applied, and the file changed since
    old_layout: bool = False  # keeps yoyo's tables: the next migrate converts them

    @property
    def drift(self) -> list[str]:
        return [f"{m} changed since applied" for m in self.changed] + [
            f"{m} applied but its file is gone" for m in self.unknown
        ]

    @property
    def state(self) -> str:
        if not self.exists:
            return "schema missing"
        if self.old_layout:
            return "old layout"
        if self.changed or self.unknown:
            return "drift"
        if not self.applied and not self.unknown:
            return "never migrated"
        if self.pending:
            return f"behind by {len(self.pending)}"
        return "at head"


@dataclass
class Status:
    master: SchemaStatus
    tenants: list[SchemaStatus]
    master_head: str | None
    tenant_head: str | None


def status(settings: Settings) -> Status:
    """Applied and pending migrations of public and of every tenant, in a few queries in all."""
    master = load_migrations(settings.master_dir)
    tenant_migrations = load_migrations(settings.tenant_dir)
    connection = connect(server_params(settings))
    try:
        cursor = connection.cursor()
        public = _schema_status(PUBLIC, None, scan(cursor, [PUBLIC])[PUBLIC], master)
        cursor.execute("SELECT to_regclass('public.tenants')")
        tenants = registry.list_tenants(cursor) if cursor.fetchone()[0] else []
        states = scan(cursor, [t.schema for t in tenants])
    finally:
        connection.close()
    return Status(
        master=public,
        tenants=[
            _schema_status(t.schema, t.org_id, states[t.schema], tenant_migrations) for t in tenants
        ],
        master_head=master[-1].id if master else None,
        tenant_head=tenant_migrations[-1].id if tenant_migrations else None,
    )


def _schema_status(schema, org_id, state: SchemaState, migrations: MigrationList) -> SchemaStatus:
    applied = state.applied_hashes
    files = {m.hash: m for m in migrations}
    return SchemaStatus(
        schema=schema,
        org_id=org_id,
        exists=state.exists,
        old_layout=state.old_layout,
        applied=[m.id for m in migrations if m.hash in applied],
        pending=[m.id for m in migrations if m.hash not in applied],
        unknown=[row.migration_id for row in state.applied if row.migration_hash not in files],
        changed=[
            row.migration_id
            for row in state.applied
            if row.migration_hash in files
            and row.checksum
            and row.checksum != migration_checksum(files[row.migration_hash])
        ],
    )


# -- verify --------------------------------------------------------------------------------------


def verify(settings: Settings) -> list[str]:
    """Every way the database disagrees with the migration files and the registry.

    Drift in public or any tenant, registered tenants without a schema, and ``tid_`` schemas
    that no tenant is registered for. An empty list means all is well.
    """
    report = status(settings)
    problems = [f"public: {p}" for p in report.master.drift]
    if report.master.old_layout:
        problems.append(f"public: {OLD_LAYOUT} (run invoke migrate-master)")
    for t in report.tenants:
        if not t.exists:
            problems.append(f"{t.org_id}: schema {t.schema} is missing")
        elif t.old_layout:
            problems.append(f"{t.org_id} ({t.schema}): {OLD_LAYOUT} (run invoke migrate-tenants)")
        problems += [f"{t.org_id} ({t.schema}): {p}" for p in t.drift]
    connection = connect(server_params(settings))
    try:
        cursor = connection.cursor()
        cursor.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY nspname",
            (registry.SCHEMA_PREFIX.replace("_", "\\_") + "%",),
        )
        registered = {t.schema for t in report.tenants}
        problems += [
            f"schema {name} has no registry row"
            for (name,) in cursor.fetchall()
            if name not in registered
        ]
    finally:
        connection.close()
    return problems


# -- new migrations ------------------------------------------------------------------------------


def make_migration(settings: Settings, kind: str, name: str, py: bool = False) -> list[Path]:
    """Create a new master or tenant migration file; return the paths created."""
    directory = {"master": settings.master_dir, "tenant": settings.tenant_dir}[kind]
    return scaffold.new_migration(directory, name, py=py)
