"""Every log is evidence: verify fails on a log no run could have written, status shows its
tenant as "log damaged", and migrate-* fails that tenant by name and leaves it as it is."""

from __future__ import annotations

import itertools
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
    repair,
    rollback_tenants,
    status,
    verify,
)
from yoyo_tenants.log import LAYOUT

from .conftest import (
    REPO,
    TENANT_IDS,
    applied_ids,
    on_a_database,
    query,
    run_invoke,
    user_env,
    write_migration,
)

ADD = "20300101000000_add_nickname"


@pytest.fixture
def fleet(project):
    """Two tenants at head; the first is the one damaged."""
    migrate_master(project)
    return [provision_tenant(project, org).tenant for org in ("org_damaged1", "org_sound1")]


def damage(params, schema: str, statement: str) -> None:
    query(params, sql.SQL(statement).format(log=sql.Identifier(schema, "_yoyo_log")))


def as_it_is(params, schema: str) -> tuple:
    """A schema's tables with their columns, and its log's rows (if it has a log)."""
    columns = query(
        params,
        "SELECT table_name, column_name, data_type FROM "
        "information_schema.columns WHERE table_schema = %s ORDER BY 1, 2",
        (schema,),
    )
    rows = []
    if query(params, "SELECT to_regclass(%s)", (f"{schema}._yoyo_log",))[0][0]:
        rows = query(params, sql.SQL("SELECT l::text FROM {} l ORDER BY l::text").format(
            sql.Identifier(schema, "_yoyo_log")))  # fmt: skip
    return columns, rows


KINDS = {
    "log-dropped": ("DROP TABLE {log}", "it has tables but no migration log (_yoyo_log)"),
    "column-dropped": (
        "ALTER TABLE {log} DROP COLUMN batch",
        "its column batch is missing",
    ),
    "column-retyped": (
        "ALTER TABLE {log} ALTER COLUMN operation TYPE text",
        "its column operation is text, not character varying(10)",
    ),
    "row-duplicated": ("INSERT INTO {log} SELECT * FROM {log} WHERE id = 2", "id 2 is there twice"),
    "row-deleted": ("DELETE FROM {log} WHERE id = 2", "its ids jump from 1 to 3: a row is missing"),
    "unknown-operation": (
        "UPDATE {log} SET operation = 'drop' WHERE id = 3",
        "row 3 has an unknown operation 'drop'",
    ),
    "rollback-never-applied": (
        "INSERT INTO {log} (id, migration_id, operation, created_at_utc) "
        "VALUES (4, '20290101000000_never', 'rollback', now())",
        "row 4 undoes 20290101000000_never, which was not applied",
    ),
}


@pytest.mark.parametrize(("statement", "problem"), KINDS.values(), ids=KINDS.keys())
def test_a_damaged_log_fails_verify_shows_in_status_and_is_left_alone_by_migrate(
    project, database, fleet, statement, problem
):
    damaged, sound = fleet
    damage(database, damaged.schema, statement)

    problems = verify(project)

    assert problems == [f"org_damaged1 ({damaged.schema}): log damaged: {problem}"]
    states = {t.org_id: t for t in status(project).tenants}
    assert states["org_damaged1"].state == "log damaged"
    assert states["org_damaged1"].damage == [problem]
    assert states["org_sound1"].state == "at head"

    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;",
                    "ALTER TABLE org_users DROP COLUMN nickname;")  # fmt: skip
    before = as_it_is(database, damaged.schema)
    for run in (migrate_tenants(project), migrate_tenants(project, dry_run=True),
                rollback_tenants(project, steps=1), repair(project)):  # fmt: skip
        result = {r.schema: r for r in run.schemas}[damaged.schema]
        assert not run.ok
        assert str(result.failure) == (
            f"the log of {damaged.schema} is damaged: {problem} (left as it is: see verify)"
        )
    assert as_it_is(database, damaged.schema) == before
    assert applied_ids(database, sound.schema) == TENANT_IDS  # migrated, then rolled back


def test_without_the_heads_index_a_run_finds_damage_in_every_log_it_reads(project, database, fleet):
    damaged, sound = fleet
    query(database, "DROP TABLE public.yoyo_tenants_heads")
    damage(database, damaged.schema, "INSERT INTO {log} SELECT * FROM {log} WHERE id = 2")
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    before = as_it_is(database, damaged.schema)

    run = migrate_tenants(project)

    failed = {r.schema: r for r in run.schemas}[damaged.schema]
    assert "is damaged: id 2 is there twice" in str(failed.failure)
    assert as_it_is(database, damaged.schema) == before
    assert applied_ids(database, sound.schema) == [*TENANT_IDS, ADD]


def only_the_duplicated_row_is_refused(project, database, damaged, sound) -> None:
    """A deploy to both: the tenant whose log has a row twice is refused and left as it was,
    the sound one migrated."""
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    before = as_it_is(database, damaged.schema)

    run = migrate_tenants(project)

    results = {r.schema: r for r in run.schemas}
    assert "id 2 is there twice" in str(results[damaged.schema].failure)
    assert as_it_is(database, damaged.schema) == before
    assert results[sound.schema].migrations == [ADD]


def test_tenants_behind_alike_are_each_checked_when_their_groups_log_is_damaged(
    project, database, fleet
):
    """The heads index groups tenants by what they applied and reads one log per group (here
    the damaged one's: a duplicated row leaves what it applied as it was); that log being
    damaged, each of the group is read whole, and only the damaged one refused."""
    damaged, sound = fleet
    damage(database, damaged.schema, KINDS["row-duplicated"][0])
    only_the_duplicated_row_is_refused(project, database, damaged, sound)


def test_verify_leaves_a_damaged_log_unindexed_so_that_runs_read_it_and_refuse_it(
    project, database
):
    """A duplicated row leaves the log's length and applied set as the index has them; the
    tenant is planned from another's log when they are behind alike, unless verify, having
    found the damage, took the index's word for it away."""
    migrate_master(project)
    sound, damaged = [provision_tenant(project, org).tenant for org in ("org_a1", "org_b1")]
    damage(database, damaged.schema, KINDS["row-duplicated"][0])
    assert verify(project) == [f"org_b1 ({damaged.schema}): log damaged: id 2 is there twice"]
    only_the_duplicated_row_is_refused(project, database, damaged, sound)


def test_a_damaged_log_in_public_fails_verify_and_migrate_master(project, database):
    migrate_master(project)
    damage(database, "public", KINDS["row-duplicated"][0])
    write_migration(project.master_dir, ADD, "CREATE TABLE public.regions (code text);")

    problems = verify(project)
    run = migrate_master(project)

    assert problems == ["public: log damaged: id 2 is there twice"]
    assert not run.ok and "the log of public is damaged" in str(run.schemas[0].failure)
    assert query(database, "SELECT to_regclass('public.regions')") == [(None,)]


def test_a_schema_in_yoyos_own_layout_is_not_damaged(project, database, fleet):
    damaged, _ = fleet
    query(database, sql.SQL("ALTER TABLE {} RENAME TO _yoyo_migration").format(
        sql.Identifier(damaged.schema, "_yoyo_log")))  # fmt: skip

    states = {t.org_id: t.state for t in status(project).tenants}

    assert states["org_damaged1"] == "old layout"
    assert not any("log damaged" in p for p in verify(project))


def test_a_tenants_query_schema_with_tables_and_no_log_is_not_adopted_yet(project, database):
    """With a tenants-query the app makes its tenants' schemas: one holding tables before the
    first run is one the tool has not adopted yet, not a damaged one."""
    migrate_master(project)
    query(database, "CREATE SCHEMA acct_acme; CREATE TABLE acct_acme.legacy (id int)")
    custom = replace(project, tenants_query="SELECT 'acme', 'acct_acme'")

    [tenant] = status(custom).tenants

    assert tenant.state == "never migrated"
    assert verify(custom) == []


def test_on_the_command_line_verify_names_each_damaged_log_and_exits_1(project, database, fleet):
    damaged, _ = fleet
    damage(database, damaged.schema, KINDS["row-duplicated"][0])
    (project.root / "tasks.py").write_text((REPO / "tasks.py").read_text())

    done = run_invoke(project.root, "verify", env=user_env(database))
    shown = run_invoke(project.root, "status", env=user_env(database))

    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"org_damaged1 ({damaged.schema}): log damaged: id 2 is there twice"
    ]
    assert done.stderr.strip() == "error: verify found 1 problem"
    assert "  1 log damaged: org_damaged1" in shown.stdout.splitlines()


# -- any damage at all ---------------------------------------------------------------------------

ROW = st.integers(1, 3)  # every tenant's log has these: provisioning applied three migrations
COLUMNS = [name for name in LAYOUT if name != "run"]  # a log from before runs has no run column
DAMAGE = st.one_of(
    ROW.map("INSERT INTO {{log}} SELECT * FROM {{log}} WHERE id = {}".format),
    ROW.map("DELETE FROM {{log}} WHERE id = {}".format),
    st.tuples(ROW, st.integers(-2, 9))
    .filter(lambda pair: pair[0] != pair[1])
    .map(lambda pair: "UPDATE {{log}} SET id = {1} WHERE id = {0}".format(*pair)),
    st.tuples(
        ROW, st.sampled_from(["rollback", "unmark", "accept", "post-apply", "drop", "APPLY", ""])
    ).map(lambda pair: "UPDATE {{log}} SET operation = '{1}' WHERE id = {0}".format(*pair)),
    st.tuples(
        st.sampled_from([TENANT_IDS[0], "20290101000000_never"]),
        st.sampled_from(["rollback", "unmark"]),
    ).map(
        lambda pair: (
            "INSERT INTO {{log}} (id, migration_id, operation, created_at_utc) "
            "SELECT max(id) + 1, '{}', '{}', now() FROM {{log}}".format(*pair)
        )
    ),
    st.sampled_from(COLUMNS).map("ALTER TABLE {{log}} DROP COLUMN {}".format),
    st.tuples(st.sampled_from(COLUMNS), st.sampled_from(["text", "bigint"])).map(
        lambda pair: "ALTER TABLE {{log}} ALTER COLUMN {0} TYPE {1} USING {0}::{1}".format(*pair)
    ),
    st.just("DROP TABLE {log}"),
)
COUNTER = itertools.count()


@on_a_database(15)
@given(statement=DAMAGE)
def test_any_damage_fails_verify_and_a_run_leaves_the_tenant_as_it_is(project, database, statement):
    if not registry_made(project):
        migrate_master(project)
        provision_tenant(project, "org_sound1")
    n = next(COUNTER)
    tenant = provision_tenant(project, f"org_damaged{n}").tenant
    try:
        damage(database, tenant.schema, statement)
    except psycopg2.Error:  # a change PostgreSQL refuses (a cast it cannot make)
        deprovision_tenant(project, tenant.org_id, yes=True)
        return

    assert any(tenant.schema in problem for problem in verify(project)), statement
    state = {t.schema: t.state for t in status(project).tenants}[tenant.schema]
    assert state != "at head", statement
    write_migration(
        project.tenant_dir, f"2030010100{n:04d}_more", f"CREATE TABLE more_{n} (i int);"
    )
    before = as_it_is(database, tenant.schema)
    run = migrate_tenants(project, jobs=1)
    failed = {r.schema: r for r in run.schemas}[tenant.schema]
    assert not run.ok and failed.failure, statement
    assert as_it_is(database, tenant.schema) == before, statement
    assert all(r.failure is None for r in run.schemas if r.schema != tenant.schema)
    deprovision_tenant(project, tenant.org_id, yes=True)


def registry_made(project) -> bool:
    return bool(query(project.connection, "SELECT to_regclass('public.tenants')")[0][0])


def test_a_row_repeated_behind_the_index_stops_the_run_under_the_lock(project, fleet):
    """The heads index still says where the log ends (a repeated row leaves its last id and
    what it applied as they were); the engine's check under the lock counts the rows too, reads
    the log again, and refuses it: the tenant is left as it is."""
    # The second of two tenants alike: the scan reads the first's log for both.
    params, sound, damaged = project.connection, fleet[0].schema, fleet[1].schema
    damage(params, damaged, "INSERT INTO {log} SELECT * FROM {log} WHERE id = 2")
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    before = as_it_is(params, damaged)

    run = migrate_tenants(project, jobs=1)

    by_schema = {r.schema: r for r in run.schemas}
    assert by_schema[sound].migrations == [ADD]
    assert "is damaged: id 2 is there twice" in str(by_schema[damaged].failure)
    assert as_it_is(params, damaged) == before
