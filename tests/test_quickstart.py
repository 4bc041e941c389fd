"""The quick start and first tour (README.md, docs/index.md), as a new user types them, on the
embedded database."""

import os
import shutil

import psycopg2

from yoyo_tenants import embedded, schema_for

from .conftest import REPO, applied_ids, copy_migrations, run_invoke, tables


def test_quick_start_on_the_embedded_database(tmp_path):
    shutil.copy(REPO / "tasks.py", tmp_path)
    copy_migrations(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_") and k != "DATABASE_URL"}
    org = "org_2abc123def456"
    try:
        steps = [
            ("migrate-master",),
            ("provision-tenant", org),
            ("make-tenant", "add_column"),
        ]
        for step in steps:
            done = run_invoke(tmp_path, *step, env=env)
            assert done.returncode == 0, done.stderr
        new_sql = next((tmp_path / "migrations" / "tenant").glob("*_add_column.sql"))
        assert str(new_sql) in done.stdout
        new_sql.write_text(
            new_sql.read_text() + "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n"
        )
        new_sql.with_suffix("").with_suffix(".rollback.sql").write_text(
            "ALTER TABLE org_users DROP COLUMN nickname;\n"
        )
        params = embedded.ensure_running(tmp_path / ".yoyo-tenants")
        schema = schema_for(org)

        done = run_invoke(tmp_path, "migrate-tenants", env=env)
        assert done.returncode == 0, done.stderr
        assert applied_ids(params, schema)[-1] == new_sql.stem
        assert "nickname" in _columns(params, schema)

        done = run_invoke(tmp_path, "rollback-tenants", env=env)
        assert done.returncode == 0, done.stderr
        assert new_sql.stem not in applied_ids(params, schema)
        assert "nickname" not in _columns(params, schema)
        assert new_sql.stem in done.stdout

        done = run_invoke(tmp_path, "status", "--all", env=env)
        assert done.returncode == 0, done.stderr
        assert "behind by 1" in done.stdout
        assert {"tenants", "focus_areas", "coaching_categories"} <= tables(params, "public")
        assert {"org_users", "org_settings", "chat_messages"} <= tables(params, schema)
    finally:
        run_invoke(tmp_path, "db", "--stop", env=env)
    assert not (tmp_path / ".yoyo-tenants" / "pgdata" / "postmaster.pid").exists()


def _columns(params, schema):
    with psycopg2.connect(**params) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'org_users'",
            (schema,),
        )
        return {row[0] for row in cursor.fetchall()}


def test_the_commands_use_the_server_configured_in_dotenv(tmp_path, database):
    shutil.copy(REPO / "tasks.py", tmp_path)
    copy_migrations(tmp_path)
    (tmp_path / ".env").write_text(
        f"DB_HOST={database['host']}\nDB_PORT={database['port']}\n"
        f"DB_USER={database['user']}\nDB_NAME={database['dbname']}\nDB_SSL=false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_") and k != "DATABASE_URL"}
    org = "org_dotenv1"
    for step in [
        ("migrate-master",),
        ("provision-tenant", org),
        ("migrate-tenants",),
        ("status",),
        ("rollback-tenants", "--yes"),
    ]:
        done = run_invoke(tmp_path, *step, env=env)
        assert done.returncode == 0, (step, done.stderr)
    schema = schema_for(org)
    assert {"tenants", "focus_areas", "coaching_categories"} <= tables(database, "public")
    assert applied_ids(database, schema) == []  # provisioned, then (--yes) its base tables undone
    assert "org_users" not in tables(database, schema)
    assert not (tmp_path / ".yoyo-tenants").exists()  # nothing embedded was started
