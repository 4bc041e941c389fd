"""A project's tenants-query is read, not trusted: it runs alone in a READ ONLY transaction with a
statement timeout, and every row it returns is checked before any schema is touched."""

from __future__ import annotations

from dataclasses import replace

import psycopg2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg2 import sql

from yoyo_tenants import (
    deprovision_tenant,
    migrate_master,
    migrate_tenants,
    provision_tenant,
    registry,
    status,
)
from yoyo_tenants.errors import ConfigError, NotReady

from .conftest import (
    MASTER_IDS,
    REPO,
    TENANT_IDS,
    applied_ids,
    on_a_database,
    query,
    run_invoke,
    user_env,
)

ACCOUNTS = "SELECT slug, 'acct_' || slug FROM public.accounts"


@pytest.fixture
def accounts(project, database):
    """Two tenants kept by the app (public.accounts), beside one org in the registry."""
    migrate_master(project)
    provision_tenant(project, "org_registered1")
    query(database, "CREATE TABLE public.accounts (slug text); "
          "INSERT INTO public.accounts VALUES ('acme'), ('globex'); "
          "CREATE SCHEMA acct_acme; CREATE SCHEMA acct_globex")  # fmt: skip
    return project


def with_query(settings, text: str):
    return replace(settings, tenants_query=text)


def untouched(database) -> tuple:
    """What a refused run must leave as it was: every schema, public's log, the registry."""
    return (
        query(database, "SELECT nspname FROM pg_namespace ORDER BY 1"),
        query(database, "SELECT table_schema, table_name FROM information_schema.tables "
              "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"),
        query(database, "SELECT id, migration_id, operation FROM public._yoyo_log ORDER BY id"),
        query(database, "SELECT clerk_org_id, schema_name, status FROM public.tenants ORDER BY 1"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("SELECT 'org_pub', 'public'", "row 1 ('org_pub', 'public'): schema public is never"),
        ("SELECT 'x', 'pg_catalog'", "schema pg_catalog is never a tenant's"),
        ("SELECT 'x', 'information_schema'", "schema information_schema is never"),
        (f"{ACCOUNTS} UNION ALL {ACCOUNTS} ORDER BY 1", "row 2 ('acme', 'acct_acme'): tenant id "
         "'acme' is returned twice (row 1 too)"),
        ("SELECT slug, 'acct_acme' FROM public.accounts", "schema 'acct_acme' is returned twice"),
        ("SELECT NULL, 'acct_acme'", "row 1 (None, 'acct_acme'): its tenant id is NULL"),
        ("SELECT 'acme', NULL", "row 1 ('acme', None): its schema name is NULL"),
        ("SELECT 7, 'acct_acme'", "its tenant id is not text"),
        ("SELECT 'acme', ''", "its schema name is empty"),
        (f"SELECT 'acme', 'acct_acme{'x' * 60}'", "longer than 63 bytes"),
        ("SELECT 'acme', 'acct_acme', 1", "must return two columns"),
    ],
    ids=["public", "pg_catalog", "information_schema", "same-tenant-twice", "same-schema-twice",
         "null-id", "null-schema", "integer-id", "empty-schema", "too-long", "three-columns"],
)  # fmt: skip
def test_a_bad_row_stops_the_run_before_any_schema_is_touched(accounts, database, text, named):
    before = untouched(database)

    with pytest.raises(ConfigError, match="tenants-query") as refused:
        migrate_tenants(with_query(accounts, text), allow_drift=True)

    assert named in str(refused.value) and refused.value.exit_code == 2
    assert untouched(database) == before
    assert applied_ids(database, "public") == MASTER_IDS  # no tenant migration in public's log


@pytest.mark.parametrize(
    "text",
    [
        "WITH d AS (DELETE FROM public.tenants RETURNING 1) SELECT 'acme', 'acct_acme' FROM d",
        "SELECT 'acme', 'acct_acme' FROM (SELECT forget_orgs()) f",
        "SELECT 'acme', 'acct_acme' INTO public.copied",
        "COMMIT; DELETE FROM public.tenants; SELECT 'acme', 'acct_acme'",
        "SELECT 'acme', 'acct_acme'; DELETE FROM public.tenants",
        "CALL forget()",
    ],
    ids=["data-modifying-cte", "writing-function", "select-into", "commit-first", "two-statements",
         "call"],
)  # fmt: skip
def test_a_query_that_would_write_is_refused_and_writes_nothing(accounts, database, text):
    query(
        database,
        "CREATE FUNCTION public.forget_orgs() RETURNS int LANGUAGE sql "
        "AS 'DELETE FROM public.tenants RETURNING 1'; "
        "CREATE PROCEDURE public.forget() LANGUAGE sql AS 'DELETE FROM public.tenants'",
    )
    before = untouched(database)

    with pytest.raises(ConfigError) as refused:
        migrate_tenants(with_query(accounts, text))

    assert "may only read" in str(refused.value) or "one SELECT" in str(refused.value)
    assert untouched(database) == before


def test_a_query_that_runs_too_long_is_cancelled(accounts, database, monkeypatch):
    monkeypatch.setattr(registry, "QUERY_TIMEOUT", 0.2)

    with pytest.raises(NotReady, match="ran longer than 0.2 s"):
        migrate_tenants(with_query(accounts, "SELECT 'acme', 'acct_acme' FROM pg_sleep(5)"))

    assert query(database, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(5)%' "
                 "AND pid <> pg_backend_pid()") == [(0,)]  # fmt: skip


def test_the_query_leaves_nothing_set_on_the_connection_that_reads_with_it(accounts, database):
    text = (
        "SELECT slug, 'acct_' || slug FROM public.accounts, "
        "set_config('search_path', 'acct_acme', false) AS a, "
        "set_config('statement_timeout', '1ms', false) AS b"
    )
    assert {t.schema for t in status(with_query(accounts, text)).tenants} == {
        "acct_acme",
        "acct_globex",
    }
    run = migrate_tenants(with_query(accounts, text))
    assert run.ok and applied_ids(database, "acct_globex") == TENANT_IDS


def test_a_registry_row_naming_public_is_refused_too(accounts, database):
    # A registry with only the columns the docs ask for: no check on its schema names.
    query(database, "ALTER TABLE public.tenants DROP CONSTRAINT tenants_schema_name_check")
    query(database, "INSERT INTO public.tenants (clerk_org_id, schema_name) "
          "VALUES ('org_evil1', 'public')")  # fmt: skip
    before = untouched(database)

    with pytest.raises(ConfigError, match=r"public.tenants row 2 \('org_evil1', 'public'\)"):
        migrate_tenants(accounts, allow_drift=True)
    with pytest.raises(ConfigError, match="org_evil1"):
        migrate_tenants(accounts, tenant="org_evil1")
    with pytest.raises(ConfigError, match="schema public is never a tenant's"):
        deprovision_tenant(accounts, "org_evil1", yes=True)  # would drop public with it

    assert untouched(database) == before


def test_on_the_command_line_a_bad_row_is_one_error_line_and_exit_2(accounts, database):
    (accounts.root / "pyproject.toml").write_text(
        "[tool.yoyo-tenants]\n"
        "master-migrations = \"migrations/master\"\n"
        "tenant-migrations = \"migrations/tenant\"\n"
        "tenants-query = \"SELECT 'org_pub', 'public'\"\n"
    )  # fmt: skip
    (accounts.root / "tasks.py").write_text((REPO / "tasks.py").read_text())
    before = untouched(database)

    done = run_invoke(accounts.root, "migrate-tenants", "--allow-drift",
                      env=user_env(database))  # fmt: skip

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: tenants-query row 1 ('org_pub', 'public'): schema public is never a tenant's: "
        "public (the master migrations' schema), information_schema and pg_* are not migrated "
        "as tenants"
    ]
    assert untouched(database) == before


# -- any rows at all -----------------------------------------------------------------------------

#: Schemas that exist (made by the fixture), names that are never a tenant's, and odd ones.
SCHEMAS = ["acct_acme", "acct_globex", "Acct Mixed", "public", "pg_toast", "information_schema",
           "acct_" + "y" * 60, "", None]  # fmt: skip
IDS = ["acme", "globex", "org_x", "", None]
ROWS = st.lists(st.tuples(st.sampled_from(IDS), st.sampled_from(SCHEMAS)), max_size=4)


def values_query(cursor, rows) -> str:
    """SQL returning `rows` (NULLs as they are)."""
    if not rows:
        return "SELECT 'a'::text, 'b'::text WHERE false"
    values = sql.SQL(", ").join(
        sql.SQL("({}::text, {}::text)").format(sql.Literal(tid), sql.Literal(schema))
        for tid, schema in rows
    )
    return (
        sql.SQL("SELECT * FROM (VALUES {}) AS v(tenant, schema_name)")
        .format(values)
        .as_string(cursor)
    )


@on_a_database(15)
@given(rows=ROWS)
def test_any_rows_are_migrated_only_if_every_one_is_a_tenant(accounts, database, rows):
    query(database, 'CREATE SCHEMA IF NOT EXISTS "Acct Mixed"')
    before = untouched(database)
    connection = psycopg2.connect(**database)
    try:
        text = values_query(connection.cursor(), rows)
    finally:
        connection.close()
    ids = [tid for tid, _ in rows]
    schemas = [schema for _, schema in rows]
    good = (
        all(ids)
        and all(schema in SCHEMAS[:3] for schema in schemas)
        and len(set(ids)) == len(ids)
        and len(set(schemas)) == len(schemas)
    )

    try:
        run = migrate_tenants(with_query(accounts, text), jobs=1)
    except ConfigError:
        assert not good
        assert untouched(database) == before
        return
    assert good and run.ok
    assert [r.schema for r in run.schemas] == schemas
    assert applied_ids(database, "public") == MASTER_IDS
    for schema in schemas:
        assert applied_ids(database, schema) == TENANT_IDS
        query(database, sql.SQL("DROP TABLE {}, {}, {}, {}").format(  # for the next example
            *(sql.Identifier(schema, t) for t in ("chat_messages", "org_settings", "org_users",
                                                 "_yoyo_log"))))  # fmt: skip
