"""The engine: one way to migrate a schema, in the fewest messages the server can take, each
migration whole or not at all, run exactly once per attempt, leaving nothing on the session.

Message counts come from the server's own log (log_statement = all): one entry per message.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import psycopg2
import pytest
from pglast import ast, parser

from yoyo_tenants import (
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_tenants,
    schema_for,
)
from yoyo_tenants.db import connect
from yoyo_tenants.engine import migrate_schema
from yoyo_tenants.loading import load_migrations
from yoyo_tenants.plan import ApplyPlan
from yoyo_tenants.pool import scan
from yoyo_tenants.results import RunOptions, SchemaResult

from .conftest import (
    ADD_NICKNAME,
    TENANT_IDS,
    TENANT_TABLES,
    YOYO_TABLES,
    Admin,
    add_nickname,
    applied_ids,
    columns,
    query,
    tables,
    write_migration,
)

ADD = ADD_NICKNAME


def params(settings) -> dict:
    return dict(settings.connection)


def tenant_messages(log, schema: str) -> list[str]:
    """The messages of the connection that migrated `schema` (a worker's, for a run of one)."""
    for messages in log.connections().values():
        if any(m.startswith("BEGIN;") and schema in m for m in messages):
            return messages
    return []


# -- messages ------------------------------------------------------------------------------------


def test_a_tenant_behind_gets_its_migration_log_row_and_commit_in_one_message(traced):
    settings, log = traced
    migrate_master(settings)
    tenant = provision_tenant(settings, "org_fast1").tenant
    add_nickname(settings)
    log.mark()

    run = migrate_tenants(settings, jobs=2)

    assert run.ok and run.schemas[0].migrations == [ADD]
    [message] = tenant_messages(log, tenant.schema)
    assert message.startswith("BEGIN;") and "ALTER TABLE org_users ADD COLUMN nickname" in message
    assert "INSERT INTO" in message and message.rstrip().endswith("COMMIT")
    assert "nickname" in columns(params(settings), tenant.schema, "org_users")
    assert applied_ids(params(settings), tenant.schema)[-1] == ADD


def test_provisioning_is_one_message_after_the_connection_check(traced):
    settings, log = traced
    migrate_master(settings)
    log.mark()

    done = provision_tenant(settings, "org_onemessage1")

    assert done.created and done.migrations == TENANT_IDS
    check, message = log.messages()  # the Citus check, then the tenant
    assert "citus" in check
    assert "INSERT INTO public.tenants" in message and "CREATE SCHEMA" in message
    assert message.count("CREATE TABLE") == 4  # the log and the three tenant tables


def test_a_rollback_after_the_scan_is_one_message(traced):
    settings, log = traced
    migrate_master(settings)
    tenant = provision_tenant(settings, "org_back1").tenant
    add_nickname(settings)
    migrate_tenants(settings)
    log.mark()

    run = rollback_tenants(settings)

    assert run.ok and run.schemas[0].migrations == [ADD]
    [message] = tenant_messages(log, tenant.schema)
    assert "DROP COLUMN nickname" in message and message.rstrip().endswith("COMMIT")
    assert "nickname" not in columns(params(settings), tenant.schema, "org_users")


def test_in_citus_mode_every_migration_statement_and_savepoint_goes_alone(traced):
    settings, log = traced
    settings = replace(settings, citus="on")
    migrate_master(settings)
    log.mark()
    done = provision_tenant(settings, "org_citus1")
    write_migration(
        settings.tenant_dir,
        ADD,
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n"
        "CREATE INDEX org_users_nickname_idx ON org_users (nickname);\n"
        "ALTER TABLE org_users ADD CONSTRAINT nickname_short CHECK (length(nickname) < 40);",
        "ALTER TABLE org_users DROP COLUMN nickname;",
    )

    run = migrate_tenants(settings)
    back = rollback_tenants(settings)

    assert done.created and run.ok and back.ok
    assert run.schemas[0].migrations == back.schemas[0].migrations == [ADD]
    messages = log.messages()
    assert len(messages) > 20
    for message in messages:
        statements = parser.parse_sql(message)
        if len(statements) > 1:
            kinds = {type(s.stmt).__name__ for s in statements}
            assert kinds <= SHAREABLE, message
            assert not any(_is_savepoint(s.stmt) for s in statements), message
    schema = done.tenant.schema
    assert applied_ids(params(settings), schema) == TENANT_IDS
    assert "nickname" not in columns(params(settings), schema, "org_users")


#: What may share a message in Citus mode: the engine's own bookkeeping (its guards are DO
#: blocks, run on the coordinator), never DDL.
SHAREABLE = {"TransactionStmt", "SelectStmt", "InsertStmt", "VariableSetStmt", "DoStmt"}


def _is_savepoint(node) -> bool:
    return isinstance(node, ast.TransactionStmt) and node.kind.name == "TRANS_STMT_SAVEPOINT"


# -- the scan's view, checked under the lock -----------------------------------------------------


@pytest.fixture
def tenant(project):
    migrate_master(project)
    tenant = provision_tenant(project, "org_engine1").tenant
    add_nickname(project)
    return tenant


def run_known(project, schema, known):
    connection = connect(project.connection)
    try:
        plan = ApplyPlan(schema, load_migrations(project.tenant_dir))
        return migrate_schema(connection, plan, SchemaResult(schema), RunOptions(), known=known)
    finally:
        connection.close()


def scanned(database, schema):
    with Admin(database) as admin:
        return scan(admin.connection.cursor(), [schema])[schema].log


def test_a_view_that_went_stale_is_not_acted_on(project, database, tenant):
    stale = scanned(database, tenant.schema)
    migrate_tenants(project)  # another run applies ADD after our scan

    result = run_known(project, tenant.schema, stale)

    assert result.migrations == [] and result.failure is None
    assert applied_ids(database, tenant.schema).count(ADD) == 1


def test_an_earlier_migration_rolled_back_meanwhile_is_applied_again_first(
    project, database, tenant
):
    stale = scanned(database, tenant.schema)
    query(database, f"DROP TABLE {tenant.schema}.chat_messages")  # as its rollback would
    query(database, f"INSERT INTO {tenant.schema}._yoyo_log (id, migration_id, operation, "
          "created_at_utc) SELECT max(id) + 1, '20250101000200_create_chat_messages', "
          f"'rollback', now() FROM {tenant.schema}._yoyo_log")  # fmt: skip

    result = run_known(project, tenant.schema, stale)

    assert result.migrations == ["20250101000200_create_chat_messages", ADD], result
    assert "embedding" in columns(database, tenant.schema, "chat_messages")
    assert applied_ids(database, tenant.schema)[-2:] == ["20250101000200_create_chat_messages", ADD]


def test_files_with_percent_signs_quotes_and_a_last_comment_go_in_one_message_as_they_are(
    project, database, tenant
):
    write_migration(
        project.tenant_dir,
        "20300101000100_odd_text",
        "CREATE TABLE odd (t TEXT);\n"
        "INSERT INTO odd VALUES ('100%'), ('\"it''s\" %s %(x)s');\n"
        "-- a comment with no newline after it",
    )

    result = run_known(project, tenant.schema, scanned(database, tenant.schema))

    assert result.migrations == [ADD, "20300101000100_odd_text"]
    rows = query(database, f"SELECT t FROM {tenant.schema}.odd ORDER BY t")
    assert rows == [('"it\'s" %s %(x)s',), ("100%",)]
    assert applied_ids(database, tenant.schema)[-2:] == [ADD, "20300101000100_odd_text"]


# -- failures: run once, named, with their line ---------------------------------------------------

#: Counts how often a migration's statements ran: a sequence does not roll back.
COUNTED = "SELECT nextval('public.runs');\n"


def test_a_failing_migration_runs_once_is_named_with_its_line_and_the_ones_before_commit(
    project, database, tenant
):
    query(database, "CREATE SEQUENCE public.runs")
    write_migration(
        project.tenant_dir,
        "20300101000100_broken",
        COUNTED + "CREATE TABLE half (i int);\n\nINSERT INTO nope VALUES (1);\n",
    )
    write_migration(project.tenant_dir, "20300101000200_after", "CREATE TABLE after (i int);")

    run = migrate_tenants(project)

    [result] = run.schemas
    assert result.migrations == [ADD]  # committed: the one before the failure
    assert result.failure.migration == "20300101000100_broken"
    assert result.failure.line == 4 and result.failure.path.endswith("_broken.sql")
    assert 'relation "nope" does not exist' in str(result.failure)
    assert "_broken.sql line 4" in str(result.failure)
    assert query(database, "SELECT last_value FROM public.runs") == [(1,)]  # ran once
    assert applied_ids(database, tenant.schema)[-1] == ADD
    assert "half" not in tables(database, tenant.schema)
    assert "after" not in tables(database, tenant.schema)


def test_a_migration_that_sleeps_then_fails_takes_its_time_once(project, database, tenant):
    write_migration(project.tenant_dir, "20300101000100_slow_fail", "SELECT pg_sleep(1);\n"
                    "SELECT 1 / 0;")  # fmt: skip
    started = time.monotonic()

    run = migrate_tenants(project)

    assert time.monotonic() - started < 1.8
    assert run.schemas[0].failure.migration == "20300101000100_slow_fail"
    assert "division by zero" in str(run.schemas[0].failure)


def test_a_failing_provision_runs_its_migrations_once_and_leaves_nothing(project, database):
    migrate_master(project)
    query(database, "CREATE SEQUENCE public.runs")
    write_migration(project.tenant_dir, "20300101000100_broken", COUNTED + "SELECT 1 / 0;")
    before = query(database, "SELECT count(*) FROM pg_class")

    with pytest.raises(Exception, match="division by zero"):
        provision_tenant(project, "org_broken1")

    assert query(database, "SELECT last_value FROM public.runs") == [(1,)]
    assert query(database, "SELECT count(*) FROM public.tenants") == [(0,)]
    assert query(database, "SELECT count(*) FROM pg_class") == before


def test_an_app_queues_behind_a_blocked_alter_at_most_once_per_attempt(project, database, tenant):
    lock_timeout, retries = 0.4, 1
    app = psycopg2.connect(**database)  # a long-running app transaction holding a read lock
    app.cursor().execute(f"SELECT count(*) FROM {tenant.schema}.org_users")
    waits: list[float] = []
    done = threading.Event()

    def reader():  # app traffic arriving all the while
        with Admin(database) as admin:
            while not done.is_set():
                started = time.monotonic()
                admin.execute(f"SELECT count(*) FROM {tenant.schema}.org_users")
                waits.append(time.monotonic() - started)
                time.sleep(0.01)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        run = migrate_tenants(
            project, lock_timeout=lock_timeout, retries=retries, retry_pause=0.3, lock_wait=5
        )
    finally:
        done.set()
        thread.join()
        app.close()

    [result] = run.schemas
    assert result.failure.migration == ADD and result.retries == retries
    queued = sum(w for w in waits if w > 0.05)
    assert lock_timeout * retries <= queued <= (retries + 1) * lock_timeout + 0.2
    assert len([w for w in waits if w > 0.05]) <= retries + 1


# -- nothing a migration sets survives its schema ------------------------------------------------


def test_a_read_only_setting_a_migration_makes_does_not_reach_the_next_tenant(project, database):
    migrate_master(project)
    first = provision_tenant(project, "org_first1").tenant
    second = provision_tenant(project, "org_second1").tenant
    write_migration(
        project.tenant_dir,
        "20300101000100_read_only",
        "CREATE TABLE notes (i int);\nSET default_transaction_read_only = on;\n",
    )

    run = migrate_tenants(project, jobs=1)  # one connection serves both tenants

    assert run.ok, run.failed
    for t in (first, second):
        assert "notes" in tables(database, t.schema)
        assert applied_ids(database, t.schema)[-1] == "20300101000100_read_only"


def test_a_role_a_python_migration_takes_is_gone_before_the_next_tenant(project, database):
    migrate_master(project)
    tenants = [provision_tenant(project, org).tenant for org in ("org_role1", "org_role2")]
    query(database, "CREATE ROLE engine_other")
    schemas = ", ".join(t.schema for t in tenants)
    query(database, f"GRANT ALL ON SCHEMA {schemas} TO engine_other")
    # ...and on their tables, the log included: only the guard stands in the role's way.
    query(database, f"GRANT ALL ON ALL TABLES IN SCHEMA {schemas} TO engine_other")
    (project.tenant_dir / "20300101000100_as_other.py").write_text(
        "from yoyo import step\n"
        "def apply(conn):\n"
        "    conn.cursor().execute('CREATE TABLE mine (i int)')\n"
        "    raw = conn.cursor().connection  # past the checked cursors: the guard's case\n"
        "    raw.cursor().execute('SET SESSION AUTHORIZATION engine_other')\n"
        "steps = [step(apply)]\n"
    )
    (project.tenant_dir / "20300101000200_after.sql").write_text("CREATE TABLE later (i int);")

    run = migrate_tenants(project, jobs=1)

    # The guard caught the role change: the Python migration is refused in every tenant...
    assert not run.ok
    for t, result in zip(tenants, run.schemas, strict=True):
        assert result.failure.migration == "20300101000100_as_other"
        assert "changed the role to engine_other" in str(result.failure)
        assert "mine" not in tables(database, t.schema)
    # ...and the second tenant ran as the tool's own user, not as the role.
    owners = query(database, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = %s",
                   (tenants[1].schema,))  # fmt: skip
    assert owners == [("postgres",)]


def test_a_search_path_changed_where_no_parser_sees_it_is_caught_and_rolled_back(
    project, database, tenant
):
    write_migration(
        project.tenant_dir,
        "20300101000100_sneaky",
        "DO $$ BEGIN PERFORM set_config('search_path', 'public', false); END $$;\n"
        "CREATE TABLE sneaky (i int);\n",
    )
    before = tables(database, "public")

    run = migrate_tenants(project)

    [result] = run.schemas
    assert result.failure.migration == "20300101000100_sneaky"
    assert "changed search_path" in str(result.failure)
    assert tables(database, "public") == before
    assert "sneaky" not in tables(database, tenant.schema)
    assert applied_ids(database, tenant.schema)[-1] == ADD  # the one before it committed


def test_a_python_migration_whose_copy_fails_leaves_no_rows(project, database, tenant):
    (project.tenant_dir / "20300101000100_copy.py").write_text(
        "import io\n"
        "from yoyo import step\n"
        "def apply(conn):\n"
        "    cursor = conn.cursor()\n"
        "    cursor.execute('CREATE TABLE copied (i int)')\n"
        "    cursor.copy_expert('COPY copied FROM STDIN', io.StringIO('1\\n2\\n'))\n"
        "    cursor.execute('SELECT 1 / 0')\n"
        "steps = [step(apply)]\n"
    )

    run = migrate_tenants(project)

    assert run.schemas[0].failure.migration == "20300101000100_copy"
    assert "copied" not in tables(database, tenant.schema)


def test_a_new_org_whose_schema_another_session_holds_waits_for_it(project, database):
    migrate_master(project)
    schema = schema_for("org_waiting1")
    with Admin(database) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"yoyo-tenants:{schema}",)
        )
        release = threading.Timer(1.0, holder.execute, ("SELECT pg_advisory_unlock_all()",))
        release.start()
        started = time.monotonic()
        done = provision_tenant(project, "org_waiting1", lock_wait=30)
        release.join()
    assert time.monotonic() - started >= 0.9  # it waited instead of going ahead
    assert done.created and done.migrations == TENANT_IDS
    assert tables(database, schema) == TENANT_TABLES | YOYO_TABLES


def test_a_role_a_non_transactional_migration_takes_is_gone_before_the_next_tenant(
    project, database
):
    migrate_master(project)
    tenants = [provision_tenant(project, org).tenant for org in ("org_nontx1", "org_nontx2")]
    query(database, "CREATE ROLE engine_nontx")
    # Where no check sees it: a DO block's dynamic SQL, in a migration run on the session.
    (project.tenant_dir / "20300101000100_as_other.sql").write_text(
        "-- transactional: false\n"
        "DO $$ BEGIN EXECUTE 'SET SESSION AUTHORIZATION engine_nontx'; END $$;\n"
    )
    (project.tenant_dir / "20300101000200_after.sql").write_text("CREATE TABLE later (i int);")

    run = migrate_tenants(project, jobs=1)  # one connection serves both tenants

    assert run.ok, run.failed
    owners = query(database, "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename = 'later'")
    assert owners == [("postgres",)]
    assert all("later" in tables(database, t.schema) for t in tenants)


def test_what_is_pending_is_worked_out_once_per_distinct_log(project, monkeypatch):
    from yoyo_tenants import plan

    migrate_master(project)
    for i in range(12):
        provision_tenant(project, f"org_same{i}")
    add_nickname(project)
    calls = []
    real = plan.pending
    monkeypatch.setattr(plan, "pending", lambda *args: calls.append(1) or real(*args))

    run = migrate_tenants(project, jobs=3)

    assert run.ok and run.count("done") == 12
    assert len(calls) == 1  # twelve tenants, one log between them


def test_a_python_migration_that_changes_how_strings_are_read_is_caught_before_the_next_file(
    project, database, tenant
):
    # cursor.connection is the session's own connection, past the checked cursors: what code
    # can always reach, and what the guard is for.
    (project.tenant_dir / "20300101000100_strings.py").write_text(
        "from yoyo import step\n"
        "def apply(conn):\n"
        "    raw = conn.cursor().connection\n"
        "    raw.cursor().execute('SET standard_conforming_strings = off')\n"
        "steps = [step(apply)]\n"
    )
    write_migration(project.tenant_dir, "20300101000200_after", "CREATE TABLE after_it (t text);")

    run = migrate_tenants(project)

    [result] = run.schemas
    assert result.failure.migration == "20300101000100_strings"
    assert "standard_conforming_strings to off" in str(result.failure)
    assert "after_it" not in tables(database, tenant.schema)
    assert applied_ids(database, tenant.schema)[-1] == ADD


PYTHON_MIGRATION = """
from yoyo import group, step

def fill(conn):
    cursor = conn.cursor()
    cursor.execute("INSERT INTO py_notes (body) VALUES (%s)", ("from python",))
    cursor.execute("SELECT count(*) FROM py_notes")
    assert cursor.fetchone()[0] == 1

steps = [
    step("CREATE TABLE py_notes (body TEXT)", "DROP TABLE py_notes"),
    group(step(fill), step("SELECT 1 FROM py_notes")),
]
"""


def test_a_python_migration_applies_and_rolls_back_in_its_tenants_transaction(
    project, database, tenant, capsys
):
    (project.tenant_dir / "20300101000100_python.py").write_text(PYTHON_MIGRATION)

    run = migrate_tenants(project)

    assert run.ok, run.failed
    assert run.schemas[0].migrations == [ADD, "20300101000100_python"]
    assert query(database, f"SELECT body FROM {tenant.schema}.py_notes") == [("from python",)]
    assert "py_notes" not in tables(database, "public")
    assert "from python" not in capsys.readouterr().out  # yoyo prints step results; not here

    back = rollback_tenants(project)

    assert back.ok and back.schemas[0].migrations == ["20300101000100_python", ADD]
    assert "py_notes" not in tables(database, tenant.schema)


def test_rows_a_python_migrations_sql_step_returns_are_not_printed(
    project, database, tenant, capsys
):
    # yoyo prints a step's result rows to stdout: over a thousand tenants, a thousand tables.
    (project.tenant_dir / "20300101000100_python.py").write_text(
        "from yoyo import step\nsteps = [step(\"SELECT 'a row yoyo would print' AS said\")]\n"
    )

    run = migrate_tenants(project)

    assert run.ok, run.failed
    assert run.schemas[0].migrations == [ADD, "20300101000100_python"]
    assert "a row yoyo would print" not in capsys.readouterr().out


def test_a_python_migrations_step_whose_errors_are_ignored_leaves_its_transaction_usable(
    project, database, tenant
):
    # yoyo runs each step in a nested transaction: a failing step it was told to ignore is
    # rolled back to there, and the steps after it run.
    (project.tenant_dir / "20300101000100_python.py").write_text(
        "from yoyo import step\n"
        "steps = [\n"
        "    step('SELECT 1 / 0', ignore_errors='apply'),\n"
        "    step('CREATE TABLE after_the_error (i int)'),\n"
        "]\n"
    )

    run = migrate_tenants(project)

    assert run.ok, run.failed
    assert run.schemas[0].migrations == [ADD, "20300101000100_python"]
    assert "after_the_error" in tables(database, tenant.schema)


def test_a_schema_held_by_another_session_is_waited_for_with_lock_wait_not_lock_timeout(
    project, database, tenant
):
    with Admin(database) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"yoyo-tenants:{tenant.schema}",)
        )
        release = threading.Timer(1.0, holder.execute, ("SELECT pg_advisory_unlock_all()",))
        release.start()
        started = time.monotonic()
        run = migrate_tenants(project, lock_wait=10, lock_timeout=0.2)
        release.join()

    assert time.monotonic() - started >= 0.9
    assert run.ok and run.schemas[0].migrations == [ADD]


def test_in_citus_mode_provisioning_sends_each_ddl_statement_alone_and_nothing_more(traced):
    settings, log = traced
    settings = replace(settings, citus="on")
    migrate_master(settings)
    log.mark()

    done = provision_tenant(settings, "org_citusround1")

    assert done.created
    messages = log.messages()
    # The server check; the transaction's start with the registry row; CREATE SCHEMA; the log;
    # the seven DDL statements of the shipped migrations; the log rows with the COMMIT.
    assert len(messages) == 12, messages
    assert not [m for m in messages if "SAVEPOINT" in m]  # all or nothing: none needed
    assert messages[1].startswith("BEGIN;") and "INSERT INTO public.tenants" in messages[1]
    assert messages[-1].count("INSERT INTO") == 4 and "COMMIT" in messages[-1]
