"""The one-message path for up-to-date tenants: it must never act on a stale view."""

import threading
import time

import pytest

from yoyo_tenants import migrate_master, migrate_tenants, provision_tenant, schema_for
from yoyo_tenants.commands import load_migrations
from yoyo_tenants.db import open_backend
from yoyo_tenants.log import Log
from yoyo_tenants.runner import SchemaResult, apply_schema, scan

from .conftest import (
    TENANT_IDS,
    TENANT_TABLES,
    YOYO_TABLES,
    Admin,
    applied_ids,
    columns,
    query,
    tables,
    write_migration,
)

ADD = "20300101000000_add_nickname"


@pytest.fixture
def tenant(project):
    migrate_master(project)
    tenant = provision_tenant(project, "org_fast1").tenant
    write_migration(
        project.tenant_dir,
        ADD,
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;",
        "ALTER TABLE org_users DROP COLUMN nickname;",
    )
    return tenant


def apply_with(project, database, schema, known, tables_ready=True):
    backend = open_backend(database)
    try:
        backend.use_schema(schema, tables_ready=tables_ready)
        return apply_schema(backend, load_migrations(project.tenant_dir), SchemaResult(schema),
                            known=known)  # fmt: skip
    finally:
        backend.connection.close()


def known_applied(database, schema):
    with Admin(database) as admin:
        return scan(admin.connection.cursor(), [schema])[schema].log


def test_up_to_date_tenant_gets_its_migration_and_log_rows_in_one_go(project, database, tenant):
    result = apply_with(project, database, tenant.schema, known_applied(database, tenant.schema))
    assert result.migrations == [ADD] and result.error is None
    assert applied_ids(database, tenant.schema)[-1] == ADD
    assert "nickname" in columns(database, tenant.schema, "org_users")
    logged = query(database, f"SELECT operation FROM {tenant.schema}._yoyo_log "
                   "WHERE migration_id = %s", (ADD,))  # fmt: skip
    assert logged == [("apply",)]


def test_a_view_that_went_stale_is_not_acted_on(project, database, tenant):
    stale = known_applied(database, tenant.schema)
    migrate_tenants(project)  # another run applies ADD after our scan
    result = apply_with(project, database, tenant.schema, stale)
    assert result.migrations == [] and result.error is None
    assert applied_ids(database, tenant.schema).count(ADD) == 1


def test_an_earlier_migration_rolled_back_meanwhile_is_applied_again_first(
    project, database, tenant
):
    stale = known_applied(database, tenant.schema)
    query(database, f"DROP TABLE {tenant.schema}.chat_messages")  # as its rollback would
    query(database, f"INSERT INTO {tenant.schema}._yoyo_log (id, migration_id, operation, "
          "created_at_utc) SELECT max(id) + 1, '20250101000200_create_chat_messages', "
          f"'rollback', now() FROM {tenant.schema}._yoyo_log")  # fmt: skip
    result = apply_with(project, database, tenant.schema, stale)
    assert result.migrations == ["20250101000200_create_chat_messages", ADD], result
    assert "embedding" in columns(database, tenant.schema, "chat_messages")
    assert applied_ids(database, tenant.schema)[-2:] == ["20250101000200_create_chat_messages", ADD]


def test_a_failing_migration_is_still_named_after_the_one_message_attempt(
    project, database, tenant
):
    write_migration(project.tenant_dir, "20300101000100_broken", "ALTER TABLE nope ADD x int;", "")
    result = apply_with(project, database, tenant.schema, known_applied(database, tenant.schema))
    assert result.migrations == [ADD]
    assert result.failed_migration == "20300101000100_broken"
    assert applied_ids(database, tenant.schema)[-1] == ADD


def test_a_fresh_schema_gets_its_log_table_its_migrations_and_log_rows_in_one_go(project, database):
    migrate_master(project)
    query(database, "CREATE SCHEMA tid_0000000001")
    result = apply_with(project, database, "tid_0000000001", known=Log([]), tables_ready=False)
    assert result.error is None and result.migrations == TENANT_IDS
    assert tables(database, "tid_0000000001") == TENANT_TABLES | YOYO_TABLES
    rows = query(database, "SELECT id, migration_id, operation, batch FROM "
                 "tid_0000000001._yoyo_log ORDER BY id")  # fmt: skip
    assert rows == [(k, m, "apply", 1) for k, m in enumerate(TENANT_IDS, 1)]


def test_a_new_org_whose_schema_another_session_holds_waits_for_it(project, database):
    migrate_master(project)
    schema = schema_for("org_waiting1")
    with Admin(database) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"yoyo-tenants:{schema}",)
        )
        release = threading.Timer(1.0, holder.execute, ("SELECT pg_advisory_unlock_all()",))
        release.start()
        started = time.monotonic()
        done = provision_tenant(project, "org_waiting1", lock_wait=30)
        release.join()
    assert time.monotonic() - started >= 0.9  # it waited instead of going ahead
    assert done.created and done.migrations == TENANT_IDS
    assert applied_ids(database, schema) == TENANT_IDS


def test_files_with_percent_signs_quotes_and_a_last_comment_go_in_one_message_as_they_are(
    project, database, tenant
):
    write_migration(
        project.tenant_dir,
        "20300101000100_odd_text",
        "CREATE TABLE odd (t TEXT);\n"
        "INSERT INTO odd VALUES ('100%'), ('\"it''s\" %s %(x)s');\n"
        "-- a comment with no newline after it",
    )
    known = known_applied(database, tenant.schema)
    migrations = load_migrations(project.tenant_dir)
    backend = open_backend(database)
    try:
        backend.use_schema(tenant.schema, tables_ready=True)
        by_id = {m.id: m for m in migrations}
        todo = [by_id["20300101000100_odd_text"], by_id[ADD]]  # the comment, then more SQL
        assert backend.apply_in_one_message(todo, known.position, batch=2)  # not the long way
    finally:
        backend.connection.close()
    rows = query(database, f"SELECT t FROM {tenant.schema}.odd ORDER BY t")
    assert rows == [('"it\'s" %s %(x)s',), ("100%",)]
    assert "nickname" in columns(database, tenant.schema, "org_users")
    assert applied_ids(database, tenant.schema)[-2:] == ["20300101000100_odd_text", ADD]
