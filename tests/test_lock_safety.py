"""Migrations must not hold the app hostage: lock and statement timeouts, retries, and
non-transactional migrations."""

import threading
import time

import psycopg2
import pytest

from yoyo_tenants import migrate_master, migrate_tenants, provision_tenant, rollback_tenants
from yoyo_tenants.errors import MigrationFailed
from yoyo_tenants.settings import Settings

from .conftest import Admin, applied_ids, columns, query, write_migration

ORGS = ["org_locked1", "org_free1"]
INDEX_NAMES = (  # a non-transactional migration: id, apply, rollback
    "20300101000000_index_names",
    "-- transactional: false\n"
    "CREATE INDEX CONCURRENTLY org_users_name_idx ON org_users (full_name);\n",
    "-- transactional: false\nDROP INDEX CONCURRENTLY org_users_name_idx;\n",
)


@pytest.fixture
def tenants(project):
    migrate_master(project)
    return [provision_tenant(project, org).tenant for org in ORGS]


def test_blocked_alter_times_out_retries_and_fails_only_that_tenant(project, database, tenants):
    locked, free = tenants
    write_migration(
        project.tenant_dir,
        "20300101000000_add_nickname",
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;",
        "ALTER TABLE org_users DROP COLUMN nickname;",
    )
    app = psycopg2.connect(**database)  # a long-running app transaction holding a read lock
    app.cursor().execute(f"SELECT count(*) FROM {locked.schema}.org_users")
    reader_waits = []

    def reader():  # app traffic that arrives while the ALTER is queued
        with Admin(database) as admin:
            admin.execute("SET statement_timeout = '5s'")
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                started = time.monotonic()
                admin.execute(f"SELECT count(*) FROM {locked.schema}.org_users")
                reader_waits.append(time.monotonic() - started)
                time.sleep(0.02)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        run = migrate_tenants(
            project, jobs=2, lock_timeout=0.3, retries=1, retry_pause=0.1, lock_wait=5
        )
    finally:
        thread.join()
        app.close()

    by_org = {r.org_id: r for r in run.schemas}
    assert by_org[free.org_id].outcome == "done"
    assert "nickname" in columns(database, free.schema, "org_users")
    failed = by_org[locked.org_id]
    assert failed.outcome == "failed"
    assert failed.failure.migration == "20300101000000_add_nickname"
    assert "lock timeout" in str(failed.failure) and "after 1 retries" in str(failed.failure)
    assert failed.retries == 1
    assert "nickname" not in columns(database, locked.schema, "org_users")
    assert "20300101000000_add_nickname" not in applied_ids(database, locked.schema)
    assert not run.ok
    # The app's reads queued behind the ALTER at most for about one lock_timeout.
    assert max(reader_waits) < 0.3 + 0.4


def test_statement_timeout_stops_a_slow_migration(project, database, tenants):
    write_migration(project.tenant_dir, "20300101000000_slow", "SELECT pg_sleep(3);", "")
    started = time.monotonic()
    run = migrate_tenants(project, tenant=ORGS[0], statement_timeout=0.2)
    assert time.monotonic() - started < 2.5
    [result] = [r for r in run.schemas if r.org_id == ORGS[0]]
    assert result.outcome == "failed"
    assert "statement timeout" in str(result.failure)
    assert "20300101000000_slow" not in applied_ids(database, tenants[0].schema)


def test_a_migration_another_session_cancels_is_not_called_a_timeout(project, database, tenants):
    # PostgreSQL says why a statement was canceled (its timeout, or a user's request): one
    # SQLSTATE for both, so the tool adds nothing of its own that could be wrong.
    write_migration(project.tenant_dir, "20300101000000_slow", "SELECT pg_sleep(3);", "")

    def cancel() -> None:
        for _ in range(100):
            time.sleep(0.05)
            found = query(
                database,
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE '%%pg_sleep(3)%%' AND pid <> pg_backend_pid()",
            )
            if found:
                return

    canceller = threading.Thread(target=cancel)
    canceller.start()
    run = migrate_tenants(project, tenant=ORGS[0])
    canceller.join()

    [result] = [r for r in run.schemas if r.org_id == ORGS[0]]
    assert result.outcome == "failed"
    assert "canceling statement due to user request" in str(result.failure)
    assert "timeout" not in str(result.failure)
    assert "20300101000000_slow" not in applied_ids(database, tenants[0].schema)


def test_timeouts_come_from_the_environment(tmp_path):
    settings = Settings.load(
        tmp_path,
        environ={"YOYO_TENANTS_LOCK_TIMEOUT": "1.5", "YOYO_TENANTS_STATEMENT_TIMEOUT": "60"},
    )
    assert (settings.lock_timeout, settings.statement_timeout) == (1.5, 60.0)


def test_non_transactional_tenant_migration_builds_index_concurrently(project, database, tenants):
    write_migration(
        project.tenant_dir,
        *INDEX_NAMES,
    )
    write_migration(
        project.tenant_dir,
        "20300101000100_add_bio",
        "ALTER TABLE org_users ADD COLUMN bio TEXT;",
        "ALTER TABLE org_users DROP COLUMN bio;",
    )
    run = migrate_tenants(project, jobs=2)
    assert run.ok, run.failed
    for tenant in tenants:
        assert _index_exists(database, tenant.schema, "org_users_name_idx")
        assert "bio" in columns(database, tenant.schema, "org_users")
        assert applied_ids(database, tenant.schema)[-2:] == [
            "20300101000000_index_names",
            "20300101000100_add_bio",
        ]
    # Nothing landed in public, and the session's search_path was given back.
    assert not _index_exists(database, "public", "org_users_name_idx")

    run = rollback_tenants(project, steps=2)
    assert run.ok, run.failed
    for tenant in tenants:
        assert not _index_exists(database, tenant.schema, "org_users_name_idx")
        assert "bio" not in columns(database, tenant.schema, "org_users")


def test_non_transactional_master_migration(project, database):
    write_migration(
        project.master_dir,
        "20300101000000_index_focus_names",
        "-- transactional: false\n"
        "CREATE INDEX CONCURRENTLY focus_areas_name_idx ON focus_areas (name);\n",
        "-- transactional: false\nDROP INDEX CONCURRENTLY focus_areas_name_idx;\n",
    )
    run = migrate_master(project)
    assert run.ok, run.failed
    assert _index_exists(database, "public", "focus_areas_name_idx")
    assert applied_ids(database, "public")[-1] == "20300101000000_index_focus_names"


def _index_exists(params, schema, name):
    rows = query(
        params,
        "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
        (schema, name),
    )
    return bool(rows)


def test_provisioning_applies_non_transactional_migrations_after_its_transaction(project, database):
    migrate_master(project)
    write_migration(
        project.tenant_dir,
        *INDEX_NAMES,
    )
    done = provision_tenant(project, "org_nontx1")
    assert done.migrations[-1] == "20300101000000_index_names"
    assert _index_exists(database, done.tenant.schema, "org_users_name_idx")


def test_provisioning_that_fails_in_a_non_transactional_migration_leaves_no_tenant(
    project, database
):
    migrate_master(project)
    write_migration(
        project.tenant_dir,
        "20300101000000_bad_index",
        "-- transactional: false\nCREATE INDEX CONCURRENTLY bad_idx ON org_users (no_such);\n",
        "",
    )
    with pytest.raises(MigrationFailed, match="20300101000000_bad_index"):
        provision_tenant(project, "org_nontx2")
    assert not query(database, "SELECT 1 FROM public.tenants")
    assert not query(database, "SELECT 1 FROM pg_namespace WHERE nspname LIKE 'tid%%'")


def test_a_run_over_a_non_transactional_migration_is_one_batch(project, database, tenants):
    # Three transactions per tenant (before, the migration alone, after): one deploy, so one
    # batch, which a rollback takes back whole.
    write_migration(project.tenant_dir, "20290101000000_add_bio",
                    "ALTER TABLE org_users ADD COLUMN bio TEXT;",
                    "ALTER TABLE org_users DROP COLUMN bio;")  # fmt: skip
    write_migration(project.tenant_dir, *INDEX_NAMES)
    write_migration(project.tenant_dir, "20300101000100_add_nickname",
                    "ALTER TABLE org_users ADD COLUMN nickname TEXT;",
                    "ALTER TABLE org_users DROP COLUMN nickname;")  # fmt: skip

    run = migrate_tenants(project, jobs=2)

    assert run.ok, run.failed
    for tenant in tenants:
        batches = query(database, f"SELECT batch FROM {tenant.schema}._yoyo_log "
                        "WHERE operation = 'apply' ORDER BY id")  # fmt: skip
        assert batches == [(1,)] * 3 + [(2,)] * 3, batches


def test_a_non_transactional_migration_left_inside_a_transaction_block_fails_and_is_not_logged(
    project, database, tenants
):
    # Its BEGIN is its own to send; a block it never ends would roll back what it did, and the
    # migration must not then be logged as applied.
    write_migration(
        project.tenant_dir,
        "20300101000000_open_block",
        "-- transactional: false\nBEGIN;\nCREATE TABLE left_open (i int);\n",
    )

    run = migrate_tenants(project, jobs=1)

    for tenant, result in zip(tenants, run.schemas, strict=True):
        assert result.failure.migration == "20300101000000_open_block"
        assert "ended inside a transaction block" in str(result.failure)
        assert "20300101000000_open_block" not in applied_ids(database, tenant.schema)
        made = query(database, "SELECT to_regclass(%s)", (f"{tenant.schema}.left_open",))
        assert made == [(None,)]
