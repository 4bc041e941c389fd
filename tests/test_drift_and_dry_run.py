"""Drift between files and what schemas recorded, `verify`, and dry runs that change nothing."""

import os
import time

import pytest

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_master,
    rollback_tenants,
    status,
    verify,
)

from .conftest import applied_ids, query, write_migration

ORGS = ["org_drift1", "org_drift2"]


@pytest.fixture
def tenants(project):
    migrate_master(project)
    return [provision_tenant(project, org).tenant for org in ORGS]


def catalog(params):
    """Everything a dry run must leave alone: relations, columns, registry and log rows."""
    relations = query(
        params,
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2",
    )
    cols = query(
        params,
        "SELECT table_schema, table_name, column_name FROM information_schema.columns "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3",
    )
    registry = query(params, "SELECT to_regclass('public.tenants')")[0][0] and query(
        params, "SELECT clerk_org_id, schema_name FROM public.tenants ORDER BY 1"
    )
    logs = [
        query(params, f'SELECT count(*) FROM "{schema}"._yoyo_log')
        for (schema,) in query(
            params,
            "SELECT table_schema FROM information_schema.tables WHERE table_name = '_yoyo_log'",
        )
    ]
    return relations, cols, registry, logs


def test_edited_migration_is_drift_in_status_and_verify(project, database, tenants):
    edited = project.tenant_dir / "20250101000100_create_org_settings.sql"
    edited.write_text(edited.read_text() + "-- an afterthought\n")
    report = status(project)
    assert {t.state for t in report.tenants} == {"drift"}
    assert report.tenants[0].changed == ["20250101000100_create_org_settings"]
    problems = verify(project)
    assert len(problems) == 2
    assert all("20250101000100_create_org_settings changed" in p for p in problems)


def test_migrate_refuses_a_drifted_schema_unless_allowed(project, database, tenants):
    edited = project.tenant_dir / "20250101000000_create_org_users.sql"
    edited.write_text(edited.read_text().replace("avatar_url TEXT", "avatar TEXT"))
    write_migration(project.tenant_dir, "20300101000000_add_x", "CREATE TABLE x (i int);", "")
    run = migrate_tenants(project)
    assert run.count("failed") == 2
    assert all("drift" in str(r.failure) and "--allow-drift" in str(r.failure) for r in run.schemas)
    assert all("20300101000000_add_x" not in applied_ids(database, t.schema) for t in tenants)

    run = migrate_tenants(project, allow_drift=True)
    assert run.ok
    assert all(applied_ids(database, t.schema)[-1] == "20300101000000_add_x" for t in tenants)


def test_a_program_that_migrates_twice_may_allow_drift_the_second_time(project, database, tenants):
    """A long-lived program keeps its migration folders read (their files are old enough to be
    trusted): what one call worked out without --allow-drift is not what a call with it gets."""
    edited = project.tenant_dir / "20250101000000_create_org_users.sql"
    edited.write_text(edited.read_text().replace("avatar_url TEXT", "avatar TEXT"))
    write_migration(project.tenant_dir, "20300101000000_add_x", "CREATE TABLE x (i int);", "")
    past = time.time() - 60
    for path in project.tenant_dir.iterdir():
        os.utime(path, (past, past))

    assert migrate_tenants(project).count("failed") == 2
    run = migrate_tenants(project, allow_drift=True)

    assert run.ok, run.failed
    assert all(applied_ids(database, t.schema)[-1] == "20300101000000_add_x" for t in tenants)


def test_tenants_that_applied_other_versions_of_the_same_files_are_judged_each_by_its_own(
    project, database, tenants
):
    """Two tenants applied a file before it was edited, a third after (provisioned with
    --allow-drift): the same migration ids, other checksums, so a drift for two of them only."""
    edited = project.tenant_dir / "20250101000000_create_org_users.sql"
    edited.write_text(edited.read_text().replace("avatar_url TEXT", "avatar TEXT"))
    late = provision_tenant(project, "org_drift3", allow_drift=True).tenant
    write_migration(project.tenant_dir, "20300101000000_add_x", "CREATE TABLE x (i int);", "")

    run = migrate_tenants(project)

    by_schema = {r.schema: r for r in run.schemas}
    assert by_schema[late.schema].migrations == ["20300101000000_add_x"]
    for tenant in tenants:
        assert "drift" in str(by_schema[tenant.schema].failure)
        assert "20300101000000_add_x" not in applied_ids(database, tenant.schema)
    assert applied_ids(database, late.schema)[-1] == "20300101000000_add_x"


def test_deleted_migration_file_is_drift(project, database, tenants):
    (project.tenant_dir / "20250101000200_create_chat_messages.sql").unlink()
    (project.tenant_dir / "20250101000200_create_chat_messages.rollback.sql").unlink()
    report = status(project)
    assert report.tenants[0].unknown == ["20250101000200_create_chat_messages"]
    assert any("file is gone" in p for p in verify(project))


def test_verify_finds_missing_schemas_and_orphan_schemas(project, database, tenants):
    assert verify(project) == []
    query(database, f"DROP SCHEMA {tenants[0].schema} CASCADE")
    query(database, "CREATE SCHEMA tid_00000000aa")
    problems = verify(project)
    assert f"{ORGS[0]}: schema {tenants[0].schema} is missing" in problems
    assert "schema tid_00000000aa has no registry row" in problems


def test_dry_runs_change_nothing_and_show_the_sql(project, database):
    before = catalog(database)
    run = migrate_master(project, dry_run=True)
    assert run.dry_run and run.schemas[0].migrations[0] == "20250101000000_create_vector_extension"
    assert any("CREATE EXTENSION" in line for line in run.schemas[0].sql)
    assert catalog(database) == before

    migrate_master(project)
    provision_tenant(project, ORGS[0])
    before = catalog(database)
    planned = provision_tenant(project, ORGS[1], dry_run=True)
    assert planned.created and len(planned.migrations) == 3
    assert any("CREATE TABLE org_users" in line for line in planned.sql)
    assert catalog(database) == before

    write_migration(
        project.tenant_dir,
        "20300101000000_add_nickname",
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;",
        "ALTER TABLE org_users DROP COLUMN nickname;",
    )
    run = migrate_tenants(project, dry_run=True)
    assert [r.migrations for r in run.schemas] == [["20300101000000_add_nickname"]]
    assert "ALTER TABLE org_users ADD COLUMN nickname TEXT;" in run.schemas[0].sql
    assert catalog(database) == before

    run = rollback_tenants(project, dry_run=True)  # only provisioning: nothing to roll back
    assert run.schemas[0].migrations == [] and run.schemas[0].failure is None
    run = rollback_tenants(project, dry_run=True, steps=1)
    assert "would undo its base tables" in str(run.schemas[0].failure)  # said, not done
    run = rollback_tenants(project, dry_run=True, yes=True)
    assert run.schemas[0].migrations == [
        "20250101000200_create_chat_messages",
        "20250101000100_create_org_settings",
        "20250101000000_create_org_users",
    ]
    assert "DROP TABLE org_users;" in run.schemas[0].sql
    run = rollback_master(project, dry_run=True, steps=1)
    assert run.schemas[0].migrations == ["20250101000400_citus_reference_tables"]
    assert catalog(database) == before


def test_dry_run_reports_drift_that_a_real_run_would_refuse(project, database, tenants):
    edited = project.tenant_dir / "20250101000000_create_org_users.sql"
    edited.write_text(edited.read_text() + "-- edited\n")
    write_migration(project.tenant_dir, "20300101000000_add_x", "CREATE TABLE x (i int);", "")
    run = migrate_tenants(project, dry_run=True)
    assert all("drift" in str(r.failure) for r in run.schemas)
    assert all("would be refused" in str(r.failure) for r in run.schemas)
    assert all(r.migrations == [] for r in run.schemas)
    run = migrate_tenants(project, dry_run=True, allow_drift=True)
    assert all(r.migrations == ["20300101000000_add_x"] for r in run.schemas)
