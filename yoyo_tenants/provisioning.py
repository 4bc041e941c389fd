"""Creating and removing tenants: each all or nothing, in one transaction."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from psycopg2 import errorcodes
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from yoyo.migrations import MigrationList

from . import archives, log, logindex, registry
from .archives import dump_schema
from .db import connect, server_params
from .engine import migrate_schema
from .errors import (
    Failure,
    LockBusy,
    MigrationFailed,
    NotReady,
    SchemaCollision,
    TenantsError,
    UsageError,
)
from .loading import load_migrations
from .log import Log
from .plan import ApplyPlan, Drift, drift, migration_sql
from .pool import scan
from .registry import Tenant
from .restore import Restored, restore_tenant  # noqa: F401 (the API's names)
from .results import RunOptions, SchemaResult
from .server import prepare_run, read_server
from .session import MessageFailed, Session, Statement
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
    settings: Settings,
    org_id: str,
    dry_run: bool = False,
    lock_wait: float | None = None,
    allow_drift: bool = False,
    lint: bool = False,
) -> Provisioned:
    """Register `org_id`, create its schema and apply every tenant migration, all or nothing.

    Refused (unless `allow_drift`) when the tenants already there applied a migration whose
    file has changed or gone since: the new org would get other tables than they have.
    Re-running it for a registered org brings that org's schema up to date. With `lint`,
    refused if squawk finds anything in the files the org would get (see lint.py).
    """
    started = time.perf_counter()
    tenant = Tenant(registry.check_org_id(org_id), registry.schema_for(org_id))
    migrations = load_migrations(settings.tenant_dir)
    if lint:
        from .lint import refuse_unclean  # only with --lint: start-up

        refuse_unclean(settings, False, [tenant])
    options = RunOptions.of(settings, lock_wait=lock_wait, allow_drift=allow_drift)
    connection = connect(server_params(settings))
    try:
        state = read_server(connection, fleet=None if dry_run else migrations)
        options = prepare_run(connection, options, settings.citus, not dry_run, state)
        if dry_run:
            done = _plan(connection, tenant, migrations)
        else:
            done = _provision(connection, tenant, migrations, options, state.fleet_at_head)
    finally:
        connection.close()
    done.duration = time.perf_counter() - started
    return done


def _provision(
    connection: Connection,
    tenant: Tenant,
    migrations: MigrationList,
    options: RunOptions,
    fleet_at_head: bool | None = None,
) -> Provisioned:
    """The registry row, the schema, its log table and every migration in one transaction
    (one message, unless a migration needs a commit or is non-transactional)."""
    if fleet_at_head is False and not options.allow_drift:
        # No tenant is at the files' head: behind (a migration not deployed yet), or drift,
        # which the tenant furthest along says.
        _check_fleet(connection, migrations)
    result = SchemaResult(tenant.schema, tenant.org_id)
    prelude = [*registry.register_sql(tenant), *log.create_sql(tenant.schema, options.citus)]
    plan = ApplyPlan(tenant.schema, migrations)
    migrate_schema(connection, plan, result, options, Log([]), prelude, atomic=True, fresh=True)
    if result.failure is None:
        return Provisioned(tenant, created=True, migrations=result.migrations)
    if result.failure.migration is None and not result.skipped:
        # Nothing ran: the registry row or the schema was refused. Find out why; a registered
        # org is brought up to date.
        return _registered(connection, tenant, migrations, options, result.failure)
    assert tenant.org_id is not None  # an org's tenant, never public
    if registry.find_tenant(connection.cursor(), tenant.org_id):
        # A non-transactional migration committed the tenant before a later one failed.
        _unregister(connection, tenant, options)
    if result.skipped:
        raise LockBusy(str(result.failure))
    raise MigrationFailed(tenant.schema, result.failure)


def _check_fleet(connection: Connection, migrations: MigrationList) -> None:
    """Drift (an applied migration's file changed or gone) in the tenant furthest along, which
    has applied the most of the files a new tenant would get."""
    cursor = connection.cursor()
    cursor.execute(logindex.FURTHEST_SQL)
    found = cursor.fetchone()
    if found is None:
        return
    furthest = found[0]
    if problems := drift(scan(cursor, [furthest])[furthest].applied, migrations):
        raise Drift(furthest, problems)


def _registered(
    connection: Connection,
    tenant: Tenant,
    migrations: MigrationList,
    options: RunOptions,
    first_failure: Failure,
) -> Provisioned:
    """Provisioning an org that is registered already: bring its schema up to date."""
    if not _check_registration(connection.cursor(), tenant):
        raise NotReady(str(first_failure))
    result = SchemaResult(tenant.schema, tenant.org_id)
    migrate_schema(connection, ApplyPlan(tenant.schema, migrations), result, options)
    if result.failure:
        if result.failure.migration is None:
            raise NotReady(str(result.failure))
        raise MigrationFailed(tenant.schema, result.failure)
    return Provisioned(tenant, created=False, migrations=result.migrations)


def _check_registration(cursor: Cursor, tenant: Tenant) -> bool:
    """Whether `tenant` is registered with its schema (False: it is free to provision); say
    what is in the way when neither."""
    registered_schema, schema_owner, schema_exists = registry.lookup(cursor, tenant)
    if registered_schema:
        if registered_schema != tenant.schema:
            raise SchemaCollision(
                f"{tenant.org_id} is registered with schema {registered_schema}, "
                f"expected {tenant.schema}"
            )
        if not schema_exists:
            raise NotReady(f"{tenant.org_id} is registered but schema {tenant.schema} is missing")
        return True
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
    return False


def _unregister(
    connection: Connection,
    tenant: Tenant,
    options: RunOptions,
    also: Sequence[Statement] = (),
) -> None:
    """Drop a tenant's schema and registry row (and run `also`), under its lock, in one
    transaction."""
    session = Session(connection, tenant.schema, options)
    prelude = [*registry.unregister_sql(tenant), *also]
    if logindex.exists(connection.cursor()):
        prelude.append(logindex.forget_sql(tenant.schema))
    session.begin(prelude)
    try:
        session.commit()
    except MessageFailed as failed:
        if failed.failure.sqlstate == errorcodes.LOCK_NOT_AVAILABLE:
            raise LockBusy(f"schema {tenant.schema} is locked by another run") from None
        raise TenantsError(str(failed.failure)) from None


def _plan(connection: Connection, tenant: Tenant, migrations: MigrationList) -> Provisioned:
    """What provisioning would do; nothing is written."""
    cursor = connection.cursor()
    registered = _check_registration(cursor, tenant)
    current = scan(cursor, [tenant.schema])[tenant.schema].log if registered else Log([])
    try:
        todo = ApplyPlan(tenant.schema, migrations).choose(current)
    except Drift as exc:
        raise NotReady(str(exc)) from None
    done = Provisioned(tenant, created=not registered, dry_run=True)
    if not registered:
        done.sql = ["-- register and CREATE SCHEMA " + tenant.schema]
    for migration in todo:
        done.migrations.append(migration.id)
        done.sql += [f"-- {migration.id}", *migration_sql(migration, "apply")]
    return done


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
    the dump succeeded; the archive is recorded (its sha256) in the transaction that drops the
    schema, so that restore-tenant knows it for one of this database's.
    """
    params = server_params(settings)
    connection = connect(params)
    try:
        cursor = connection.cursor()
        tenant = registry.get_tenant(cursor, org_id)
        cursor.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = %s ORDER BY table_name",
            (tenant.schema,),
        )
        result = Deprovisioned(tenant, [row[0] for row in cursor.fetchall()], dropped=False)
        if not yes:
            return result
        record = []
        if archive is not None:
            if Path(archive).exists():
                raise UsageError(f"{archive} exists: refusing to overwrite an archive")
            archives.ensure_records(cursor)
            comment = archives.label(cursor, tenant)
            try:
                result.archive = dump_schema(params, tenant.schema, Path(archive))
            except TenantsError:
                archives.set_comment(cursor, tenant.schema, comment)  # nothing changed
                raise
            record = [archives.record_sql(tenant, result.archive)]
        _unregister(connection, tenant, RunOptions.of(settings), record)  # waits for any run on it
        result.dropped = True
        return result
    finally:
        connection.close()
