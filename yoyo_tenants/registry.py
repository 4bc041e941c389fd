"""The tenant registry: which organizations exist and which schema holds each one's tables.

The registry is the table ``public.tenants``, created by the master migrations. A tenant's
schema name is derived from its Clerk org id (``tid_`` + 10 hex characters of its sha256) and
stored with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from .db import public_table
from .errors import NotReady, UnknownTenant, UsageError

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


def exists(cursor) -> bool:
    """Whether the registry is there (the master migrations make it)."""
    return public_table(cursor, "tenants")


def ensure_registry(cursor) -> None:
    """Fail clearly when the master migrations (which create the registry) have not run."""
    if not public_table(cursor, "tenants"):
        raise NotReady(REGISTRY_MISSING)


def list_tenants(cursor, query: str | None = None) -> list[Tenant]:
    """Every tenant: the registry's, oldest first, or the rows of `query` (the project's
    `tenants-query`: SQL returning tenant id and schema name, in the order to migrate them)."""
    if query is None:
        ensure_registry(cursor)
        cursor.execute("SELECT clerk_org_id, schema_name, status FROM public.tenants ORDER BY id")
        return [Tenant(*row) for row in cursor.fetchall()]
    try:
        cursor.execute(query)
    except psycopg2.Error as exc:
        raise NotReady(f"tenants-query failed: {' '.join(str(exc).split())}") from None
    rows = cursor.fetchall() if cursor.description else None
    if rows is None or len(cursor.description) != 2:
        raise NotReady("tenants-query must return two columns: tenant id, schema name")
    return [Tenant(None if tid is None else str(tid), str(schema)) for tid, schema in rows]


def tenant_of(cursor, org_id: str, query: str | None = None) -> Tenant:
    """The tenant `org_id` names: registered (or, with `query`, among its rows)."""
    if query is None:
        return get_tenant(cursor, org_id)
    for tenant in list_tenants(cursor, query):
        if tenant.org_id == org_id:
            return tenant
    raise UnknownTenant(f"tenants-query returns no tenant {org_id}")


def find_tenant(cursor, org_id: str) -> Tenant | None:
    ensure_registry(cursor)
    cursor.execute(
        "SELECT clerk_org_id, schema_name, status FROM public.tenants WHERE clerk_org_id = %s",
        (org_id,),
    )
    row = cursor.fetchone()
    return Tenant(*row) if row else None


def get_tenant(cursor, org_id: str) -> Tenant:
    """The registered tenant for `org_id`, or UnknownTenant."""
    tenant = find_tenant(cursor, check_org_id(org_id))
    if tenant is None:
        raise UnknownTenant(f"no tenant is registered for {org_id}")
    return tenant


def lookup(cursor, tenant: Tenant) -> tuple[str | None, str | None, bool]:
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
    return cursor.fetchone()


def register(cursor, tenant: Tenant) -> None:
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


def reregister_sql(schema: str, row: dict, columns: list[str]) -> list[sql.Composed]:
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
