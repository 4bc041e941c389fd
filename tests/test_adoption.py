"""Adoption: a project's own tenants query, validation on migrate (drift stops a deploy and a
new org alike), repair of accepted edits, restore of an archived tenant, the yoyo CLI as safe as
the tasks."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from yoyo_tenants import (
    deprovision_tenant,
    migrate_master,
    migrate_tenants,
    provision_tenant,
    repair,
    restore_tenant,
    status,
    verify,
)
from yoyo_tenants.errors import SchemaCollision, TenantsError, UsageError
from yoyo_tenants.plan import Drift
from yoyo_tenants.settings import Settings

from . import servers
from .conftest import (
    REPO,
    TENANT_IDS,
    applied_ids,
    copy_migrations,
    query,
    run_invoke,
    tables,
    user_env,
    write_migration,
)

ADD = "20300101000000_add_nickname"
ORGS = ["org_adopt1", "org_adopt2"]


@pytest.fixture
def fleet(project):
    migrate_master(project)
    return [provision_tenant(project, org).tenant for org in ORGS]


def edit(settings, migration_id: str = TENANT_IDS[1]) -> None:
    path = settings.tenant_dir / f"{migration_id}.sql"
    path.write_text(path.read_text() + "-- an edit after it was applied\n")


# -- tenants-query -------------------------------------------------------------------------------


def test_a_project_names_its_tenants_with_a_query(project, database):
    migrate_master(project)
    query(database, "CREATE TABLE public.accounts (slug text); "
          "INSERT INTO public.accounts VALUES ('acme'), ('globex'); "
          "CREATE SCHEMA acct_acme; CREATE SCHEMA acct_globex")  # fmt: skip
    custom = replace(project, tenants_query="SELECT slug, 'acct_' || slug FROM public.accounts")

    run = migrate_tenants(custom, jobs=2)

    assert run.ok and [r.org_id for r in run.schemas] == ["acme", "globex"]
    assert applied_ids(database, "acct_acme") == TENANT_IDS
    assert {t.schema for t in status(custom).tenants} == {"acct_acme", "acct_globex"}
    assert verify(custom) == []
    assert migrate_tenants(custom, tenant="globex").schemas[0].schema == "acct_globex"


# -- validate on migrate -------------------------------------------------------------------------


def test_an_edited_applied_migration_stops_migrate_even_with_nothing_pending(project, fleet):
    edit(project)

    run = migrate_tenants(project)

    assert not run.ok
    for result in run.schemas:
        assert f"{TENANT_IDS[1]} changed since it was applied" in str(result.failure)
    assert migrate_tenants(project, allow_drift=True).ok


def test_a_vanished_applied_migration_stops_migrate_master(project):
    migrate_master(project)
    (project.master_dir / "20250101000300_create_coaching_categories.sql").unlink()

    run = migrate_master(project)

    assert not run.ok
    assert "20250101000300_create_coaching_categories was applied but its file is gone" in str(
        run.schemas[0].failure
    )


def test_a_new_org_is_refused_when_the_tenants_applied_an_edited_file(project, database, fleet):
    edit(project)

    with pytest.raises(Drift, match=f"{TENANT_IDS[1]} changed since it was applied"):
        provision_tenant(project, "org_adopt3")

    assert query(database, "SELECT count(*) FROM public.tenants") == [(2,)]
    done = provision_tenant(project, "org_adopt3", allow_drift=True)
    assert done.created and done.migrations == TENANT_IDS


def test_a_new_org_gets_a_migration_the_others_are_still_waiting_for(project, fleet):
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")

    done = provision_tenant(project, "org_adopt3")  # no tenant at head, but no drift either

    assert done.created and done.migrations == [*TENANT_IDS, ADD]
    assert "org_users" in tables(project.connection, done.tenant.schema)


# -- repair --------------------------------------------------------------------------------------


def test_repair_accepts_an_edited_migration_in_every_schema_with_a_new_log_row(project, fleet):
    edit(project)
    planned = repair(project, dry_run=True)
    assert {r.schema: r.migrations for r in planned.schemas if r.migrations} == {
        t.schema: [TENANT_IDS[1]] for t in fleet
    }
    assert verify(project) != []

    done = repair(project)

    assert done.ok and done.run
    assert verify(project) == []
    assert all(t.state == "at head" for t in status(project).tenants)
    for t in fleet:
        rows = query(project.connection, f"SELECT operation FROM {t.schema}._yoyo_log "
                     "WHERE migration_id = %s ORDER BY id", (TENANT_IDS[1],))  # fmt: skip
        assert rows == [("apply",), ("accept",)]  # the apply row stays as it was
        assert applied_ids(project.connection, t.schema) == TENANT_IDS  # in the same order
    assert migrate_tenants(project).ok  # a deploy goes on


def test_repair_of_one_migration_leaves_other_edits_as_drift(project, fleet):
    edit(project, TENANT_IDS[1])
    edit(project, TENANT_IDS[2])

    repair(project, migration=TENANT_IDS[2])

    problems = verify(project)
    assert problems and all(TENANT_IDS[1] in p for p in problems)


def test_a_deleted_file_stays_an_error_unless_forgotten(project, fleet):
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    assert migrate_tenants(project).ok
    (project.tenant_dir / f"{ADD}.sql").unlink()

    refused = repair(project)
    assert not refused.ok and all(ADD in str(r.failure) for r in refused.failed)
    assert all("--forget-missing" in str(r.failure) for r in refused.failed)

    done = repair(project, forget_missing=True)

    assert done.ok and verify(project) == []
    assert all(applied_ids(project.connection, t.schema) == TENANT_IDS for t in fleet)


# -- restore -------------------------------------------------------------------------------------


def test_an_archived_tenant_comes_back_with_its_data_and_registry_row(project, database, tmp_path):
    migrate_master(project)
    tenant = provision_tenant(project, "org_archived1").tenant
    query(database, f"INSERT INTO {tenant.schema}.org_settings (key, value) VALUES ('a.b', '7')")
    archive = tmp_path / "org_archived1.dump"
    assert deprovision_tenant(project, "org_archived1", yes=True, archive=archive).dropped
    with pytest.raises(UsageError, match="refusing to overwrite"):
        deprovision_tenant(project, provision_tenant(project, ORGS[0]).tenant.org_id, yes=True,
                           archive=archive)  # fmt: skip

    restored = restore_tenant(project, archive)

    assert restored.tenant == tenant.__class__("org_archived1", tenant.schema)
    assert query(database, f"SELECT value FROM {tenant.schema}.org_settings") == [(7,)]
    registered = query(database, "SELECT clerk_org_id, status FROM public.tenants ORDER BY id")
    assert registered == [(ORGS[0], "active"), ("org_archived1", "active")]
    assert applied_ids(database, tenant.schema) == TENANT_IDS
    assert verify(project) == []
    with pytest.raises(SchemaCollision):  # once back, it cannot come back again
        restore_tenant(project, archive)


def test_an_archive_is_not_restored_over_a_schema_of_its_name_or_an_org_of_its_id(
    project, database, tmp_path
):
    migrate_master(project)
    tenant = provision_tenant(project, "org_archived1").tenant
    archive = tmp_path / "org_archived1.dump"
    assert deprovision_tenant(project, "org_archived1", yes=True, archive=archive).dropped
    query(database, f"CREATE SCHEMA {tenant.schema}")  # someone else's, unregistered

    with pytest.raises(SchemaCollision, match="nothing was restored"):
        restore_tenant(project, archive)

    assert tables(database, tenant.schema) == set()
    assert query(database, "SELECT count(*) FROM public.tenants") == [(0,)]

    query(database, f"DROP SCHEMA {tenant.schema}")
    # The org registered again meanwhile, with another schema.
    query(database, "INSERT INTO public.tenants (clerk_org_id, schema_name) "
          "VALUES ('org_archived1', 'tid_0000000000')")  # fmt: skip

    with pytest.raises(SchemaCollision, match="nothing was restored"):
        restore_tenant(project, archive)

    assert query(database, "SELECT to_regnamespace(%s)", (tenant.schema,)) == [(None,)]
    assert query(database, "SELECT schema_name FROM public.tenants") == [("tid_0000000000",)]


def test_an_archive_whose_registry_row_is_refused_leaves_no_schema_behind(
    project, database, tmp_path
):
    migrate_master(project)
    tenant = provision_tenant(project, "org_archived1").tenant
    archive = tmp_path / "org_archived1.dump"
    assert deprovision_tenant(project, "org_archived1", yes=True, archive=archive).dropped
    # The registry gained a required column since: the archived row has no value for it.
    query(database, "ALTER TABLE public.tenants ADD COLUMN region TEXT NOT NULL DEFAULT 'eu'; "
          "ALTER TABLE public.tenants ALTER COLUMN region DROP DEFAULT")  # fmt: skip

    with pytest.raises(TenantsError, match="its registry row was refused"):
        restore_tenant(project, archive)

    assert query(database, "SELECT to_regnamespace(%s)", (tenant.schema,)) == [(None,)]
    assert query(database, "SELECT count(*) FROM public.tenants") == [(0,)]


OLD_BIN = servers.postgres_before(17)


@pytest.mark.skipif(
    OLD_BIN is None, reason="no PostgreSQL before 17 (Debian: apt-get install postgresql-15)"
)
def test_an_archive_restores_into_a_server_older_than_the_clients(tmp_path):
    """The wheel's pg_restore 18 sets transaction_timeout, which PostgreSQL 15 and 16 refuse."""
    copy_migrations(tmp_path)  # without pgvector, which Debian's server does not have
    for path in [
        *tmp_path.glob("migrations/master/*vector*"),
        *tmp_path.glob("migrations/tenant/*chat*"),
    ]:
        path.unlink()
    with servers.postgres(bin_path=OLD_BIN) as old:
        params = {**old.socket_params(), "host": "127.0.0.1"}
        project = Settings(
            root=tmp_path,
            connection=params,
            master_dir=tmp_path / "migrations" / "master",
            tenant_dir=tmp_path / "migrations" / "tenant",
        )
        migrate_master(project)
        tenant = provision_tenant(project, "org_archived1").tenant
        query(params, f"INSERT INTO {tenant.schema}.org_settings (key, value) VALUES ('a.b', '7')")
        archive = tmp_path / "org_archived1.dump"
        deprovision_tenant(project, "org_archived1", yes=True, archive=archive)

        restore_tenant(project, archive)

        assert query(params, "SHOW server_version_num")[0][0] < "170000"
        assert query(params, f"SELECT value FROM {tenant.schema}.org_settings") == [(7,)]
        assert query(params, "SELECT clerk_org_id FROM public.tenants") == [("org_archived1",)]
        assert verify(project) == []


@pytest.mark.skipif(
    OLD_BIN is None, reason="no PostgreSQL before 17 (Debian: apt-get install postgresql-15)"
)
def test_a_restore_into_a_server_older_than_the_clients_that_fails_part_way_leaves_nothing(
    project, database, tmp_path
):
    """The archive's org_settings needs a type of public's the older server does not have: its
    restore fails after the schema and other tables were made, and takes them back with it."""
    migrate_master(project)
    tenant = provision_tenant(project, "org_archived1").tenant
    query(database, "CREATE TYPE public.mood AS ENUM ('fine'); "
          f"ALTER TABLE {tenant.schema}.org_settings ADD COLUMN mood public.mood")  # fmt: skip
    archive = tmp_path / "org_archived1.dump"
    assert deprovision_tenant(project, "org_archived1", yes=True, archive=archive).dropped
    old_root = tmp_path / "old"
    copy_migrations(old_root)
    for path in [
        *old_root.glob("migrations/master/*vector*"),
        *old_root.glob("migrations/tenant/*chat*"),
    ]:
        path.unlink()
    with servers.postgres(bin_path=OLD_BIN) as old:
        params = {**old.socket_params(), "host": "127.0.0.1"}
        settings = Settings(
            root=old_root,
            connection=params,
            master_dir=old_root / "migrations" / "master",
            tenant_dir=old_root / "migrations" / "tenant",
        )
        assert migrate_master(settings).ok

        with pytest.raises(TenantsError, match="nothing was restored"):
            restore_tenant(settings, archive)

        assert query(params, "SELECT to_regnamespace(%s)", (tenant.schema,)) == [(None,)]
        assert query(params, "SELECT count(*) FROM public.tenants") == [(0,)]


# -- on the command line -------------------------------------------------------------------------


def cli(project, *args):
    """`invoke <args>` in the project's folder, on its database."""
    shutil.copy(REPO / "tasks.py", project.root / "tasks.py")
    return run_invoke(project.root, *args, env=user_env(project.connection))


def test_repair_restore_and_a_report_path_on_the_command_line(project, database, fleet, tmp_path):
    edit(project)
    shown = cli(project, "repair", "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert f"would accept {TENANT_IDS[1]}" in shown.stdout
    assert cli(project, "verify").returncode == 1

    done = cli(project, "repair")

    assert done.returncode == 0, done.stderr
    assert cli(project, "verify").returncode == 0

    archive = tmp_path / "adopt1.dump"
    gone = cli(project, "deprovision-tenant", ORGS[0], "--yes", "--archive", str(archive))
    assert gone.returncode == 0, gone.stderr
    back = cli(project, "restore-tenant", "--archive", str(archive))
    assert back.returncode == 0, back.stderr
    assert f"restored {ORGS[0]}" in back.stdout
    assert cli(project, "verify").returncode == 0

    nowhere = cli(project, "migrate-tenants", "--json", str(tmp_path / "no" / "such" / "x.json"))
    assert nowhere.returncode == 2
    assert nowhere.stderr.strip().startswith("error: --json") and "\n" not in nowhere.stderr.strip()
    assert "migrating" not in nowhere.stdout  # refused before anything ran


def test_verify_fails_on_a_database_never_migrated_or_without_its_registry(project, database):
    assert verify(project) == ["public has never been migrated: run invoke migrate-master"]
    migrate_master(project)
    query(database, "DROP TABLE public.tenants")

    assert verify(project) == [
        "public: the tenant registry public.tenants does not exist: run invoke migrate-master"
    ]
