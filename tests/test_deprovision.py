"""Removing a tenant: only when asked twice, optionally archived first, all or nothing."""

import subprocess

import pytest

from yoyo_tenants import deprovision_tenant, embedded, migrate_master, provision_tenant
from yoyo_tenants.errors import TenantsError, UnknownTenant

from .conftest import query


@pytest.fixture
def tenant(project):
    migrate_master(project)
    provision_tenant(project, "org_keep1")
    return provision_tenant(project, "org_gone1").tenant


def schema_exists(params, schema):
    return bool(query(params, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)))


def registered(params, org_id):
    return bool(query(params, "SELECT 1 FROM public.tenants WHERE clerk_org_id = %s", (org_id,)))


def test_without_yes_it_only_lists_what_would_be_dropped(project, database, tenant):
    result = deprovision_tenant(project, tenant.org_id)
    assert not result.dropped
    assert {"org_users", "org_settings", "chat_messages"} <= set(result.tables)
    assert schema_exists(database, tenant.schema) and registered(database, tenant.org_id)


def test_yes_drops_schema_and_registry_row_and_nothing_else(project, database, tenant):
    result = deprovision_tenant(project, tenant.org_id, yes=True)
    assert result.dropped
    assert not schema_exists(database, tenant.schema)
    assert not registered(database, tenant.org_id)
    assert registered(database, "org_keep1")
    with pytest.raises(UnknownTenant):
        deprovision_tenant(project, tenant.org_id, yes=True)


def test_archive_is_a_restorable_dump_of_the_schema(project, database, tenant, tmp_path):
    query(database, f"INSERT INTO {tenant.schema}.org_users (clerk_user_id, email) "
          "VALUES ('user_1', 'a@example.com')")  # fmt: skip
    archive = tmp_path / "org_gone1.dump"
    result = deprovision_tenant(project, tenant.org_id, yes=True, archive=archive)
    assert result.dropped and result.archive == archive
    listing = subprocess.run(
        [str(embedded.bin_dir() / "pg_restore"), "--list", str(archive)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"TABLE {tenant.schema} org_users" in listing
    assert f"TABLE DATA {tenant.schema} org_users" in listing
    assert "org_keep1" not in listing and "tid_" in listing


def test_failed_archive_drops_nothing(project, database, tenant, tmp_path):
    with pytest.raises(TenantsError, match="pg_dump failed, nothing was dropped"):
        deprovision_tenant(
            project, tenant.org_id, yes=True, archive=tmp_path / "no-such-dir" / "x.dump"
        )
    assert schema_exists(database, tenant.schema) and registered(database, tenant.org_id)


def test_failed_archive_leaves_the_schemas_comment_as_it_was(project, database, tenant, tmp_path):
    # The archive carries the registry row in the schema's comment while pg_dump runs.
    query(database, f"COMMENT ON SCHEMA {tenant.schema} IS 'the comment it had'")
    with pytest.raises(TenantsError, match="pg_dump failed, nothing was dropped"):
        deprovision_tenant(
            project, tenant.org_id, yes=True, archive=tmp_path / "no-such-dir" / "x.dump"
        )
    comment = query(database, "SELECT obj_description(%s::regnamespace, 'pg_namespace')",
                    (tenant.schema,))  # fmt: skip
    assert comment == [("the comment it had",)]
