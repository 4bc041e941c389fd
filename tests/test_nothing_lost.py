"""Nothing lost: one broken tenant never stops the rest, a run always reports what became of
every tenant (whatever happens to the server or the network), privileges are explained, and an
interrupted CREATE INDEX CONCURRENTLY is named and repaired."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
from psycopg2 import sql

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_master,
    rollback_tenants,
    schema_for,
    status,
    verify,
)
from yoyo_tenants.errors import NotReady
from yoyo_tenants.report import run_json
from yoyo_tenants.results import Outcome
from yoyo_tenants.settings import Settings

from .conftest import (
    TENANT_IDS,
    Admin,
    applied_ids,
    copy_migrations,
    query,
    tables,
    write_migration,
)
from .servers import CuttingProxy, pg_ctl, postgres

ADD = "20300101000000_add_nickname"
#: Slow enough that a run over a few tenants is still going when the test strikes.
SLOW_ADD = "SELECT pg_sleep(0.15);\nALTER TABLE org_users ADD COLUMN nickname TEXT;\n"


def register(settings, count: int, prefix: str = "org_lost") -> list:
    """`count` orgs provisioned the fast way: registered, their schemas made, then migrated."""
    orgs = [f"{prefix}{i:03d}" for i in range(count)]
    with Admin(settings.connection) as admin:
        admin.execute(
            "INSERT INTO public.tenants (clerk_org_id, schema_name) "
            "SELECT * FROM unnest(%s::text[], %s::text[])",
            (orgs, [schema_for(o) for o in orgs]),
        )
        admin.execute("".join(f"CREATE SCHEMA {schema_for(o)};" for o in orgs))
    assert migrate_tenants(settings, jobs=2).ok
    return [schema_for(o) for o in orgs]


def applied_once(params, schema: str) -> bool:
    """Whether ADD is applied in `schema`, checked to be applied at most once."""
    rows = query(params, sql.SQL(
        "SELECT count(*) FROM {} WHERE migration_id = %s AND operation = 'apply'"
    ).format(sql.Identifier(schema, "_yoyo_log")), (ADD,))  # fmt: skip
    assert rows[0][0] <= 1
    return ADD in applied_ids(params, schema)


# -- one tenant's problem is that tenant's --------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "said", "state"),
    [
        ("ALTER TABLE {log} DROP COLUMN operation", "is damaged: its column operation is missing",
         "log damaged"),
        ("REVOKE ALL ON {log} FROM lost_app", "cannot be read", "log unreadable"),
    ],
    ids=["column-dropped", "permission-denied"],
)  # fmt: skip
def test_a_tenant_whose_log_cannot_be_read_is_named_and_the_others_go_on(
    project, database, damage, said, state
):
    migrate_master(project)
    schemas = register(project, 20)
    # Run as a role that is not the superuser the tests connect as, so privileges count: it
    # owns the tenants' tables and may write public's.
    query(database, "DO $$ BEGIN CREATE ROLE lost_app LOGIN; EXCEPTION WHEN duplicate_object "
          "THEN NULL; END $$")  # fmt: skip
    everywhere = ", ".join(["public", *schemas])
    query(database, f"GRANT ALL ON SCHEMA {everywhere} TO lost_app")
    query(database, f"GRANT ALL ON ALL TABLES IN SCHEMA {everywhere} TO lost_app")
    for schema in schemas:
        query(database, f"ALTER TABLE {schema}.org_users OWNER TO lost_app")
    app = Settings(project.root, {**database, "user": "lost_app"}, project.master_dir,
                   project.tenant_dir)  # fmt: skip
    damaged = schemas[7]
    query(database, sql.SQL(damage).format(log=sql.Identifier(damaged, "_yoyo_log")))
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")

    run = migrate_tenants(app, jobs=2)

    by_schema = {r.schema: r for r in run.schemas}
    assert by_schema[damaged].outcome == Outcome.FAILED
    assert f"the log of {damaged} {said}" in str(by_schema[damaged].failure)
    assert all(by_schema[s].outcome == Outcome.DONE for s in schemas if s != damaged)
    report = {t.schema: t for t in status(app).tenants}
    assert report[damaged].state == state
    assert all(report[s].state == "at head" for s in schemas if s != damaged)
    problems = verify(app)
    assert len([p for p in problems if damaged in p]) == 1, problems
    assert not [p for p in problems if damaged not in p], problems


def test_a_tenant_whose_schema_may_not_be_used_is_named_though_the_index_describes_it(
    project, database
):
    """The index row of its log is sound (the table, its columns, its grants), but the schema
    holding it may not be used: reading the log fails, and only that tenant is marked."""
    migrate_master(project)
    schemas = register(project, 3)
    damaged = schemas[1]
    # A log of its own (a group of one in the index), so that it is the log read for its group.
    assert rollback_tenants(project, tenant="org_lost001", steps=1, yes=True).ok
    query(database, "DO $$ BEGIN CREATE ROLE lost_app LOGIN; EXCEPTION WHEN duplicate_object "
          "THEN NULL; END $$")  # fmt: skip
    everywhere = ", ".join(["public", *schemas])
    query(database, f"GRANT ALL ON SCHEMA {everywhere} TO lost_app")
    query(database, f"GRANT ALL ON ALL TABLES IN SCHEMA {everywhere} TO lost_app")
    query(database, f"REVOKE ALL ON SCHEMA {damaged} FROM lost_app")
    app = Settings(project.root, {**database, "user": "lost_app"}, project.master_dir,
                   project.tenant_dir)  # fmt: skip
    write_migration(project.tenant_dir, ADD, "CREATE TABLE org_notes (body TEXT);")

    run = migrate_tenants(app, jobs=2)

    by_schema = {r.schema: r for r in run.schemas}
    assert by_schema[damaged].outcome == Outcome.FAILED
    assert f"the log of {damaged} cannot be read" in str(by_schema[damaged].failure)
    assert all(by_schema[s].migrations == [ADD] for s in schemas if s != damaged)
    assert applied_ids(database, damaged) == TENANT_IDS[:2]


# -- a run always reports -----------------------------------------------------------------------


@contextmanager
def own_server(tmp_path):
    """A project on a server of its own, which a test may stop, start, or reach by a proxy."""
    # Commits written before they are acknowledged: a stop -m immediate loses none of them.
    with postgres(settings={"synchronous_commit": True}) as server:
        params = {"host": "127.0.0.1", "port": str(server.port), "user": "postgres",
                  "dbname": "postgres", "sslmode": "disable"}  # fmt: skip
        copy_migrations(tmp_path)
        settings = Settings(
            root=tmp_path,
            connection={**params, "application_name": "yoyo-tenants", "connect_timeout": "3"},
            master_dir=tmp_path / "migrations" / "master",
            tenant_dir=tmp_path / "migrations" / "tenant",
        )
        migrate_master(settings)
        yield server, settings


def test_a_server_stopped_mid_run_still_gets_a_summary_and_a_rerun_converges(tmp_path):
    with own_server(tmp_path) as (server, settings):
        schemas = register(settings, 12)
        write_migration(settings.tenant_dir, ADD, SLOW_ADD)
        stopper = threading.Timer(0.5, pg_ctl, (server, "-m", "immediate", "stop"))
        stopper.start()

        run = migrate_tenants(settings, jobs=2)
        stopper.join()

        outcomes = {r.schema: r.outcome for r in run.schemas}
        assert len(outcomes) == len(schemas) and not run.ok
        assert Outcome.DONE in outcomes.values()  # some committed before the server went
        lost = [r for r in run.schemas if r.outcome != Outcome.DONE]
        assert lost and all(r.failure or r.outcome == Outcome.NOT_STARTED for r in lost)
        assert not [r for r in lost if "cursor already closed" in str(r.failure)]
        assert any("shut down" in str(r.failure) or "lost" in str(r.failure) for r in lost)
        data = run_json(run)  # what --json writes: every tenant, with its real state
        assert {s["status"] for s in data["schemas"]} <= {o.value for o in Outcome}
        assert len(data["schemas"]) == len(schemas)

        assert pg_ctl(server, "start").returncode == 0
        params = dict(settings.connection)
        for result in run.schemas:  # done means done; failed means nothing of it stayed
            if result.outcome == Outcome.DONE:
                assert applied_once(params, result.schema)
            elif result.outcome != Outcome.UNKNOWN:
                assert not applied_once(params, result.schema)
        again = migrate_tenants(settings, jobs=2)
        assert again.ok
        assert all(applied_once(params, s) for s in schemas)


def test_connections_cut_mid_run_are_named_settled_from_the_logs_and_the_run_goes_on(tmp_path):
    with own_server(tmp_path) as (server, settings):
        schemas = register(settings, 12)
        proxy = CuttingProxy(("127.0.0.1", server.port))
        through = Settings(
            settings.root,
            {**settings.connection, "port": str(proxy.port)},
            settings.master_dir,
            settings.tenant_dir,
        )
        write_migration(settings.tenant_dir, ADD, SLOW_ADD)
        finished = []

        def cut_after_three(result) -> None:
            finished.append(result)
            if len(finished) == 3:
                proxy.cut()

        try:
            run = migrate_tenants(through, jobs=3, on_result=cut_after_three)
        finally:
            proxy.close()

        params = dict(settings.connection)
        cut = [r for r in run.schemas if r.failure]
        assert cut, "the cut broke no connection mid-tenant"
        for result in cut:
            assert "connection was lost" in str(result.failure), result.failure
            assert "cursor already closed" not in str(result.failure)
        assert all(r.outcome != Outcome.UNKNOWN for r in run.schemas)  # settled from the logs
        for result in run.schemas:
            assert applied_once(params, result.schema) == (result.outcome == Outcome.DONE)
        assert migrate_tenants(settings, jobs=2).ok
        assert all(applied_once(params, s) for s in schemas)


# -- least privilege, explained --------------------------------------------------------------------


@pytest.fixture
def app_user(project, database):
    """The project as a login role that owns nothing and may not create in public."""
    query(database, "DO $$ BEGIN CREATE ROLE lp_app LOGIN; EXCEPTION WHEN duplicate_object "
          "THEN NULL; END $$")  # fmt: skip
    query(database, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    query(database, "GRANT USAGE ON SCHEMA public TO lp_app")
    return Settings(project.root, {**database, "user": "lp_app"}, project.master_dir,
                    project.tenant_dir)  # fmt: skip


def test_migrate_master_at_head_needs_no_create_privilege(project, database, app_user):
    migrate_master(project)  # as the superuser
    query(database, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO lp_app")

    run = migrate_master(app_user)

    assert run.ok and run.schemas[0].migrations == []


def test_a_missing_privilege_names_the_grant_that_fixes_it(project, database, app_user):
    migrate_master(project)
    query(database, "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO lp_app")
    write_migration(project.master_dir, "20300101000000_regions",
                    "CREATE TABLE public.regions (code text);")  # fmt: skip

    run = migrate_master(app_user)

    failure = str(run.schemas[0].failure)
    assert "permission denied for schema public" in failure
    assert "lp_app lacks a privilege migration 20300101000000_regions needs" in failure
    assert "GRANT USAGE, CREATE ON SCHEMA public TO lp_app" in failure


def test_rollback_master_will_not_drop_the_registry_of_registered_tenants(project, database):
    migrate_master(project)
    provision_tenant(project, "org_registered1")

    run = rollback_master(project)

    assert not run.ok
    assert "would drop public.tenants, the registry of 1 tenants" in str(run.schemas[0].failure)
    assert "--yes" in str(run.schemas[0].failure)
    assert query(database, "SELECT count(*) FROM public.tenants") == [(1,)]
    assert rollback_master(project, dry_run=True).schemas[0].failure  # the dry run says so too


def test_a_user_who_may_not_create_the_heads_index_migrates_without_it(project, database, app_user):
    migrate_master(project)  # as the superuser, who makes the index
    query(database, "DROP TABLE public.yoyo_tenants_heads")
    query(database, sql.SQL("GRANT CREATE ON DATABASE {} TO lp_app").format(
        sql.Identifier(database["dbname"])))  # fmt: skip
    query(database, "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO lp_app; "
          "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO lp_app")  # fmt: skip

    done = provision_tenant(app_user, "org_plain1")
    write_migration(project.tenant_dir, ADD, "CREATE TABLE org_notes (body TEXT);")
    run = migrate_tenants(app_user)

    assert done.created and done.migrations == TENANT_IDS
    assert run.ok and run.schemas[0].migrations == [ADD]
    assert applied_ids(database, done.tenant.schema) == [*TENANT_IDS, ADD]
    assert query(database, "SELECT to_regclass('public.yoyo_tenants_heads')") == [(None,)]


def test_a_tenant_at_head_whose_schema_may_not_be_used_is_not_reported_at_head(
    project, database, app_user
):
    """Its index row is sound, but this user could not read (or migrate) the log it names."""
    migrate_master(project)
    schemas = [provision_tenant(project, f"org_usage{i}").tenant.schema for i in range(2)]
    everywhere = ", ".join(schemas)
    query(database, f"GRANT ALL ON SCHEMA {everywhere} TO lp_app; "
          f"GRANT ALL ON ALL TABLES IN SCHEMA {everywhere}, public TO lp_app; "
          f"REVOKE USAGE ON SCHEMA {schemas[1]} FROM lp_app")  # fmt: skip

    states = {t.schema: t.state for t in status(app_user).tenants}

    assert states == {schemas[0]: "at head", schemas[1]: "log unreadable"}


def test_a_user_who_may_read_the_heads_index_but_not_keep_it_is_told_the_grant(
    project, database, app_user
):
    migrate_master(project)
    schema = provision_tenant(project, "org_kept1").tenant.schema
    query(database, f"GRANT ALL ON SCHEMA {schema} TO lp_app; "
          f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO lp_app; "
          "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO lp_app; "
          "REVOKE INSERT, UPDATE ON public.yoyo_tenants_heads FROM lp_app")  # fmt: skip
    write_migration(project.tenant_dir, ADD, "CREATE TABLE org_notes (body TEXT);")

    with pytest.raises(NotReady, match="GRANT INSERT, UPDATE ON public.yoyo_tenants_heads"):
        migrate_tenants(app_user)

    assert "org_notes" not in tables(database, schema)
    assert applied_ids(database, schema) == TENANT_IDS


def test_a_rollback_dropping_the_registry_by_its_bare_name_is_refused_too(project, database):
    migrate_master(project)
    provision_tenant(project, "org_registered1")
    write_migration(project.master_dir, "20300101000000_regions",
                    "CREATE TABLE public.regions (code text);",
                    "DROP TABLE regions;\nDROP TABLE tenants;")  # fmt: skip
    assert migrate_master(project).ok

    run = rollback_master(project)

    assert not run.ok
    assert "would drop public.tenants, the registry of 1 tenants" in str(run.schemas[0].failure)
    assert query(database, "SELECT count(*) FROM public.tenants") == [(1,)]
    assert query(database, "SELECT to_regclass('public.regions') IS NOT NULL") == [(True,)]


# -- an interrupted CREATE INDEX CONCURRENTLY ---------------------------------------------------


def test_an_invalid_index_left_behind_is_named_and_repaired_on_request(project, database):
    migrate_master(project)
    tenant = provision_tenant(project, "org_index1").tenant
    query(database, f"INSERT INTO {tenant.schema}.org_settings (key, value) VALUES "
          "('a.b', '1'), ('c.d', '1')")  # fmt: skip
    write_migration(
        project.tenant_dir,
        "20300101000000_unique_values",
        "-- transactional: false\n"
        "CREATE UNIQUE INDEX CONCURRENTLY org_settings_value_idx ON org_settings ((value::text));",
        "-- transactional: false\nDROP INDEX CONCURRENTLY org_settings_value_idx;",
    )
    first = migrate_tenants(project)  # fails on the duplicates, leaving an invalid index
    assert "could not create unique index" in str(first.schemas[0].failure)

    second = migrate_tenants(project)

    failure = str(second.schemas[0].failure)
    assert f"index {tenant.schema}.org_settings_value_idx is invalid" in failure
    assert "DROP INDEX CONCURRENTLY" in failure and "--repair-invalid-indexes" in failure

    query(database, f"UPDATE {tenant.schema}.org_settings SET value = '2' WHERE key = 'c.d'")
    third = migrate_tenants(project, repair_invalid_indexes=True)

    assert third.ok and third.schemas[0].migrations == ["20300101000000_unique_values"]
    valid = query(database, "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass",
                  (f"{tenant.schema}.org_settings_value_idx",))  # fmt: skip
    assert valid == [(True,)]
    assert applied_ids(database, tenant.schema) == [*TENANT_IDS, "20300101000000_unique_values"]
    time.sleep(0)  # (the index was built by the migration itself, not left over)


def test_an_invalid_index_in_another_tenant_is_that_tenants_alone(project, database):
    migrate_master(project)
    broken, fine = [provision_tenant(project, org).tenant for org in ("org_index1", "org_index2")]
    query(database, f"INSERT INTO {broken.schema}.org_settings (key, value) VALUES "
          "('a.b', '1'), ('c.d', '1')")  # fmt: skip
    write_migration(
        project.tenant_dir,
        "20300101000000_unique_values",
        "-- transactional: false\n"
        "CREATE UNIQUE INDEX CONCURRENTLY org_settings_value_idx ON org_settings ((value::text));",
    )
    first = {r.schema: r for r in migrate_tenants(project, jobs=1).schemas}
    assert "could not create unique index" in str(first[broken.schema].failure)
    assert first[fine.schema].outcome == Outcome.DONE
    write_migration(
        project.tenant_dir,
        "20300101000100_key_index",
        "-- transactional: false\n"
        "CREATE INDEX CONCURRENTLY org_settings_key_idx ON org_settings (key);",
    )

    second = {r.schema: r for r in migrate_tenants(project, jobs=1).schemas}

    assert f"index {broken.schema}.org_settings_value_idx is invalid" in str(
        second[broken.schema].failure
    )
    assert second[fine.schema].migrations == ["20300101000100_key_index"]
    assert applied_ids(database, fine.schema)[-1] == "20300101000100_key_index"
    invalid = query(database, "SELECT indexrelid::regclass::text FROM pg_index "
                    "WHERE NOT indisvalid")  # fmt: skip
    assert invalid == [(f"{broken.schema}.org_settings_value_idx",)]  # left for its own tenant
