"""Migration histories as real projects write them: an enum value added, then used; temp tables
and COPY data; statements that need their own transaction, or none; extensions; and the truth
about rollbacks that stop half-way."""

from __future__ import annotations

import itertools
import json
import shutil
import threading

import psycopg2
import pytest
from psycopg2 import errors, sql

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_tenants,
    schema_for,
    status,
)
from yoyo_tenants.errors import MigrationFailed, UnsafeMigration
from yoyo_tenants.registry import Tenant
from yoyo_tenants.settings import Settings

from .conftest import (
    REPO,
    TENANT_IDS,
    applied_ids,
    query,
    run_invoke,
    tables,
    user_env,
    write_migration,
)

ORG = "org_real1"


def register(settings: Settings, orgs: list[str]) -> list[Tenant]:
    """Registered orgs with empty schemas, as a tenant run finds them (never migrated)."""
    tenants = [Tenant(org, schema_for(org)) for org in orgs]
    for t in tenants:
        query(
            settings.connection,
            "INSERT INTO public.tenants (clerk_org_id, schema_name) VALUES (%s, %s)",
            (t.org_id, t.schema),
        )
        query(settings.connection, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(t.schema)))
    return tenants


def invoke(settings: Settings, *args: str):
    """The command line, as a user in the project's folder runs it."""
    shutil.copy(REPO / "tasks.py", settings.root)
    return run_invoke(settings.root, *args, env=user_env(settings.connection))


def log_ops(settings: Settings, schema: str) -> list[tuple[int, str, str]]:
    return query(
        settings.connection,
        sql.SQL("SELECT id, migration_id, operation FROM {} ORDER BY id").format(
            sql.Identifier(schema, "_yoyo_log")
        ),
    )


# -- an enum value added, then used ---------------------------------------------------------------

ENUM_HISTORY = {
    "20300101000000_create_posts": (
        "CREATE TYPE visibility AS ENUM ('public', 'team');\n"
        "CREATE TABLE posts (id serial PRIMARY KEY, seen visibility NOT NULL DEFAULT 'team');",
        "DROP TABLE posts;\nDROP TYPE visibility;",
    ),
    "20300101000100_add_private": (
        "ALTER TYPE visibility ADD VALUE 'private';",
        "-- an enum value cannot be dropped: the next down file rebuilds the type\nSELECT 1;",
    ),
    "20300101000200_private_by_default": (
        "ALTER TABLE posts ALTER COLUMN seen SET DEFAULT 'private';\n"
        "INSERT INTO posts (seen) VALUES ('private');",
        "DELETE FROM posts WHERE seen = 'private';\n"
        "ALTER TABLE posts ALTER COLUMN seen SET DEFAULT 'team';",
    ),
    "20300101000300_add_secret": (
        "ALTER TYPE visibility ADD VALUE IF NOT EXISTS 'secret' AFTER 'private';",
        "SELECT 1;",
    ),
    "20300101000400_use_secret": (
        "INSERT INTO posts (seen) VALUES ('secret');",
        "DELETE FROM posts WHERE seen = 'secret';",
    ),
}


def write_history(settings: Settings, history: dict[str, tuple[str, str]]) -> None:
    for migration_id, (up, down) in history.items():
        write_migration(settings.tenant_dir, migration_id, up, down)


@pytest.fixture
def enums(project) -> Settings:
    assert migrate_master(project).ok
    write_history(project, ENUM_HISTORY)
    return project


def test_a_history_that_adds_enum_values_and_uses_them_provisions_in_one_command(enums):
    done = provision_tenant(enums, ORG)

    schema = schema_for(ORG)
    assert done.created and done.migrations == [*TENANT_IDS, *ENUM_HISTORY]
    assert applied_ids(enums.connection, schema) == [*TENANT_IDS, *ENUM_HISTORY]
    rows = query(
        enums.connection,
        sql.SQL("SELECT seen::text FROM {} ORDER BY id").format(sql.Identifier(schema, "posts")),
    )
    assert rows == [("private",), ("secret",)]
    [(values,)] = query(
        enums.connection,
        sql.SQL("SELECT enum_range(NULL::{})::text").format(sql.Identifier(schema, "visibility")),
    )
    assert values == "{public,team,private,secret}"
    assert status(enums).tenants[0].state == "at head"  # the heads index agrees with the log


def test_the_same_history_migrates_from_empty_in_one_run(enums):
    tenants = register(enums, [f"org_empty{i}" for i in range(4)])

    run = migrate_tenants(enums, jobs=2)

    assert run.ok, [str(r.failure) for r in run.schemas]
    for t in tenants:
        assert applied_ids(enums.connection, t.schema) == [*TENANT_IDS, *ENUM_HISTORY]
    assert {r.outcome for r in run.schemas} == {"done"}
    assert all(t.state == "at head" for t in status(enums).tenants)


def test_the_schema_commits_after_each_migration_that_adds_an_enum_value(traced):
    """Two commit points, so three transactions: each begins by checking that the log ends where
    the last one left it (a run that got in between is noticed, never undone or repeated)."""
    settings, statements = traced
    assert migrate_master(settings).ok
    write_history(settings, ENUM_HISTORY)
    [tenant] = register(settings, ["org_traced1"])
    statements.mark()

    assert migrate_tenants(settings, jobs=1).ok

    messages = [m for m in statements.messages() if tenant.schema in m and "BEGIN;" in m]
    assert len(messages) == 3
    assert [m.rstrip().endswith("COMMIT") for m in messages] == [True] * 3
    assert "ADD VALUE 'private'" in messages[0] and "'private');" not in messages[0]
    assert "INSERT INTO posts (seen) VALUES ('private')" in messages[1]
    assert "ADD VALUE IF NOT EXISTS 'secret'" in messages[1]
    assert "VALUES ('secret')" in messages[2]
    for message in messages[1:]:  # the log where the transaction before left it
        assert "ERRCODE = 'YT001'" in message


def test_concurrent_runs_over_an_enum_history_apply_each_migration_once(enums):
    tenants = register(enums, [f"org_race{i}" for i in range(6)])
    runs = []

    def run() -> None:
        runs.append(migrate_tenants(enums, jobs=2, lock_wait=60))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(r.ok for r in runs), [str(s.failure) for r in runs for s in r.schemas]
    for t in tenants:
        ops = log_ops(enums, t.schema)
        assert [op for _, _, op in ops] == ["apply"] * len(ops)
        assert [m for _, m, _ in ops] == [*TENANT_IDS, *ENUM_HISTORY]  # once each, in order
        assert [i for i, _, _ in ops] == list(range(1, len(ops) + 1))
    done = [
        m for r in runs for s in r.schemas if s.org_id == tenants[0].org_id for m in s.migrations
    ]
    assert sorted(done) == sorted([*TENANT_IDS, *ENUM_HISTORY])


def test_provisioning_that_fails_after_a_commit_point_leaves_no_tenant(enums):
    write_migration(
        enums.tenant_dir, "20300101000500_broken", "INSERT INTO posts (seen) VALUES ('nope');"
    )

    with pytest.raises(MigrationFailed) as failed:
        provision_tenant(enums, ORG)

    assert "20300101000500_broken" in str(failed.value)
    schema = schema_for(ORG)
    assert query(enums.connection, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)) == []
    assert (
        query(enums.connection, "SELECT 1 FROM public.tenants WHERE clerk_org_id = %s", (ORG,))
        == []
    )
    assert (
        query(
            enums.connection,
            "SELECT 1 FROM public.yoyo_tenants_heads WHERE schema_name = %s",
            (schema,),
        )
        == []
    )


def test_a_python_migration_that_adds_an_enum_value_commits_too(enums):
    for path in enums.tenant_dir.glob("20300101000[1-4]*"):
        path.unlink()
    (enums.tenant_dir / "20300101000100_add_private.py").write_text(
        "from yoyo import step\n\n"
        "steps = [step(lambda conn: conn.cursor().execute(\n"
        "    'ALTER TYPE visibility ADD VALUE %s', ('private',)))]\n"
    )
    write_migration(
        enums.tenant_dir,
        "20300101000200_use_private",
        "INSERT INTO posts (seen) VALUES ('private');",
    )

    done = provision_tenant(enums, ORG)

    assert done.migrations[-2:] == ["20300101000100_add_private", "20300101000200_use_private"]


# -- one clean session per schema -----------------------------------------------------------------

#: What a migration finds on its connection when it starts, then what it leaves there.
SESSION_STATE = """
CREATE TABLE seen AS SELECT
    pg_backend_pid() AS pid,
    to_regclass('pg_temp.stage') IS NOT NULL AS stage,
    (SELECT count(*) FROM pg_prepared_statements) AS prepared,
    (SELECT count(*) FROM pg_listening_channels()) AS listening,
    (SELECT count(*) FROM pg_cursors) AS cursors,
    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
        AND objid = 4242) AS locks;
CREATE TEMP TABLE stage AS SELECT current_schema()::text AS src;
CREATE TABLE copied AS SELECT * FROM stage;
PREPARE mine AS SELECT 1;
LISTEN tenant_events;
DECLARE kept CURSOR WITH HOLD FOR SELECT 1;
SELECT pg_advisory_lock(4242);
"""
LATER = """
CREATE TABLE later AS SELECT (SELECT count(*) FROM stage) AS staged,
    (SELECT count(*) FROM pg_prepared_statements) AS prepared;
"""


def test_each_schema_starts_from_a_clean_session(project):
    """Over 10 tenants and 2 worker connections, what one tenant's migration leaves on the
    session (a temp table, a prepared statement, LISTEN, a WITH HOLD cursor, a session advisory
    lock) is its own: the next tenant on that connection starts without it, while the same
    tenant's later migration still sees it, after a commit inside that tenant's work too."""
    assert migrate_master(project).ok
    write_migration(
        project.tenant_dir,
        "20300101000000_session_state",
        "CREATE TYPE mood AS ENUM ('calm');\n" + SESSION_STATE,
    )
    # A commit point between the two: the session, not the transaction, keeps what is staged.
    write_migration(project.tenant_dir, "20300101000100_add_mood", "ALTER TYPE mood ADD VALUE 'x';")
    write_migration(project.tenant_dir, "20300101000200_later", LATER)
    tenants = register(project, [f"org_clean{i}" for i in range(10)])

    run = migrate_tenants(project, jobs=2)

    assert run.ok, [str(r.failure) for r in run.schemas]
    pids = []
    for t in tenants:
        [(pid, stage, prepared, listening, cursors, locks)] = query(
            project.connection,
            sql.SQL("SELECT * FROM {}").format(sql.Identifier(t.schema, "seen")),
        )
        assert (stage, prepared, listening, cursors, locks) == (False, 0, 0, 0, 0), t
        assert query(
            project.connection,
            sql.SQL("SELECT src FROM {}").format(sql.Identifier(t.schema, "copied")),
        ) == [(t.schema,)]
        later = query(
            project.connection,
            sql.SQL("SELECT * FROM {}").format(sql.Identifier(t.schema, "later")),
        )
        assert later == [(1, 1)]  # its own temp table and statement, in its next migration
        pids.append(pid)
    assert len(set(pids)) <= 2 < len(pids)  # connections did serve several tenants each


# -- statements that need a transaction of their own, or none ------------------------------------

#: Statements PostgreSQL never runs inside a transaction block, with what they act on.
OUTSIDE_TRANSACTION = {
    "CREATE INDEX CONCURRENTLY": "CREATE INDEX CONCURRENTLY t_a ON t (a);",
    "DROP INDEX CONCURRENTLY": "DROP INDEX CONCURRENTLY t_b;",
    "REINDEX CONCURRENTLY": "REINDEX TABLE CONCURRENTLY t;",
    "REINDEX SCHEMA": "REINDEX SCHEMA s;",
    "VACUUM": "VACUUM t;",
    "CLUSTER without a table": "CLUSTER;",
    "ALTER SYSTEM": "ALTER SYSTEM SET work_mem = '8MB';",
    "CREATE DATABASE": "CREATE DATABASE never_made;",
    "DETACH PARTITION ... CONCURRENTLY": "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY;",
}
SETUP = (
    "CREATE SCHEMA s; CREATE TABLE t (a int, b int); CREATE INDEX t_b ON t (b);"
    "CREATE TABLE p (a int) PARTITION BY RANGE (a);"
    "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10);"
)


@pytest.mark.parametrize("name", OUTSIDE_TRANSACTION)
def test_a_statement_postgresql_runs_only_outside_a_transaction_is_refused_before_the_run(
    project, database, name
):
    statement = OUTSIDE_TRANSACTION[name]
    with psycopg2.connect(**database) as connection, connection.cursor() as cursor:
        cursor.execute(SETUP)  # the server's own verdict, inside a transaction block:
        with pytest.raises(errors.ActiveSqlTransaction):
            cursor.execute(statement)
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(project.tenant_dir, "20300101000000_outside", f"SELECT 1;\n{statement}\n")

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(project)

    assert "20300101000000_outside.sql line 2" in str(refused.value)
    assert name in str(refused.value) and "-- transactional: false" in str(refused.value)
    assert applied_ids(project.connection, schema_for(ORG)) == TENANT_IDS


def test_such_a_statement_runs_in_a_file_marked_non_transactional(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(
        project.tenant_dir,
        "20300101000000_index_email",
        "-- transactional: false\nCREATE INDEX CONCURRENTLY users_email ON org_users (email);\n",
        "-- transactional: false\nDROP INDEX CONCURRENTLY users_email;\n",
    )

    assert migrate_tenants(project).ok
    assert query(
        project.connection,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
        (f"{schema_for(ORG)}.users_email",),
    ) == [(True,)]


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE EXTENSION IF NOT EXISTS pg_trgm;",
        "DROP EXTENSION IF EXISTS pg_trgm;",
        "ALTER EXTENSION vector UPDATE;",
        "ALTER EXTENSION vector SET SCHEMA public;",
    ],
)
def test_an_extension_in_a_tenant_migration_is_refused_and_sent_to_the_master_ones(
    project, statement
):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(project.tenant_dir, "20300101000000_ext", statement)

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(project)

    message = str(refused.value)
    assert "20300101000000_ext.sql line 1" in message
    assert "an extension is the database's, not a tenant's" in message
    assert "migrations/master" in message
    assert query(project.connection, "SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'") == []


def test_an_extension_in_a_master_migration_is_fine(project):
    write_migration(
        project.master_dir,
        "20300101000000_trgm",
        "CREATE EXTENSION pg_trgm;",
        "DROP EXTENSION pg_trgm;",
    )

    assert migrate_master(project).ok
    assert query(project.connection, "SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'") == [
        (1,)
    ]


def test_a_python_tenant_migration_creating_an_extension_is_refused_as_it_runs(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    (project.tenant_dir / "20300101000000_ext.py").write_text(
        "from yoyo import step\n\nsteps = [step('CREATE EXTENSION pg_trgm')]\n"
    )

    run = migrate_tenants(project)

    assert not run.ok and "an extension is the database's" in str(run.schemas[0].failure)
    assert query(project.connection, "SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'") == []
    assert applied_ids(project.connection, schema_for(ORG)) == TENANT_IDS


# -- COPY ... FROM stdin ------------------------------------------------------------------------

SEED = (
    "CREATE TABLE plans (id int PRIMARY KEY, name text, note text);\n"
    "COPY plans (id, name, note) FROM stdin;\n"
    "1\tfree\t\\N\n"
    "2\tteam\ttab\\there\n"
    "3\tÉquipe; SELECT 1\tback\\\\slash\n"
    "\\.\n"
    "CREATE INDEX plans_name ON plans (name);\n"
)
SEED_ROWS = [(1, "free", None), (2, "team", "tab\there"), (3, "Équipe; SELECT 1", "back\\slash")]


def plans(settings: Settings, schema: str) -> list[tuple]:
    return query(
        settings.connection,
        sql.SQL("SELECT id, name, note FROM {} ORDER BY id").format(
            sql.Identifier(schema, "plans")
        ),
    )


@pytest.mark.parametrize("citus", ["off", "on"])  # one message per tenant, or a statement each
def test_copy_from_stdin_loads_its_data_as_psql_would(project, citus):
    settings = Settings(**{**project.__dict__, "citus": citus})
    assert migrate_master(settings).ok
    provision_tenant(settings, ORG)
    write_migration(settings.tenant_dir, "20300101000000_seed", SEED, "DROP TABLE plans;")
    [other] = register(settings, ["org_real2"])

    run = migrate_tenants(settings, jobs=1)

    assert run.ok, [str(r.failure) for r in run.schemas]
    for schema in (schema_for(ORG), other.schema):
        assert plans(settings, schema) == SEED_ROWS
        assert "plans" in tables(settings.connection, schema)
    assert query(settings.connection, "SELECT 1 FROM pg_class WHERE relname = 'plans_name'") == [
        (1,),
        (1,),
    ]


def test_copy_in_a_non_transactional_migration(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(project.tenant_dir, "20300101000000_seed", "-- transactional: false\n" + SEED)

    assert migrate_tenants(project).ok
    assert plans(project, schema_for(ORG)) == SEED_ROWS


def test_a_failure_after_copy_data_names_its_own_line(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(
        project.tenant_dir, "20300101000000_seed", SEED + "SELECT 1;\nSELECT nope FROM plans;\n"
    )

    run = migrate_tenants(project)

    failure = run.schemas[0].failure
    assert failure.path.endswith("20300101000000_seed.sql") and failure.line == 9
    assert "plans" not in tables(project.connection, schema_for(ORG))  # all of it rolled back


def test_bad_copy_data_names_the_copy_and_keeps_nothing(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(project.tenant_dir, "20300101000000_seed", SEED.replace("2\tteam", "two\tteam"))

    run = migrate_tenants(project)

    failure = run.schemas[0].failure
    assert failure.line == 2 and "invalid input syntax for type integer" in failure.message
    assert "plans" not in tables(project.connection, schema_for(ORG))
    assert applied_ids(project.connection, schema_for(ORG)) == TENANT_IDS


def test_a_python_migration_copies_with_copy_expert(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    (project.tenant_dir / "20300101000000_seed.py").write_text(
        "import io\nfrom yoyo import step\n\n"
        "def seed(conn):\n"
        "    cursor = conn.cursor()\n"
        "    cursor.execute('CREATE TABLE plans (id int PRIMARY KEY, name text, note text)')\n"
        "    cursor.copy_expert('COPY plans FROM stdin', io.StringIO('1\\tfree\\t\\\\N\\n'))\n\n"
        "steps = [step(seed)]\n"
    )

    assert migrate_tenants(project).ok
    assert plans(project, schema_for(ORG)) == [(1, "free", None)]


def test_copy_data_that_does_not_start_on_the_next_line_is_refused(project):
    write_migration(
        project.tenant_dir, "20300101000000_seed", "COPY t FROM stdin; SELECT 1;\n1\n\\.\n"
    )

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(project)

    assert "line 1" in str(refused.value) and "next line" in str(refused.value)


def test_a_dry_run_shows_copy_data_as_psql_reads_it(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(project.tenant_dir, "20300101000000_seed", SEED)

    run = migrate_tenants(project, dry_run=True)

    shown = "\n".join(run.schemas[0].sql)
    assert "COPY plans (id, name, note) FROM stdin;\n1\tfree\t\\N\n" in shown
    assert "\\.\nCREATE INDEX plans_name ON plans (name);" in shown


# -- rollbacks tell the truth ------------------------------------------------------------------


def test_a_rollback_that_stops_half_way_says_what_it_undid(project, tmp_path):
    """Three migrations to undo; the middle one's down file is broken: the newest is undone
    (committed), the failure is named by file and line, and every report says both."""
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(
        project.tenant_dir, "20300101000000_a", "CREATE TABLE a (i int);", "DROP TABLE a;"
    )
    write_migration(
        project.tenant_dir,
        "20300101000100_b",
        "CREATE TABLE b (i int);",
        "SELECT 1;\nSELECT nope FROM b;",
    )
    write_migration(
        project.tenant_dir, "20300101000200_c", "CREATE TABLE c (i int);", "DROP TABLE c;"
    )
    assert migrate_tenants(project).ok
    report = tmp_path / "report.json"

    done = invoke(project, "rollback-tenants", "--json", str(report))

    assert done.returncode == 1
    schema = schema_for(ORG)
    assert applied_ids(project.connection, schema) == [
        *TENANT_IDS,
        "20300101000000_a",
        "20300101000100_b",
    ]
    line = (
        f"failed: {ORG} ({schema}) in 20300101000100_b: migrations/tenant/20300101000100_b"
        '.rollback.sql line 2: column "nope" does not exist (rolled back 1 before it: '
        "20300101000200_c)"
    )
    assert line in done.stdout.splitlines()
    summary = done.stdout.splitlines()[-1]
    assert summary.startswith("tenants: 0 rolled back, 0 unchanged, 1 failed in ")
    assert summary.endswith("; 1 failed schema rolled back 1 migration before failing")
    entry = json.loads(report.read_text())["schemas"][0]
    assert entry["partial"] is True and entry["migrations"] == ["20300101000200_c"]
    assert entry["failed_migration"] == "20300101000100_b" and entry["line"] == 2


def test_a_refusal_stays_one_line_however_many_migrations_it_names(project):
    assert migrate_master(project).ok
    for i in range(40):
        write_migration(
            project.tenant_dir,
            f"2030010100{i:04d}_m",
            f"CREATE TABLE m{i} (i int);",
            f"DROP TABLE m{i};",
        )
    provision_tenant(project, ORG)

    run = rollback_tenants(project, steps=100)

    message = str(run.schemas[0].failure)
    assert "would undo its base tables" in message and "and 40 more" in message
    assert len(message) < 300 and "\n" not in message


def test_a_plain_rollback_with_only_provisioning_left_says_so_and_exits_0(project):
    assert migrate_master(project).ok
    provision_tenant(project, ORG)

    done = invoke(project, "rollback-tenants")

    assert done.returncode == 0, done.stderr
    assert "tenants: nothing to roll back" in done.stdout.splitlines()
    assert applied_ids(project.connection, schema_for(ORG)) == TENANT_IDS


def test_copy_to_stdout_is_refused_before_the_run(project):
    write_migration(project.tenant_dir, "20300101000000_dump", "COPY org_users TO stdout;")

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(project)

    assert "20300101000000_dump.sql line 1: COPY ... TO stdout" in str(refused.value)


def test_a_database_whose_dates_are_not_iso_is_read_right_after_every_reset(project, database):
    """psycopg2 reads dates as ISO, and asks for it at connect; the session's clean-up between
    schemas (and a migration's own SET DateStyle) must not leave the log unreadable."""
    query(
        database,
        sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(
            sql.Identifier(database["dbname"])
        ),
    )
    assert migrate_master(project).ok
    write_migration(project.tenant_dir, "20300101000000_dates", "SET DateStyle = 'German';")
    # Its log row is written after a read of the log, in a transaction of its own.
    write_migration(
        project.tenant_dir, "20300101000100_alone", "-- transactional: false\nSELECT 1;"
    )
    tenants = register(project, [f"org_dates{i}" for i in range(3)])

    run = migrate_tenants(project, jobs=1)

    assert run.ok, [str(r.failure) for r in run.schemas]
    for t in tenants:
        assert applied_ids(project.connection, t.schema)[-1] == "20300101000100_alone"


# -- a Python migration's own bug ------------------------------------------------------------------

BUGGY = (
    "from yoyo import step\n\n"
    "def bug(conn):\n"
    "    conn.cursor().execute('CREATE TABLE half_done (i int)')\n"
    "    raise ValueError('the migration has a bug')\n\n"
    "steps = [step(bug)]\n"
)


@pytest.mark.parametrize("transactional", [True, False])
def test_a_python_migration_that_raises_fails_its_tenant_alone(project, transactional):
    assert migrate_master(project).ok
    tenants = register(project, ["org_bug1", "org_bug2"])
    head = "" if transactional else "__transactional__ = False\n"
    (project.tenant_dir / "20300101000000_bug.py").write_text(head + BUGGY)

    run = migrate_tenants(project, jobs=1)

    assert [r.outcome for r in run.schemas] == ["failed", "failed"]  # each reported, no crash
    for t, result in zip(tenants, run.schemas, strict=True):
        assert "ValueError: the migration has a bug" in str(result.failure)
        assert result.failure.migration == "20300101000000_bug"
        assert applied_ids(project.connection, t.schema) == TENANT_IDS  # those before it stay
        if transactional:
            assert "half_done" not in tables(project.connection, t.schema)


def test_a_connection_left_inside_a_transaction_is_not_given_to_the_next_schema(project):
    """Whatever went wrong in a schema's work, the next schema never inherits its session."""
    from yoyo_tenants.runner import run_schemas

    from yoyo_tenants.errors import TenantsError
    from yoyo_tenants.results import SchemaResult

    seen = []

    def action(connection, result: SchemaResult) -> SchemaResult:
        cursor = connection.cursor()
        cursor.execute("SELECT pg_backend_pid(), now() = statement_timestamp()")
        seen.append(cursor.fetchone())
        if result.schema == "first":
            cursor.execute("BEGIN; CREATE TEMP TABLE leftover (i int)")
            raise TenantsError("gave up half-way")
        return result

    work = [SchemaResult("first"), SchemaResult("second")]
    run = run_schemas(project.connection, work, action, direction="apply", jobs=1)

    assert [r.outcome for r in run.schemas] == ["failed", "up to date"]
    (first_pid, _), (second_pid, fresh) = seen
    assert second_pid != first_pid and fresh  # a new connection, not in a transaction


def test_a_worker_connection_is_replaced_after_so_many_schemas(project):
    """A server backend keeps the catalog of every schema it touched: a worker gets a new
    connection after RECONNECT_EVERY schemas (here 3), so none grows without bound."""
    from yoyo_tenants.runner import run_schemas

    from yoyo_tenants.results import SchemaResult

    pids = []

    def action(connection, result: SchemaResult) -> SchemaResult:
        cursor = connection.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        pids.append(cursor.fetchone()[0])
        return result

    work = [SchemaResult(f"s{i}") for i in range(10)]
    run = run_schemas(
        project.connection, work, action, direction="apply", jobs=1, reconnect_every=3
    )

    assert run.ok
    runs = [len(list(group)) for _, group in itertools.groupby(pids)]
    assert runs == [3, 3, 3, 1] and len(set(pids)) == 4


def test_a_down_file_is_marked_on_its_own(project):
    """Each file runs as its own first line says: an up file in the transaction, its down file
    outside one (CONCURRENTLY), and the other way round."""
    assert migrate_master(project).ok
    provision_tenant(project, ORG)
    write_migration(
        project.tenant_dir,
        "20300101000000_index_in_down",
        "DROP INDEX IF EXISTS no_such_index;",
        "-- transactional: false\nCREATE INDEX CONCURRENTLY users_email ON org_users (email);",
    )
    write_migration(
        project.tenant_dir,
        "20300101000100_index_in_up",
        "-- transactional: false\nCREATE INDEX CONCURRENTLY users_name ON org_users (full_name);",
        "DROP INDEX users_name;",
    )
    assert migrate_tenants(project).ok
    assert query(project.connection, "SELECT 1 FROM pg_class WHERE relname = 'users_name'") == [
        (1,)
    ]

    run = rollback_tenants(project, steps=2)

    assert run.ok, [str(r.failure) for r in run.schemas]
    names = query(project.connection, "SELECT relname FROM pg_class WHERE relname LIKE 'users_%'")
    assert names == [("users_email",)]
