"""Rollbacks: the last batch, --steps N, --to <id>, one tenant, and the public schema."""

from __future__ import annotations

import pytest
from psycopg2 import sql

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_master,
    rollback_tenants,
    schema_for,
)
from yoyo_tenants.errors import UnknownTenant, UsageError

from .conftest import (
    MASTER_IDS,
    TENANT_IDS,
    YOYO_TABLES,
    applied_ids,
    columns,
    query,
    tables,
    write_migration,
)

ORG_A = "org_alpha1"
ORG_B = "org_bravo2"
NICKNAME = "20250201000000_add_nickname"
NOTES = "20250201000100_create_org_notes"
PRONOUNS = "20250301000000_add_pronouns"
SECOND_BATCH = [NICKNAME, NOTES]


def batches(db, schema: str) -> dict[str, int]:
    rows = query(
        db,
        sql.SQL("SELECT migration_id, batch FROM {} WHERE operation = 'apply' ORDER BY id").format(
            sql.Identifier(schema, "_yoyo_log")
        ),
    )
    return dict(rows)


def log_rows(db, schema: str) -> list[tuple[str, str]]:
    return query(
        db,
        sql.SQL("SELECT migration_id, operation FROM {} ORDER BY id").format(
            sql.Identifier(schema, "_yoyo_log")
        ),
    )


def add_second_batch(directory):
    write_migration(
        directory,
        NICKNAME,
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n",
        "ALTER TABLE org_users DROP COLUMN nickname;\n",
    )
    write_migration(
        directory,
        NOTES,
        "CREATE TABLE org_notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL);\n",
        "DROP TABLE org_notes;\n",
    )


def add_third_batch(directory):
    write_migration(
        directory,
        PRONOUNS,
        "ALTER TABLE org_users ADD COLUMN pronouns TEXT;\n",
        "ALTER TABLE org_users DROP COLUMN pronouns;\n",
    )


@pytest.fixture
def two_batches(project):
    """ORG_A provisioned (batch 1: the shipped migrations), then migrated again (batch 2)."""
    assert migrate_master(project).ok
    provision_tenant(project, ORG_A)
    add_second_batch(project.tenant_dir)
    run = migrate_tenants(project, jobs=1)
    assert run.ok
    assert run.schemas[0].migrations == SECOND_BATCH
    return project


# -- tenants: the last batch ---------------------------------------------------------------------


def test_two_runs_record_two_batches(two_batches):
    assert batches(two_batches.connection, schema_for(ORG_A)) == {
        **dict.fromkeys(TENANT_IDS, 1),
        **dict.fromkeys(SECOND_BATCH, 2),
    }


def test_rollback_tenants_undoes_only_the_last_batch(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)

    run = rollback_tenants(two_batches, jobs=1)

    assert applied_ids(db, schema) == TENANT_IDS
    assert "nickname" not in columns(db, schema, "org_users")
    assert "org_notes" not in tables(db, schema)
    assert {"org_users", "org_settings", "chat_messages"} <= tables(db, schema)
    assert log_rows(db, schema)[-2:] == [(NOTES, "rollback"), (NICKNAME, "rollback")]
    assert run.ok
    assert run.direction == "rollback"
    assert len(run.schemas) == 1
    result = run.schemas[0]
    assert (result.schema, result.org_id) == (schema, ORG_A)
    assert result.migrations == [NOTES, NICKNAME]  # newest first, as they were undone
    assert result.outcome == "done"


def test_a_second_rollback_finds_only_provisioning_left_and_has_nothing_to_do(two_batches):
    """Each plain rollback walks back one deploy, as Knex's walks back batches; what a tenant
    got from provisioning is never a deploy, so once only that is left, there is nothing to
    roll back (exit 0), and the base tables go only when asked for with --yes."""
    db = two_batches.connection
    schema = schema_for(ORG_A)
    rollback_tenants(two_batches, jobs=1)
    before = log_rows(db, schema)

    run = rollback_tenants(two_batches, jobs=1)  # what is left is the tenant's provisioning

    assert run.ok
    assert run.schemas[0].migrations == [] and run.schemas[0].failure is None
    assert run.count("up to date") == 1
    assert log_rows(db, schema) == before
    assert applied_ids(db, schema) == TENANT_IDS

    run = rollback_tenants(two_batches, jobs=1, yes=True)

    assert run.ok and run.schemas[0].migrations == list(reversed(TENANT_IDS))
    assert applied_ids(db, schema) == []
    assert tables(db, schema) == YOYO_TABLES


def test_rollback_then_migrate_reapplies_in_a_new_batch(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)
    rollback_tenants(two_batches, jobs=1)

    run = migrate_tenants(two_batches, jobs=1)

    assert run.schemas[0].migrations == SECOND_BATCH
    assert applied_ids(db, schema) == [*TENANT_IDS, *SECOND_BATCH]
    assert {batches(db, schema)[m] for m in SECOND_BATCH} == {2}
    assert "nickname" in columns(db, schema, "org_users")


def test_a_rollback_undoes_a_deploy_only_where_it_reached(project):
    """B joins after the second deploy: provisioning gives it everything, and undoing that
    deploy leaves B alone (its tables came from provisioning, never a deploy)."""
    db = project.connection
    assert migrate_master(project).ok
    provision_tenant(project, ORG_A)
    add_second_batch(project.tenant_dir)
    second = migrate_tenants(project, jobs=1)
    provision_tenant(project, ORG_B)
    add_third_batch(project.tenant_dir)
    third = migrate_tenants(project, jobs=2)
    assert second.run and third.run and third.run > second.run

    run = rollback_tenants(project, jobs=2)  # the last deploy: the third batch, in both

    by_org = {r.org_id: r.migrations for r in run.schemas}
    assert by_org == {ORG_A: [PRONOUNS], ORG_B: [PRONOUNS]}
    assert applied_ids(db, schema_for(ORG_A)) == [*TENANT_IDS, *SECOND_BATCH]
    assert applied_ids(db, schema_for(ORG_B)) == [*TENANT_IDS, *SECOND_BATCH]

    run = rollback_tenants(project, jobs=2)  # the deploy before: it reached A only

    by_org = {r.org_id: r.migrations for r in run.schemas}
    assert by_org == {ORG_A: [NOTES, NICKNAME], ORG_B: []}
    assert run.ok and run.count("up to date") == 1
    assert applied_ids(db, schema_for(ORG_A)) == TENANT_IDS
    assert applied_ids(db, schema_for(ORG_B)) == [*TENANT_IDS, *SECOND_BATCH]
    assert "org_notes" in tables(db, schema_for(ORG_B))


def test_a_named_run_is_undone_wherever_it_applied(project):
    db = project.connection
    assert migrate_master(project).ok
    provision_tenant(project, ORG_A)
    add_second_batch(project.tenant_dir)
    second = migrate_tenants(project, jobs=1)
    add_third_batch(project.tenant_dir)
    migrate_tenants(project, jobs=1)

    run = rollback_tenants(project, run=second.run, jobs=1)

    assert run.schemas[0].migrations == [NOTES, NICKNAME]
    assert applied_ids(db, schema_for(ORG_A)) == [*TENANT_IDS, PRONOUNS]


# -- tenants: steps and to -----------------------------------------------------------------------


def test_rollback_steps_undoes_that_many_migrations_across_batches(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)

    run = rollback_tenants(two_batches, steps=3, jobs=1, yes=True)

    assert run.schemas[0].migrations == [NOTES, NICKNAME, TENANT_IDS[2]]
    assert applied_ids(db, schema) == TENANT_IDS[:2]
    assert "chat_messages" not in tables(db, schema)
    assert "org_notes" not in tables(db, schema)
    assert "nickname" not in columns(db, schema, "org_users")
    assert {"org_users", "org_settings"} <= tables(db, schema)
    assert [m for m, op in log_rows(db, schema) if op == "rollback"] == [
        NOTES,
        NICKNAME,
        TENANT_IDS[2],
    ]


def test_steps_reaching_into_the_base_tables_are_refused_without_yes(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)
    before = log_rows(db, schema)

    run = rollback_tenants(two_batches, steps=3, jobs=1)

    assert not run.ok and "would undo its base tables" in str(run.schemas[0].failure)
    assert TENANT_IDS[2] in str(run.schemas[0].failure)
    assert log_rows(db, schema) == before
    assert "org_notes" in tables(db, schema)


def test_rollback_steps_one_undoes_only_the_newest_migration(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)
    run = rollback_tenants(two_batches, steps=1, jobs=1)
    assert run.schemas[0].migrations == [NOTES]
    assert applied_ids(db, schema) == [*TENANT_IDS, NICKNAME]
    assert "nickname" in columns(db, schema, "org_users")


def test_rollback_steps_beyond_what_is_applied_undoes_everything(two_batches):
    db = two_batches.connection
    run = rollback_tenants(two_batches, steps=50, jobs=1, yes=True)
    assert run.ok
    assert len(run.schemas[0].migrations) == 5
    assert applied_ids(db, schema_for(ORG_A)) == []


def test_rollback_to_keeps_that_migration_and_undoes_everything_after(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)

    run = rollback_tenants(two_batches, to=TENANT_IDS[0], jobs=1, yes=True)

    assert applied_ids(db, schema) == [TENANT_IDS[0]]
    assert tables(db, schema) == {"org_users", *YOYO_TABLES}
    assert "nickname" not in columns(db, schema, "org_users")
    assert run.schemas[0].migrations == [NOTES, NICKNAME, TENANT_IDS[2], TENANT_IDS[1]]


def test_rollback_to_the_newest_migration_changes_nothing(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)
    before = log_rows(db, schema)
    run = rollback_tenants(two_batches, to=NOTES, jobs=1)
    assert run.ok
    assert run.schemas[0].migrations == []
    assert run.schemas[0].outcome == "up to date"
    assert applied_ids(db, schema) == [*TENANT_IDS, *SECOND_BATCH]
    assert log_rows(db, schema) == before


def test_rollback_to_a_migration_that_is_not_applied_fails_and_changes_nothing(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)
    add_third_batch(two_batches.tenant_dir)  # a migration file, not applied anywhere
    before = log_rows(db, schema)

    run = rollback_tenants(two_batches, to=PRONOUNS, jobs=1)

    assert applied_ids(db, schema) == [*TENANT_IDS, *SECOND_BATCH]
    assert log_rows(db, schema) == before
    assert not run.ok
    assert run.schemas[0].migrations == []
    assert PRONOUNS in str(run.schemas[0].failure)
    assert "not applied" in str(run.schemas[0].failure)


def test_rollback_to_an_id_that_is_no_migration_file_is_one_usage_error(two_batches):
    db = two_batches.connection
    before = log_rows(db, schema_for(ORG_A))

    with pytest.raises(UsageError) as info:
        rollback_tenants(two_batches, to="20990101000000_nope", jobs=1)

    assert "20990101000000_nope" in str(info.value) and info.value.exit_code == 2
    assert log_rows(db, schema_for(ORG_A)) == before
    with pytest.raises(UsageError):
        rollback_master(two_batches, to="20990101000000_nope")


@pytest.mark.parametrize(
    "kwargs", [{"steps": 0}, {"steps": -1}, {"steps": 1, "to": TENANT_IDS[0]}], ids=str
)
def test_bad_rollback_targets_are_usage_errors(two_batches, kwargs):
    db = two_batches.connection
    with pytest.raises(UsageError) as info:
        rollback_tenants(two_batches, jobs=1, **kwargs)
    assert info.value.exit_code == 2
    assert applied_ids(db, schema_for(ORG_A)) == [*TENANT_IDS, *SECOND_BATCH]


# -- tenants: one of them ------------------------------------------------------------------------


def test_rollback_of_one_tenant_leaves_the_others_alone(project):
    db = project.connection
    assert migrate_master(project).ok
    provision_tenant(project, ORG_A)
    provision_tenant(project, ORG_B)
    add_second_batch(project.tenant_dir)
    assert migrate_tenants(project, jobs=2).ok

    run = rollback_tenants(project, tenant=ORG_A, jobs=2)

    assert [(r.org_id, r.schema) for r in run.schemas] == [(ORG_A, schema_for(ORG_A))]
    assert run.schemas[0].migrations == [NOTES, NICKNAME]
    assert applied_ids(db, schema_for(ORG_A)) == TENANT_IDS
    assert applied_ids(db, schema_for(ORG_B)) == [*TENANT_IDS, *SECOND_BATCH]
    assert "org_notes" not in tables(db, schema_for(ORG_A))
    assert "org_notes" in tables(db, schema_for(ORG_B))
    assert "nickname" in columns(db, schema_for(ORG_B), "org_users")
    assert not [op for _, op in log_rows(db, schema_for(ORG_B)) if op == "rollback"]


def test_rollback_of_an_unknown_tenant_is_an_error(two_batches):
    with pytest.raises(UnknownTenant, match="org_unknown1"):
        rollback_tenants(two_batches, tenant="org_unknown1", jobs=1)
    assert applied_ids(two_batches.connection, schema_for(ORG_A)) == [*TENANT_IDS, *SECOND_BATCH]


def test_a_failing_rollback_is_reported_and_keeps_that_migration(two_batches):
    db = two_batches.connection
    schema = schema_for(ORG_A)
    # Break NOTES' rollback after it was applied: dropping a table that is not there fails.
    (two_batches.tenant_dir / f"{NOTES}.rollback.sql").write_text("DROP TABLE no_such_table;\n")

    run = rollback_tenants(two_batches, jobs=1)

    assert not run.ok
    result = run.schemas[0]
    assert result.failure.migration == NOTES
    assert "no_such_table" in str(result.failure)
    assert result.migrations == []
    assert applied_ids(db, schema) == [*TENANT_IDS, *SECOND_BATCH]
    assert "org_notes" in tables(db, schema)
    assert "nickname" in columns(db, schema, "org_users")


# -- master --------------------------------------------------------------------------------------

REGIONS = "20250201000000_create_regions"


def test_rollback_master_undoes_only_the_last_batch(project):
    db = project.connection
    assert migrate_master(project).ok
    write_migration(
        project.master_dir,
        REGIONS,
        "CREATE TABLE public.regions (code TEXT PRIMARY KEY);\n",
        "DROP TABLE public.regions;\n",
    )
    assert migrate_master(project).schemas[0].migrations == [REGIONS]
    assert batches(db, "public")[REGIONS] == 2

    run = rollback_master(project)

    assert run.ok
    assert run.direction == "rollback"
    assert [r.schema for r in run.schemas] == ["public"]
    assert run.schemas[0].migrations == [REGIONS]
    assert applied_ids(db, "public") == MASTER_IDS
    assert "regions" not in tables(db, "public")
    assert {"tenants", "focus_areas", "coaching_categories"} <= tables(db, "public")
    assert log_rows(db, "public")[-1] == (REGIONS, "rollback")


def test_rollback_master_steps_and_to(project):
    db = project.connection
    assert migrate_master(project).ok

    run = rollback_master(project, steps=2)
    assert run.schemas[0].migrations == [MASTER_IDS[4], MASTER_IDS[3]]
    assert "coaching_categories" not in tables(db, "public")

    run = rollback_master(project, to=MASTER_IDS[0])
    assert run.schemas[0].migrations == [MASTER_IDS[2], MASTER_IDS[1]]
    assert applied_ids(db, "public") == [MASTER_IDS[0]]
    assert not {"tenants", "focus_areas"} & tables(db, "public")
    assert query(db, "SELECT extname FROM pg_extension WHERE extname = 'vector'") == [("vector",)]


def test_rollback_master_of_everything_leaves_public_empty(project):
    db = project.connection
    assert migrate_master(project).ok

    run = rollback_master(project)

    assert run.schemas[0].migrations == list(reversed(MASTER_IDS))
    assert applied_ids(db, "public") == []
    assert tables(db, "public") == {*YOYO_TABLES, "yoyo_tenants_runs", "yoyo_tenants_heads"}
    assert query(db, "SELECT extname FROM pg_extension WHERE extname = 'vector'") == []


def test_rollback_master_does_not_touch_tenant_schemas(project):
    db = project.connection
    assert migrate_master(project).ok
    provision_tenant(project, ORG_A)
    write_migration(
        project.master_dir,
        REGIONS,
        "CREATE TABLE public.regions (code TEXT PRIMARY KEY);\n",
        "DROP TABLE public.regions;\n",
    )
    migrate_master(project)

    rollback_master(project)

    assert applied_ids(db, schema_for(ORG_A)) == TENANT_IDS
    assert {"org_users", "org_settings", "chat_messages"} <= tables(db, schema_for(ORG_A))
    assert [m for m, op in log_rows(db, schema_for(ORG_A)) if op == "rollback"] == []
