"""The commands through a real transaction-pooling PgBouncer, whose few server connections are
shared by every client: one client's session settings would show up in the next one's transaction.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import psycopg2
import pytest
from psycopg2 import sql

import yoyo_tenants as tenants
from yoyo_tenants import schema_for
from yoyo_tenants.settings import Settings

from . import servers
from .conftest import (
    YOYO_TABLES,
    applied_ids,
    copy_migrations,
    new_database,
    query,
    write_migration,
)

pytestmark = pytest.mark.skipif(
    shutil.which("pgbouncer") is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer)",
)

POOL_SIZE = 2
DEFAULT_SEARCH_PATH = '"$user", public'
ORGS = [f"org_bouncer{n}x" for n in range(6)]
NEW_MIGRATION = "20990101000000_add_org_notes"


@pytest.fixture(scope="module")
def backend():
    """The wheel's PostgreSQL (with pgvector), reached by PgBouncer over its Unix socket."""
    with servers.postgres(hba=[]) as pg:
        yield pg


@pytest.fixture(scope="module")
def bouncer(backend):
    with servers.pgbouncer(
        backend.socket_params(),
        settings={"pool_mode": "transaction", "default_pool_size": POOL_SIZE},
    ) as running:
        yield running


@pytest.fixture
def dbname(backend):
    with new_database(backend.socket_params(), "pgb") as name:
        yield name


@pytest.fixture
def settings(tmp_path, bouncer, dbname) -> Settings:
    """A project whose DB_* variables point at PgBouncer."""
    copy_migrations(tmp_path)
    env = {
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(bouncer.port),
        "DB_USER": "postgres",
        "DB_NAME": dbname,
    }
    return Settings.load(tmp_path, environ=env)


class Observer(threading.Thread):
    """Another client of the same PgBouncer, reading its session settings in its own
    transactions, as an application sharing the pool would."""

    def __init__(self, params):
        super().__init__(daemon=True)
        self.params = params
        self.seen: list[tuple[float, str, str, str, int]] = []  # time, settings..., backend pid
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            connection = psycopg2.connect(**self.params)  # not autocommit: BEGIN ... COMMIT
            try:
                while not self.stopping.is_set():
                    with connection.cursor() as cursor:
                        cursor.execute("SHOW search_path")
                        [path] = cursor.fetchone()
                        cursor.execute(
                            "SELECT current_setting('lock_timeout'),"
                            " current_setting('statement_timeout'), pg_backend_pid()"
                        )
                        lock_timeout, statement_timeout, pid = cursor.fetchone()
                    connection.commit()
                    self.seen.append((time.monotonic(), path, lock_timeout, statement_timeout, pid))
                    time.sleep(0.002)
            finally:
                connection.close()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def wait_for(self, more: int, timeout: float = 10) -> None:
        target, deadline = len(self.seen) + more, time.monotonic() + timeout
        while len(self.seen) < target and self.error is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.error is None, self.error
        assert len(self.seen) >= target, "the observer stalled"

    def between(self, start: float, end: float) -> list[tuple]:
        return [seen for seen in self.seen if start <= seen[0] <= end]


def relations(params) -> dict[str, set[str]]:
    """Every table, index, sequence and view outside the system schemas, by schema."""
    rows = query(
        params,
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
        """,
    )
    found: dict[str, set[str]] = {}
    for schema, name in rows:
        found.setdefault(schema, set()).add(name)
    return found


def migration_ids(directory) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.sql") if ".rollback." not in path.name)


def logged_ids(params, schema: str) -> list[tuple[str, str]]:
    rows = query(
        params,
        sql.SQL("SELECT migration_id, operation FROM {}").format(
            sql.Identifier(schema, "_yoyo_log")
        ),
    )
    return sorted(rows)


def test_tenant_migrations_through_a_transaction_pooler_stay_in_their_schemas(
    settings, bouncer, backend, dbname
):
    direct = backend.socket_params(dbname)
    observer = Observer(bouncer.params(dbname))
    observer.start()
    try:
        observer.wait_for(5)  # before

        assert tenants.migrate_master(settings).ok
        for org in ORGS:
            provisioned = tenants.provision_tenant(settings, org)
            assert provisioned.created and len(provisioned.migrations) == 3, org
        write_migration(
            settings.tenant_dir,
            NEW_MIGRATION,
            "CREATE TABLE org_notes (\n"
            "    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
            "    author_id UUID REFERENCES org_users (id),\n"
            "    body TEXT NOT NULL,\n"
            "    embedding vector(3)\n"
            ");\n"
            "CREATE INDEX org_notes_author_idx ON org_notes (author_id);\n"
            # which server connection ran this tenant's migration, and in which schema it ran
            "INSERT INTO org_settings (key, value) VALUES ('migrated_by',"
            " jsonb_build_object('pid', pg_backend_pid(), 'schema', current_schema()));\n"
            "SELECT pg_sleep(0.05);\n",
            "DROP TABLE org_notes;\nDELETE FROM org_settings WHERE key = 'migrated_by';\n",
        )

        started = time.monotonic()
        run = tenants.migrate_tenants(settings, jobs=4)
        ended = time.monotonic()
        observer.wait_for(5)  # after
    finally:
        observer.stopping.set()
        observer.join(10)
    assert observer.error is None, observer.error

    assert run.ok, [(r.schema, r.failure) for r in run.schemas]
    assert [r.outcome for r in run.schemas] == ["done"] * len(ORGS)
    assert all(r.migrations == [NEW_MIGRATION] for r in run.schemas)

    # The other client never saw a tenant's search_path, nor the runs' lock or statement timeouts.
    assert {seen[1] for seen in observer.seen} == {DEFAULT_SEARCH_PATH}
    assert {(seen[2], seen[3]) for seen in observer.seen} == {("0", "0")}
    assert observer.between(started, ended), "no observation during migrate-tenants"

    # ... though it shared server connections with the tenant migrations.
    schemas = [schema_for(org) for org in ORGS]
    migrated_by = {}
    for schema in schemas:
        rows = query(direct, sql.SQL("SELECT value FROM {}").format(
            sql.Identifier(schema, "org_settings")))  # fmt: skip
        assert len(rows) == 1, (schema, rows)
        value = rows[0][0] if isinstance(rows[0][0], dict) else json.loads(rows[0][0])
        assert value["schema"] == schema
        migrated_by[schema] = value["pid"]
    observer_pids = {seen[4] for seen in observer.seen}
    assert observer_pids & set(migrated_by.values())
    assert len(observer_pids | set(migrated_by.values())) <= POOL_SIZE

    # Each schema holds its own objects and bookkeeping, and nothing of anyone else's.
    master_ids = sorted(
        p.stem for p in settings.master_dir.glob("*.sql") if ".rollback" not in p.name
    )
    tenant_ids = sorted(
        p.stem for p in settings.tenant_dir.glob("*.sql") if ".rollback" not in p.name
    )
    found = relations(direct)
    assert set(found) == {"public", *schemas}
    yoyo_objects = YOYO_TABLES
    assert found["public"] >= {"tenants", "focus_areas", "coaching_categories", *yoyo_objects}
    tenant_objects = found[schemas[0]]
    assert tenant_objects >= {
        "org_users", "org_settings", "chat_messages", "org_notes", "org_notes_author_idx",
        *yoyo_objects,
    }  # fmt: skip
    for schema in schemas:
        assert found[schema] == tenant_objects, schema
        assert applied_ids(direct, schema) == tenant_ids
        assert logged_ids(direct, schema) == [(id_, "apply") for id_ in tenant_ids]
    assert found["public"] & tenant_objects == yoyo_objects
    assert applied_ids(direct, "public") == master_ids
    assert logged_ids(direct, "public") == [(id_, "apply") for id_ in master_ids]

    # A second run through the pooler finds every tenant at head.
    again = tenants.migrate_tenants(settings, jobs=4)
    assert [r.outcome for r in again.schemas] == ["up to date"] * len(ORGS)


def test_status_through_the_pooler_leaves_the_default_search_path(settings, bouncer, dbname):
    assert tenants.migrate_master(settings).ok
    tenants.provision_tenant(settings, ORGS[0])
    report = tenants.status(settings)
    assert report.master.state == "at head"
    assert [t.state for t in report.tenants] == ["at head"]
    for _ in range(2 * POOL_SIZE):
        connection = psycopg2.connect(**bouncer.params(dbname))
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW search_path")
                assert cursor.fetchone()[0] == DEFAULT_SEARCH_PATH
        finally:
            connection.close()
