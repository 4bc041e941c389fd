"""provision_tenant: registry row, schema and every tenant migration, all or nothing."""

from __future__ import annotations

import hashlib

import pytest
from psycopg2 import sql

from yoyo_tenants import migrate_master, provision_tenant, schema_for
from yoyo_tenants.errors import MigrationFailed, NotReady, SchemaCollision, UsageError

from .conftest import (
    MASTER_IDS,
    TENANT_IDS,
    TENANT_TABLES,
    YOYO_TABLES,
    Admin,
    applied_ids,
    columns,
    query,
    tables,
    write_migration,
)

ORG = "org_2abc123def456"


def registry(db) -> list[tuple[str, str, str]]:
    return query(db, "SELECT clerk_org_id, schema_name, status FROM public.tenants ORDER BY id")


def tenant_schemas(db) -> set[str]:
    rows = query(db, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tid\\_%'")
    return {row[0] for row in rows}


def select(db, what: str, schema: str, table: str, rest: str = ""):
    """Rows of `SELECT what FROM schema.table rest`, the names quoted."""
    query_text = sql.SQL(f"SELECT {what} FROM {{}} {rest}").format(sql.Identifier(schema, table))
    return query(db, query_text)


def log_rows(db, schema: str) -> list[tuple[str, str]]:
    return query(
        db,
        sql.SQL("SELECT migration_id, operation FROM {} ORDER BY id").format(
            sql.Identifier(schema, "_yoyo_log")
        ),
    )


def relations_named(db, name: str) -> list[str]:
    rows = query(
        db,
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s",
        (name,),
    )
    return [row[0] for row in rows]


@pytest.fixture
def ready(project):
    """The project with its master migrations applied."""
    assert migrate_master(project).ok
    return project


# -- the happy path ------------------------------------------------------------------------------


def test_schema_name_is_tid_and_ten_hex_characters_of_the_org_ids_sha256():
    expected = "tid_" + hashlib.sha256(ORG.encode()).hexdigest()[:10]
    assert schema_for(ORG) == expected
    assert schema_for("org_other1") != expected


def test_provisioning_creates_registry_row_schema_tables_and_log_rows(ready):
    db = ready.connection
    schema = schema_for(ORG)

    result = provision_tenant(ready, ORG)

    assert registry(db) == [(ORG, schema, "active")]
    assert tenant_schemas(db) == {schema}
    assert tables(db, schema) == TENANT_TABLES | YOYO_TABLES
    assert applied_ids(db, schema) == TENANT_IDS
    assert select(db, "DISTINCT batch", schema, "_yoyo_log") == [(1,)]
    assert log_rows(db, schema) == [(m, "apply") for m in TENANT_IDS]
    embedding = query(
        db,
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = %s::regclass AND a.attname = 'embedding'",
        (f"{schema}.chat_messages",),
    )
    assert embedding == [("vector(1536)",)]
    # nothing tenant-ish in public: its migration table still lists only the master migrations
    assert not TENANT_TABLES & tables(db, "public")
    assert applied_ids(db, "public") == MASTER_IDS
    assert not {m for m, _ in log_rows(db, "public")} & set(TENANT_IDS)
    # and what the caller is told
    assert result.created is True
    assert result.tenant.org_id == ORG
    assert result.tenant.schema == schema
    assert result.migrations == TENANT_IDS


def test_two_orgs_get_separate_schemas(ready):
    db = ready.connection
    provision_tenant(ready, ORG)
    provision_tenant(ready, "org_second2")
    assert tenant_schemas(db) == {schema_for(ORG), schema_for("org_second2")}
    for org in (ORG, "org_second2"):
        assert tables(db, schema_for(org)) >= TENANT_TABLES
        assert applied_ids(db, schema_for(org)) == TENANT_IDS
    assert [row[0] for row in registry(db)] == [ORG, "org_second2"]


def test_second_provision_of_same_org_is_a_no_op(ready):
    db = ready.connection
    schema = schema_for(ORG)
    provision_tenant(ready, ORG)
    with Admin(db) as admin:
        admin.execute(
            sql.SQL("INSERT INTO {} (clerk_user_id, email) VALUES ('u1', 'a@example.com')").format(
                sql.Identifier(schema, "org_users")
            )
        )
    before = (registry(db), applied_ids(db, schema), log_rows(db, schema))

    again = provision_tenant(ready, ORG)

    assert (registry(db), applied_ids(db, schema), log_rows(db, schema)) == before
    assert select(db, "email", schema, "org_users") == [("a@example.com",)]
    assert again.created is False
    assert again.migrations == []
    assert again.tenant.schema == schema


def test_second_provision_brings_the_schema_up_to_date(ready):
    db = ready.connection
    schema = schema_for(ORG)
    provision_tenant(ready, ORG)
    new_id = "20250201000000_add_nickname"
    write_migration(
        ready.tenant_dir,
        new_id,
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n",
        "ALTER TABLE org_users DROP COLUMN nickname;\n",
    )

    again = provision_tenant(ready, ORG)

    assert "nickname" in columns(db, schema, "org_users")
    assert "nickname" not in columns(db, "public", "org_users")
    assert applied_ids(db, schema) == [*TENANT_IDS, new_id]
    batch = select(db, "migration_id, batch", schema, "_yoyo_log")
    assert dict(batch)[new_id] > dict(batch)[TENANT_IDS[-1]]  # a batch of its own
    assert log_rows(db, schema)[-1] == (new_id, "apply")
    assert len(registry(db)) == 1
    assert again.created is False
    assert again.migrations == [new_id]


# -- all or nothing ------------------------------------------------------------------------------


def test_a_provisioning_that_fails_midway_leaves_no_registry_row_and_no_schema(ready):
    db = ready.connection
    schema = schema_for(ORG)
    broken = "20250101000150_broken"  # runs after org_users and org_settings
    write_migration(
        ready.tenant_dir,
        broken,
        "CREATE TABLE half_done (i int);\nSELECT no_such_function();\n",
    )

    with pytest.raises(MigrationFailed) as info:
        provision_tenant(ready, ORG)

    assert registry(db) == []
    assert tenant_schemas(db) == set()
    assert relations_named(db, "half_done") == []
    assert relations_named(db, "org_users") == []
    assert not TENANT_TABLES & tables(db, "public")
    assert applied_ids(db, "public") == MASTER_IDS
    error = info.value
    assert error.migration_id == broken
    assert error.schema == schema
    assert broken in str(error) and schema in str(error)
    assert "no_such_function" in str(error)
    assert error.exit_code == 1


def test_provisioning_succeeds_once_the_broken_migration_is_fixed(ready):
    db = ready.connection
    broken = "20250101000150_broken"
    write_migration(ready.tenant_dir, broken, "SELECT no_such_function();\n")
    with pytest.raises(MigrationFailed):
        provision_tenant(ready, ORG)
    write_migration(ready.tenant_dir, broken, "CREATE TABLE fixed (i int);\n", "DROP TABLE fixed;")

    result = provision_tenant(ready, ORG)

    assert result.created is True
    assert applied_ids(db, schema_for(ORG)) == [*TENANT_IDS[:2], broken, TENANT_IDS[2]]
    assert "fixed" in tables(db, schema_for(ORG))


# -- bad org ids ---------------------------------------------------------------------------------

BAD_ORG_IDS = {
    "bad": "bad",
    "org_": "org_",
    "hyphen": "org_abc-def",
    "semicolon": "org_a;drop",
    "upper-prefix": "ORG_abc",
    "empty": "",
    "10kB": "org_" + "a" * 10_000,
    "unicode": "org_caf\u00e9",
    "unicode-digits": "org_\u0661\u0662\u0663",
    "NUL": "org_abc\x00",
    "newline": "org_abc\n",
    "quote": "org_a'b",
}


@pytest.mark.parametrize("org_id", BAD_ORG_IDS.values(), ids=BAD_ORG_IDS.keys())
def test_a_bad_org_id_is_a_usage_error_and_writes_nothing(ready, org_id):
    db = ready.connection
    public_before = tables(db, "public")
    schemas_before = query(db, "SELECT nspname FROM pg_namespace ORDER BY 1")

    with pytest.raises(UsageError) as info:
        provision_tenant(ready, org_id)

    assert registry(db) == []
    assert query(db, "SELECT nspname FROM pg_namespace ORDER BY 1") == schemas_before
    assert tables(db, "public") == public_before
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "invalid org id" in message
    assert len(message) < 400  # a 10kB id is not echoed whole
    assert "\x00" not in message


def test_the_longest_allowed_org_id_is_provisioned(ready):
    db = ready.connection
    longest = "org_" + "Z9" * 30  # 64 characters
    result = provision_tenant(ready, longest)
    assert registry(db) == [(longest, schema_for(longest), "active")]
    assert applied_ids(db, schema_for(longest)) == TENANT_IDS
    assert result.created
    with pytest.raises(UsageError):
        provision_tenant(ready, longest + "0")
    assert len(registry(db)) == 1


# -- refusing to share a schema ------------------------------------------------------------------


def test_a_hash_collision_raises_schema_collision_and_overwrites_nothing(ready):
    db = ready.connection
    schema = schema_for(ORG)
    squatter = "org_squatter1"  # pretend its sha256 starts like ORG's
    with Admin(db) as admin:
        admin.execute(
            "INSERT INTO public.tenants (clerk_org_id, schema_name) VALUES (%s, %s)",
            (squatter, schema),
        )
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        admin.execute(sql.SQL("CREATE TABLE {} (v text)").format(sql.Identifier(schema, "keep")))
        keep = sql.Identifier(schema, "keep")
        admin.execute(sql.SQL("INSERT INTO {} VALUES ('mine')").format(keep))

    with pytest.raises(SchemaCollision) as info:
        provision_tenant(ready, ORG)

    assert registry(db) == [(squatter, schema, "active")]
    assert tables(db, schema) == {"keep"}
    assert select(db, "v", schema, "keep") == [("mine",)]
    assert tenant_schemas(db) == {schema}
    message = str(info.value)
    assert ORG in message and squatter in message and schema in message
    assert info.value.exit_code == 1


def test_an_unregistered_schema_of_the_same_name_is_not_taken_over(ready):
    db = ready.connection
    schema = schema_for(ORG)
    with Admin(db) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        admin.execute(sql.SQL("CREATE TABLE {} (v text)").format(sql.Identifier(schema, "keep")))

    with pytest.raises(SchemaCollision) as info:
        provision_tenant(ready, ORG)

    assert registry(db) == []
    assert tables(db, schema) == {"keep"}
    assert schema in str(info.value)


# -- not ready -----------------------------------------------------------------------------------


def test_provisioning_before_migrate_master_says_to_run_it(project):
    db = project.connection

    with pytest.raises(NotReady) as info:
        provision_tenant(project, ORG)

    assert "migrate-master" in str(info.value)
    assert "public.tenants" in str(info.value)
    assert query(db, "SELECT to_regclass('public.tenants')") == [(None,)]
    assert tenant_schemas(db) == set()
    assert not TENANT_TABLES & tables(db, "public")


def test_provisioning_a_registered_org_whose_schema_was_dropped_is_not_ready(ready):
    db = ready.connection
    schema = schema_for(ORG)
    provision_tenant(ready, ORG)
    with Admin(db) as admin:
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))

    with pytest.raises(NotReady) as info:
        provision_tenant(ready, ORG)

    assert schema in str(info.value) and "missing" in str(info.value)
    assert registry(db) == [(ORG, schema, "active")]
    assert tenant_schemas(db) == set()


def test_provisioning_without_the_vector_extension_says_how_to_install_it(ready):
    db = ready.connection
    # No tenant exists yet, so nothing depends on the extension.
    with Admin(db) as admin:
        admin.execute("DROP EXTENSION vector")

    with pytest.raises(MigrationFailed) as info:
        provision_tenant(ready, ORG)

    assert registry(db) == []
    assert tenant_schemas(db) == set()
    assert relations_named(db, "org_users") == []
    error = info.value
    assert error.migration_id == "20250101000200_create_chat_messages"
    assert error.schema == schema_for(ORG)
    message = str(error)
    assert 'type "vector" does not exist' in message
    assert "CREATE EXTENSION vector" in message
    assert "migrate-master" in message


def test_a_missing_type_that_is_not_pgvectors_gets_no_pgvector_hint(ready):
    write_migration(ready.tenant_dir, "20300101000000_odd_type",
                    "CREATE TABLE odd (v no_such_type);")  # fmt: skip

    with pytest.raises(MigrationFailed) as info:
        provision_tenant(ready, ORG)

    message = str(info.value)
    assert 'type "no_such_type" does not exist' in message
    assert "pgvector" not in message and "CREATE EXTENSION" not in message
    assert registry(ready.connection) == []
