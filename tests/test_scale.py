"""Many tenants at once: failures, fail-fast, concurrent runs, kills, signals, locks, status.

Every test runs on the real PostgreSQL and asserts on database state. The tenant migrations are
replaced by tiny ones, `t<N>`, each creating one table named after it, so "a schema is at a
migration boundary" reads as "its tables are exactly those of its applied migrations".
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import pytest
from psycopg2 import sql
from rich.console import Console

from yoyo_tenants import TenantsError, commands, pool, registry, report, schema_for
from yoyo_tenants.registry import Tenant

from .conftest import (
    REPO,
    YOYO_TABLES,
    Admin,
    applied_ids,
    conflicting_table,
    tables,
    write_migration,
)

#: Prepended to a migration that must be slow, so a test can act while a run is midway.
SLEEP = "SELECT pg_sleep({});\n"


# -- helpers -------------------------------------------------------------------------------------


class Scale:
    """A migrated public schema, an empty tenant migrations folder, and ways to fill both."""

    def __init__(self, settings):
        self.settings = settings
        self.params = dict(settings.connection)
        self.tenant_dir = settings.tenant_dir

    def migration(self, n: int, sleep: float = 0.0) -> str:
        """Write tenant migration t<n>, which creates table t<n>; return its id."""
        migration_id = f"20250102{n:06d}_t{n}"
        apply = (SLEEP.format(sleep) if sleep else "") + f"CREATE TABLE t{n} (id int);\n"
        write_migration(self.tenant_dir, migration_id, apply, f"DROP TABLE t{n};\n")
        return migration_id

    def register(self, count: int, start: int = 0) -> list[Tenant]:
        """Register `count` orgs and create their (empty) schemas, as provisioning does."""
        tenants = [
            Tenant(org, schema_for(org))
            for org in (f"org_scale{i:04d}" for i in range(start, start + count))
        ]
        with Admin(self.params) as admin, admin.connection.cursor() as cursor:
            for tenant in tenants:
                registry.register(cursor, tenant)
        return tenants

    def migrate(self, **kwargs) -> pool.RunResult:
        return commands.migrate_tenants(self.settings, **kwargs)

    def snapshot(self, schemas) -> dict[str, tuple[list[str], set[str]]]:
        """Per schema: applied migration ids (oldest first) and the non-yoyo tables."""
        found = {}
        with Admin(self.params) as admin:
            for schema in schemas:
                names = {
                    row[0]
                    for row in admin.execute(
                        "SELECT c.relname FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = %s AND c.relkind = 'r'",
                        (schema,),
                    )
                }
                applied = applied_ids(self.params, schema) if names >= YOYO_TABLES else []
                found[schema] = (applied, names - YOYO_TABLES)
        return found

    def assert_at_boundaries(self, schemas) -> dict[str, list[str]]:
        """Each schema's tables are exactly those its applied migrations create."""
        applied = {}
        for schema, (ids, names) in self.snapshot(schemas).items():
            assert names == {mid.rsplit("_", 1)[1] for mid in ids}, schema
            applied[schema] = ids
        return applied

    def apply_log(self, schema) -> dict[str, int]:
        rows = _query(
            self.params,
            sql.SQL(
                "SELECT migration_id, count(*) FROM {} WHERE operation = 'apply' GROUP BY 1"
            ).format(sql.Identifier(schema, "_yoyo_log")),
        )
        return dict(rows)

    def count_with_table(self, table: str) -> int:
        """How many tid_ schemas have committed table `table` (a cheap progress probe)."""
        return _query(
            self.params,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname LIKE 'tid\\_%%' AND c.relname = %s",
            (table,),
        )[0][0]

    # -- invoke in a subprocess, as a user runs it --

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
        env.pop("DATABASE_URL", None)
        env.update(
            DB_HOST=self.params["host"],
            DB_PORT=str(self.params["port"]),
            DB_USER=self.params["user"],
            DB_NAME=self.params["dbname"],
            COLUMNS="300",  # rich wraps table cells at 80 columns when not on a terminal
        )
        return env

    def _argv(self, args):
        if not (self.settings.root / "tasks.py").exists():
            shutil.copy(REPO / "tasks.py", self.settings.root)
        return [sys.executable, "-m", "invoke", "migrate-tenants", *args]

    def invoke(self, *args, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._argv(args),
            cwd=self.settings.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args) -> subprocess.Popen:
        return subprocess.Popen(
            self._argv(args),
            cwd=self.settings.root,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _query(params, text, args=None):
    with Admin(params) as admin:
        return admin.execute(text, args)


def wait_until(predicate, timeout: float, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def advisory_locks(params) -> int:
    return _query(
        params,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )[0][0]


def by_schema(run: pool.RunResult) -> dict[str, pool.SchemaResult]:
    return {r.schema: r for r in run.schemas}


@pytest.fixture
def scale(project) -> Scale:
    for path in project.tenant_dir.iterdir():
        path.unlink()
    run = commands.migrate_master(project)
    assert run.ok, run.schemas
    return Scale(project)


# -- one tenant fails ----------------------------------------------------------------------------


def test_a_migration_failing_in_one_tenant_leaves_it_at_its_last_boundary_and_the_rest_at_head(
    scale,
):
    m1 = scale.migration(1)
    tenants = scale.register(6)
    assert scale.migrate(jobs=3).ok
    bad = tenants[2]
    _query(
        scale.params, sql.SQL("CREATE TABLE {} (x text)").format(sql.Identifier(bad.schema, "t3"))
    )
    m2, m3, m4 = scale.migration(2), scale.migration(3), scale.migration(4)

    run = scale.migrate(jobs=3)

    assert not run.ok and not run.interrupted
    assert [r.schema for r in run.schemas] == [t.schema for t in tenants]
    assert run.count("done") == 5 and run.count("failed") == 1
    assert [r.schema for r in run.failed] == [bad.schema]
    failed = run.failed[0]
    assert failed.outcome == "failed"
    assert failed.org_id == bad.org_id
    assert failed.failure.migration == m3
    assert failed.migrations == [m2]
    assert 'relation "t3" already exists' in str(failed.failure)
    for r in run.schemas:
        if r.schema != bad.schema:
            assert r.migrations == [m2, m3, m4] and r.failure is None
            assert applied_ids(scale.params, r.schema) == [m1, m2, m3, m4]
            assert tables(scale.params, r.schema) - YOYO_TABLES == {"t1", "t2", "t3", "t4"}
    # m2 of the failed run committed; m3 was rolled back to its savepoint; m4 never ran.
    assert applied_ids(scale.params, bad.schema) == [m1, m2]
    assert tables(scale.params, bad.schema) - YOYO_TABLES == {"t1", "t2", "t3"}
    assert scale.apply_log(bad.schema) == {m1: 1, m2: 1}

    _query(scale.params, sql.SQL("DROP TABLE {}").format(sql.Identifier(bad.schema, "t3")))
    rerun = scale.migrate(jobs=3)

    assert rerun.ok
    assert by_schema(rerun)[bad.schema].migrations == [m3, m4]
    assert rerun.count("done") == 1 and rerun.count("up to date") == 5
    for tenant in tenants:
        assert applied_ids(scale.params, tenant.schema) == [m1, m2, m3, m4]
        assert set(scale.apply_log(tenant.schema).values()) == {1}


def test_invoke_exits_1_when_one_tenant_fails_and_a_rerun_after_the_fix_completes_it(scale):
    m1 = scale.migration(1)
    tenants = scale.register(4)
    bad = tenants[1]
    conflicting_table(scale.params, bad.schema, "t2")
    m2 = scale.migration(2)

    done = scale.invoke("--jobs", "2")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "tenants: 3 migrated, 0 up to date, 1 failed in" in done.stdout
    assert bad.org_id in done.stdout and m2 in done.stdout and "already exists" in done.stdout
    assert applied_ids(scale.params, bad.schema) == [m1]

    _query(scale.params, sql.SQL("DROP TABLE {}").format(sql.Identifier(bad.schema, "t2")))
    done = scale.invoke("--jobs", "2")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "tenants: 1 migrated, 3 up to date, 0 failed in" in done.stdout
    applied = scale.assert_at_boundaries([t.schema for t in tenants])
    assert all(ids[-1] == m2 and len(ids) == 2 for ids in applied.values())


def test_fail_fast_with_one_job_reports_later_tenants_not_started_and_leaves_them_untouched(
    scale,
):
    m1 = scale.migration(1)
    tenants = scale.register(5)
    assert scale.migrate(jobs=2).ok
    first = tenants[0]
    _query(
        scale.params, sql.SQL("CREATE TABLE {} (x text)").format(sql.Identifier(first.schema, "t2"))
    )
    m2 = scale.migration(2)

    run = scale.migrate(jobs=1, fail_fast=True)

    assert not run.ok
    assert not run.interrupted  # a fail-fast stop is not a signal
    results = by_schema(run)
    assert results[first.schema].outcome == "failed"
    assert results[first.schema].failure.migration == m2
    assert run.count("not started") == 4 and run.count("done") == 0
    assert len(run.failed) == 5
    for tenant in tenants[1:]:
        assert results[tenant.schema].outcome == "not started"
        assert results[tenant.schema].org_id == tenant.org_id
        assert results[tenant.schema].migrations == []
        assert applied_ids(scale.params, tenant.schema) == [m1]
        assert tables(scale.params, tenant.schema) - YOYO_TABLES == {"t1"}
        assert scale.apply_log(tenant.schema) == {m1: 1}


# -- concurrency ---------------------------------------------------------------------------------


def test_two_concurrent_runs_in_threads_apply_each_migration_exactly_once_per_schema(scale):
    tenants = scale.register(12)
    ids = [scale.migration(1), scale.migration(2, sleep=0.05), scale.migration(3)]
    barrier = threading.Barrier(2)
    runs: list = [None, None]

    def go(i):
        barrier.wait()
        runs[i] = scale.migrate(jobs=2)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert all(run is not None and run.ok for run in runs), runs
    # every schema was migrated by exactly one of the two runs; the other found it up to date
    for tenant in tenants:
        statuses = sorted(by_schema(run)[tenant.schema].outcome for run in runs)
        assert statuses == ["done", "up to date"], (tenant, statuses)
    assert sum(run.count("done") for run in runs) == len(tenants)
    for schema, applied in scale.assert_at_boundaries([t.schema for t in tenants]).items():
        assert applied == ids
        assert scale.apply_log(schema) == dict.fromkeys(ids, 1)


def test_two_concurrent_invoke_processes_both_exit_ok_and_apply_each_migration_once(
    scale, tmp_path
):
    tenants = scale.register(12)
    ids = [scale.migration(1), scale.migration(2, sleep=0.1), scale.migration(3)]
    reports = [tmp_path / "a.json", tmp_path / "b.json"]

    procs = [scale.start("--jobs", "2", "--json", str(report)) for report in reports]
    outputs = [proc.communicate(timeout=60) for proc in procs]

    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stdout + stderr
    counts = [json.loads(report.read_text())["counts"] for report in reports]
    assert sum(c["done"] for c in counts) == len(tenants)
    assert sum(c["done"] + c["up to date"] for c in counts) == 2 * len(tenants)
    for schema, applied in scale.assert_at_boundaries([t.schema for t in tenants]).items():
        assert applied == ids
        assert scale.apply_log(schema) == dict.fromkeys(ids, 1)


# -- crashes and signals -------------------------------------------------------------------------


def test_a_run_killed_midway_leaves_every_schema_at_a_boundary_and_no_locks_and_a_rerun_finishes(
    scale,
):
    m1 = scale.migration(1)
    tenants = scale.register(30)
    schemas = [t.schema for t in tenants]
    assert scale.migrate(jobs=2).ok
    ids = [m1, scale.migration(2, sleep=0.2), scale.migration(3)]

    proc = scale.start("--jobs", "2")
    try:
        progressed = wait_until(lambda: scale.count_with_table("t3") >= 4, timeout=30)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert progressed, "the run made no progress before the kill"
    assert proc.returncode == -signal.SIGKILL

    # the server notices the dead client and ends its sessions, releasing their xact locks
    assert wait_until(lambda: advisory_locks(scale.params) == 0, timeout=10)
    applied = scale.assert_at_boundaries(schemas)
    at_head = [s for s, a in applied.items() if a == ids]
    assert 4 <= len(at_head) < len(schemas)
    assert all(a in (ids, [m1]) for a in applied.values())
    assert all(scale.apply_log(s) == dict.fromkeys(applied[s], 1) for s in schemas)

    rerun = scale.migrate(jobs=2)

    assert rerun.ok
    assert rerun.count("done") == len(schemas) - len(at_head)
    assert rerun.count("up to date") == len(at_head)
    for schema, a in scale.assert_at_boundaries(schemas).items():
        assert a == ids
        assert scale.apply_log(schema) == dict.fromkeys(ids, 1)
    assert advisory_locks(scale.params) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_finishes_running_tenants_reports_and_leaves_later_ones_untouched(
    scale, sig
):
    m1 = scale.migration(1)
    tenants = scale.register(20)
    schemas = [t.schema for t in tenants]
    assert scale.migrate(jobs=2).ok
    ids = [m1, scale.migration(2, sleep=0.1)]

    proc = scale.start("--jobs", "1")
    try:
        progressed = wait_until(lambda: scale.count_with_table("t2") >= 3, timeout=30)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert progressed

    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr
    applied = scale.assert_at_boundaries(schemas)
    done = [s for s in schemas if applied[s] == ids]
    assert 3 <= len(done) < len(schemas)
    # with one job the tenants run in registry order: the done ones first, then untouched ones
    assert done == schemas[: len(done)]
    for schema in schemas[len(done) :]:
        assert applied[schema] == [m1]
        assert scale.apply_log(schema) == {m1: 1}
    not_started = len(schemas) - len(done)
    assert (
        f"tenants: {len(done)} migrated, 0 up to date, 0 failed, {not_started} not started in"
        in stdout
    )
    assert "interrupted: no new schema was started after the signal" in stdout
    assert advisory_locks(scale.params) == 0

    rerun = scale.invoke("--jobs", "2")

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"tenants: {not_started} migrated, {len(done)} up to date, 0 failed in" in rerun.stdout
    assert all(a == ids for a in scale.assert_at_boundaries(schemas).values())


# -- connections and locks -----------------------------------------------------------------------


def test_jobs_bounds_the_connections_of_a_run_to_jobs_plus_one(scale):
    tenants = scale.register(20)
    scale.migration(1, sleep=0.08)
    dbname = scale.params["dbname"]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("run", scale.migrate(jobs=2)))
    seen = []
    with Admin(scale.params) as side:
        thread.start()
        while thread.is_alive():
            seen.append(
                side.value(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                    "AND application_name = 'yoyo-tenants' AND pid <> pg_backend_pid()",
                    (dbname,),
                )
            )
            time.sleep(0.01)
        thread.join()
        # A closed connection's server process exits a moment after the client let go of it.
        deadline = time.monotonic() + 5
        while (
            left := side.value(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name = 'yoyo-tenants' AND pid <> pg_backend_pid()",
                (dbname,),
            )
        ) and time.monotonic() < deadline:
            time.sleep(0.01)

    assert result["run"].ok and result["run"].count("done") == len(tenants)
    assert 2 <= max(seen) <= 3, seen
    assert left == 0  # every worker connection and the scanning one are closed


def test_a_schema_locked_by_another_session_is_skipped_after_lock_wait_and_the_rest_are_done(
    scale,
):
    m1 = scale.migration(1)
    tenants = scale.register(4)
    locked = tenants[1]
    holder = psycopg2.connect(**scale.params)
    try:
        with holder.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('yoyo-tenants:' || %s, 0))",
                (locked.schema,),
            )
        started = time.monotonic()
        run = scale.migrate(jobs=2, lock_wait=0.5)
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()

    assert not run.ok
    results = by_schema(run)
    assert results[locked.schema].outcome == "skipped"
    assert results[locked.schema].skipped
    assert results[locked.schema].org_id == locked.org_id
    assert "locked" in str(results[locked.schema].failure)
    assert 0.5 <= results[locked.schema].duration < 10
    assert elapsed < 20
    assert run.count("skipped") == 1 and run.count("done") == 3
    assert [r.schema for r in run.failed] == [locked.schema]
    applied = scale.assert_at_boundaries([t.schema for t in tenants])
    assert applied[locked.schema] == []
    assert all(applied[t.schema] == [m1] for t in tenants if t is not locked)

    rerun = scale.migrate(jobs=2, lock_wait=0.5)
    assert rerun.ok and rerun.count("done") == 1
    assert applied_ids(scale.params, locked.schema) == [m1]


# -- reports -------------------------------------------------------------------------------------


def test_json_report_lists_each_tenant_with_its_migrations_duration_error_and_the_counts(
    scale, tmp_path
):
    m1 = scale.migration(1)
    tenants = scale.register(4)
    assert scale.migrate(jobs=2).ok
    m2 = scale.migration(2)
    current, bad = tenants[0], tenants[2]
    assert scale.migrate(tenant=current.org_id).count("done") == 1
    _query(
        scale.params, sql.SQL("CREATE TABLE {} (x text)").format(sql.Identifier(bad.schema, "t2"))
    )
    report_file = tmp_path / "report.json"

    done = scale.invoke("--jobs", "2", "--json", str(report_file))

    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert report["direction"] == "apply" and report["jobs"] == 2
    assert report["interrupted"] is False
    assert report["duration"] > 0
    assert report["counts"] == {
        "done": 2,
        "up to date": 1,
        "failed": 1,
        "skipped": 0,
        "not started": 0,
        "unknown": 0,
    }
    entries = report["schemas"]
    assert [(e["org_id"], e["schema"]) for e in entries] == [(t.org_id, t.schema) for t in tenants]
    for tenant, entry in zip(tenants, entries, strict=True):
        assert set(entry) >= {"org_id", "schema", "status", "migrations", "duration", "error"}
        if tenant is current:
            assert entry["status"] == "up to date" and entry["migrations"] == []
            assert entry["error"] is None
        elif tenant is bad:
            assert entry["status"] == "failed" and entry["migrations"] == []
            assert entry["failed_migration"] == m2
            assert 'relation "t2" already exists' in entry["error"]
            assert entry["duration"] > 0
        else:
            assert entry["status"] == "done" and entry["migrations"] == [m2]
            assert entry["error"] is None and entry["failed_migration"] is None
            assert entry["duration"] > 0
            assert applied_ids(scale.params, tenant.schema) == [m1, m2]


def test_plain_output_when_stdout_is_not_a_terminal_has_per_tenant_lines_and_the_summary(scale):
    ids = [scale.migration(1), scale.migration(2)]
    tenants = scale.register(3)

    done = scale.invoke("--jobs", "2")

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "migrating 3 of 3 tenants with 2 jobs"
    assert "\x1b[" not in done.stdout  # no colours, no progress bar redraws
    for tenant in tenants:
        assert f"{tenant.org_id} ({tenant.schema}): applied 2: {', '.join(ids)}" in lines
    summary = [line for line in lines if line.startswith("tenants: ")]
    assert len(summary) == 1
    assert summary[0].startswith("tenants: 3 migrated, 0 up to date, 0 failed in ")

    again = scale.invoke("--jobs", "2")
    assert again.returncode == 0
    assert "tenants: 0 migrated, 3 up to date, 0 failed in " in again.stdout


def test_plain_progress_prints_a_count_line_per_interval_then_the_summary(scale, monkeypatch):
    scale.migration(1)
    scale.register(5)
    console = Console(file=io.StringIO(), highlight=False, soft_wrap=True)
    assert not console.is_terminal
    monkeypatch.setattr(report, "PLAIN_PROGRESS_EVERY", 0.0)

    with report.progress(console, "tenants") as progress:
        run = scale.migrate(jobs=2, on_start=progress.start, on_result=progress)
    report.run_summary(console, run, "tenants")

    lines = console.file.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines[:5]] == [
        f"tenants: {n} of 5 done" for n in range(1, 6)
    ]
    assert all(line.endswith(" left") for line in lines[:4])
    assert lines[-1].startswith("tenants: 5 migrated, 0 up to date, 0 failed in ")
    assert "\x1b[" not in console.file.getvalue()


# -- status --------------------------------------------------------------------------------------


class CountingCursor:
    """A real cursor that counts its statements."""

    def __init__(self, cursor, counter):
        self._cursor, self._counter = cursor, counter

    def execute(self, *args, **kwargs):
        self._counter.append(args[0])
        return self._cursor.execute(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


class CountingConnection:
    def __init__(self, connection, counter):
        self._connection, self._counter = connection, counter

    def cursor(self, *args, **kwargs):
        return CountingCursor(self._connection.cursor(*args, **kwargs), self._counter)

    def __getattr__(self, name):
        return getattr(self._connection, name)


def test_status_over_fifty_tenants_in_mixed_states_is_right_and_takes_a_constant_few_queries(
    scale, monkeypatch
):
    m1, m2 = scale.migration(1), scale.migration(2)
    at_head = scale.register(20, start=0)
    assert scale.migrate(jobs=2).ok
    # behind: migrated while m2 was not there yet
    hidden = scale.tenant_dir.parent / "hidden"
    hidden.mkdir()
    for path in scale.tenant_dir.glob(f"{m2}*"):
        path.rename(hidden / path.name)
    behind = scale.register(15, start=20)
    assert scale.migrate(jobs=2).count("done") == 15
    for path in hidden.iterdir():
        path.rename(scale.tenant_dir / path.name)
    never = scale.register(14, start=35)
    missing = scale.register(1, start=49)[0]
    _query(scale.params, sql.SQL("DROP SCHEMA {}").format(sql.Identifier(missing.schema)))

    statements: list = []
    scans: list = []
    real_connect = commands.connect

    def counting_scan(cursor, schemas, migrations=None):
        before = len(statements)
        states = pool.scan(cursor, schemas, migrations)
        scans.append((len(schemas), len(statements) - before))
        return states

    monkeypatch.setattr(
        commands, "connect", lambda params: CountingConnection(real_connect(params), statements)
    )
    monkeypatch.setattr(commands, "scan", counting_scan)

    result = commands.status(scale.settings)

    assert result.master.state == "at head"
    assert result.tenant_head == m2
    states = {t.org_id: t for t in result.tenants}
    assert len(states) == 50
    for t in at_head:
        assert states[t.org_id].state == "at head"
        assert states[t.org_id].applied == [m1, m2] and states[t.org_id].pending == []
    for t in behind:
        assert states[t.org_id].state == "behind by 1"
        assert states[t.org_id].applied == [m1] and states[t.org_id].pending == [m2]
    for t in never:
        assert states[t.org_id].state == "never migrated"
        assert states[t.org_id].pending == [m1, m2]
    assert states[missing.org_id].state == "schema missing"
    assert all(states[t.org_id].schema == t.schema for t in [*at_head, *behind, *never])
    # From the heads index: whether it is there, its rows, plain yoyo's tables; for the behind,
    # one log (they share what they applied); the never migrated are not in it: the catalog.
    assert scans == [(1, 3), (50, 5)], statements
    assert len(statements) <= 12, statements


def test_scan_reads_many_schemas_in_one_query_per_chunk(scale, monkeypatch):
    scale.migration(1)
    tenants = scale.register(25)
    assert scale.migrate(jobs=2).ok
    monkeypatch.setattr(pool, "SCAN_CHUNK", 10)
    statements: list = []
    connection = psycopg2.connect(**scale.params)
    try:
        cursor = CountingCursor(connection.cursor(), statements)
        states = pool.scan(cursor, [t.schema for t in tenants] + ["tid_0000000000"])
    finally:
        connection.close()

    assert len(statements) == 1 + math.ceil(len(tenants) / 10)
    assert all(states[t.schema].exists and len(states[t.schema].applied) == 1 for t in tenants)
    assert not states["tid_0000000000"].exists


# -- probes --------------------------------------------------------------------------------------


def test_a_run_connects_workers_only_for_the_tenants_that_are_behind(scale, monkeypatch):
    m1 = scale.migration(1)
    tenants = scale.register(20)
    assert scale.migrate(jobs=4).ok
    opened = []
    real_connect = pool.connect

    def counting_connect(params):
        opened.append(params)
        return real_connect(params)

    monkeypatch.setattr(pool, "connect", counting_connect)

    run = scale.migrate(jobs=4)

    assert run.ok and run.count("up to date") == 20
    assert opened == []  # all at head: the scan alone decided it, no worker connected

    newcomer = scale.register(1, start=20)[0]
    run = scale.migrate(jobs=4)

    assert run.ok and run.count("done") == 1 and run.count("up to date") == 20
    assert len(opened) == 1  # one schema behind: one worker, not four

    opened.clear()
    m2 = scale.migration(2)
    missing = scale.register(1, start=21)[0]
    _query(scale.params, sql.SQL("DROP SCHEMA {}").format(sql.Identifier(missing.schema)))
    run = scale.migrate(jobs=4)

    assert run.count("done") == 21 and run.count("failed") == 1
    assert by_schema(run)[missing.schema].outcome == "failed"
    assert "does not exist" in str(by_schema(run)[missing.schema].failure)
    assert len(opened) == 4  # one connection per worker, reused across the 21 schemas
    for t in [*tenants, newcomer]:
        assert applied_ids(scale.params, t.schema) == [m1, m2]


def test_a_tenant_whose_schema_is_dropped_mid_run_is_reported_failed_and_the_others_finish(
    scale,
):
    m1 = scale.migration(1)
    tenants = scale.register(6)
    assert scale.migrate(jobs=2).ok
    m2 = scale.migration(2)
    # Two in a row: after the first fails, the worker's next connection opens on the second.
    gone = tenants[2:4]

    def drop_after_first(result):
        # deprovisioned by someone else after the run's scan, while the run goes on
        if result.schema == tenants[0].schema:
            for t in gone:
                _query(
                    scale.params,
                    sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(t.schema)),
                )

    try:
        run = scale.migrate(jobs=1, on_result=drop_after_first)
    except (psycopg2.Error, TenantsError) as exc:
        at_head = [
            t.org_id
            for t in tenants
            if t not in gone and applied_ids(scale.params, t.schema)[-1] == m2
        ]
        pytest.fail(
            f"one schema's database error aborted the whole run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); tenants at head: {at_head}, no RunResult"
        )

    assert not run.ok
    results = by_schema(run)
    for t in gone:
        assert results[t.schema].outcome == "failed"
        assert results[t.schema].org_id == t.org_id
        assert t.schema in str(results[t.schema].failure)
    assert run.count("done") == 4 and run.count("failed") == 2
    for t in tenants:
        if t not in gone:
            assert applied_ids(scale.params, t.schema) == [m1, m2]
