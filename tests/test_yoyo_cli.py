"""Plain yoyo on one tenant schema through the registered ``postgresql+tenant`` scheme."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlencode

import psycopg2
import pytest
from psycopg2 import extensions, sql
from yoyo import read_migrations
from yoyo.connections import get_backend

from yoyo_tenants import migrate_master
from yoyo_tenants.errors import MigrationFailed, NotReady, UsageError
from yoyo_tenants.session import lock_key

from .conftest import (
    TENANT_IDS,
    TENANT_TABLES,
    YOYO_TABLES,
    Admin,
    applied_ids,
    query,
    run_module,
    tables,
    write_migration,
)

SCHEMA = "tid_0123456789"


def uri(db, schema: str) -> str:
    args = {"host": db["host"], "port": db["port"], "user": db["user"], "schema": schema}
    return f"postgresql+tenant:///{db['dbname']}?{urlencode(args)}"


def yoyo(cwd, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    return run_module("yoyo", cwd, *args, env=env)


def log_rows(db, schema: str) -> list[tuple[str, str]]:
    return query(
        db,
        sql.SQL("SELECT migration_id, operation FROM {} ORDER BY id").format(
            sql.Identifier(schema, "_yoyo_log")
        ),
    )


def all_tables(db) -> set[tuple[str, str]]:
    rows = query(
        db,
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    return set(rows)


@pytest.fixture
def master(project):
    """Master migrations applied (so pgvector exists); nothing else."""
    assert migrate_master(project).ok
    return project


def test_yoyo_apply_migrates_one_tenant_schema_and_rollback_all_undoes_it(master, tmp_path):
    db = master.connection
    with Admin(db) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    public_before = tables(db, "public")
    public_log_before = log_rows(db, "public")

    done = yoyo(tmp_path, "apply", "--batch", "--database", uri(db, SCHEMA), str(master.tenant_dir))

    assert done.returncode == 0, done.stderr
    assert tables(db, SCHEMA) == TENANT_TABLES | YOYO_TABLES
    assert applied_ids(db, SCHEMA) == TENANT_IDS
    assert log_rows(db, SCHEMA) == [(m, "apply") for m in TENANT_IDS]
    # nothing landed in public: no tenant tables, no yoyo bookkeeping for tenant migrations
    assert tables(db, "public") == public_before
    assert log_rows(db, "public") == public_log_before
    assert not set(applied_ids(db, "public")) & set(TENANT_IDS)
    assert "yoyo_lock" not in {name for _, name in all_tables(db)}
    embedding_type = query(
        db,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attname = 'embedding'",
        (f"{SCHEMA}.chat_messages",),
    )
    assert embedding_type == [("vector(1536)",)]

    rollback = ("rollback", "--batch", "--all", "--database", uri(db, SCHEMA))
    done = yoyo(tmp_path, *rollback, str(master.tenant_dir))

    assert done.returncode == 0, done.stderr
    assert tables(db, SCHEMA) == YOYO_TABLES
    assert applied_ids(db, SCHEMA) == []
    assert [op for _, op in log_rows(db, SCHEMA)] == ["apply"] * 3 + ["rollback"] * 3
    assert tables(db, "public") == public_before


def test_yoyo_apply_is_idempotent(master, tmp_path):
    db = master.connection
    with Admin(db) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    args = ("apply", "--batch", "--database", uri(db, SCHEMA), str(master.tenant_dir))
    assert yoyo(tmp_path, *args).returncode == 0
    before = log_rows(db, SCHEMA)

    done = yoyo(tmp_path, *args)

    assert done.returncode == 0, done.stderr
    assert log_rows(db, SCHEMA) == before
    assert applied_ids(db, SCHEMA) == TENANT_IDS


def test_yoyo_apply_to_a_missing_schema_fails_instead_of_falling_through_to_public(
    master, tmp_path
):
    db = master.connection
    before = all_tables(db)

    missing = uri(db, "tid_ffffffffff")
    done = yoyo(tmp_path, "apply", "--batch", "--database", missing, str(master.tenant_dir))

    assert done.returncode != 0
    assert "tid_ffffffffff" in done.stderr
    assert "does not exist" in done.stderr
    assert all_tables(db) == before
    assert "org_users" not in tables(db, "public")
    assert query(db, "SELECT 1 FROM pg_namespace WHERE nspname = 'tid_ffffffffff'") == []


EVIL = 'x";CREATE TABLE public.pwned(i int);--'


def test_a_schema_name_with_quotes_and_semicolons_does_not_execute_sql(master, tmp_path):
    db = master.connection
    before = all_tables(db)

    done = yoyo(tmp_path, "apply", "--batch", "--database", uri(db, EVIL), str(master.tenant_dir))

    assert done.returncode != 0
    assert "does not exist" in done.stderr
    assert all_tables(db) == before
    assert "pwned" not in tables(db, "public")
    assert "org_users" not in tables(db, "public")


def test_a_schema_with_a_hostile_name_is_used_as_a_name_only(master, tmp_path):
    db = master.connection
    with Admin(db) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(EVIL)))

    done = yoyo(tmp_path, "apply", "--batch", "--database", uri(db, EVIL), str(master.tenant_dir))

    assert done.returncode == 0, done.stderr
    assert tables(db, EVIL) == TENANT_TABLES | YOYO_TABLES
    assert applied_ids(db, EVIL) == TENANT_IDS
    assert "pwned" not in tables(db, "public")
    assert "org_users" not in tables(db, "public")


# -- errors end in one line on yoyo's command line -------------------------------------------------


def error_line(done) -> str:
    """The one line a failed yoyo command printed on stderr: no traceback, a non-zero exit."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def plain_uri(db, schema: str) -> str:
    """The same database for yoyo's own PostgreSQL backend."""
    return uri(db, schema).replace("postgresql+tenant:", "postgresql:", 1)


def no_schema_uri(db) -> str:
    args = {"host": db["host"], "port": db["port"], "user": db["user"]}
    return f"postgresql+tenant:///{db['dbname']}?{urlencode(args)}"


@pytest.fixture
def tenant(master):
    """A tenant schema, created but never migrated."""
    with Admin(master.connection) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    return master


def test_a_url_without_schema_is_one_line_that_says_how_to_name_it(master, tmp_path):
    db = master.connection
    before = all_tables(db)

    args = ("apply", "--batch", "--database", no_schema_uri(db), str(master.tenant_dir))
    line = error_line(yoyo(tmp_path, *args))

    assert "?schema=" in line and "?schema=public" in line
    assert all_tables(db) == before


def test_a_missing_schema_is_one_line(master, tmp_path):
    missing = uri(master.connection, "tid_ffffffffff")

    done = yoyo(tmp_path, "list", "--batch", "--database", missing, str(master.tenant_dir))

    assert error_line(done) == "error: schema tid_ffffffffff does not exist"


def test_a_failing_migration_is_one_line_naming_its_file_and_line(tenant, tmp_path):
    db = tenant.connection
    write_migration(
        tenant.tenant_dir, "20300101000000_broken", "SELECT 1;\n\nSELECT nope FROM x;\n"
    )

    args = ("apply", "--batch", "--database", uri(db, SCHEMA), str(tenant.tenant_dir))
    line = error_line(yoyo(tmp_path, *args))

    assert "20300101000000_broken failed in schema tid_0123456789" in line
    assert "20300101000000_broken.sql line 3" in line
    assert 'relation "x" does not exist' in line
    assert applied_ids(db, SCHEMA) == TENANT_IDS  # those before it committed


def test_a_failing_rollback_is_one_line_naming_its_down_file_and_line(tenant, tmp_path):
    db = tenant.connection
    write_migration(
        tenant.tenant_dir, "20300101000000_undo", "CREATE TABLE undo (i int);",
        "SELECT 1;\nSELECT nope FROM undo;\n",
    )  # fmt: skip
    args = ("--batch", "--database", uri(db, SCHEMA), str(tenant.tenant_dir))
    assert yoyo(tmp_path, "apply", *args).returncode == 0

    line = error_line(yoyo(tmp_path, "rollback", "--revision", "20300101000000_undo", *args))

    assert "20300101000000_undo.rollback.sql line 2" in line
    assert 'column "nope" does not exist' in line
    assert applied_ids(db, SCHEMA)[-1] == "20300101000000_undo"  # nothing of it undone


def test_a_refused_migration_file_is_one_line_and_nothing_runs(tenant, tmp_path):
    db = tenant.connection
    write_migration(
        tenant.tenant_dir, "00000000000000_commits", "CREATE TABLE a (i int);\nCOMMIT;\n"
    )

    args = ("apply", "--batch", "--database", uri(db, SCHEMA), str(tenant.tenant_dir))
    line = error_line(yoyo(tmp_path, *args))

    assert "00000000000000_commits.sql line 2: COMMIT" in line
    assert tables(db, SCHEMA) == set()


def test_an_edited_applied_migration_stops_yoyo_apply_as_it_stops_the_tasks(tenant, tmp_path):
    db = tenant.connection
    args = ("apply", "--batch", "--database", uri(db, SCHEMA), str(tenant.tenant_dir))
    assert yoyo(tmp_path, *args).returncode == 0
    edited = tenant.tenant_dir / f"{TENANT_IDS[1]}.sql"
    edited.write_text(edited.read_text() + "-- edited after it was applied\n")
    write_migration(tenant.tenant_dir, "20300101000000_more", "CREATE TABLE more (i int);")
    before = log_rows(db, SCHEMA)

    line = error_line(yoyo(tmp_path, *args))

    assert f"drift in {SCHEMA}: {TENANT_IDS[1]} changed since it was applied" in line
    assert "invoke repair" in line
    assert log_rows(db, SCHEMA) == before
    assert "more" not in tables(db, SCHEMA)


def test_library_callers_get_exceptions_not_an_exit(tenant):
    db = tenant.connection
    with pytest.raises(UsageError, match=r"\?schema="):
        get_backend(no_schema_uri(db))
    with pytest.raises(NotReady, match="tid_ffffffffff does not exist"):
        get_backend(uri(db, "tid_ffffffffff"))
    write_migration(tenant.tenant_dir, "20300101000000_broken", "SELECT nope FROM x;")
    backend = get_backend(uri(db, SCHEMA))

    # yoyo's API promises a DatabaseError of the driver when a migration fails
    with pytest.raises(psycopg2.DatabaseError) as failed:
        backend.apply_migrations(backend.to_apply(read_migrations(str(tenant.tenant_dir))))

    assert isinstance(failed.value, MigrationFailed)
    assert "20300101000000_broken.sql line 1" in str(failed.value)
    assert not getattr(sys.excepthook, "yoyo_tenants", False)


# -- --migration-table -----------------------------------------------------------------------------


def test_a_migration_table_of_its_own_is_refused_in_one_line(tenant, tmp_path):
    db = tenant.connection
    before = all_tables(db)
    database = ("--database", uri(db, SCHEMA), str(tenant.tenant_dir))

    line = error_line(yoyo(tmp_path, "apply", "--batch", "--migration-table", "other", *database))

    assert "'other'" in line and "_yoyo_log" in line
    assert all_tables(db) == before
    with pytest.raises(UsageError):
        get_backend(uri(db, SCHEMA), migration_table="other")


def test_the_default_migration_table_and_the_logs_own_name_are_the_one_log(tenant, tmp_path):
    db = tenant.connection
    database = ("--database", uri(db, SCHEMA), str(tenant.tenant_dir))

    done = yoyo(tmp_path, "apply", "--batch", "--migration-table", "_yoyo_log", *database)

    assert done.returncode == 0, done.stderr
    assert applied_ids(db, SCHEMA) == TENANT_IDS
    assert tables(db, SCHEMA) == TENANT_TABLES | YOYO_TABLES


# -- reads -----------------------------------------------------------------------------------------


def test_reads_outside_a_transaction_see_the_schema_and_leave_the_session_as_it_was(
    tenant, tmp_path
):
    db = tenant.connection
    args = ("apply", "--batch", "--database", uri(db, SCHEMA), str(tenant.tenant_dir))
    assert yoyo(tmp_path, *args).returncode == 0
    query(db, sql.SQL("INSERT INTO {} (clerk_user_id, email) VALUES ('u1', 'a@b.c')").format(
        sql.Identifier(SCHEMA, "org_users")))  # fmt: skip
    backend = get_backend(uri(db, SCHEMA))

    assert backend.execute("SELECT count(*) FROM org_users").fetchone() == (1,)
    cursor = backend.cursor()
    cursor.execute(
        "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'org_users'::regclass"
    )
    assert cursor.fetchone() == (SCHEMA,)
    assert "org_users" in backend.list_tables()

    idle = backend.connection.cursor()
    idle.execute("SHOW search_path")
    assert idle.fetchone() == ('"$user", public',)  # the session never had the schema
    assert backend.connection.info.transaction_status == extensions.TRANSACTION_STATUS_IDLE


def test_yoyo_list_on_a_schema_plain_yoyo_migrated_changes_nothing(tenant, tmp_path):
    db = tenant.connection
    folder = tmp_path / "own"
    folder.mkdir()
    write_migration(folder, "0001_a", "CREATE TABLE a (i int);")
    write_migration(folder, "0002_b", "CREATE TABLE b (i int);")
    plain = ("--batch", "--database", plain_uri(db, SCHEMA), str(folder))
    assert yoyo(tmp_path, "apply", "--revision", "0001_a", *plain).returncode == 0
    layout = tables(db, SCHEMA)
    assert {"_yoyo_migration", "_yoyo_log", "_yoyo_version"} <= layout
    yoyo_log = query(db, f"SELECT * FROM {SCHEMA}._yoyo_log ORDER BY created_at_utc")
    yoyo_applied = query(db, f"SELECT * FROM {SCHEMA}._yoyo_migration")

    done = yoyo(tmp_path, "list", "--batch", "--database", uri(db, SCHEMA), str(folder))

    assert done.returncode == 0, done.stderr
    states = {line.split()[1]: line.split()[0] for line in done.stdout.splitlines()[2:]}
    assert states == {"0001_a": "A", "0002_b": "U"}
    assert tables(db, SCHEMA) == layout
    assert query(db, f"SELECT * FROM {SCHEMA}._yoyo_log ORDER BY created_at_utc") == yoyo_log
    assert query(db, f"SELECT * FROM {SCHEMA}._yoyo_migration") == yoyo_applied
    # and plain yoyo still reads and writes its own tables
    done = yoyo(tmp_path, "apply", *plain)
    assert done.returncode == 0, done.stderr
    assert "b" in tables(db, SCHEMA)


# -- the lock --------------------------------------------------------------------------------------


@pytest.fixture
def holder(tenant):
    """Another session holding the tenant schema's advisory lock, as a running migration does;
    yields its backend pid."""
    with Admin(tenant.connection) as admin:
        admin.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock_key(SCHEMA),))
        yield admin.value("SELECT pg_backend_pid()")


def held(db) -> int:
    return query(db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")[0][0]


def test_break_lock_names_the_session_holding_the_lock_and_leaves_it_running(
    tenant, holder, tmp_path
):
    db = tenant.connection

    line = error_line(yoyo(tmp_path, "break-lock", "--batch", "--database", uri(db, SCHEMA)))

    assert f"schema {SCHEMA} is locked by another run (pid {holder}," in line
    assert f"pg_terminate_backend({holder})" in line
    assert held(db) == 1  # not broken, and its session not ended


def test_break_lock_with_no_lock_held_is_a_quiet_success(tenant, tmp_path):
    done = yoyo(tmp_path, "break-lock", "--batch", "--database", uri(tenant.connection, SCHEMA))

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_lock_held_past_yoyos_wait_is_one_line_and_nothing_runs(tenant, holder, tmp_path):
    db = tenant.connection
    args = ("apply", "--batch", "--database", uri(db, SCHEMA), str(tenant.tenant_dir))

    line = error_line(yoyo(tmp_path, *args))  # yoyo waits 10 s for its lock

    assert f"schema {SCHEMA} is locked by another run (waited 10 s; pid {holder}," in line
    assert tables(db, SCHEMA) == set()


# -- yoyo's migrations in Python -------------------------------------------------------------------


def test_a_python_migration_outside_a_transaction_runs_outside_one(tenant, tmp_path):
    db = tenant.connection
    (tenant.tenant_dir / "20300101000000_index.py").write_text(
        "from yoyo import step\n"
        "__transactional__ = False\n"
        "steps = [step('CREATE INDEX CONCURRENTLY org_users_email ON org_users (email)',\n"
        "              'DROP INDEX CONCURRENTLY org_users_email')]\n"
    )
    backend = get_backend(uri(db, SCHEMA))

    # yoyo's API, as its own tests call it: the migrations not yet loaded (yoyo's command line
    # loads them as it sorts them)
    backend.apply_migrations(read_migrations(str(tenant.tenant_dir)))

    assert applied_ids(db, SCHEMA) == [*TENANT_IDS, "20300101000000_index"]
    index = f"{SCHEMA}.org_users_email"
    assert query(db, "SELECT to_regclass(%s)::text", (index,)) == [(index,)]
