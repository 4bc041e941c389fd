"""The heads index: who is behind, found without opening every tenant's log, and never trusted
past what the logs say (a restore, plain yoyo, a hand-edited log)."""

from __future__ import annotations

from dataclasses import replace

import psycopg2
import pytest
from psycopg2 import sql

from yoyo_tenants import (
    inspection,
    log,
    logindex,
    migrate_master,
    migrate_tenants,
    provision_tenant,
    schema_for,
    verify,
)
from yoyo_tenants.commands import Applying
from yoyo_tenants.loading import load_migrations
from yoyo_tenants.pool import scan

from .conftest import (
    ADD_NICKNAME,
    TENANT_IDS,
    add_nickname,
    applied_ids,
    columns,
    query,
    write_migration,
)

ADD = ADD_NICKNAME
ORGS = [f"org_heads{i}" for i in range(6)]


def log_reads(messages: list[str]) -> list[str]:
    """The messages that read some tenant's own log."""
    return log_reads_of(messages, "tid_")


def log_reads_of(messages: list[str], schema: str) -> list[str]:
    return [m for m in messages if "._yoyo_log" in m.replace('"', "") and schema in m]


@pytest.fixture
def fleet(traced):
    """Six tenants at head on the statement-logging server, indexed."""
    settings, log = traced
    migrate_master(settings)
    tenants = [provision_tenant(settings, org).tenant for org in ORGS]
    return settings, log, tenants


def test_a_run_with_every_tenant_at_head_opens_no_tenant_log(fleet):
    settings, log, tenants = fleet
    log.mark()

    run = migrate_tenants(settings)

    assert run.ok and run.count("up to date") == len(ORGS)
    messages = log.messages()
    assert log_reads(messages) == []
    assert any("yoyo_tenants_heads" in m for m in messages)
    # The registry (2), the index (2), plain yoyo's tables (1): the server itself is checked
    # only by a run that will write.
    assert len(messages) == 5, messages


def test_tenants_behind_alike_are_planned_from_one_log(fleet):
    settings, log, tenants = fleet
    add_nickname(settings)
    log.mark()

    run = migrate_tenants(settings, jobs=2)

    assert run.ok and run.count("done") == len(ORGS)
    reads = [m for m in log_reads(log.messages()) if not m.startswith("BEGIN")]
    assert len(reads) == 1  # one representative's log: the others share what they applied
    for t in tenants:
        assert applied_ids(settings.connection, t.schema) == [*TENANT_IDS, ADD]


def test_without_the_index_every_log_is_read(fleet, monkeypatch):
    settings, log, tenants = fleet
    monkeypatch.setattr(logindex, "exists", lambda cursor: False)
    log.mark()

    migrate_tenants(settings)

    assert len(log_reads(log.messages())) == 1  # one UNION ALL naming every tenant's log
    assert all(t.schema in log_reads(log.messages())[0] for t in tenants)


def test_a_tenant_restored_from_an_older_copy_is_read_whole_and_brought_to_head(project):
    migrate_master(project)
    tenant = provision_tenant(project, ORGS[0]).tenant
    add_nickname(project)
    assert migrate_tenants(project).ok
    db = project.connection
    # As a restore would leave it: the log as it was before ADD (a new table), and no column.
    schema = sql.Identifier(tenant.schema)
    query(db, sql.SQL(
        "CREATE TABLE {s}.restored AS SELECT * FROM {s}._yoyo_log WHERE migration_id <> %s; "
        "DROP TABLE {s}._yoyo_log; ALTER TABLE {s}.restored RENAME TO _yoyo_log; "
        "ALTER TABLE {s}.org_users DROP COLUMN nickname"
    ).format(s=schema), (ADD,))  # fmt: skip

    run = migrate_tenants(project)

    assert run.schemas[0].migrations == [ADD]
    assert "nickname" in columns(db, tenant.schema, "org_users")
    assert verify(project) == []


def test_a_schema_renamed_away_and_made_again_under_its_name_is_read_not_trusted(project):
    """The index row names the old log by oid; that table now lives in another schema."""
    migrate_master(project)
    tenant = provision_tenant(project, ORGS[0]).tenant
    query(project.connection, sql.SQL("ALTER SCHEMA {} RENAME TO kept_aside; CREATE SCHEMA {}")
          .format(*[sql.Identifier(tenant.schema)] * 2))  # fmt: skip

    run = migrate_tenants(project)

    assert run.ok and run.schemas[0].migrations == TENANT_IDS
    assert applied_ids(project.connection, tenant.schema) == TENANT_IDS


def test_a_schema_whose_name_needs_quoting_is_judged_from_the_index(traced):
    settings, log = traced
    migrate_master(settings)
    query(settings.connection, 'CREATE TABLE public.accounts (slug text); '
          'INSERT INTO public.accounts VALUES (\'Acme\'); CREATE SCHEMA "Acme Corp"')  # fmt: skip
    custom = replace(settings, tenants_query="SELECT slug, slug || ' Corp' FROM public.accounts")
    assert migrate_tenants(custom).ok
    log.mark()

    run = migrate_tenants(custom)

    assert run.ok and run.count("up to date") == 1
    assert log_reads(log.messages()) == [] and log_reads_of(log.messages(), "Acme Corp") == []


def test_an_org_provisioned_with_no_tenant_migrations_yet_is_indexed(project):
    migrate_master(project)
    for path in project.tenant_dir.iterdir():
        path.unlink()

    schema = provision_tenant(project, ORGS[0]).tenant.schema

    rows = query(project.connection, "SELECT schema_name, position FROM "
                 "public.yoyo_tenants_heads WHERE schema_name = %s", (schema,))  # fmt: skip
    assert rows == [(schema, 0)]


def test_plain_yoyo_tables_in_an_indexed_schema_are_noticed(project):
    migrate_master(project)
    tenant = provision_tenant(project, ORGS[0]).tenant
    query(project.connection, sql.SQL("CREATE TABLE {}._yoyo_migration (x int)").format(
        sql.Identifier(tenant.schema)))  # fmt: skip

    report = inspection.status(project)

    assert report.tenants[0].state == "old layout"


def test_a_log_changed_behind_the_tools_back_is_found_by_verify_which_rebuilds_the_index(project):
    migrate_master(project)
    tenant = provision_tenant(project, ORGS[0]).tenant
    db = project.connection
    # Undone by hand, log row and all, as an older yoyo-tenants would: the index is not told.
    query(db, sql.SQL(
        "DROP TABLE {s}.chat_messages; INSERT INTO {s}._yoyo_log (id, migration_id, operation, "
        "created_at_utc) SELECT max(id) + 1, %s, 'rollback', now() FROM {s}._yoyo_log"
    ).format(s=sql.Identifier(tenant.schema)), (TENANT_IDS[2],))  # fmt: skip
    assert migrate_tenants(project).count("up to date") == 1  # the index alone cannot know

    problems = verify(project)

    assert problems == [
        f"{tenant.schema}: the heads index did not match its log (the log was changed by "
        "something other than yoyo-tenants); rebuilt from the log"
    ]
    assert verify(project) == []
    run = migrate_tenants(project)
    assert run.schemas[0].migrations == [TENANT_IDS[2]]
    assert applied_ids(db, tenant.schema) == TENANT_IDS


def test_an_index_row_behind_its_log_is_caught_by_the_guard_and_the_log_read_again(project):
    migrate_master(project)
    alike, moved = [provision_tenant(project, org).tenant for org in ORGS[:2]]
    add_nickname(project)
    db = project.connection
    # Marked applied by hand in the second (the column added too): its log moved on, the index
    # did not, and the scan plans it from the first one's log, which the index describes.
    query(db, sql.SQL(
        "ALTER TABLE {s}.org_users ADD COLUMN nickname TEXT; INSERT INTO {s}._yoyo_log (id, "
        "migration_id, operation, created_at_utc) SELECT max(id) + 1, %s, 'mark', now() "
        "FROM {s}._yoyo_log"
    ).format(s=sql.Identifier(moved.schema)), (ADD,))  # fmt: skip

    run = migrate_tenants(project, jobs=1)

    by_schema = {r.schema: r.migrations for r in run.schemas}
    assert run.ok and by_schema == {alike.schema: [ADD], moved.schema: []}  # not applied twice
    assert applied_ids(db, moved.schema) == [*TENANT_IDS, ADD]
    assert verify(project) == []  # and the run put the index right, under the schema's lock


def test_logs_changed_behind_the_index_are_read_whole_when_their_groups_log_disagrees(project):
    """Two tenants behind alike are one group, planned from one of their logs. Both logs were
    changed by hand, differently: the log read disagrees with the index, so neither is judged
    from it, and each is read as it is."""
    migrate_master(project)
    marked, undone = [provision_tenant(project, org).tenant for org in ORGS[:2]]
    add_nickname(project)
    db = project.connection
    query(db, sql.SQL(
        "ALTER TABLE {s}.org_users ADD COLUMN nickname TEXT; INSERT INTO {s}._yoyo_log (id, "
        "migration_id, operation, created_at_utc) SELECT max(id) + 1, %s, 'mark', now() "
        "FROM {s}._yoyo_log"
    ).format(s=sql.Identifier(marked.schema)), (ADD,))  # fmt: skip
    query(db, sql.SQL(
        "DROP TABLE {s}.chat_messages; INSERT INTO {s}._yoyo_log (id, migration_id, operation, "
        "created_at_utc) SELECT max(id) + 1, %s, 'rollback', now() FROM {s}._yoyo_log"
    ).format(s=sql.Identifier(undone.schema)), (TENANT_IDS[2],))  # fmt: skip

    report = {t.schema: t for t in inspection.status(project).tenants}

    assert report[marked.schema].applied == [*TENANT_IDS, ADD]
    assert report[marked.schema].state == "at head"
    assert report[undone.schema].applied == TENANT_IDS[:2]
    assert report[undone.schema].pending == [TENANT_IDS[2], ADD]


def test_a_log_table_renamed_away_is_not_taken_for_the_schemas_log(project):
    """The index row names the log by oid; that table is still in the schema, under another
    name, so the schema has no log a run would read or write."""
    migrate_master(project)
    tenant = provision_tenant(project, ORGS[0]).tenant
    query(project.connection, sql.SQL("ALTER TABLE {} RENAME TO kept_aside").format(
        sql.Identifier(tenant.schema, "_yoyo_log")))  # fmt: skip

    [report] = inspection.status(project).tenants

    assert report.applied == [] and report.pending == TENANT_IDS
    assert report.state == "log damaged"  # a registered tenant with tables and no log


def test_a_transaction_that_logs_nothing_leaves_the_index_alone(traced):
    """A tenant whose next migration is non-transactional: its first transaction (the check that
    the log is where the index said) logs nothing, so it writes no index row."""
    settings, log = traced
    migrate_master(settings)
    provision_tenant(settings, ORGS[0])
    write_migration(
        settings.tenant_dir,
        "20300101000000_index_names",
        "-- transactional: false\n"
        "CREATE INDEX CONCURRENTLY org_users_name_idx ON org_users (full_name);\n",
    )
    log.mark()

    run = migrate_tenants(settings)

    assert run.ok and run.schemas[0].migrations == ["20300101000000_index_names"]
    [checked] = [m for m in log.messages() if "log moved" in m]  # the position guard's
    assert checked.startswith("BEGIN;") and "COMMIT" in checked
    assert "yoyo_tenants_heads" not in checked
    assert verify(settings) == []


def test_the_scan_looks_each_log_up_once_whatever_the_statistics_say(project):
    # Planned as a join, analyzed catalogs made the planner expect one log table and scan the
    # index once per log table: quadratic in the tenants (3,000: 0.84 s instead of 0.15 s).
    # With nested loops its only choice, the index must still be read once, each row's table
    # looked up by oid.
    migrate_master(project)
    orgs = [f"org_scan{i}" for i in range(20)]
    for org in orgs:
        provision_tenant(project, org)
    query(project.connection, "ANALYZE")
    with psycopg2.connect(**project.connection) as connection, connection.cursor() as cursor:
        cursor.execute("SET enable_hashjoin = off; SET enable_mergejoin = off")
        cursor.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + logindex.READ_SQL,
            {
                "log": log.TABLE,
                "schemas": [schema_for(org) for org in orgs],
                "columns": list(log.COLUMN_NAMES),
                "count": len(log.COLUMN_NAMES),
            },
        )
        plan = cursor.fetchone()[0][0]["Plan"]
    scans = [node for node in walk(plan) if node.get("Relation Name") == "yoyo_tenants_heads"]
    assert [node["Actual Loops"] for node in scans] == [1]
    assert plan["Actual Rows"] == len(orgs)


def walk(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def test_tenants_the_index_judges_alike_are_judged_against_the_files_once(fleet):
    # At 100,000 tenants, judging every tenant's applied list again took most of status.
    settings, _, tenants = fleet

    report = inspection.status(settings)

    assert len(report.tenants) == len(ORGS)
    first = report.tenants[0]
    assert all(t.pending is first.pending and t.applied is first.applied for t in report.tenants)
    assert first.pending == [] and len(first.applied) > 0


def test_logs_read_whole_alike_are_judged_against_the_files_once(fleet):
    # verify reads every log whole: alike by their rows, they share one judgement too.
    settings, _, _ = fleet
    with psycopg2.connect(**settings.connection) as connection:
        report, _ = inspection.read_status(settings, connection.cursor(), from_index=False)

    first = report.tenants[0]
    assert all(t.pending is first.pending and t.applied is first.applied for t in report.tenants)


def test_logs_read_whole_share_their_ids_and_checksums(fleet):
    # verify keeps every log: at 100,000 tenants a copy of each id and checksum per row took
    # 556 MB of the tool's memory; shared, 266 MB.
    settings, _, tenants = fleet
    with psycopg2.connect(**settings.connection) as connection:
        _, states = inspection.read_status(settings, connection.cursor(), from_index=False)

    first, second = (states[t.schema].applied for t in tenants[:2])
    assert len(first) == len(second) > 0
    assert all(a.migration_id is b.migration_id for a, b in zip(first, second, strict=True))
    assert all(a.checksum is b.checksum for a, b in zip(first, second, strict=True))
    assert all(a is b for a, b in zip(first, second, strict=True))  # equal rows: one object


def test_a_runs_plans_answer_once_for_tenants_the_scan_found_alike(fleet):
    # At 100,000 tenants, working out each tenant's key for the answers took half a second.
    settings, _, tenants = fleet
    migrations = load_migrations(settings.tenant_dir)
    schemas = [t.schema for t in tenants]
    with psycopg2.connect(**settings.connection) as connection:
        cursor = connection.cursor()
        states = scan(cursor, schemas, migrations)
        plan_for = Applying(migrations, allow_drift=False).planner(states, cursor)
        plans = [plan_for(schema) for schema in schemas]
        answers = [
            plan.choose(states[schema].log) for plan, schema in zip(plans, schemas, strict=True)
        ]

    assert answers[0] == [] and all(answer is answers[0] for answer in answers)
    shared = plans[0]._alike
    assert all(plan._alike is shared for plan in plans)
    assert len(shared._found) == 1  # one applied list for all of them, answered once


def test_an_index_row_naming_another_tenants_log_is_not_trusted(project):
    # A hostile or hand-edited index row: tenant A's row names tenant B's log (B at head, A
    # behind). The scan takes a row only for the log table in its own schema, so A's own log is
    # read and A is migrated, not judged at head from B's.
    migrate_master(project)
    behind, ahead = (provision_tenant(project, org).tenant for org in ORGS[:2])
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    assert migrate_tenants(project, tenant=ORGS[1]).ok
    query(
        project.connection,
        "UPDATE public.yoyo_tenants_heads h SET log_table = o.log_table, position = o.position,"
        " applied = o.applied FROM public.yoyo_tenants_heads o"
        " WHERE h.schema_name = %s AND o.schema_name = %s",
        (behind.schema, ahead.schema),
    )

    run = migrate_tenants(project)

    results = {r.schema: r for r in run.schemas}
    assert results[behind.schema].migrations == [ADD]
    assert "nickname" in columns(project.connection, behind.schema, "org_users")
    assert verify(project) == []
