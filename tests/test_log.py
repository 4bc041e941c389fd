"""The per-schema migration log: one lean table, append-only, that says what is applied."""

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_tenants,
    schema_for,
    status,
)

from .conftest import TENANT_IDS, applied_ids, query

ORG = "org_logbook1"


def relations(db, schema: str) -> dict[str, tuple[str, int]]:
    """name -> (relkind, reltoastrelid) of every relation in `schema`."""
    rows = query(
        db,
        "SELECT c.relname, c.relkind::text, c.reltoastrelid::int FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s",
        (schema,),
    )
    return {name: (kind, toast) for name, kind, toast in rows}


def log_rows(db, schema: str) -> list[tuple]:
    return query(
        db, f'SELECT id, migration_id, operation, batch FROM "{schema}"._yoyo_log ORDER BY id'
    )


def test_the_log_is_one_table_with_no_index_and_no_toast_table(project):
    migrate_master(project)
    schema = provision_tenant(project, ORG).tenant.schema
    db = project.connection

    yoyo = {name: kind for name, kind in relations(db, schema).items() if "yoyo" in name}
    assert yoyo == {"_yoyo_log": ("r", 0)}  # no _pkey, no version table, reltoastrelid 0
    # The widest row its columns allow (4-byte characters everywhere) still fits in a page.
    query(
        db,
        f'INSERT INTO "{schema}"._yoyo_log VALUES (999, %s, %s, 1, %s, %s, %s, now())',
        ("\U0001f600" * 255, "x" * 10, "f" * 64, "\U0001f600" * 63, "\U0001f600" * 95),
    )


def test_each_operation_is_a_numbered_row_and_applied_is_what_they_add_up_to(project):
    migrate_master(project)
    schema = provision_tenant(project, ORG).tenant.schema
    db = project.connection

    rollback_tenants(project, steps=1, yes=True)
    migrate_tenants(project)

    rows = log_rows(db, schema)
    assert [row[0] for row in rows] == list(range(1, len(TENANT_IDS) + 3))
    assert [(r[1], r[2], r[3]) for r in rows] == [
        *[(m, "apply", 1) for m in TENANT_IDS],
        (TENANT_IDS[-1], "rollback", None),
        (TENANT_IDS[-1], "apply", 2),
    ]
    assert applied_ids(db, schema) == TENANT_IDS
    assert status(project).tenants[0].state == "at head"


def test_a_schema_with_every_migration_rolled_back_is_never_migrated(project):
    migrate_master(project)
    provision_tenant(project, ORG)
    schema = schema_for(ORG)
    db = project.connection
    rollback_tenants(project, yes=True)  # the whole first batch: its provisioning

    assert [row[2] for row in log_rows(db, schema)][-3:] == ["rollback"] * 3
    assert applied_ids(db, schema) == []
    assert status(project).tenants[0].state == "never migrated"
    assert migrate_tenants(project).ok
    assert applied_ids(db, schema) == TENANT_IDS
