"""Linting migration files with squawk before they touch a tenant, and weighing each finding
across the fleet from the catalog.

squawk (PyPI `squawk-cli`, the extra `yoyo-tenants[lint]`) is run through its JSON reporter,
configured the way this tool runs files, so that it reports nothing the tool already handles:
a file the engine runs in a transaction is linted as one (`--assume-in-transaction`), a
`-- transactional: false` file is not; the engine sets lock and statement timeouts itself, so
squawk's timeout rules are off. A finding is then weighed by the table its statement touches,
summed over every tenant schema from `pg_class.reltuples`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from pglast import ast, parser, visitors
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from yoyo.migrations import Migration, MigrationList

from . import registry
from .db import connect, one_row, server_params
from .errors import ConfigError, LintFailed, LintUnavailable, UsageError, _shown
from .loading import SqlMigration, load_migrations
from .pool import scan
from .registry import Tenant
from .settings import Settings
from .sqlfiles import Script

#: squawk rules the tool satisfies on its own: every migration runs under the lock and
#: statement timeouts the run sets (RunOptions), so a file need not set them.
TOOL_RULES = ("require-lock-timeout", "require-statement-timeout")
INSTALL = "pip install 'yoyo-tenants[lint]'"
#: A project's own .squawk.toml would override the rules chosen here (squawk's --exclude
#: replaces its excluded_rules) or drop files (excluded_paths): squawk reads an empty one instead.
NO_CONFIG = os.devnull
#: Relations whose rows a statement can rewrite or lock: tables, partitioned tables, matviews.
TABLE_KINDS = ["r", "p", "m"]
WEIGHT_SQL = sql.SQL(
    "SELECT count(*),"
    " coalesce(sum(c.reltuples) FILTER (WHERE c.reltuples >= 0), 0)::bigint,"
    " count(*) FILTER (WHERE c.reltuples < 0),"
    " coalesce(sum(pg_relation_size(c.oid)) FILTER (WHERE c.reltuples < 0), 0)::bigint"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = ANY(%(schemas)s) AND c.relname = %(table)s"
    ' AND c.relkind = ANY(%(kinds)s::"char"[])'
)


@dataclass(frozen=True)
class Weight:
    """A table as big as the fleet holds it: in how many schemas, with how many rows.

    `rows` sums pg_class.reltuples over the copies ANALYZE (or VACUUM, CREATE INDEX) has
    counted; a copy never counted (reltuples -1) is weighed by its size on disk instead: its
    relpages is still 0 too."""

    table: str
    public: bool  # the shared table in public, not a tenant's copy
    schemas: int  # schemas holding it
    rows: int  # in the copies counted
    unanalysed: int  # copies never counted
    unanalysed_bytes: int

    def __str__(self) -> str:
        if self.public:
            where = f"public.{self.table}"
            if not self.schemas:
                return f"{where} is not there yet"
        else:
            where = f"{self.table} in {_count(self.schemas, 'tenant')}"
            if not self.schemas:
                return f"{self.table} is in no tenant yet"
        counted = self.schemas - self.unanalysed
        parts = []
        if counted:
            in_all = " in all" if counted > 1 else ""
            parts.append(f"about {_about(self.rows)} rows{in_all} (pg_class.reltuples)")
        if self.unanalysed:
            size = _bytes(self.unanalysed_bytes) + " on disk" if self.unanalysed_bytes else "empty"
            copies = "" if self.schemas == 1 else f"{self.unanalysed} "
            parts.append(f"{copies}not analysed ({size})")
        return f"{where}: {'; '.join(parts)}"


@dataclass(frozen=True)
class Finding:
    """One thing squawk reported, once per file, line and rule."""

    path: Path
    line: int  # 1-based
    rule: str
    message: str
    help: str | None
    public: bool  # in a master file: its statements run in public
    #: The table its statement touches, as written: (schema or None, name); None if none.
    table: tuple[str | None, str] | None = None
    weight: Weight | None = None

    def __str__(self) -> str:
        return f"{_shown(self.path)} line {self.line}: {self.rule}: {self.message}"


@dataclass
class Report:
    """What `lint` read and found."""

    files: list[Path] = field(default_factory=list)  # linted
    python: list[Path] = field(default_factory=list)  # Python migrations: not SQL, not linted
    findings: list[Finding] = field(default_factory=list)
    rules_off: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass(frozen=True)
class _File:
    """A migration file to lint, and where it runs."""

    script: Script
    public: bool  # a master file: runs in public

    def table_at(self, line: int, column: int) -> tuple[str | None, str] | None:
        """The table of the statement at `line` (1-based) and `column` (0-based)."""
        text, offset = self.script.text, 0
        for _ in range(line - 1):
            offset = text.find("\n", offset) + 1
        offset += column
        started = [s for s in self.statements if (s.stmt_location or 0) <= offset]
        here = started or self.statements[:1]
        return _target(here[-1].stmt) if here else None

    @cached_property
    def statements(self) -> tuple[ast.RawStmt, ...]:
        return parser.parse_sql(self.script.text)


# -- the commands --------------------------------------------------------------------------------


def lint(settings: Settings, files: Sequence[str] = (), every: bool = False) -> Report:
    """Lint the migration files pending in public or in any tenant (every file with `every`, or
    only `files`: paths or migration ids), each finding weighed across the fleet."""
    master = load_migrations(settings.master_dir, public=True)
    tenant = load_migrations(settings.tenant_dir)
    if files and every:
        raise UsageError("give files or --all, not both")
    binary = squawk_path()
    connection = connect(server_params(settings))
    try:
        cursor = connection.cursor()
        fleet = [t.schema for t in _fleet(cursor, settings)]
        if files:
            chosen = _named(settings, files, master, tenant)
        elif every:
            chosen = [*master, *tenant]
        else:
            # With no tenant yet, the first one provisioned gets every tenant file.
            tenants = _pending(cursor, tenant, fleet) if fleet else list(tenant)
            chosen = [*_pending(cursor, master, ["public"]), *tenants]
        report = _lint(settings, binary, chosen, _version(connection))
        _weigh(cursor, report.findings, fleet)
    finally:
        connection.close()
    return report


def refuse_unclean(settings: Settings, public: bool, tenants: Iterable[Tenant]) -> None:
    """For a run's --lint: LintFailed if the files pending in `tenants` (or in public) have
    findings, before anything is written."""
    migrations = load_migrations(settings.master_dir if public else settings.tenant_dir, public)
    binary = squawk_path()
    connection = connect(server_params(settings))
    try:
        pending = _pending(connection.cursor(), migrations, [t.schema for t in tenants])
        report = _lint(settings, binary, pending, _version(connection))
    finally:
        connection.close()
    if report.findings:
        first, count = report.findings[0], len(report.findings)
        more = f" and {count - 1} more" if count > 1 else ""
        raise LintFailed(
            f"--lint: squawk has {_count(count, 'finding')} in the pending migrations, so "
            f"nothing was run: {_shown(first.path)} line {first.line}: {first.rule}{more} "
            "(invoke lint shows them)",
            report.findings,
        )


# -- which files ---------------------------------------------------------------------------------


def _fleet(cursor: Cursor, settings: Settings) -> list[Tenant]:
    """Every tenant, or none while the registry is not there yet."""
    if settings.tenants_query is None and not registry.exists(cursor):
        return []
    return registry.list_tenants(cursor, settings.tenants_query)


def _pending(cursor: Cursor, migrations: MigrationList, schemas: Sequence[str]) -> list[Migration]:
    """The migrations some of `schemas` has not applied (a schema not made yet: all)."""
    states = scan(cursor, schemas, migrations)
    missing = set()
    for state in states.values():
        applied = state.applied_hashes
        missing |= {m.hash for m in migrations if m.hash not in applied}
    return [m for m in migrations if m.hash in missing]


def _named(
    settings: Settings, names: Sequence[str], master: MigrationList, tenant: MigrationList
) -> list[Migration | Script]:
    """The migrations (or rollback files) `names` give, as paths or migration ids."""
    by_path: dict[Path, Migration | Script] = {}
    by_id: dict[str, Migration] = {}
    for migration in [*master, *tenant]:
        by_id[migration.id] = migration
        by_path[Path(migration.path).resolve()] = migration
        if getattr(migration, "rollback_script", None):
            by_path[migration.rollback_script.path.resolve()] = migration.rollback_script
    chosen = []
    for name in names:
        found = by_id.get(name) or by_path.get(Path(name).resolve())
        if found is None:
            raise UsageError(
                f"{name} is not a migration in {_shown(settings.master_dir)} or "
                f"{_shown(settings.tenant_dir)} (give its path or its id)"
            )
        chosen.append(found)
    return chosen


# -- squawk --------------------------------------------------------------------------------------


def squawk_path() -> str:
    """squawk's executable: the one installed with this package (the `lint` extra puts it
    beside the Python running us, which need not be on PATH), else one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / ("squawk.exe" if os.name == "nt" else "squawk")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("squawk")
    if found is None:
        raise LintUnavailable(f"squawk is not installed: {INSTALL} (or put squawk on PATH)")
    return found


def _lint(
    settings: Settings, binary: str, migrations: Sequence[Migration | Script], pg_version: str
) -> Report:
    """Run squawk on the SQL files among `migrations` (migrations, or rollback scripts)."""
    chosen = (*TOOL_RULES, *settings.lint_exclude)
    rules_off = tuple(rule for rule in chosen if rule not in settings.lint_include)
    report = Report(rules_off=rules_off)
    files: dict[Path, _File] = {}
    for item in migrations:
        if isinstance(item, Script):
            public = item.path.resolve().is_relative_to(settings.master_dir.resolve())
            files[item.path.resolve()] = _File(item, public)
        elif isinstance(item, SqlMigration):
            assert item.script is not None  # load_migrations loaded it
            files[item.script.path.resolve()] = _File(item.script, item.public)
        else:
            report.python.append(Path(item.path))
    report.files = [f.script.path for f in files.values()]
    if not files:
        return report
    seen = set()
    for in_transaction in (True, False):
        group = [path for path, f in files.items() if f.script.transactional == in_transaction]
        if not group:
            continue
        args = [
            binary,
            "--reporter=json",
            f"--config={NO_CONFIG}",
            f"--pg-version={pg_version}",
            "--assume-in-transaction" if in_transaction else "--no-assume-in-transaction",
            *(f"--exclude={rule}" for rule in rules_off),
            *(f"--include={rule}" for rule in settings.lint_include),
            "--",
            *map(str, group),
        ]
        for raw in _run(args):
            file = files[Path(raw["file"]).resolve()]
            line = int(raw["line"]) + 1  # squawk's JSON counts lines from 0 (its tty from 1)
            if (file.script.path, line, raw["rule_name"]) in seen:
                continue  # squawk may report a rule at several places of one statement
            seen.add((file.script.path, line, raw["rule_name"]))
            report.findings.append(
                Finding(
                    file.script.path,
                    line,
                    raw["rule_name"],
                    raw["message"],
                    raw.get("help"),
                    file.public,
                    file.table_at(line, int(raw.get("column") or 0)),
                )
            )
    order = {path: i for i, path in enumerate(report.files)}
    report.findings.sort(key=lambda f: (order[f.path], f.line, f.rule))
    return report


def _run(args: list[str]) -> list[dict[str, Any]]:
    """squawk's findings, as its JSON reporter gives them."""
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as exc:
        raise LintUnavailable(f"squawk ({args[0]}) cannot run: {exc.strerror}") from None
    said = next((line for line in done.stderr.splitlines() if line.strip()), "")
    if done.returncode == 2:  # its command line: here, a rule name it does not know
        raise ConfigError(f"squawk refused the lint rules of pyproject.toml: {said}")
    try:
        findings = json.loads(done.stdout)
    except json.JSONDecodeError:
        findings = None
    if done.returncode not in (0, 1) or not isinstance(findings, list):
        raise LintUnavailable(f"squawk failed (exit {done.returncode}): {said or done.stdout}")
    return findings


def _version(connection: Connection) -> str:
    """The server's version as squawk takes it: some rules depend on it (adding a column with
    a default rewrites the table before PostgreSQL 11)."""
    number = connection.server_version
    if number >= 100000:
        return f"{number // 10000}.{number % 10000}"
    return f"{number // 10000}.{number // 100 % 100}"


# -- weights -------------------------------------------------------------------------------------


def _weigh(cursor: Cursor, findings: list[Finding], fleet: Sequence[str]) -> None:
    """Give each finding the weight of the table its statement touches, across the fleet:
    a tenant file's unqualified table in every tenant schema, a public one in public."""
    weights: dict[tuple[bool, str], Weight] = {}
    for i, finding in enumerate(findings):
        if finding.table is None:
            continue
        schema, table = finding.table
        if schema not in (None, "public"):
            continue  # a schema of its own, not the fleet's
        public = finding.public or schema == "public"
        if (public, table) not in weights:
            schemas = ["public"] if public else list(fleet)
            cursor.execute(WEIGHT_SQL, {"schemas": schemas, "table": table, "kinds": TABLE_KINDS})
            weights[public, table] = Weight(table, public, *one_row(cursor))
        findings[i] = replace(finding, weight=weights[public, table])


# -- helpers -------------------------------------------------------------------------------------


def _target(node: ast.Node | None) -> tuple[str | None, str] | None:
    """The table a statement works on: its own relation (ALTER TABLE, CREATE INDEX, ...), else
    the first table it names."""
    relation = getattr(node, "relation", None)
    # (pglast types a name as optional; the parser always gives a table's.)
    if isinstance(relation, ast.RangeVar) and relation.relname is not None:
        return relation.schemaname, relation.relname
    found: list[tuple[str | None, str]] = []

    class Tables(visitors.Visitor):
        def visit_RangeVar(self, ancestors: visitors.Ancestor, range_var: ast.RangeVar) -> None:
            if range_var.relname is not None:
                found.append((range_var.schemaname, range_var.relname))

    if node is not None:
        Tables()(node)
    return found[0] if found else None


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun if n == 1 else noun + 's'}"


def _about(n: int) -> str:
    """A row count as a person reads it: 950, 12,400, 1.2 M."""
    for size, unit in ((10**9, "G"), (10**6, "M")):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n:,}"


def _bytes(n: int) -> str:
    for size, unit in ((2**30, "GB"), (2**20, "MB"), (2**10, "kB")):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"
