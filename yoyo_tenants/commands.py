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

from yoyo import exceptions as yoyo_exceptions
from yoyo.migrations import MigrationList, read_migrations

from . import registry, scaffold
from .db import connect, open_backend, server_params
from .errors import MigrationFailed, NotReady, SchemaCollision, TenantsError
from .registry import Tenant
from .runner import (
    RollbackTarget,
    RunResult,
    SchemaResult,
    SchemaState,
    apply_schema,
    explain,
    rollback_schema,
    run_schemas,
    scan,
)
from .settings import Settings

#: Tenants migrated at once unless --jobs says otherwise.
DEFAULT_JOBS = min(8, 2 * (os.cpu_count() or 2))
PUBLIC = "public"

OnResult = Callable[[SchemaResult], None]


def load_migrations(directory: Path) -> MigrationList:
    """Read and parse every migration in `directory` once, for all the schemas of a run."""
    if not directory.is_dir():
        raise NotReady(f"migrations folder {directory} does not exist")
    migrations = read_migrations(str(directory))
    for migration in [*migrations, *migrations.post_apply]:
        try:
            migration.load()
        except yoyo_exceptions.BadMigration as exc:
            raise NotReady(f"cannot load migration {migration.path}: {exc.args[-1]}") from None
    return migrations


# -- master --------------------------------------------------------------------------------------


def migrate_master(settings: Settings, lock_wait: float | None = None) -> RunResult:
    """Apply pending master migrations to the public schema."""
    migrations = load_migrations(settings.master_dir)
    action = partial(apply_schema, migrations=migrations, lock_wait=lock_wait)
    return _run_public(settings, action, "apply")


def rollback_master(
    settings: Settings,
    steps: int | None = None,
    to: str | None = None,
    lock_wait: float | None = None,
) -> RunResult:
    """Roll back the public schema's last batch, its last `steps` migrations, or all after `to`."""
    migrations = load_migrations(settings.master_dir)
    target = RollbackTarget(steps=steps, to=to)
    action = partial(rollback_schema, migrations=migrations, target=target, lock_wait=lock_wait)
    return _run_public(settings, action, "rollback")


def _run_public(settings: Settings, action, direction: str) -> RunResult:
    params = server_params(settings)
    return run_schemas(
        params,
        [SchemaResult(PUBLIC)],
        lambda backend, result: action(backend, result=result),
        direction=direction,
        jobs=1,
    )


# -- tenants -------------------------------------------------------------------------------------


def migrate_tenants(
    settings: Settings,
    tenant: str | None = None,
    jobs: int = DEFAULT_JOBS,
    fail_fast: bool = False,
    lock_wait: float | None = None,
    on_result: OnResult | None = None,
) -> RunResult:
    """Apply pending tenant migrations to every registered tenant (or to the one org id given).

    Which tenants are behind is read for all of them in a few queries; only those are connected
    to, over at most `jobs` worker connections (plus this one).
    """
    migrations = load_migrations(settings.tenant_dir)
    action = partial(apply_schema, migrations=migrations, lock_wait=lock_wait)
    hashes = {m.hash for m in migrations}

    def needs_work(state: SchemaState) -> bool:
        return not state.tables_ready or not hashes <= {row[0] for row in state.applied}

    return _run_tenants(settings, tenant, needs_work, action, "apply", jobs, fail_fast, on_result)


def rollback_tenants(
    settings: Settings,
    tenant: str | None = None,
    steps: int | None = None,
    to: str | None = None,
    jobs: int = DEFAULT_JOBS,
    fail_fast: bool = False,
    lock_wait: float | None = None,
    on_result: OnResult | None = None,
) -> RunResult:
    """Roll back each tenant's last batch (or `steps` migrations, or all after `to`)."""
    migrations = load_migrations(settings.tenant_dir)
    target = RollbackTarget(steps=steps, to=to)
    action = partial(rollback_schema, migrations=migrations, target=target, lock_wait=lock_wait)
    return _run_tenants(
        settings, tenant, lambda state: bool(state.applied), action, "rollback",
        jobs, fail_fast, on_result,
    )  # fmt: skip


def _run_tenants(settings, org_id, needs_work, action, direction, jobs, fail_fast, on_result):
    if jobs < 1:
        raise TenantsError("--jobs must be at least 1")
    params = server_params(settings)
    connection = connect(params)
    try:
        cursor = connection.cursor()
        tenants = [registry.get_tenant(cursor, org_id)] if org_id else registry.list_tenants(cursor)
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
        run = run_schemas(
            params,
            work,
            lambda backend, result: action(backend, result=result),
            direction=direction,
            jobs=jobs,
            fail_fast=fail_fast,
            tables_ready=lambda schema: states[schema].tables_ready,
            on_result=on_result,
        )
    finally:
        connection.close()
    done = {r.schema: r for r in run.schemas}
    run.schemas = [done.get(t.schema) or idle[t.schema] for t in tenants]
    return run


# -- provisioning --------------------------------------------------------------------------------


@dataclass
class Provisioned:
    tenant: Tenant
    created: bool  # False: the org was already registered, and was brought up to date
    migrations: list[str] = field(default_factory=list)
    duration: float = 0.0


def provision_tenant(
    settings: Settings, org_id: str, lock_wait: float | None = None
) -> Provisioned:
    """Register `org_id`, create its schema and apply every tenant migration, all or nothing.

    Re-running it for a registered org brings that org's schema up to date.
    """
    started = time.perf_counter()
    tenant = Tenant(registry.check_org_id(org_id), registry.schema_for(org_id))
    migrations = load_migrations(settings.tenant_dir)
    backend = open_backend(server_params(settings))
    try:
        cursor = backend.connection.cursor()
        registry.ensure_registry(cursor)
        backend.use_schema(tenant.schema)
        result = SchemaResult(tenant.schema, tenant.org_id)
        # One transaction: the registry row, the schema and its migrations commit together.
        with backend.transaction():
            backend.lock_schema(lock_wait)
            created = _register(cursor, tenant)
            for migration in backend.to_apply(migrations):
                if not migration.use_transactions:
                    raise NotReady(
                        f"{migration.id} is non-transactional: provisioning must be all or "
                        "nothing; run invoke migrate-tenants for it instead"
                    )
                try:
                    backend.apply_in_transaction(migration)
                except backend.DatabaseError as exc:
                    raise MigrationFailed(
                        migration.id, tenant.schema, explain(backend, exc)
                    ) from None
                result.migrations.append(migration.id)
            if result.migrations:
                for hook in migrations.post_apply:
                    backend.apply_in_transaction(hook, mark=False)
    finally:
        backend.connection.close()
    return Provisioned(tenant, created, result.migrations, time.perf_counter() - started)


def _register(cursor, tenant: Tenant) -> bool:
    """Register `tenant` and create its schema; False if it was registered already."""
    existing = registry.find_tenant(cursor, tenant.org_id)
    if existing:
        if existing.schema != tenant.schema:
            raise SchemaCollision(
                f"{tenant.org_id} is registered with schema {existing.schema}, "
                f"expected {tenant.schema}"
            )
        if not registry.existing_schemas(cursor, [tenant.schema]):
            raise NotReady(
                f"{tenant.org_id} is registered but its schema {tenant.schema} is missing"
            )
        return False
    owner = registry.owner_of_schema(cursor, tenant.schema)
    if owner:
        raise SchemaCollision(
            f"{tenant.org_id} and {owner} both map to schema {tenant.schema}: "
            "refusing to share it; nothing was written"
        )
    if registry.existing_schemas(cursor, [tenant.schema]):
        raise SchemaCollision(
            f"schema {tenant.schema} exists but no tenant is registered for it: "
            "remove or register it first; nothing was written"
        )
    registry.register(cursor, tenant)
    return True


# -- status --------------------------------------------------------------------------------------


@dataclass
class SchemaStatus:
    schema: str
    org_id: str | None
    exists: bool
    applied: list[str]
    pending: list[str]
    unknown: list[str]  # applied, but no such file any more

    @property
    def state(self) -> str:
        if not self.exists:
            return "schema missing"
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
    applied = {row[0] for row in state.applied}
    known = {m.hash for m in migrations}
    return SchemaStatus(
        schema=schema,
        org_id=org_id,
        exists=state.exists,
        applied=[m.id for m in migrations if m.hash in applied],
        pending=[m.id for m in migrations if m.hash not in applied],
        unknown=sorted(row[1] for row in state.applied if row[0] not in known),
    )


# -- new migrations ------------------------------------------------------------------------------


def make_migration(settings: Settings, kind: str, name: str, py: bool = False) -> list[Path]:
    """Create a new master or tenant migration file; return the paths created."""
    directory = {"master": settings.master_dir, "tenant": settings.tenant_dir}[kind]
    return scaffold.new_migration(directory, name, py=py)
