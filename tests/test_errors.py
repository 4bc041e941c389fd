"""What a user sees when things go wrong, through the invoke CLI: one `error:` line, an exit code,
no traceback, never a password."""

from __future__ import annotations

import shutil
import socket
import uuid
from pathlib import Path

import pytest
from psycopg2 import sql

from yoyo_tenants import migrate_master, provision_tenant, schema_for

from .conftest import (
    REPO,
    TENANT_IDS,
    Admin,
    applied_ids,
    copy_migrations,
    query,
    run_invoke,
    tables,
    user_env,
    write_migration,
)

ORG = "org_2abc123def456"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_one_error_line(done):
    """The user's view of an expected failure: one line on stderr, no traceback."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


@pytest.fixture
def cli(tmp_path):
    """A project folder as a user has it: tasks.py and the migrations."""
    shutil.copy(REPO / "tasks.py", tmp_path)
    copy_migrations(tmp_path)
    return tmp_path


@pytest.fixture
def cli_project(project):
    """The `project` fixture's folder (fresh database, copied migrations), plus tasks.py."""
    shutil.copy(REPO / "tasks.py", project.root)
    return project


# -- cannot connect ------------------------------------------------------------------------------


def test_an_unreachable_server_is_one_error_line_and_exit_1(cli):
    port = closed_port()
    env = user_env({"host": "127.0.0.1", "port": port, "user": "postgres"})

    done = run_invoke(cli, "migrate-master", env=env)

    assert done.returncode == 1
    line = assert_one_error_line(done)
    assert "cannot connect" in line
    assert f"127.0.0.1:{port}" in line
    assert not (cli / ".yoyo-tenants").exists()  # no embedded server was started instead


def test_a_missing_database_is_a_clear_error(cli, server):
    env = user_env(server, DB_NAME="no_such_database_here")

    done = run_invoke(cli, "migrate-master", env=env)

    assert done.returncode == 1
    line = assert_one_error_line(done)
    assert 'database "no_such_database_here" does not exist' in line
    assert query(server, "SELECT 1 FROM pg_database WHERE datname = 'no_such_database_here'") == []


@pytest.fixture
def scram_role(server):
    """A login role with a password that must authenticate with scram over the unix socket."""
    role = f"pw_{uuid.uuid4().hex[:8]}"
    password = f"Right-{uuid.uuid4().hex}"
    with Admin(server) as admin:
        hba = Path(admin.value("SHOW hba_file"))
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    original = hba.read_bytes()
    hba.write_bytes(f"local all {role} scram-sha-256\n".encode() + original)
    with Admin(server) as admin:
        assert admin.value("SELECT pg_reload_conf()")
    try:
        yield role, password
    finally:
        hba.write_bytes(original)
        with Admin(server) as admin:
            admin.execute("SELECT pg_reload_conf()")
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_a_wrong_password_is_one_error_line_that_never_shows_the_password(
    cli, database, scram_role
):
    role, _ = scram_role
    wrong = f"Wrong-{uuid.uuid4().hex}"
    env = user_env(database, DB_USER=role, DB_PASSWORD=wrong)

    done = run_invoke(cli, "migrate-master", env=env)

    assert done.returncode == 1
    line = assert_one_error_line(done)
    assert "password authentication failed" in line
    assert role in line
    assert wrong not in done.stdout
    assert wrong not in done.stderr
    assert query(database, "SELECT to_regclass('public.tenants')") == [(None,)]


def test_a_wrong_password_in_database_url_never_shows_the_password(cli, database, scram_role):
    role, _ = scram_role
    wrong = f"Wrong-{uuid.uuid4().hex}"
    url = (
        f"postgresql://{role}:{wrong}@/{database['dbname']}"
        f"?host={database['host']}&port={database['port']}"
    )
    env = user_env()
    env["DATABASE_URL"] = url

    done = run_invoke(cli, "status", env=env)

    assert done.returncode == 1
    line = assert_one_error_line(done)
    assert "password authentication failed" in line
    assert wrong not in done.stdout + done.stderr


def test_the_right_password_connects(cli, database, scram_role):
    """The control for the wrong-password tests: the role and the hba line do work."""
    role, password = scram_role
    env = user_env(database, DB_USER=role, DB_PASSWORD=password)

    done = run_invoke(cli, "status", env=env)

    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr


def test_a_missing_ssl_cert_file_is_a_config_error_before_connecting(cli):
    missing = cli / "certs" / "missing-ca.pem"
    port = closed_port()  # would be "cannot connect" if it got as far as connecting
    env = user_env(
        {"host": "127.0.0.1", "port": port, "user": "postgres"},
        DB_SSL="true",
        DB_SSL_CERT_PATH=str(missing),
    )

    done = run_invoke(cli, "migrate-master", env=env)

    assert done.returncode == 2
    line = assert_one_error_line(done)
    assert "DB_SSL_CERT_PATH" in line
    assert str(missing) in line
    assert "cannot connect" not in line


def test_a_bad_db_port_is_a_config_error(cli):
    env = user_env({"host": "127.0.0.1", "port": "fivefourthreetwo", "user": "postgres"})
    done = run_invoke(cli, "status", env=env)
    assert done.returncode == 2
    assert "DB_PORT" in assert_one_error_line(done)


# -- bad arguments -------------------------------------------------------------------------------


def test_provision_tenant_with_a_bad_org_id_exits_2_with_one_line(cli_project):
    db = cli_project.connection
    assert migrate_master(cli_project).ok

    done = run_invoke(cli_project.root, "provision-tenant", "bad", env=user_env(db))

    assert done.returncode == 2
    line = assert_one_error_line(done)
    assert "invalid org id 'bad'" in line
    assert query(db, "SELECT count(*) FROM public.tenants") == [(0,)]
    assert query(db, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tid\\_%'") == []


def test_make_tenant_with_a_bad_name_exits_2_and_creates_nothing(cli):
    before = sorted(p.name for p in (cli / "migrations" / "tenant").iterdir())

    done = run_invoke(cli, "make-tenant", "a b", env=user_env())

    assert done.returncode == 2
    line = assert_one_error_line(done)
    assert "invalid migration name 'a b'" in line
    assert sorted(p.name for p in (cli / "migrations" / "tenant").iterdir()) == before
    assert not (cli / ".yoyo-tenants").exists()  # no database was needed, or started


@pytest.mark.parametrize(
    "args",
    [
        ("rollback-tenants", "--steps", "abc"),
        ("rollback-tenants", "--steps", "0"),
        ("migrate-tenants", "--jobs", "many"),
        ("migrate-tenants", "--jobs", "0"),
    ],
    ids=" ".join,
)
def test_a_bad_number_flag_exits_2_with_one_line(cli_project, args):
    db = cli_project.connection
    assert migrate_master(cli_project).ok
    provision_tenant(cli_project, ORG)

    done = run_invoke(cli_project.root, *args, env=user_env(db))

    assert done.returncode == 2
    line = assert_one_error_line(done)
    assert args[1] in line
    assert applied_ids(db, schema_for(ORG)) == TENANT_IDS


def test_migrate_tenants_for_an_unknown_tenant_is_a_clear_error(cli_project):
    db = cli_project.connection
    assert migrate_master(cli_project).ok
    provision_tenant(cli_project, ORG)

    done = run_invoke(
        cli_project.root, "migrate-tenants", "--tenant", "org_unknown1", env=user_env(db)
    )

    assert done.returncode != 0
    line = assert_one_error_line(done)
    assert "org_unknown1" in line
    assert "no tenant is registered" in line
    assert applied_ids(db, schema_for(ORG)) == TENANT_IDS


def test_migrate_tenants_before_migrate_master_says_to_run_it(cli_project):
    done = run_invoke(cli_project.root, "migrate-tenants", env=user_env(cli_project.connection))
    assert done.returncode == 1
    assert "migrate-master" in assert_one_error_line(done)


# -- a failing migration -------------------------------------------------------------------------

BROKEN = "20250301000000_add_broken"


def test_a_failing_tenant_migration_exits_1_names_it_and_rolls_back_its_schema(cli_project):
    db = cli_project.connection
    schema = schema_for(ORG)
    assert migrate_master(cli_project).ok
    provision_tenant(cli_project, ORG)
    write_migration(
        cli_project.tenant_dir,
        BROKEN,
        "CREATE TABLE partial_ddl (i int);\n"
        "ALTER TABLE org_users ADD COLUMN half TEXT;\n"
        "ALTER TABLE org_users ADD COLUMN email TEXT;\n",  # already exists: fails here
        "DROP TABLE partial_ddl;\n",
    )
    log_before = query(
        db, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "_yoyo_log"))
    )

    done = run_invoke(cli_project.root, "migrate-tenants", env=user_env(db, COLUMNS="200"))

    # the schema's transaction rolled back: no mark, no log row, none of the partial DDL
    assert applied_ids(db, schema) == TENANT_IDS
    assert "partial_ddl" not in tables(db, schema)
    assert query(db, "SELECT 1 FROM pg_class WHERE relname = 'partial_ddl'") == []
    assert "half" not in {
        row[0]
        for row in query(
            db,
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'org_users'",
            (schema,),
        )
    }
    assert (
        query(db, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "_yoyo_log")))
        == log_before
    )
    # and the user is told which migration failed where, and why
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert BROKEN in output
    assert schema in output
    assert ORG in output
    assert 'column "email"' in output
    assert "Traceback" not in output


def test_a_failing_tenant_migration_is_named_at_the_default_terminal_width(cli_project):
    """Without COLUMNS a non-terminal console is 80 columns wide: the ids must still be whole."""
    db = cli_project.connection
    assert migrate_master(cli_project).ok
    provision_tenant(cli_project, ORG)
    write_migration(cli_project.tenant_dir, BROKEN, "SELECT no_such_function();\n")
    env = user_env(db)
    env.pop("COLUMNS", None)

    done = run_invoke(cli_project.root, "migrate-tenants", env=env)

    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert BROKEN in output
    assert schema_for(ORG) in output
    assert applied_ids(db, schema_for(ORG)) == TENANT_IDS
