"""On a real Citus cluster with schema-based sharding: each tenant a distributed schema on one
worker, migrated by the same commands.

Runs when YOYO_TENANTS_TEST_CITUS_URL names a coordinator (tests/citus_cluster.py starts one
where Citus is installed: `export YOYO_TENANTS_TEST_CITUS_URL=$(python tests/citus_cluster.py
start)`), and is skipped otherwise. The tests share the cluster's database and run in order:
the module starts it from an empty public schema.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from yoyo_tenants import (
    commands,
    deprovision_tenant,
    migrate_master,
    migrate_tenants,
    provision_tenant,
    restore_tenant,
    rollback_tenants,
    status,
    verify,
)
from yoyo_tenants.settings import Settings

from .conftest import TENANT_IDS, Admin, applied_ids, columns, copy_migrations, query

URL = os.environ.get("YOYO_TENANTS_TEST_CITUS_URL")
pytestmark = pytest.mark.skipif(
    not URL, reason="no Citus cluster: set YOYO_TENANTS_TEST_CITUS_URL to a coordinator's URL"
)

ORGS = [f"org_citus{i:03d}" for i in range(20)]
FOCUS = "20300101000000_focus_area"
BIO = "20300101000100_bio"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The coordinator's database, emptied, with the master migrations applied."""
    params = {**parse_dsn(URL), "application_name": "yoyo-tenants"}
    with Admin(params) as admin:
        schemas = admin.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tid\\_%'")
        for (schema,) in schemas:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        tables = admin.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for (table,) in tables:
            admin.execute(sql.SQL("DROP TABLE {} CASCADE").format(sql.Identifier("public", table)))
    root = tmp_path_factory.mktemp("citus")
    copy_migrations(root)
    settings = Settings(
        root, params, root / "migrations" / "master", root / "migrations" / "tenant"
    )
    run = migrate_master(settings)
    assert run.ok, run.failed
    return settings


def nodes(settings) -> Counter:
    return Counter(t.node for t in status(settings).tenants)


def test_master_migrations_make_the_lookup_tables_reference_tables(cluster):
    kinds = dict(query(cluster.connection, "SELECT logicalrelid::text, partmethod FROM "
                       "pg_dist_partition WHERE logicalrelid::text IN "
                       "('focus_areas', 'coaching_categories', 'tenants')"))  # fmt: skip
    assert kinds == {"focus_areas": "n", "coaching_categories": "n"}  # reference; tenants local
    assert migrate_master(cluster).schemas[0].migrations == []  # vector there: nothing to do


def test_twenty_tenants_are_provisioned_and_spread_over_the_workers(cluster):
    for org in ORGS:
        done = provision_tenant(cluster, org)
        assert done.created and done.migrations == TENANT_IDS

    placed = nodes(cluster)
    assert len(placed) == 2 and None not in placed
    assert max(placed.values()) - min(placed.values()) <= 1, placed


def test_a_migration_adding_an_index_and_a_foreign_key_to_a_reference_table(cluster):
    (cluster.tenant_dir / f"{FOCUS}.sql").write_text(
        "ALTER TABLE org_users ADD COLUMN focus_area_id BIGINT;\n"
        "CREATE INDEX org_users_focus_area_idx ON org_users (focus_area_id);\n"
        "ALTER TABLE org_users ADD CONSTRAINT org_users_focus_area_fk\n"
        "    FOREIGN KEY (focus_area_id) REFERENCES public.focus_areas (id);\n"
    )
    (cluster.tenant_dir / f"{FOCUS}.rollback.sql").write_text(
        "ALTER TABLE org_users DROP CONSTRAINT org_users_focus_area_fk;\n"
        "DROP INDEX org_users_focus_area_idx;\n"
        "ALTER TABLE org_users DROP COLUMN focus_area_id;\n"
    )

    run = migrate_tenants(cluster, jobs=4)

    assert run.ok, run.failed
    assert run.count("done") == len(ORGS)
    first = status(cluster).tenants[0].schema
    assert "focus_area_id" in columns(cluster.connection, first, "org_users")
    assert verify(cluster) == []


def test_a_rollback_dropping_a_column_undoes_the_last_deploy(cluster):
    run = rollback_tenants(cluster, jobs=4)

    assert run.ok, run.failed
    assert all(r.migrations == [FOCUS] for r in run.schemas)
    first = status(cluster).tenants[0].schema
    assert "focus_area_id" not in columns(cluster.connection, first, "org_users")
    assert migrate_tenants(cluster, jobs=4).ok  # and back again


def test_status_shows_each_tenants_node(cluster):
    report = status(cluster)

    assert all(t.node and ":" in t.node for t in report.tenants)
    workers = {row[0] for row in query(cluster.connection, "SELECT nodename || ':' || nodeport "
                                        "FROM pg_dist_node WHERE noderole = 'primary' AND "
                                        "groupid <> 0")}  # fmt: skip
    assert {t.node for t in report.tenants} == workers


def test_a_tenant_moved_online_keeps_its_log_and_data_and_migrates_after(cluster):
    tenant = status(cluster).tenants[0]
    query(cluster.connection, sql.SQL("INSERT INTO {} (key, value) VALUES ('moved', '1')").format(
        sql.Identifier(tenant.schema, "org_settings")))  # fmt: skip
    other = next(n for n in nodes(cluster) if n != tenant.node)

    was, now = commands.move_tenant(cluster, tenant.org_id, other)

    assert (was, now) == (tenant.node, other)
    assert {t.schema: t.node for t in status(cluster).tenants}[tenant.schema] == other
    assert applied_ids(cluster.connection, tenant.schema) == [*TENANT_IDS, FOCUS]
    assert query(cluster.connection, sql.SQL("SELECT value FROM {} WHERE key = 'moved'").format(
        sql.Identifier(tenant.schema, "org_settings"))) == [(1,)]  # fmt: skip
    (cluster.tenant_dir / f"{BIO}.sql").write_text("ALTER TABLE org_users ADD COLUMN bio TEXT;\n")
    run = migrate_tenants(cluster, tenant=tenant.org_id)
    assert run.ok and run.schemas[0].migrations == [BIO]


def test_a_tenant_deprovisioned_with_an_archive_comes_back(cluster, tmp_path):
    tenant = status(cluster).tenants[-1]
    archive = tmp_path / "tenant.dump"

    gone = deprovision_tenant(cluster, tenant.org_id, yes=True, archive=archive)

    assert gone.dropped and archive.stat().st_size > 0
    assert tenant.org_id not in {t.org_id for t in status(cluster).tenants}
    back = restore_tenant(cluster, archive)
    assert back.tenant.schema == tenant.schema
    assert {t.schema: t.node for t in status(cluster).tenants}[tenant.schema]  # distributed
    assert verify(cluster) == []


def test_eight_concurrent_provisions_all_land_and_stay_spread(cluster):
    orgs = [f"org_concurrent{i}" for i in range(8)]
    errors: list[BaseException] = []

    def provision(org: str) -> None:
        try:
            provision_tenant(cluster, org)
        except BaseException as exc:  # noqa: BLE001 - reported below, per org
            errors.append(exc)

    threads = [threading.Thread(target=provision, args=(org,)) for org in orgs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert orgs[0] in {t.org_id for t in status(cluster).tenants}
    placed = nodes(cluster)
    assert max(placed.values()) - min(placed.values()) <= 1, placed
    assert verify(cluster) == []
