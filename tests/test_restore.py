"""restore-tenant restores only what the tool archived, and only into that tenant: an archive
proves to be one this database recorded, holds its one tenant schema and its log, and runs
under a role that may write nothing else. Crafted archives change nothing outside their
schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg2 import sql

from yoyo_tenants import (
    deprovision_tenant,
    log,
    migrate_master,
    provision_tenant,
    restore_tenant,
    schema_for,
    verify,
)
from yoyo_tenants.errors import NotReady, SchemaCollision, TenantsError, UsageError
from yoyo_tenants.settings import Settings

from . import servers
from .archives import Archive
from .conftest import (
    TENANT_IDS,
    applied_ids,
    copy_migrations,
    on_a_database,
    query,
    run_invoke,
    user_env,
)

LIVE = "org_live1"


@pytest.fixture
def live(project, database):
    """A database with one live tenant, holding a row."""
    migrate_master(project)
    tenant = provision_tenant(project, LIVE).tenant
    query(database, f"INSERT INTO {tenant.schema}.org_settings (key, value) VALUES ('a.b', '1')")
    return tenant


@pytest.fixture
def archived(project, database, live, tmp_path) -> Path:
    """An honest archive of org_gone1 (recorded here), which is gone."""
    tenant = provision_tenant(project, "org_gone1").tenant
    query(database, f"INSERT INTO {tenant.schema}.org_settings (key, value) VALUES ('g.h', '7'); "
          f"COMMENT ON SCHEMA {tenant.schema} IS 'its own comment'")  # fmt: skip
    path = tmp_path / "org_gone1.dump"
    assert deprovision_tenant(project, "org_gone1", yes=True, archive=path).dropped
    return path


def outside(params, schema: str) -> tuple:
    """Everything a restore into `schema` must leave as it was: the registry but for its row,
    every other schema and what it holds, every function, large object and role."""
    return (
        query(params, "SELECT clerk_org_id, schema_name, status FROM public.tenants "
              "WHERE schema_name <> %s ORDER BY 1", (schema,)),
        query(params, "SELECT n.nspname, c.relname, c.relkind, c.relowner::regrole::text "
              "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname "
              "NOT IN (%s, 'pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2",
              (schema,)),
        query(params, "SELECT p.oid::regprocedure::text, p.prosecdef FROM pg_proc p JOIN "
              "pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN "
              "(%s, 'pg_catalog', 'information_schema') ORDER BY 1", (schema,)),
        query(params, "SELECT nspname FROM pg_namespace WHERE nspname <> %s ORDER BY 1",
              (schema,)),
        query(params, "SELECT count(*) FROM pg_largeobject_metadata"),
        query(params, "SELECT rolname FROM pg_roles WHERE rolname LIKE 'yoyo\\_tenants\\_%%' "
              "ORDER BY 1"),
        query(params, f"SELECT key, value FROM {schema_for(LIVE)}.org_settings ORDER BY 1"),
        records(params),
    )  # fmt: skip


def records(params) -> list:
    if query(params, "SELECT to_regclass('public.yoyo_tenants_archives')") == [(None,)]:
        return []
    return query(params, "SELECT * FROM public.yoyo_tenants_archives ORDER BY 1")


def nothing_restored(params, schema: str) -> bool:
    return query(params, "SELECT to_regnamespace(%s)", (schema,)) == [(None,)] and not query(
        params, "SELECT 1 FROM public.tenants WHERE schema_name = %s", (schema,)
    )


# -- the honest round trip -----------------------------------------------------------------------


def test_a_recorded_archive_comes_back_under_a_role_of_its_own_then_is_the_users(
    project, database, archived
):
    schema = schema_for("org_gone1")
    before = outside(database, schema)

    restored = restore_tenant(project, archived)

    assert restored.role and restored.role.startswith("yoyo_tenants_restore_")
    assert query(database, f"SELECT value FROM {schema}.org_settings") == [(7,)]
    assert applied_ids(database, schema) == TENANT_IDS
    owners = query(database, "SELECT DISTINCT relowner::regrole::text FROM pg_class "
                   "WHERE relnamespace = %s::regnamespace UNION SELECT nspowner::regrole::text "
                   "FROM pg_namespace WHERE nspname = %s", (schema, schema))  # fmt: skip
    assert owners == [("postgres",)]
    assert query(database, "SELECT 1 FROM pg_roles WHERE rolname = %s", (restored.role,)) == []
    assert query(database, "SELECT obj_description(%s::regnamespace, 'pg_namespace')",
                 (schema,)) == [("its own comment",)]  # not the label  # fmt: skip
    assert outside(database, schema) == before
    assert verify(project) == []


def test_a_tenant_referring_to_a_shared_table_comes_back_referring_to_it(
    project, database, live, tmp_path
):
    """Its foreign key to public.focus_areas is made by the restore's role, which may refer
    to that table (and only that), for the restore."""
    gone = provision_tenant(project, "org_gone1").tenant
    query(database, "INSERT INTO public.focus_areas (slug, name) VALUES ('calm', 'Calm'); "
          f"ALTER TABLE {gone.schema}.org_users ADD COLUMN focus BIGINT "
          "REFERENCES public.focus_areas (id)")  # fmt: skip
    path = tmp_path / "gone.dump"
    deprovision_tenant(project, "org_gone1", yes=True, archive=path)

    restore_tenant(project, path)

    refers = query(database, "SELECT confrelid::regclass::text FROM pg_constraint "
                   "WHERE conrelid = %s::regclass AND contype = 'f'",
                   (f"{gone.schema}.org_users",))  # fmt: skip
    assert refers == [("focus_areas",)]
    assert (
        query(
            database,
            "SELECT has_table_privilege(r.rolname, 'public.focus_areas', "
            "'REFERENCES') FROM pg_roles r WHERE r.rolname LIKE 'yoyo\\_tenants\\_%'",
        )
        == []
    )


def test_on_the_command_line_refusals_are_one_error_line_and_the_flags_work(
    project, database, archived
):
    (project.root / "tasks.py").write_text((Path(__file__).parent.parent / "tasks.py").read_text())
    data = bytearray(archived.read_bytes())
    data[-10] ^= 0xFF
    changed = archived.with_name("changed.dump")
    changed.write_bytes(bytes(data))
    env = user_env(database)

    refused = run_invoke(project.root, "restore-tenant", "--archive", str(changed), env=env)
    done = run_invoke(project.root, "restore-tenant", "--archive", str(archived), env=env)

    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith(f"error: {changed}: no archive of this database has its")
    assert done.returncode == 0, done.stderr
    assert f"restored org_gone1 in schema {schema_for('org_gone1')}" in done.stdout


# -- provenance ----------------------------------------------------------------------------------


def test_an_archive_with_one_byte_changed_is_refused(project, database, archived):
    schema = schema_for("org_gone1")
    data = bytearray(archived.read_bytes())
    data[len(data) // 2] ^= 0x01
    archived.write_bytes(bytes(data))
    before = outside(database, schema)

    with pytest.raises(UsageError, match="no archive of this database has its sha256"):
        restore_tenant(project, archived)

    assert nothing_restored(database, schema) and outside(database, schema) == before


def test_an_archive_relabelled_for_another_org_is_refused(project, database, archived, tmp_path):
    crafted = Archive.read(archived)
    entry = crafted.entry("COMMENT", f"SCHEMA {schema_for('org_gone1')}")
    entry.text["defn"] = entry.text["defn"].replace("org_gone1", "org_other1")
    relabelled = tmp_path / "org_other1.dump"
    crafted.write(relabelled)
    before = outside(database, schema_for("org_gone1"))

    with pytest.raises(UsageError, match="no archive of this database has its sha256"):
        restore_tenant(project, relabelled)
    with pytest.raises(UsageError, match=f"its label names org_other1, whose schema is "
                       f"{schema_for('org_other1')}, not {schema_for('org_gone1')}"):  # fmt: skip
        restore_tenant(project, relabelled, unrecorded=True)

    assert outside(database, schema_for("org_gone1")) == before
    assert nothing_restored(database, schema_for("org_gone1"))
    assert nothing_restored(database, schema_for("org_other1"))


def test_a_record_says_which_org_an_archive_is_of(project, database, archived):
    query(database, "UPDATE public.yoyo_tenants_archives SET org_id = 'org_other1'")

    with pytest.raises(UsageError, match="it was recorded for org_other1, not org_gone1"):
        restore_tenant(project, archived)

    assert nothing_restored(database, schema_for("org_gone1"))


def test_a_schema_made_by_another_session_meanwhile_is_not_undone(
    project, database, archived, monkeypatch
):
    """Between the check that its schema is free and making it, another restore (or anyone)
    made one of that name: this restore fails, and drops only what it made."""
    from yoyo_tenants import restore

    schema = schema_for("org_gone1")
    monkeypatch.setattr(restore, "_check_free", lambda cursor, tenant, archive: None)
    query(database, f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.theirs (x int)")

    with pytest.raises(SchemaCollision, match="was made meanwhile"):
        restore_tenant(project, archived)

    assert query(database, f"SELECT to_regclass('{schema}.theirs') IS NOT NULL") == [(True,)]
    roles = "SELECT rolname FROM pg_roles WHERE rolname LIKE 'yoyo\\_tenants\\_%'"
    assert query(database, roles) == []


def test_deprovisioning_records_the_archive_with_the_drop(project, database, live, tmp_path):
    path = tmp_path / "live.dump"
    deprovision_tenant(project, LIVE, yes=True, archive=path)

    rows = query(database, "SELECT size, org_id, schema_name FROM public.yoyo_tenants_archives")

    assert rows == [(path.stat().st_size, LIVE, live.schema)]


# -- what an archive holds -----------------------------------------------------------------------


def scratch_archive(database, tmp_path, org: str, setup: str, *args: str) -> Path:
    """A pg_dump (with `args`, else of the org's schema) made in a database of its own after
    `setup` ({s}: the org's schema; {live}: the live tenant's), with the label and a log."""
    from yoyo_tenants.archives import run_client

    from .conftest import new_database

    schema = schema_for(org)
    path = tmp_path / f"{org}-{len(list(tmp_path.iterdir()))}.dump"
    row = {"row": {"clerk_org_id": org, "status": "active"}, "comment": None}
    label = "yoyo-tenants registry row: " + json.dumps(row)
    with new_database(database, "scratch") as name:
        params = {**database, "dbname": name}
        query(params, sql.SQL("CREATE SCHEMA {s}; COMMENT ON SCHEMA {s} IS {label}; "
                              "CREATE TABLE {s}._yoyo_log ({definition})").format(
            s=sql.Identifier(schema), label=sql.Literal(label),
            definition=sql.SQL(log.DEFINITION)))  # fmt: skip
        query(params, setup.format(s=schema, live=schema_for(LIVE)))
        chosen = [arg.format(s=schema) for arg in args] or [f"--schema={schema}"]
        run_client("pg_dump", ["--format=custom", f"--file={path}", *chosen], params, "dump")
    return path


#: The archive of the issue: a table whose CHECK constraint calls a function that, while the
#: data loads, suspends every tenant, plants a SECURITY DEFINER function and a table in public,
#: and a table in a live tenant's schema. (Harmless until its row is in, then made evil.)
HARMLESS = """
    CREATE FUNCTION {s}.evil() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RETURN true; END $$;
    CREATE TABLE {s}.notes (body text CHECK ({s}.evil()));
    INSERT INTO {s}.notes VALUES ('x');
"""
EVIL = """
    CREATE OR REPLACE FUNCTION {s}.evil() RETURNS boolean LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE public.tenants SET status = 'suspended';
        EXECUTE 'CREATE FUNCTION public.backdoor() RETURNS int SECURITY DEFINER LANGUAGE sql '
            'AS ''SELECT 1''';
        CREATE TABLE public.planted (x int);
        CREATE TABLE {live}.planted (x int);
        RETURN true;
    END $$;
"""


def test_the_crafted_archive_of_the_issue_is_refused_with_nothing_run(
    project, database, live, tmp_path
):
    crafted = scratch_archive(database, tmp_path, "org_evil1", HARMLESS + EVIL)
    schema = schema_for("org_evil1")
    before = outside(database, schema)

    with pytest.raises(UsageError, match="no archive of this database has its sha256"):
        restore_tenant(project, crafted)
    with pytest.raises(UsageError, match=r"holds code from elsewhere \(function evil\(\)"):
        restore_tenant(project, crafted, unrecorded=True)
    # Trusted, its code still runs under the restore's own role: refused, as it writes.
    with pytest.raises(TenantsError, match="permission denied for table tenants"):
        restore_tenant(project, crafted, unrecorded=True, trust_code=True)

    assert outside(database, schema) == before and nothing_restored(database, schema)


def test_code_in_a_recorded_archive_runs_under_a_role_that_may_write_only_its_schema(
    project, database, live, tmp_path
):
    """As if the app had planted the crafted table and function in a tenant before it was
    archived: the archive is the tool's own, and its code runs while the data loads."""
    planted = provision_tenant(project, "org_evil1").tenant
    query(database, (HARMLESS + EVIL).format(s=planted.schema, live=live.schema))
    path = tmp_path / "evil.dump"
    deprovision_tenant(project, "org_evil1", yes=True, archive=path)
    before = outside(database, planted.schema)

    with pytest.raises(TenantsError, match="permission denied for table tenants"):
        restore_tenant(project, path)

    assert outside(database, planted.schema) == before
    assert nothing_restored(database, planted.schema)


@pytest.mark.parametrize(
    ("setup", "args", "said"),
    [
        ("CREATE SCHEMA other; CREATE TABLE other.t (x int)", ("--schema={s}", "--schema=other"),
         "it holds 2 schemas, not the one of a tenant"),
        ("CREATE TABLE {s}.t (x int); GRANT SELECT ON {s}.t TO PUBLIC", (),
         "is a change of privileges"),
        ("DROP TABLE {s}._yoyo_log", (), "brings no migration log (_yoyo_log)"),
        ("SELECT lo_from_bytea(0, 'x')", ("--schema={s}", "--large-objects"),
         "is not of a kind a tenant schema holds"),
        ("COMMENT ON SCHEMA {s} IS 'mine'", (),
         "it has no label: deprovision-tenant --archive did not write it"),
    ],
    ids=["two-schemas", "grant", "no-log", "large-object", "no-label"],
)  # fmt: skip
def test_an_archive_holding_more_or_less_than_its_tenant_schema_is_refused(
    project, database, live, tmp_path, setup, args, said
):
    s = schema_for("org_odd1")
    path = scratch_archive(database, tmp_path, "org_odd1", setup, *args)
    before = outside(database, s)

    with pytest.raises(UsageError, match="nothing was restored") as refused:
        restore_tenant(project, path, unrecorded=True)

    assert said in str(refused.value)
    assert outside(database, s) == before and nothing_restored(database, s)


def test_an_entry_outside_its_schema_is_refused(project, database, archived, tmp_path):
    crafted = Archive.read(archived)
    crafted.entry("TABLE", "org_settings").text["namespace"] = "public"
    path = tmp_path / "crafted.dump"
    crafted.write(path)

    with pytest.raises(UsageError) as refused:
        restore_tenant(project, path, unrecorded=True)

    assert "its entry 'TABLE public org_settings postgres' is outside schema" in str(refused.value)
    assert nothing_restored(database, schema_for("org_gone1"))


def test_an_archive_whose_log_is_damaged_is_refused_and_undone(project, database, live, tmp_path):
    gone = provision_tenant(project, "org_gone1").tenant
    query(database, f"INSERT INTO {gone.schema}._yoyo_log SELECT * FROM {gone.schema}._yoyo_log "
          "WHERE id = 2")  # fmt: skip
    path = tmp_path / "gone.dump"
    deprovision_tenant(project, "org_gone1", yes=True, archive=path)
    before = outside(database, gone.schema)

    with pytest.raises(UsageError, match="its log is damaged: id 2 is there twice"):
        restore_tenant(project, path)

    assert outside(database, gone.schema) == before and nothing_restored(database, gone.schema)


# -- the role it runs under ----------------------------------------------------------------------


def test_a_large_object_the_archive_makes_outside_its_schema_is_refused_and_undone(
    project, database, live, tmp_path
):
    """lo_from_bytea is PostgreSQL's own function, callable by every role: the constraint
    runs as the restore's role, which then owns something outside its schema."""
    gone = provision_tenant(project, "org_gone1").tenant
    query(database, f"INSERT INTO {gone.schema}.org_settings (key, value) VALUES ('a.b', '1'); "
          f"ALTER TABLE {gone.schema}.org_settings ADD CHECK (lo_from_bytea(0, 'x') > 0); "
          "SELECT lo_unlink(oid) FROM pg_largeobject_metadata")  # fmt: skip
    path = tmp_path / "gone.dump"
    deprovision_tenant(project, "org_gone1", yes=True, archive=path)
    before = outside(database, gone.schema)

    with pytest.raises(TenantsError, match=r"made large object \d+ outside schema"):
        restore_tenant(project, path)

    assert outside(database, gone.schema) == before and nothing_restored(database, gone.schema)


@pytest.mark.parametrize(
    ("grant", "named"),
    [
        ("GRANT INSERT ON public.tenants TO PUBLIC", "table tenants"),
        ("GRANT CREATE ON SCHEMA public TO PUBLIC", "schema public (CREATE)"),
        ("CREATE FUNCTION public.helper() RETURNS int SECURITY DEFINER LANGUAGE sql "
         "AS 'SELECT 1'", "function helper() (SECURITY DEFINER)"),
    ],
    ids=["table", "schema", "security-definer"],
)  # fmt: skip
def test_a_grant_to_public_that_would_let_the_role_write_elsewhere_stops_the_restore(
    project, database, archived, grant, named
):
    query(database, grant)
    schema = schema_for("org_gone1")
    before = outside(database, schema)

    with pytest.raises(NotReady, match=f"every role may write {re.escape(named)}.*--trust-code"):
        restore_tenant(project, archived)

    assert outside(database, schema) == before and nothing_restored(database, schema)
    done = restore_tenant(project, archived, trust_code=True)
    assert done.role is None and query(database, f"SELECT value FROM {schema}.org_settings")


def test_a_user_without_createrole_is_told_and_may_trust_the_code(project, database, archived):
    query(database, "DO $$ BEGIN CREATE ROLE rs_tool LOGIN; EXCEPTION WHEN duplicate_object "
          "THEN NULL; END $$; ALTER ROLE rs_tool NOCREATEROLE")  # fmt: skip
    query(database, sql.SQL("GRANT CREATE ON DATABASE {} TO rs_tool; "
                            "GRANT ALL ON ALL TABLES IN SCHEMA public TO rs_tool; "
                            "GRANT USAGE ON SCHEMA public TO rs_tool").format(
        sql.Identifier(database["dbname"])))  # fmt: skip
    tool = Settings(project.root, {**database, "user": "rs_tool"}, project.master_dir,
                    project.tenant_dir)  # fmt: skip
    schema = schema_for("org_gone1")

    with pytest.raises(NotReady, match="making it takes CREATEROLE: ALTER ROLE rs_tool CREATEROLE"):
        restore_tenant(tool, archived)
    assert nothing_restored(database, schema)
    trusted = restore_tenant(tool, archived, trust_code=True)  # as rs_tool
    assert trusted.role is None and query(database, f"SELECT value FROM {schema}.org_settings")
    deprovision_tenant(project, "org_gone1", yes=True)

    query(database, "ALTER ROLE rs_tool CREATEROLE")
    done = restore_tenant(tool, archived)

    assert done.role and query(database, f"SELECT value FROM {schema}.org_settings") == [(7,)]
    owners = query(database, "SELECT DISTINCT relowner::regrole::text FROM pg_class "
                   "WHERE relnamespace = %s::regnamespace", (schema,))  # fmt: skip
    assert owners == [("rs_tool",)]
    assert query(database, "SELECT 1 FROM pg_roles WHERE rolname = %s", (done.role,)) == []


def test_the_role_logs_in_with_a_password_the_server_never_sees(tmp_path):
    """On a server that asks every login for a password (scram-sha-256) and logs every
    statement: the role is made with a SCRAM verifier, never its password."""
    copy_migrations(tmp_path)
    hba = ("host all all 127.0.0.1/32 scram-sha-256",)
    with servers.postgres(hba=hba, settings={"log_statement": "all"}) as server:
        query(server.socket_params(), "ALTER ROLE postgres PASSWORD 'tool-Pa55'")
        params = {**server.socket_params(), "host": "127.0.0.1", "password": "tool-Pa55"}
        project = Settings(root=tmp_path, connection=params,
                           master_dir=tmp_path / "migrations" / "master",
                           tenant_dir=tmp_path / "migrations" / "tenant")  # fmt: skip
        migrate_master(project)
        provision_tenant(project, "org_gone1")
        archive = tmp_path / "gone.dump"
        deprovision_tenant(project, "org_gone1", yes=True, archive=archive)

        done = restore_tenant(project, archive)

        assert done.role and verify(project) == []
        lines = server.log().splitlines()
        made = [line for line in lines if f'CREATE ROLE "{done.role}"' in line]
        assert len(made) == 1 and "LOGIN PASSWORD 'SCRAM-SHA-256$4096:" in made[0], [
            line for line in lines if "ROLE" in line
        ]


# -- any table of contents -----------------------------------------------------------------------

#: What an attacker appends to an entry's SQL (or puts in its place).
PAYLOADS = [
    "UPDATE public.tenants SET status = 'suspended';",
    "CREATE TABLE public.planted (x int);",
    f"CREATE TABLE {schema_for(LIVE)}.planted (x int);",
    f"DELETE FROM {schema_for(LIVE)}.org_settings;",
    "CREATE FUNCTION public.backdoor() RETURNS int SECURITY DEFINER LANGUAGE sql AS 'SELECT 1';",
    "SELECT lo_from_bytea(0, 'x');",
    "RESET ROLE; RESET SESSION AUTHORIZATION; UPDATE public.tenants SET status = 'suspended';",
    "COMMIT; CREATE TABLE public.planted (x int);",
    "SET ROLE postgres; DROP TABLE public.tenants CASCADE;",
    "ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO PUBLIC;",
    "SELECT pg_catalog.set_config('search_path', 'public', false);",
]
#: An entry's SQL with a payload after it (or its COPY statement, for a data entry), which
#: the listing does not show; or what the listing does show, changed.
SQL_EDIT = st.tuples(
    st.integers(0, 40), st.sampled_from(["defn", "copy"]), st.sampled_from(PAYLOADS)
)
LISTED = ["public", schema_for(LIVE), "-", "pg_catalog", "ACL", "SCHEMA", "EXTENSION",
          "FUNCTION", "TABLE", "BLOB", "DATABASE", ""]  # fmt: skip
LISTED_EDIT = st.tuples(
    st.integers(0, 40), st.sampled_from(["namespace", "desc", "tag"]), st.sampled_from(LISTED)
)
EDIT = st.one_of(SQL_EDIT, SQL_EDIT, LISTED_EDIT)


@on_a_database(20)
@given(edits=st.lists(EDIT, min_size=1, max_size=3))
def test_any_edit_of_an_archives_table_of_contents_changes_nothing_outside_its_schema(
    project, database, archived, tmp_path, edits
):
    """Entries are picked by their place (modulo their number), the special ones pg_restore
    --list does not show (the encoding, the search path it sets first) among them."""
    schema = schema_for("org_gone1")
    crafted = Archive.read(archived)
    for index, name, value in edits:
        entry = crafted.entries[index % len(crafted.entries)]
        if name in ("defn", "copy"):
            value = (entry.text[name] or "") + "\n" + value
        entry.text[name] = value
    path = tmp_path / "crafted.dump"
    crafted.write(path)
    before = outside(database, schema)

    try:
        restore_tenant(project, path, unrecorded=True)
    except TenantsError as refused:
        assert "\n" not in str(refused)
        assert nothing_restored(database, schema)
    else:  # (a payload that failed harmlessly, in an entry the restore does not run)
        deprovision_tenant(project, "org_gone1", yes=True)
    assert outside(database, schema) == before
