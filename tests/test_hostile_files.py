"""Hostile migration files: every statement that would end or escape a schema's transaction, or
change its session, is refused before anything runs, by file and line, by every command (real
runs, new orgs, dry runs, the command line), and the database is left exactly as it was. What no
parser can see is caught at run time, for that migration only.

Refusals write nothing, so they share one database (public and two tenants at head); each test
has its own copy of the migration folders. Tests whose files do run get a fresh database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg2 import sql

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_master,
    rollback_tenants,
    schema_for,
)
from yoyo_tenants.errors import MigrationFailed, NotReady, UnsafeMigration
from yoyo_tenants.settings import Settings

from .conftest import (
    MASTER_IDS,
    REPO,
    TENANT_IDS,
    Admin,
    applied_ids,
    copy_migrations,
    new_database,
    query,
    run_invoke,
    tables,
    user_env,
    write_migration,
)

ORGS = ("org_hostile1", "org_hostile2")
NEW_ORG = "org_newcomer1"
HOSTILE = "20300101000100_hostile"
BEFORE = "20300101000000_add_nickname"


# -- the hostile set -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """A migration file that may not run, and what its refusal must say."""

    text: str
    #: Words the message must hold, for a tenant migration.
    words: tuple[str, ...]
    #: The line the message names (None: the file as a whole).
    line: int | None = 3
    #: Words for the same file as a master migration: () the same as a tenant's, None none (a
    #: master migration may run it).
    master: tuple[str, ...] | None = ()

    @property
    def master_words(self) -> tuple[str, ...] | None:
        return self.words if self.master == () else self.master


def around(statement: str) -> str:
    """A file whose line 3 is `statement`, with harmless work before and after it."""
    return (
        "-- one statement in this file may not run\n"
        "CREATE TABLE before_it (i int);\n"
        f"{statement}\n"
        "CREATE TABLE after_it (i int);\n"
    )


def case(statement: str, *words: str, master: tuple[str, ...] | None = (), **kw) -> Hostile:
    return Hostile(around(statement), words, master=master, **kw)


COMMITS = ("COMMIT would commit", "transactional: false")
ROLLS_BACK = ("ROLLBACK would end the schema's transaction",)
LEAVES_TENANT = "would move the migration out of its tenant schema"
OUTLIVES = "would outlive the migration's transaction: use SET LOCAL search_path"
ANOTHER_ROLE = "as another role"

CASES = {
    # Ending the transaction, or opening another.
    "commit": case("COMMIT;", *COMMITS),
    "commit-work": case("COMMIT WORK;", *COMMITS),
    "end": case("END;", *COMMITS),
    "commit-and-chain": case("COMMIT AND CHAIN;", *COMMITS),
    "rollback": case("ROLLBACK;", *ROLLS_BACK),
    "abort": case("ABORT;", *ROLLS_BACK),
    "rollback-and-chain": case("ROLLBACK AND CHAIN;", *ROLLS_BACK),
    "start-transaction": case("START TRANSACTION;", "START TRANSACTION would start"),
    "begin": case("BEGIN;", "BEGIN would start a transaction"),
    "begin-isolation": case("BEGIN WORK ISOLATION LEVEL SERIALIZABLE;", "BEGIN would start"),
    "savepoint": case("SAVEPOINT mine;", "SAVEPOINT would interfere"),
    "release": case("RELEASE mine;", "RELEASE SAVEPOINT would interfere"),
    "rollback-to": case("ROLLBACK TO SAVEPOINT mine;", "ROLLBACK TO SAVEPOINT would interfere"),
    "prepare-transaction": case("PREPARE TRANSACTION 'mine';", "PREPARE TRANSACTION would end"),
    "commit-prepared": case("COMMIT PREPARED 'mine';", "COMMIT PREPARED", "run it by hand"),
    "rollback-prepared": case("ROLLBACK PREPARED 'mine';", "ROLLBACK PREPARED", "by hand"),
    "wrapped": Hostile(
        "BEGIN;\nCREATE TABLE before_it (i int);\nCOMMIT;\n",
        ("wrapped in BEGIN; ... COMMIT;", "already runs in its own transaction"),
        line=None,
    ),
    "wrapped-start-end": Hostile(
        "-- the old way\nSTART TRANSACTION;\nCREATE TABLE before_it (i int);\nEND;\n",
        ("already runs in its own transaction",),
        line=None,
    ),
    # Where the tables go.
    "set-search-path": case(
        "SET search_path TO public;", "SET search_path", LEAVES_TENANT, master=(OUTLIVES,)
    ),
    "set-session-search-path": case(
        "SET SESSION search_path = public;", "SET search_path", master=(OUTLIVES,)
    ),
    "set-search-path-default": case(
        "SET search_path TO DEFAULT;", "SET search_path", master=(OUTLIVES,)
    ),
    "set-quoted-search-path": case(
        'SET "Search_Path" TO public;', "SET search_path", master=(OUTLIVES,)
    ),
    "set-local-search-path": case(
        "SET LOCAL search_path TO public;", "SET search_path", LEAVES_TENANT, master=None
    ),
    "reset-search-path": case("RESET search_path;", "RESET search_path", master=(OUTLIVES,)),
    "set-config-search-path": case(
        "SELECT set_config('search_path', 'public', false);",
        "set_config('search_path', ...)",
        LEAVES_TENANT,
        master=(OUTLIVES,),
    ),
    "set-config-search-path-local": case(
        "SELECT set_config('search_path', 'public', true);",
        "set_config('search_path', ...)",
        master=None,
    ),
    "set-config-unicode-name": case(
        "SELECT set_config(U&'search\\005Fpath', 'public', false);",
        "set_config('search_path', ...)",
        master=(OUTLIVES,),
    ),
    "set-config-unicode-function": case(
        "SELECT U&\"set!005Fconfig\" UESCAPE '!' ('search_path', 'public', false);",
        "set_config('search_path', ...)",
        master=(OUTLIVES,),
    ),
    "set-config-escape-string": case(
        "SELECT set_config(E'search\\137path', 'public', false);",
        "set_config('search_path', ...)",
        master=(OUTLIVES,),
    ),
    "set-config-qualified-upper-case": case(
        "SELECT PG_CATALOG.SET_CONFIG('SEARCH_PATH', 'public', false);",
        "set_config('search_path', ...)",
        master=(OUTLIVES,),
    ),
    "set-config-in-a-subquery": case(
        "CREATE TABLE moved AS\n"
        "  SELECT * FROM (SELECT set_config('search_path', 'public', false)) s;",
        "set_config('search_path', ...)",
        master=(OUTLIVES,),
    ),
    "set-config-computed-name": case(
        "SELECT set_config('search_' || 'path', 'public', false);", "computed at run time"
    ),
    # Whose tables they are.
    "set-role": case("SET ROLE postgres;", "SET ROLE", ANOTHER_ROLE),
    "set-local-role": case("SET LOCAL ROLE postgres;", "SET ROLE", ANOTHER_ROLE),
    "reset-role": case("RESET ROLE;", "RESET ROLE", ANOTHER_ROLE),
    "set-session-authorization": case(
        "SET SESSION AUTHORIZATION postgres;", "SET SESSION AUTHORIZATION", ANOTHER_ROLE
    ),
    "reset-session-authorization": case(
        "RESET SESSION AUTHORIZATION;", "RESET SESSION AUTHORIZATION", ANOTHER_ROLE
    ),
    "set-config-role": case(
        "SELECT set_config('role', 'postgres', false);", "set_config('role', ...)", ANOTHER_ROLE
    ),
    "set-config-role-in-a-cte": case(
        "WITH r AS (SELECT set_config('role', 'postgres', true)) SELECT * FROM r;",
        "set_config('role', ...)",
    ),
    "set-config-session-authorization": case(
        "SELECT set_config('session_authorization', 'postgres', false);",
        "set_config('session_authorization', ...)",
        ANOTHER_ROLE,
    ),
    # The whole session.
    "reset-all": case("RESET ALL;", "RESET ALL would reset"),
    "discard-all": case("DISCARD ALL;", "DISCARD would drop the session's state"),
    "discard-temp": case("DISCARD TEMP;", "DISCARD"),
    # Where the line is: after comments, several lines long, two statements on a line.
    "after-a-block-comment": Hostile(
        "/* a header\n   over three\n   lines */\nCREATE TABLE before_it (i int);\n\n"
        "-- and now:\nCOMMIT;\n",
        COMMITS,
        line=7,
    ),
    "over-several-lines": Hostile(
        "CREATE TABLE before_it (i int);\n-- café ☕ before it\nSET\n  search_path\n  TO public;\n",
        ("SET search_path",),
        line=3,
        master=(OUTLIVES,),
    ),
    "two-on-a-line": Hostile(
        "-- x\n-- y\nCREATE TABLE before_it (i int); SAVEPOINT mine;\n", ("SAVEPOINT",), line=3
    ),
}
TENANT_CASES = [pytest.param(h, id=name) for name, h in CASES.items()]
MASTER_REFUSED = [pytest.param(h, id=n) for n, h in CASES.items() if h.master_words is not None]
MASTER_ACCEPTED = [pytest.param(h, id=n) for n, h in CASES.items() if h.master_words is None]


def assert_refused(refused, path: Path, hostile: Hostile, words=None) -> None:
    """The refusal names the file and the line, and says what to do, on one line."""
    exc = refused.value
    message = str(exc)
    assert Path(exc.path).name == path.name, message
    assert exc.line == hostile.line, message
    assert path.name in message and "\n" not in message
    if hostile.line is not None:
        assert f"line {hostile.line}:" in message
    for word in hostile.words if words is None else words:
        assert word in message, message


# -- fixtures ------------------------------------------------------------------------------------


def settings_for(root: Path, params) -> Settings:
    return Settings(
        root=root,
        connection=params,
        master_dir=root / "migrations" / "master",
        tenant_dir=root / "migrations" / "tenant",
    )


@pytest.fixture(scope="module")
def shared(server, tmp_path_factory):
    """One database for this module's refusals: public and two tenants at head."""
    with new_database(server, prefix="hostile") as name:
        params = {**server, "dbname": name}
        root = tmp_path_factory.mktemp("shared")
        copy_migrations(root)
        settings = settings_for(root, params)
        migrate_master(settings)
        for org in ORGS:
            provision_tenant(settings, org)
        yield params


@pytest.fixture
def at_head(shared, tmp_path) -> Settings:
    """A project whose migrations (its own copy) the shared database is at head with."""
    copy_migrations(tmp_path)
    return settings_for(tmp_path, shared)


@pytest.fixture
def tenants(project):
    """A fresh database with public and two tenants at head (for files that do run)."""
    migrate_master(project)
    return [provision_tenant(project, org).tenant for org in ORGS]


def add_hostile(directory: Path, hostile: Hostile) -> Path:
    path = directory / f"{HOSTILE}.sql"
    path.write_text(hostile.text)
    return path


# -- what must not change ------------------------------------------------------------------------


def snapshot(params) -> dict[str, list]:
    """The catalog, public and every log: the schemas; every relation outside pg_catalog,
    information_schema and pg_toast; every column of every table in public and the tenants;
    every row of every table in public (the registry, public's log); every tenant's log.

    Not the rows of the tool's own tables in public: a run that started is recorded in
    yoyo_tenants_runs whether or not it changed anything, and yoyo_tenants_heads follows the
    logs, which are compared."""
    with Admin(params) as admin:
        found = {
            "schemas": admin.execute("SELECT nspname FROM pg_namespace ORDER BY 1"),
            "relations": admin.execute(
                "SELECT n.nspname, c.relname, c.relkind FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
                " ORDER BY 1, 2"
            ),
            "columns": admin.execute(
                "SELECT table_schema, table_name, ordinal_position, column_name, data_type"
                " FROM information_schema.columns"
                " WHERE table_schema = 'public' OR table_schema LIKE 'tid\\_%'"
                " ORDER BY 1, 2, 3"
            ),
            "functions": admin.execute(
                "SELECT n.nspname, p.oid::regprocedure::text FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'public' OR n.nspname LIKE 'tid\\_%' ORDER BY 1, 2"
            ),
        }
        public_tables = admin.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND relkind = 'r' AND relname NOT IN ('yoyo_tenants_runs', 'yoyo_tenants_heads')"
            " ORDER BY 1"
        )
        for (table,) in public_tables:
            found[f"public.{table}"] = admin.execute(
                sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(
                    sql.Identifier("public", table)
                )
            )
        logs = admin.execute(
            "SELECT relnamespace::regnamespace::text FROM pg_class"
            " WHERE relname = '_yoyo_log' AND relnamespace <> 'public'::regnamespace ORDER BY 1"
        )
        for (schema,) in logs:
            found[f"{schema}._yoyo_log"] = admin.execute(
                sql.SQL("SELECT l::text FROM {} l ORDER BY id").format(
                    sql.Identifier(schema, "_yoyo_log")
                )
            )
    return found


def test_the_snapshot_sees_every_kind_of_write(project, database, tenants):
    """The control for every `snapshot(...) == before` below."""
    schema = tenants[0].schema
    for write in (
        "CREATE SCHEMA stray",
        "CREATE TABLE public.stray (i int)",
        f"CREATE INDEX stray_idx ON {schema}.org_settings (created_at)",
        f"ALTER TABLE {schema}.org_users ADD COLUMN stray text",
        f"CREATE FUNCTION {schema}.stray() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        f"DELETE FROM {schema}._yoyo_log WHERE id = (SELECT max(id) FROM {schema}._yoyo_log)",
        "DELETE FROM public._yoyo_log WHERE id = (SELECT max(id) FROM public._yoyo_log)",
        "UPDATE public.tenants SET status = 'suspended'",
        "INSERT INTO public.focus_areas (slug, name) VALUES ('stray', 'Stray')",
    ):
        before = snapshot(database)
        query(database, write)
        assert snapshot(database) != before, write


# -- tenant migrations ---------------------------------------------------------------------------


@pytest.mark.parametrize("hostile", TENANT_CASES)
def test_migrating_tenants_refuses_the_file_before_any_tenant_is_touched(at_head, shared, hostile):
    path = add_hostile(at_head.tenant_dir, hostile)
    before = snapshot(shared)

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(at_head, jobs=2)

    assert_refused(refused, path, hostile)
    assert snapshot(shared) == before


@pytest.mark.parametrize("hostile", TENANT_CASES)
def test_provisioning_a_new_org_refuses_the_file_and_registers_nothing(at_head, shared, hostile):
    path = add_hostile(at_head.tenant_dir, hostile)
    before = snapshot(shared)

    with pytest.raises(UnsafeMigration) as refused:
        provision_tenant(at_head, NEW_ORG)

    assert_refused(refused, path, hostile)
    assert query(shared, "SELECT 1 FROM public.tenants WHERE clerk_org_id = %s", (NEW_ORG,)) == []
    assert query(shared, "SELECT to_regnamespace(%s)", (schema_for(NEW_ORG),)) == [(None,)]
    assert snapshot(shared) == before


@pytest.mark.parametrize("hostile", TENANT_CASES)
def test_dry_runs_report_the_refusal_and_write_nothing(at_head, shared, hostile):
    tenant_file = add_hostile(at_head.tenant_dir, hostile)
    master_file = add_hostile(at_head.master_dir, hostile)
    before = snapshot(shared)

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(at_head, dry_run=True)
    assert_refused(refused, tenant_file, hostile)
    with pytest.raises(UnsafeMigration) as refused:
        provision_tenant(at_head, NEW_ORG, dry_run=True)
    assert_refused(refused, tenant_file, hostile)
    with pytest.raises(UnsafeMigration) as refused:
        provision_tenant(at_head, ORGS[0], dry_run=True)  # registered already
    assert_refused(refused, tenant_file, hostile)
    if hostile.master_words is not None:
        with pytest.raises(UnsafeMigration) as refused:
            migrate_master(at_head, dry_run=True)
        assert_refused(refused, master_file, hostile, hostile.master_words)

    assert snapshot(shared) == before


# -- master migrations ---------------------------------------------------------------------------


@pytest.mark.parametrize("hostile", MASTER_REFUSED)
def test_migrating_master_refuses_the_file_and_public_stays_as_it_was(at_head, shared, hostile):
    path = add_hostile(at_head.master_dir, hostile)
    before = snapshot(shared)

    with pytest.raises(UnsafeMigration) as refused:
        migrate_master(at_head)

    assert_refused(refused, path, hostile, hostile.master_words)
    assert snapshot(shared) == before


@pytest.mark.parametrize("hostile", MASTER_ACCEPTED)
def test_a_master_migration_may_set_its_search_path_for_its_own_transaction(
    project, database, hostile
):
    add_hostile(project.master_dir, hostile)

    run = migrate_master(project)

    assert run.ok and run.schemas[0].migrations == [*MASTER_IDS, HOSTILE]
    assert {"before_it", "after_it"} <= tables(database, "public")
    assert applied_ids(database, "public")[-1] == HOSTILE
    # The same statement in a tenant migration would move it out of its schema: refused.
    add_hostile(project.tenant_dir, hostile)
    with pytest.raises(UnsafeMigration) as refused:
        provision_tenant(project, NEW_ORG)
    assert LEAVES_TENANT in str(refused.value)
    assert query(database, "SELECT count(*) FROM public.tenants") == [(0,)]


# -- rollback files ------------------------------------------------------------------------------


COMMIT_ON_LINE_2 = Hostile("", COMMITS, line=2)


def test_a_rollback_file_with_commit_is_refused_before_anything_is_rolled_back(at_head, shared):
    # The rollback file of a migration every tenant has applied, edited to commit half-way.
    path = at_head.tenant_dir / f"{TENANT_IDS[-1]}.rollback.sql"
    path.write_text("DROP INDEX chat_messages_embedding_idx;\nCOMMIT;\nDROP TABLE chat_messages;\n")
    before = snapshot(shared)

    for run in (
        lambda: rollback_tenants(at_head),
        lambda: rollback_tenants(at_head, dry_run=True),
        lambda: rollback_tenants(at_head, tenant=ORGS[0], steps=1),
        lambda: migrate_tenants(at_head),  # every file is checked up front, even with no work
    ):
        with pytest.raises(UnsafeMigration) as refused:
            run()
        assert_refused(refused, path, COMMIT_ON_LINE_2)

    assert snapshot(shared) == before
    for org in ORGS:
        assert applied_ids(shared, schema_for(org)) == TENANT_IDS


def test_a_master_rollback_file_with_commit_is_refused(at_head, shared):
    path = at_head.master_dir / f"{MASTER_IDS[3]}.rollback.sql"
    path.write_text("DROP INDEX public.coaching_categories_focus_area_id_idx;\nCOMMIT;\n")
    before = snapshot(shared)

    with pytest.raises(UnsafeMigration) as refused:
        rollback_master(at_head)

    assert_refused(refused, path, COMMIT_ON_LINE_2)
    assert snapshot(shared) == before


def test_a_new_migration_whose_rollback_file_rolls_back_is_refused(at_head, shared):
    write_migration(
        at_head.tenant_dir,
        HOSTILE,
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n",
        "-- undo\nALTER TABLE org_users DROP COLUMN nickname;\nROLLBACK;\n",
    )
    path = at_head.tenant_dir / f"{HOSTILE}.rollback.sql"
    before = snapshot(shared)

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(at_head)

    assert_refused(refused, path, Hostile("", ROLLS_BACK, line=3))
    assert snapshot(shared) == before


# -- non-transactional migrations ----------------------------------------------------------------


NON_TRANSACTIONAL = "-- transactional: false\n"


def test_a_non_transactional_migration_may_commit_as_it_goes(project, database, tenants):
    write_migration(
        project.tenant_dir,
        HOSTILE,
        NON_TRANSACTIONAL + "BEGIN;\nCREATE TABLE committed_first (i int);\nCOMMIT;\n"
        "CREATE INDEX CONCURRENTLY committed_first_idx ON committed_first (i);\n",
    )

    run = migrate_tenants(project, jobs=2)

    assert run.ok, [str(r.failure) for r in run.failed]
    for tenant in tenants:
        assert "committed_first" in tables(database, tenant.schema)
        assert applied_ids(database, tenant.schema)[-1] == HOSTILE
    assert "committed_first" not in tables(database, "public")


@pytest.mark.parametrize(
    "statement, words",
    [
        ("SET search_path TO public;", ("SET search_path", LEAVES_TENANT)),
        ("SELECT set_config('search_path', 'public', false);", ("set_config('search_path'",)),
        ("SET ROLE postgres;", ("SET ROLE", ANOTHER_ROLE)),
        ("RESET ALL;", ("RESET ALL",)),
        ("DISCARD ALL;", ("DISCARD",)),
    ],
    ids=["set-search-path", "set-config", "set-role", "reset-all", "discard"],
)
def test_a_non_transactional_migration_may_not_change_the_session(
    at_head, shared, statement, words
):
    hostile = Hostile(NON_TRANSACTIONAL + "BEGIN;\nCOMMIT;\n" + statement + "\n", words, line=4)
    path = add_hostile(at_head.tenant_dir, hostile)
    before = snapshot(shared)

    with pytest.raises(UnsafeMigration) as refused:
        migrate_tenants(at_head)

    assert_refused(refused, path, hostile)
    assert snapshot(shared) == before


def test_a_failure_inside_a_non_transactional_migrations_own_transaction_stays_with_it(
    project, database, tenants
):
    first, second = tenants
    write_migration(
        project.tenant_dir,
        HOSTILE,
        NON_TRANSACTIONAL + "BEGIN;\nCREATE TABLE in_block (i int);\n"
        # (1 / 0 written out would fail when planned, in every schema)
        f"SELECT 1 / (current_schema() <> '{first.schema}')::int;\nCOMMIT;\n",
    )

    run = migrate_tenants(project, jobs=1)  # one connection serves both tenants, first first

    failed, done = run.schemas
    assert "division by zero" in str(failed.failure)
    assert "in_block" not in tables(database, first.schema)
    assert done.failure is None, str(done.failure)
    assert applied_ids(database, second.schema)[-1] == HOSTILE


# -- the command line ----------------------------------------------------------------------------


def invoke(cwd: Path, *args: str, params) -> subprocess.CompletedProcess:
    return run_invoke(cwd, *args, env=user_env(params))


@pytest.mark.parametrize(
    "command, kind, name",
    [
        (("migrate-tenants",), "tenant", "commit"),
        (("provision-tenant", NEW_ORG), "tenant", "set-config-unicode-name"),
        (("migrate-master",), "master", "set-role"),
    ],
    ids=["migrate-tenants", "provision-tenant", "migrate-master"],
)
def test_the_command_line_prints_one_error_line_naming_file_and_line_and_exits_2(
    at_head, shared, command, kind, name
):
    hostile = CASES[name]
    shutil.copy(REPO / "tasks.py", at_head.root)
    add_hostile(at_head.root / "migrations" / kind, hostile)
    before = snapshot(shared)

    done = invoke(at_head.root, *command, params=shared)

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: migrations/{kind}/{HOSTILE}.sql line {hostile.line}: ")
    assert all(word in line for word in hostile.words), line
    assert snapshot(shared) == before


# -- what no parser sees -------------------------------------------------------------------------


SNEAKY = {
    "do-block": (
        "DO $$ BEGIN PERFORM set_config('search_path', 'public', false); END $$;\n"
        "CREATE TABLE sneaky (i int);\n",
        "changed search_path to public",
    ),
    "function-made-earlier-in-the-file": (
        "CREATE FUNCTION move_me() RETURNS void LANGUAGE plpgsql AS $$\n"
        "BEGIN PERFORM set_config('search_path', 'public', false); END $$;\n"
        "SELECT move_me();\n"
        "CREATE TABLE sneaky (i int);\n",
        "changed search_path to public",
    ),
    "sql-function-made-earlier-in-the-file": (
        "CREATE FUNCTION move_me() RETURNS text LANGUAGE sql\n"
        "AS 'SELECT set_config(''search_path'', ''public'', false)';\n"
        "CREATE TABLE sneaky AS SELECT move_me() AS moved;\n",
        "changed search_path to public",
    ),
    "dynamic-sql": (
        "CREATE TABLE sneaky (i int);\n"
        "DO $$ BEGIN EXECUTE 'SET search_' || 'path TO public'; END $$;\n",
        "changed search_path to public",
    ),
    "commit-in-a-do-block": (
        "CREATE TABLE sneaky (i int);\nDO $$ BEGIN COMMIT; END $$;\n",
        "invalid transaction termination",
    ),
    "commit-in-a-procedure": (
        "CREATE PROCEDURE commit_me() LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$;\n"
        "CREATE TABLE sneaky (i int);\n"
        "CALL commit_me();\n",
        "invalid transaction termination",
    ),
}


def add_sneaky(directory: Path, text: str) -> None:
    write_migration(directory, BEFORE, "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n")
    write_migration(directory, HOSTILE, text)


def public_part(found: dict[str, list]) -> dict[str, list]:
    """What of a snapshot is public's: its relations, functions and rows."""
    return {
        "relations": [r for r in found["relations"] if r[0] == "public"],
        "functions": [f for f in found["functions"] if f[0] == "public"],
        **{key: rows for key, rows in found.items() if key.startswith("public.")},
    }


@pytest.mark.parametrize("text, words", SNEAKY.values(), ids=SNEAKY.keys())
def test_what_no_parser_sees_is_caught_at_run_time_and_rolled_back(
    project, database, tenants, text, words
):
    add_sneaky(project.tenant_dir, text)
    before = snapshot(database)

    run = migrate_tenants(project, jobs=2)

    assert not run.ok
    for tenant, result in zip(tenants, run.schemas, strict=True):
        assert result.failure.migration == HOSTILE
        assert words in str(result.failure)
        assert result.migrations == [BEFORE]  # the migration before it committed
        assert applied_ids(database, tenant.schema) == [*TENANT_IDS, BEFORE]
        assert "sneaky" not in tables(database, tenant.schema)
    assert public_part(snapshot(database)) == public_part(before)


@pytest.mark.parametrize("text, words", SNEAKY.values(), ids=SNEAKY.keys())
def test_what_no_parser_sees_fails_provisioning_whole(project, database, text, words):
    migrate_master(project)
    add_sneaky(project.tenant_dir, text)
    before = snapshot(database)

    with pytest.raises(MigrationFailed) as failed:
        provision_tenant(project, NEW_ORG)

    assert failed.value.migration_id == HOSTILE and words in str(failed.value)
    assert snapshot(database) == before


def test_a_search_path_moved_in_a_master_migration_is_caught_at_run_time(project, database):
    migrate_master(project)
    write_migration(
        project.master_dir,
        HOSTILE,
        "DO $$ BEGIN PERFORM set_config('search_path', 'pg_temp', false); END $$;\n"
        "CREATE TABLE sneaky (i int);\n",
    )
    before = snapshot(database)

    run = migrate_master(project)

    [result] = run.schemas
    assert result.failure.migration == HOSTILE
    assert "changed search_path to pg_temp" in str(result.failure)
    assert snapshot(database) == before


def test_a_python_migration_that_commits_on_its_connection_leaves_nothing_behind(
    project, database, tenants
):
    write_migration(project.tenant_dir, BEFORE, "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n")
    (project.tenant_dir / f"{HOSTILE}.py").write_text(
        "from yoyo import step\n"
        "def apply(conn):\n"
        "    cursor = conn.cursor()\n"
        "    cursor.execute('CREATE TABLE sneaky (i int)')\n"
        "    cursor.execute('COMMIT')\n"
        "    cursor.execute('CREATE TABLE sneaky_after (i int)')\n"
        "steps = [step(apply)]\n"
    )
    before = public_part(snapshot(database))

    run = migrate_tenants(project, jobs=1)

    assert public_part(snapshot(database)) == before
    for tenant, result in zip(tenants, run.schemas, strict=True):
        assert result.failure.migration == HOSTILE
        assert "sneaky" not in tables(database, tenant.schema)
        assert applied_ids(database, tenant.schema) == [*TENANT_IDS, BEFORE]


#: Other ways a Python migration's code can send COMMIT: each is checked as a file is.
PYTHON_COMMITS = {
    "executemany": "conn.cursor().executemany('COMMIT', [{}])",
    "copy-expert": "conn.cursor().copy_expert('COMMIT', io.StringIO())",
    "composed": "conn.cursor().execute(sql.SQL('COMMIT'))",
    "bytes": "conn.cursor().execute(b'COMMIT')",
}


def python_commit(call: str) -> str:
    return (
        "import io\n"
        "from psycopg2 import sql\n"
        "from yoyo import step\n"
        "def apply(conn):\n"
        "    conn.cursor().execute('CREATE TABLE sneaky (i int)')\n"
        f"    {call}\n"
        "    conn.cursor().execute('CREATE TABLE sneaky_after (i int)')\n"
        "steps = [step(apply)]\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        *[pytest.param(python_commit(call), id=name) for name, call in PYTHON_COMMITS.items()],
        pytest.param(
            "from yoyo import step\n"
            "steps = [step('CREATE TABLE sneaky (i int)'), step('COMMIT')]\n",
            id="a-step-of-sql",
        ),
    ],
)
def test_every_way_a_python_migration_sends_sql_is_checked(project, database, tenants, text):
    write_migration(project.tenant_dir, BEFORE, "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n")
    (project.tenant_dir / f"{HOSTILE}.py").write_text(text)
    before = public_part(snapshot(database))

    run = migrate_tenants(project, jobs=1)

    assert public_part(snapshot(database)) == before
    for tenant, result in zip(tenants, run.schemas, strict=True):
        assert result.failure.migration == HOSTILE
        assert "COMMIT would commit" in str(result.failure), result.failure
        assert {"sneaky", "sneaky_after"}.isdisjoint(tables(database, tenant.schema))
        assert applied_ids(database, tenant.schema) == [*TENANT_IDS, BEFORE]


# -- strings the server reads differently --------------------------------------------------------

#: With standard_conforming_strings off, the server reads `'a\'; SELECT '` as one string and the
#: COMMIT after it as a statement; the checker (PostgreSQL's grammar with the setting on, the
#: default since 9.1) reads two SELECTs of two strings.
HIDDEN_COMMIT = "CREATE TABLE before_it (i int);\nSELECT 'a\\'; SELECT '; COMMIT; --';\n"


def backslash_escapes_by_default(database) -> None:
    name = sql.Identifier(database["dbname"])
    query(database, sql.SQL("ALTER DATABASE {} SET standard_conforming_strings = off").format(name))


def all_or_nothing(database, schema: str) -> bool:
    """The hidden-COMMIT file is applied whole, with its log row, or not at all."""
    applied = HOSTILE in applied_ids(database, schema)
    return ("before_it" in tables(database, schema)) == applied


def test_a_database_defaulting_to_backslash_escapes_reads_files_as_the_checker_did(
    project, database, tenants
):
    backslash_escapes_by_default(database)
    write_migration(project.tenant_dir, HOSTILE, HIDDEN_COMMIT)

    with pytest.raises(NotReady, match="standard_conforming_strings"):
        migrate_tenants(project)

    for tenant in tenants:
        assert all_or_nothing(database, tenant.schema)


def test_provisioning_on_a_database_defaulting_to_backslash_escapes_is_all_or_nothing(
    project, database
):
    migrate_master(project)
    backslash_escapes_by_default(database)
    write_migration(project.tenant_dir, HOSTILE, HIDDEN_COMMIT)
    before = snapshot(database)

    with pytest.raises(NotReady, match="standard_conforming_strings"):
        provision_tenant(project, NEW_ORG)

    assert snapshot(database) == before


def test_a_migration_cannot_make_the_server_read_the_next_file_differently(
    project, database, tenants
):
    write_migration(
        project.tenant_dir, "20300101000000_a", "SET LOCAL standard_conforming_strings = off;\n"
    )
    (project.tenant_dir / "20300101000050_python.py").write_text(
        "from yoyo import step\nsteps = [step('SELECT 1')]\n"
    )
    write_migration(project.tenant_dir, HOSTILE, HIDDEN_COMMIT)

    with pytest.raises(UnsafeMigration, match="standard_conforming_strings"):
        migrate_tenants(project)

    for tenant in tenants:
        assert all_or_nothing(database, tenant.schema)


def test_set_config_cannot_make_the_server_read_the_next_file_differently_either(
    project, database, tenants
):
    write_migration(
        project.tenant_dir,
        "20300101000000_a",
        "SELECT set_config('standard_conforming_strings', 'off', true);\n",
    )
    write_migration(project.tenant_dir, HOSTILE, HIDDEN_COMMIT)

    with pytest.raises(UnsafeMigration, match="changing standard_conforming_strings"):
        migrate_tenants(project)

    for tenant in tenants:
        assert all_or_nothing(database, tenant.schema)
        assert "20300101000000_a" not in applied_ids(database, tenant.schema)


# -- a big file ----------------------------------------------------------------------------------

BIG_ROWS = 50_000
#: Provisions an org in a process of its own and prints what it applied and its peak memory.
PROVISION_AND_MEASURE = """
import json, resource, sys, time
from pathlib import Path
from yoyo_tenants import provision_tenant
from yoyo_tenants.settings import Settings
root, params, org = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
settings = Settings(root=root, connection=params, master_dir=root / "migrations" / "master",
                    tenant_dir=root / "migrations" / "tenant")
started = time.perf_counter()
done = provision_tenant(settings, org)
print(json.dumps({"migrations": done.migrations, "seconds": time.perf_counter() - started,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_a_4_mb_migration_is_checked_and_applied_in_bounded_memory(project, database):
    migrate_master(project)
    lines = ["CREATE TABLE big_rows (id int PRIMARY KEY, label text NOT NULL);"]
    lines += [
        f"INSERT INTO big_rows (id, label) VALUES ({i}, 'row {i:05d} of a big file');"
        for i in range(BIG_ROWS)
    ]
    path = project.tenant_dir / f"{HOSTILE}.sql"
    path.write_text("\n".join(lines) + "\n")
    assert 3_500_000 < path.stat().st_size < 4_500_000

    done = subprocess.run(
        [sys.executable, "-c", PROVISION_AND_MEASURE, str(project.root), json.dumps(database),
         NEW_ORG],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["migrations"] == [*TENANT_IDS, HOSTILE]
    assert measured["max_rss_kb"] < 500 * 1024, measured
    schema = schema_for(NEW_ORG)
    assert query(database, f"SELECT count(*), max(id) FROM {schema}.big_rows") == [
        (BIG_ROWS, BIG_ROWS - 1)
    ]
