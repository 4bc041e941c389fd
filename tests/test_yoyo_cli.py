"""Plain yoyo on one tenant schema through the registered ``postgresql+tenant`` scheme."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlencode

import pytest
from psycopg2 import sql

from yoyo_tenants import migrate_master

from .conftest import TENANT_IDS, TENANT_TABLES, YOYO_TABLES, Admin, applied_ids, query, tables

SCHEMA = "tid_0123456789"


def uri(db, schema: str) -> str:
    args = {"host": db["host"], "port": db["port"], "user": db["user"], "schema": schema}
    return f"postgresql+tenant:///{db['dbname']}?{urlencode(args)}"


def yoyo(cwd, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    return subprocess.run(
        [sys.executable, "-m", "yoyo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


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
