"""The tenant registry: which organizations exist and which schema holds each one's tables.

The registry is the table ``public.tenants``, created by the master migrations. A tenant's
schema name is derived from its Clerk org id (``tid_`` + 10 hex characters of its sha256) and
stored with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
from pglast import ast, parser
from pglast.parser import ParseError
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from .db import one_row, public_table
from .errors import ConfigError, NotReady, UnknownTenant, UsageError

ORG_ID = re.compile(r"org_[A-Za-z0-9]+")
MAX_ORG_ID_LENGTH = 64
SCHEMA_PREFIX = "tid_"
REGISTRY_MISSING = "the tenant registry public.tenants does not exist: run invoke migrate-master"


@dataclass(frozen=True)
class Tenant:
    org_id: str | None  # None for public, in results that treat it like a tenant
    schema: str
    status: str = "active"


def check_org_id(org_id: str) -> str:
    """Return `org_id` if it is a Clerk organization id (``org_`` + letters and digits)."""
    if len(org_id) > MAX_ORG_ID_LENGTH or not ORG_ID.fullmatch(org_id):
        shown = org_id if len(org_id) <= MAX_ORG_ID_LENGTH else org_id[:MAX_ORG_ID_LENGTH] + "..."
        raise UsageError(
            f"invalid org id {shown!r}: expected 'org_' followed by letters and digits "
            f"(at most {MAX_ORG_ID_LENGTH} characters), e.g. org_2abc123def456"
        )
    return org_id


def schema_for(org_id: str) -> str:
    """The tenant schema for an org id: ``tid_`` + the first 10 hex characters of its sha256."""
    return SCHEMA_PREFIX + hashlib.sha256(check_org_id(org_id).encode()).hexdigest()[:10]


def exists(cursor: Cursor) -> bool:
    """Whether the registry is there (the master migrations make it)."""
    return public_table(cursor, "tenants")


def ensure_registry(cursor: Cursor) -> None:
    """Fail clearly when the master migrations (which create the registry) have not run."""
    if not public_table(cursor, "tenants"):
        raise NotReady(REGISTRY_MISSING)


def list_tenants(cursor: Cursor, query: str | None = None) -> list[Tenant]:
    """Every tenant: the registry's, oldest first, or the rows of `query` (the project's
    `tenants-query`: SQL returning tenant id and schema name, in the order to migrate them).
    Every row is checked (see check_tenant_rows) before any is returned."""
    if query is None:
        ensure_registry(cursor)
        cursor.execute("SELECT clerk_org_id, schema_name, status FROM public.tenants ORDER BY id")
        rows = cursor.fetchall()
        checked = check_tenant_rows([row[:2] for row in rows], "public.tenants")
        return [Tenant(t.org_id, t.schema, row[2]) for t, row in zip(checked, rows, strict=True)]
    return check_tenant_rows(read_query(cursor, query, "tenants-query"), "tenants-query")


def tenant_of(cursor: Cursor, org_id: str, query: str | None = None) -> Tenant:
    """The tenant `org_id` names: registered (or, with `query`, among its rows)."""
    if query is None:
        return get_tenant(cursor, org_id)
    for tenant in list_tenants(cursor, query):
        if tenant.org_id == org_id:
            return tenant
    raise UnknownTenant(f"tenants-query returns no tenant {org_id}")


# -- a configured query: read, not trusted -------------------------------------------------------

#: How long a configured query may run, in seconds: it is read before any schema is touched.
QUERY_TIMEOUT = 30
#: Never a tenant's schema: the one the master migrations use (the registry's), and
#: PostgreSQL's own (with every pg_* schema: pg_catalog, pg_toast, pg_temp_N, ...).
NOT_TENANTS = ("public", "information_schema")
#: PostgreSQL cuts a longer name to this many bytes, which could then name another schema.
MAX_SCHEMA_BYTES = 63
READ_ONLY_SQL = "BEGIN READ ONLY; SELECT set_config('statement_timeout', %s, true)"


def read_query(cursor: Cursor, query: str, source: str) -> list[tuple[Any, ...]]:
    """The rows of a configured query (`source` names it in errors), run where it can change
    nothing: one SELECT statement, alone in a READ ONLY transaction that is rolled back, with a
    statement timeout. ConfigError (exit 2) if it is not one SELECT or tries to write;
    NotReady if it fails otherwise. The cursor's connection must be in autocommit (as
    db.connect makes them): the transaction is this function's own."""
    if not cursor.connection.autocommit:
        raise ValueError("read_query needs an autocommit connection")
    _check_one_select(query, source)
    cursor.execute(READ_ONLY_SQL, (f"{QUERY_TIMEOUT}s",))
    try:
        cursor.execute(query)
        if cursor.description is None or len(cursor.description) != 2:
            raise ConfigError(f"{source} must return two columns: tenant id, schema name")
        return cursor.fetchall()
    except psycopg2.errors.ReadOnlySqlTransaction:
        raise ConfigError(
            f"{source} tried to write: it runs in a READ ONLY transaction and may only read"
        ) from None
    except psycopg2.errors.QueryCanceled:
        raise NotReady(f"{source} ran longer than {QUERY_TIMEOUT} s: it was cancelled") from None
    except psycopg2.Error as exc:
        raise NotReady(f"{source} failed: {' '.join(str(exc).split())}") from None
    finally:
        cursor.execute("ROLLBACK")


def _check_one_select(query: str, source: str) -> None:
    """A query is one SELECT: a second statement (a COMMIT first) would run outside the READ
    ONLY transaction."""
    try:
        statements = parser.parse_sql(query)
    except ParseError as exc:
        raise ConfigError(f"{source} is not valid SQL: {exc}") from None
    if len(statements) != 1 or not isinstance(statements[0].stmt, ast.SelectStmt):
        raise ConfigError(f"{source} must be one SELECT statement")


def check_tenant_rows(rows: Iterable[Sequence[Any]], source: str) -> list[Tenant]:
    """Tenants from rows of (tenant id, schema name), every row checked before any is used:
    two non-empty text values, no tenant id or schema twice, and never a schema that is not a
    tenant's (NOT_TENANTS, pg_*, longer than PostgreSQL keeps). ConfigError (exit 2) naming
    the first bad row of `source` (the query's name) otherwise."""
    tenants: list[Tenant] = []
    ids: dict[str, int] = {}
    schemas: dict[str, int] = {}
    for number, row in enumerate(rows, 1):
        problem = _problem(row)
        if problem is None and row[0] in ids:
            problem = f"tenant id {row[0]!r} is returned twice (row {ids[row[0]]} too)"
        if problem is None and row[1] in schemas:
            problem = f"schema {row[1]!r} is returned twice (row {schemas[row[1]]} too)"
        if problem:
            raise ConfigError(f"{source} row {number} {_shown(row)}: {problem}")
        ids[row[0]], schemas[row[1]] = number, number
        tenants.append(Tenant(row[0], row[1]))
    return tenants


def _problem(row: Sequence[Any]) -> str | None:
    """What makes one row no tenant, if anything."""
    if len(row) != 2:
        return "expected two columns: tenant id, schema name"
    for value, what in zip(row, ("tenant id", "schema name"), strict=True):
        if value is None:
            return f"its {what} is NULL"
        if not isinstance(value, str):
            return f"its {what} is not text (cast it in the query: ...::text)"
        if not value:
            return f"its {what} is empty"
    schema = row[1]
    if schema in NOT_TENANTS or schema.startswith("pg_"):
        return (
            f"schema {schema} is never a tenant's: public (the master migrations' schema), "
            "information_schema and pg_* are not migrated as tenants"
        )
    if len(schema.encode()) > MAX_SCHEMA_BYTES:
        return f"schema name longer than {MAX_SCHEMA_BYTES} bytes, which PostgreSQL would cut"
    return None


def _shown(row: Sequence[Any]) -> str:
    text = repr(tuple(row))
    return text if len(text) <= 120 else text[:117] + "..."


def find_tenant(cursor: Cursor, org_id: str) -> Tenant | None:
    ensure_registry(cursor)
    cursor.execute(
        "SELECT clerk_org_id, schema_name, status FROM public.tenants WHERE clerk_org_id = %s",
        (org_id,),
    )
    row = cursor.fetchone()
    if row is None:
        return None
    if problem := _problem(row[:2]):
        raise ConfigError(f"public.tenants row of {org_id} {_shown(row[:2])}: {problem}")
    return Tenant(*row)


def get_tenant(cursor: Cursor, org_id: str) -> Tenant:
    """The registered tenant for `org_id`, or UnknownTenant."""
    tenant = find_tenant(cursor, check_org_id(org_id))
    if tenant is None:
        raise UnknownTenant(f"no tenant is registered for {org_id}")
    return tenant


def lookup(cursor: Cursor, tenant: Tenant) -> tuple[str | None, str | None, bool]:
    """In one query: the schema registered for tenant.org_id, the org registered for
    tenant.schema, and whether that schema exists."""
    try:
        cursor.execute(
            "SELECT (SELECT schema_name FROM public.tenants WHERE clerk_org_id = %s),"
            " (SELECT clerk_org_id FROM public.tenants WHERE schema_name = %s),"
            " EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)",
            (tenant.org_id, tenant.schema, tenant.schema),
        )
    except psycopg2.errors.UndefinedTable:
        raise NotReady(REGISTRY_MISSING) from None
    registered_schema, schema_owner, schema_exists = one_row(cursor)
    return registered_schema, schema_owner, schema_exists


def register(cursor: Cursor, tenant: Tenant) -> None:
    """Insert the registry row and create the schema, in the caller's transaction."""
    for statement in register_sql(tenant):
        cursor.execute(statement)


def register_sql(tenant: Tenant) -> list[sql.Composed]:
    """The statements that register `tenant`: its registry row, then its schema."""
    return [
        sql.SQL("INSERT INTO public.tenants (clerk_org_id, schema_name) VALUES ({}, {})").format(
            sql.Literal(tenant.org_id), sql.Literal(tenant.schema)
        ),
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(tenant.schema)),
    ]


def reregister_sql(schema: str, row: dict[str, Any], columns: list[str]) -> list[sql.Composed]:
    """The registry row a tenant had (as JSON keys and values), back in `columns` of the
    registry; its schema name is the one it is restored into."""
    values = {**row, "schema_name": schema}
    names = [name for name in columns if name in values]
    return [
        sql.SQL("INSERT INTO public.tenants ({}) SELECT {} FROM json_populate_record(NULL::"
                "public.tenants, {})").format(
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.Literal(json.dumps(values)),
        )
    ]  # fmt: skip


def unregister_sql(tenant: Tenant) -> list[sql.Composed]:
    """The statements that drop the schema (with everything in it) and the registry row."""
    return [
        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tenant.schema)),
        sql.SQL("DELETE FROM public.tenants WHERE clerk_org_id = {}").format(
            sql.Literal(tenant.org_id)
        ),
    ]
