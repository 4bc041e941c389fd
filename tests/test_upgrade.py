"""Schemas whose migrations yoyo's own tables record (plain yoyo, or yoyo-tenants 0.1, which
added batch and checksum columns to them) are converted to the one log table by the next run,
without applying anything twice."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlencode

from psycopg2 import sql

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_tenants,
    status,
    verify,
)

from .conftest import MASTER_IDS, TENANT_IDS, applied_ids, query, tables, write_migration

ADD = "20300101000000_add_nickname"

#: The bookkeeping yoyo-tenants 0.1 created in each schema (yoyo's tables, two columns more).
TABLES_0_1 = """
    CREATE TABLE {migrations} (
        migration_hash VARCHAR(64) PRIMARY KEY, migration_id VARCHAR(255),
        applied_at_utc TIMESTAMP, batch INTEGER NOT NULL DEFAULT 0, checksum VARCHAR(64));
    CREATE TABLE {log} (
        id VARCHAR(36) PRIMARY KEY, migration_hash VARCHAR(64), migration_id VARCHAR(255),
        operation VARCHAR(10), username VARCHAR(255), hostname VARCHAR(255),
        comment VARCHAR(255), created_at_utc TIMESTAMP);
    CREATE TABLE {version} (version INT NOT NULL PRIMARY KEY, installed_at_utc TIMESTAMP);
    INSERT INTO {version} VALUES (2, now())
"""


def back_to_0_1(db, schema: str, batches: list[int]) -> None:
    """Keep the schema's tables, but record its migrations as 0.1 did."""
    names = {
        "migrations": sql.Identifier(schema, "_yoyo_migration"),
        "log": sql.Identifier(schema, "_yoyo_log"),
        "version": sql.Identifier(schema, "_yoyo_version"),
    }
    rows = query(
        db, sql.SQL("SELECT migration_id, checksum FROM {} ORDER BY id").format(names["log"])
    )
    query(db, sql.SQL("DROP TABLE {}").format(names["log"]))
    query(db, sql.SQL(TABLES_0_1).format(**names))
    for k, ((migration_id, checksum), batch) in enumerate(zip(rows, batches, strict=True)):
        query(
            db,
            sql.SQL(
                "INSERT INTO {} VALUES (md5(%s), %s, now() - interval '1 day' + %s * interval "
                "'1 s', %s, %s); INSERT INTO {} VALUES (md5(random()::text), md5(%s), %s, "
                "'apply', 'u', 'h', NULL, now())"
            ).format(names["migrations"], names["log"]),
            (migration_id, migration_id, k, batch, checksum, migration_id, migration_id),
        )


def test_a_tenant_recorded_by_0_1_is_converted_and_keeps_its_batches(project, database):
    migrate_master(project)
    schema = provision_tenant(project, "org_older1").tenant.schema
    back_to_0_1(database, schema, batches=[1, 1, 2])

    assert status(project).tenants[0].state == "old layout"
    assert any("keeps yoyo's migration tables" in p for p in verify(project))
    assert migrate_tenants(project, dry_run=True).schemas[0].failure  # says a real run converts

    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;",
                    "ALTER TABLE org_users DROP COLUMN nickname;")  # fmt: skip
    run = migrate_tenants(project)
    assert run.ok and run.schemas[0].migrations == [ADD]  # nothing applied twice
    assert applied_ids(database, schema) == [*TENANT_IDS, ADD]
    yoyo = {t for t in tables(database, schema) if "yoyo" in t}
    assert yoyo == {"_yoyo_log", "_yoyo_log_v1"}  # yoyo's log kept as history
    rows = query(database, f"SELECT id, migration_id, batch FROM {schema}._yoyo_log ORDER BY id")
    assert rows == [
        (1, TENANT_IDS[0], 1),
        (2, TENANT_IDS[1], 1),
        (3, TENANT_IDS[2], 2),
        (4, ADD, 3),
    ]
    assert status(project).tenants[0].state == "at head" and verify(project) == []

    rollback_tenants(project)  # the last batch: only what this run applied
    assert applied_ids(database, schema) == TENANT_IDS
    rollback_tenants(project)  # then 0.1's second batch
    assert applied_ids(database, schema) == TENANT_IDS[:2]


def test_a_schema_whose_log_cannot_be_converted_is_left_as_it_was(project, database):
    migrate_master(project)
    schema = provision_tenant(project, "org_older1").tenant.schema
    back_to_0_1(database, schema, batches=[1, 1, 1])
    query(database, f"CREATE TABLE {schema}._yoyo_log_v1 (x int)")  # the name is taken

    run = migrate_tenants(project)
    assert not run.ok and "_yoyo_log_v1" in str(run.schemas[0].failure)
    assert {t for t in tables(database, schema) if "yoyo" in t} == {
        "_yoyo_migration", "_yoyo_log", "_yoyo_version", "_yoyo_log_v1"
    }  # fmt: skip


def test_a_public_schema_plain_yoyo_migrated_is_adopted_by_migrate_master(project, database):
    args = {"host": database["host"], "port": database["port"], "user": database["user"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    done = subprocess.run(
        [sys.executable, "-m", "yoyo", "apply", "--batch", "--database",
         f"postgresql:///{database['dbname']}?{urlencode(args)}", str(project.master_dir)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "_yoyo_migration" in tables(database, "public")

    run = migrate_master(project)
    assert run.ok and run.schemas[0].migrations == []  # already applied, by yoyo
    assert applied_ids(database, "public") == MASTER_IDS
    assert "_yoyo_migration" not in tables(database, "public")
    provision_tenant(project, "org_after1")
    assert migrate_tenants(project).ok


def test_old_layouts_convert_one_after_another_on_a_database_whose_dates_are_not_iso(
    project, database
):
    """A converted log is read under the lock before anything is committed, first thing on a
    connection cleaned after the tenant before: the clean-up must leave dates readable."""
    query(
        database,
        sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(
            sql.Identifier(database["dbname"])
        ),
    )
    migrate_master(project)
    schemas = [provision_tenant(project, f"org_olddates{i}").tenant.schema for i in range(3)]
    for schema in schemas:
        back_to_0_1(database, schema, batches=[1, 1, 1])
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")

    run = migrate_tenants(project, jobs=1)

    assert run.ok, [str(r.failure) for r in run.schemas]
    assert all(applied_ids(database, schema) == [*TENANT_IDS, ADD] for schema in schemas)
