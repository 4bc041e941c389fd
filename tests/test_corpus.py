"""The project's own migration history (tests/corpus) does for every tenant what psql does.

The corpus is a small, realistic tenant history holding what real histories hold: enums made,
grown (ALTER TYPE ... ADD VALUE) and the new value used by the next migration or a later one; a
temporary staging table filling real ones; seed data as pg_dump writes it (COPY ... FROM stdin);
DO blocks; plpgsql functions with their own search path; triggers; a view dropped and rebuilt;
indexes built CONCURRENTLY in a non-transactional file; a down file that undoes each of them.

The oracle is the plain way to run those files: psql applies them one after another into one
schema, each file in a session of its own and, unless marked `-- transactional: false`, in a
transaction of its own, stopping at the first error. A tenant is right when pg_dump describes it
as it describes the oracle (the schema's name made the same, the tool's log table left out), and
its rows are the oracle's.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from yoyo_tenants import (
    embedded,
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_tenants,
    schema_for,
)

from .conftest import REPO, Admin, applied_ids, query

CORPUS = REPO / "tests" / "corpus"
IDS = sorted(p.name.removesuffix(".sql") for p in CORPUS.glob("*.sql") if ".rollback" not in p.name)
#: How many migrations a deploy gone wrong takes back: both grown enums made again without their
#: value, the COPY data, the concurrent indexes, the view rebuilt, the DO block, the functions.
UNDONE = 11
ORACLE = "psql_oracle"


@dataclass(frozen=True)
class Snapshot:
    """A schema as pg_dump describes it (its name replaced by <schema>), and each table's rows."""

    ddl: str
    rows: dict[str, list[str]]


def snapshot(params, schema: str) -> Snapshot:
    dump = subprocess.run(
        [
            embedded.bin_dir() / "pg_dump",
            "--schema-only",
            f"--schema={schema}",
            f"--exclude-table={schema}._yoyo_log",
            "--restrict-key=corpus",  # else a random key on every dump
            make_dsn(**params),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return Snapshot(dump.replace(schema, "<schema>"), table_rows(params, schema))


def table_rows(params, schema: str) -> dict[str, list[str]]:
    """Every table's rows as text, sorted (an UPDATE moves a row on disk, and pg_dump's data
    follows the disk); sequences' positions are not compared."""
    with Admin(params) as admin:
        names = admin.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace "
            "AND relkind = 'r' AND relname <> '_yoyo_log' ORDER BY relname",
            (schema,),
        )
        return {
            name: [
                row[0]
                for row in admin.execute(
                    sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(
                        sql.Identifier(schema, name)
                    )
                )
            ]
            for (name,) in names
        }


class Psql:
    """The corpus applied by psql into one schema, the plain way."""

    def __init__(self, params, schema: str = ORACLE):
        self.params, self.schema = params, schema
        with Admin(params) as admin:
            admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))

    def apply(self, ids: list[str]) -> None:
        for migration_id in ids:
            self.run(CORPUS / f"{migration_id}.sql")

    def undo(self, ids: list[str]) -> None:
        for migration_id in reversed(ids):
            self.run(CORPUS / f"{migration_id}.rollback.sql")

    def run(self, path: Path) -> None:
        transactional = not path.read_text(encoding="utf-8").startswith("-- transactional: false")
        env = {**os.environ, "PGOPTIONS": f"-c search_path={self.schema},public"}
        done = subprocess.run(
            [
                embedded.bin_dir() / "psql",
                "--no-psqlrc",
                "--quiet",
                "--set=ON_ERROR_STOP=1",
                *(["--single-transaction"] if transactional else []),
                f"--file={path}",
                make_dsn(**self.params),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"psql {path.name}: {done.stderr}"

    def snapshot(self) -> Snapshot:
        return snapshot(self.params, self.schema)


@pytest.fixture
def history(project):
    """A project whose tenant migrations are the corpus, its master migrations applied."""
    settings = replace(project, tenant_dir=CORPUS)
    assert migrate_master(settings).ok
    return settings


@pytest.fixture
def oracle(history) -> Psql:
    """The whole corpus applied by psql, beside the tenants."""
    psql = Psql(history.connection)
    psql.apply(IDS)
    return psql


def register(params, orgs: list[str]) -> list[str]:
    """Orgs registered with empty schemas, as an app that creates tenants itself leaves them."""
    schemas = [schema_for(org) for org in orgs]
    with Admin(params) as admin:
        admin.execute(
            "INSERT INTO public.tenants (clerk_org_id, schema_name) "
            "SELECT * FROM unnest(%s::text[], %s::text[])",
            (orgs, schemas),
        )
        for schema in schemas:
            admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return schemas


def failures(run) -> list[str]:
    return [f"{r.schema}: {r.failure}" for r in run.failed]


def assert_like_oracle(params, schemas: list[str], expected: Snapshot) -> None:
    for schema in schemas:
        found = snapshot(params, schema)
        assert found.ddl == expected.ddl, schema
        assert found.rows == expected.rows, schema


# -- the corpus itself ---------------------------------------------------------------------------


def test_each_down_file_undoes_its_migration(history):
    psql = Psql(history.connection, "psql_walk")
    states = [psql.snapshot()]
    for migration_id in IDS:
        psql.apply([migration_id])
        states.append(psql.snapshot())
        assert states[-1] != states[-2], f"{migration_id} changed nothing"

    for migration_id in reversed(IDS):
        psql.undo([migration_id])
        states.pop()
        assert psql.snapshot() == states[-1], f"{migration_id}.rollback.sql left the schema changed"


# -- the tool against the oracle -----------------------------------------------------------------


def test_orgs_provisioned_one_command_each_are_what_psql_makes(history, oracle, database):
    orgs = ["org_corpus1", "org_corpus2", "org_corpus3"]

    for org in orgs:
        done = provision_tenant(history, org)
        assert applied_ids(database, done.tenant.schema) == IDS
        assert done.created and done.migrations == IDS

    assert_like_oracle(database, [schema_for(org) for org in orgs], oracle.snapshot())
    # The COPY data as its file wrote it: escapes read, null as null, UTF-8 whole.
    tags = sql.SQL("SELECT slug, label, description FROM {} ORDER BY slug").format(
        sql.Identifier(schema_for(orgs[0]), "tags")
    )
    assert query(database, tags)[:3] == [
        ("agenda", "Agenda", "First line\nSecond line\tindented"),
        ("feedback", "Feedback", None),
        ("growth", "成長", "Learning goals, in the coachee's own words"),
    ]
    assert ("tools", "Tools", r"Notes live in C:\Coaching\Notes on Windows laptops") in query(
        database, tags
    )


def test_registered_orgs_migrated_from_empty_in_one_run_are_what_psql_makes(
    history, oracle, database
):
    # Two workers for four schemas: each worker connection serves two tenants in turn.
    schemas = register(database, ["org_empty1", "org_empty2", "org_empty3", "org_empty4"])

    run = migrate_tenants(history, jobs=2)

    assert run.ok, failures(run)
    assert all(applied_ids(database, schema) == IDS for schema in schemas)
    assert {r.schema: r.migrations for r in run.schemas} == {s: IDS for s in schemas}
    assert_like_oracle(database, schemas, oracle.snapshot())


def test_undoing_the_last_migrations_and_migrating_back_is_what_psql_does(
    history, oracle, database
):
    provisioned = [provision_tenant(history, "org_fleet1").tenant.schema]
    schemas = provisioned + register(database, ["org_fleet2", "org_fleet3"])
    assert migrate_tenants(history, jobs=2).ok
    head = oracle.snapshot()

    undone = rollback_tenants(history, steps=UNDONE, yes=True, jobs=2)
    oracle.undo(IDS[-UNDONE:])

    assert undone.ok, failures(undone)
    assert all(applied_ids(database, schema) == IDS[:-UNDONE] for schema in schemas)
    assert {r.schema: r.migrations for r in undone.schemas} == {
        s: IDS[-UNDONE:][::-1] for s in schemas
    }
    assert_like_oracle(database, schemas, oracle.snapshot())

    redone = migrate_tenants(history, jobs=2)
    oracle.apply(IDS[-UNDONE:])

    assert redone.ok, failures(redone)
    assert all(applied_ids(database, schema) == IDS for schema in schemas)
    assert oracle.snapshot() == head
    assert_like_oracle(database, schemas, head)
