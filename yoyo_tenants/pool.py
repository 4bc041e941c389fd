"""Many schemas at once: reading their logs in a few queries, and running the engine on each
schema that needs work over a bounded pool of worker connections, one connection per worker for
the whole run."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE as IDLE
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from yoyo.migrations import MigrationList

from . import log, logindex
from .db import clean_session, connect, connection_lost, error_text
from .errors import ConnectionFailed, TenantsError
from .log import AppliedMigration, Log, migration_checksum
from .results import ConnectionLost, Direction, Outcome, SchemaResult

if TYPE_CHECKING:
    from .waves import Wave

#: Schemas per query when reading many schemas' migration tables at once: planning a UNION ALL
#: grows faster than its size (measured: 1000 schemas in chunks of 100 read in 0.09 s, of 500 in
#: 0.12-0.16 s, on a fresh connection).
SCAN_CHUNK = 100
#: Schemas a worker connection serves before it is replaced by a new one. A server backend keeps
#: what it has read of every schema's catalog (relation and catalog caches) for as long as it
#: lives; measured in bench/tenants.py, it grows about 8 KB for each schema a migration touches,
#: and would pass 200 MB a backend at some 25,000 schemas. A new connection costs a few ms.
RECONNECT_EVERY = 2000


@dataclass
class RunResult:
    """What a run did to every schema it touched."""

    direction: Direction
    schemas: list[SchemaResult] = field(default_factory=list)
    jobs: int = 1
    interrupted: bool = False
    duration: float = 0.0
    dry_run: bool = False
    run: int | None = None  # the run's number in public.yoyo_tenants_runs (if it wrote)
    waves: list[Wave] = field(default_factory=list)  # a run in waves: each wave (see waves.py)

    @property
    def failed(self) -> list[SchemaResult]:
        return [r for r in self.schemas if r.outcome in NOT_DONE]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.schemas if r.outcome == outcome)


NOT_DONE = (Outcome.FAILED, Outcome.SKIPPED, Outcome.NOT_STARTED, Outcome.UNKNOWN)


# -- many schemas --------------------------------------------------------------------------------


@dataclass
class SchemaState:
    """A schema as read by `scan`."""

    exists: bool = False
    tables_ready: bool = False  # its log table is there, in the current layout
    has_run: bool = False  # its log records runs (a log from before them gets the column)
    old_layout: bool = False  # it keeps yoyo's tables, which a run converts (see log.UPGRADE_SQL)
    log: Log = field(default_factory=lambda: Log([]))
    unreadable: str | None = None  # why its log could not be read (the others' could)
    #: What in its log no run writes (a column missing or of another type, misnumbered rows,
    #: an unknown operation, a rollback of what was not applied): the log is no evidence.
    damage: tuple[str, ...] = ()
    #: It has no log (in either layout) but holds tables.
    unlogged_tables: bool = False

    @property
    def applied(self) -> list[AppliedMigration]:
        return self.log.applied

    @property
    def applied_hashes(self) -> set[str]:
        return {row.migration_hash for row in self.applied}


#: Per schema: whether its log is in the current layout and records runs, whether it keeps
#: yoyo's tables, whether it holds tables though it has no log (one pass over pg_class, made
#: only if some schema has no log), and whether a column of its log is missing or of another
#: type than log.LAYOUT (counted in the one pass over the log's columns that finds batch and run).
CATALOG_SQL = """
    SELECT n.nspname, a.batch, a.run,
        EXISTS (SELECT 1 FROM pg_class o WHERE o.relnamespace = n.oid AND o.relname = %(old)s),
        CASE WHEN c.oid IS NULL THEN
            n.oid IN (SELECT relnamespace FROM pg_class WHERE relkind IN ('r', 'p')) END,
        c.oid IS NOT NULL AND a.sound < cardinality(%(names)s::text[]) - (NOT a.run)::int
    FROM pg_namespace n
    LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %(log)s
    LEFT JOIN LATERAL (
        SELECT coalesce(bool_or(attname = %(batch)s), false) AS batch,
            coalesce(bool_or(attname = %(run)s), false) AS run,
            count(*) FILTER (WHERE (attname, atttypid, atttypmod) IN (SELECT * FROM unnest(
                %(names)s::name[], %(types)s::regtype[]::oid[], %(typmods)s::int[]))) AS sound
        FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped
    ) a ON true
    WHERE n.nspname = ANY(%(schemas)s)
"""
#: The columns of the logs found damaged, to say which are wrong.
COLUMNS_SQL = """
    SELECT n.nspname, a.attname, format_type(a.atttypid, a.atttypmod)
    FROM pg_namespace n
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %(log)s
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname = ANY(%(schemas)s)
"""


def scan(
    cursor: Cursor, schemas: Sequence[str], migrations: MigrationList | None = None
) -> dict[str, SchemaState]:
    """Read the migration logs of many schemas in a few queries.

    Given `migrations`, schemas the heads index describes (see logindex.py) are judged from it: at
    head, or grouped by what they have applied, one log read per group. Every other schema's
    log is read whole, SCAN_CHUNK schemas a query; a log that cannot be read (a damaged table, a
    privilege missing) fails its chunk, which is then read one schema at a time, and only the
    schema at fault is marked.
    """
    states = {schema: SchemaState() for schema in schemas}
    indexed: dict[str, tuple[int, str, int | None]] = {}
    if migrations is not None and logindex.exists(cursor):
        indexed = logindex.read(cursor, schemas)
        for schema in logindex.old_layouts(cursor, list(indexed)):
            del indexed[schema]  # plain yoyo has been at it since: read it whole
    unread = _from_index(cursor, indexed, states, migrations) if indexed else []
    _read_whole(cursor, [s for s in schemas if s not in indexed or s in unread], states)
    return states


def _from_index(
    cursor: Cursor,
    indexed: dict[str, tuple[int, str, int | None]],
    states: dict[str, SchemaState],
    migrations: MigrationList,
) -> list[str]:
    """States of the indexed schemas, from the index and one log per distinct digest; returns
    the schemas to read whole after all (their group's log disagreed with the index)."""
    at_head = logindex.head_digest(migrations)
    head_rows = [AppliedMigration(m.id, None, migration_checksum(m)) for m in migrations]
    groups: dict[str, list[str]] = {}
    for schema, (position, applied, batch) in indexed.items():
        state = states[schema]
        state.exists = state.tables_ready = state.has_run = True
        if applied == at_head:
            state.log = Log(head_rows, position, batch)
        else:
            groups.setdefault(applied, []).append(schema)
    if not groups:
        return []
    representatives = {members[0]: digest for digest, members in groups.items()}
    unread = []
    try:
        rows = _read_logs(cursor, list(representatives), states)
    except psycopg2.Error:
        rows = None  # read each of them whole, and find the one at fault
    for representative, digest in representatives.items():
        found = Log.from_rows(rows.get(representative, ())) if rows is not None else None
        if (
            found is None
            or logindex.digest_of(found.applied) != digest
            or found.damage  # each of them is found out
        ):
            unread += groups[digest]
            continue
        for schema in groups[digest]:
            position, _, batch = indexed[schema]
            states[schema].log = Log(found.applied, position, batch)
    return unread


def _read_whole(cursor: Cursor, schemas: Sequence[str], states: dict[str, SchemaState]) -> None:
    if not schemas:
        return
    cursor.execute(
        CATALOG_SQL,
        {
            "old": log.OLD_TABLE,
            "log": log.TABLE,
            "batch": log.LAYOUT_COLUMN,
            "run": log.RUN_COLUMN,
            **log.layout_params(),
            "schemas": list(schemas),
        },
    )
    misshapen = []
    for name, ready, has_run, old, tables, wrong in cursor.fetchall():
        state = states[name]
        state.exists, state.tables_ready, state.has_run = True, ready, has_run
        state.old_layout = old
        state.unlogged_tables = bool(tables) and not old
        if wrong and not old:  # (yoyo's own log has other columns: a run converts it)
            misshapen.append(name)
    if misshapen:
        _say_which_columns(cursor, misshapen, states)
    ready = [s for s in schemas if states[s].tables_ready and not states[s].damage]
    alike: dict[AppliedMigration, AppliedMigration] = {}  # see Log.from_rows
    for start in range(0, len(ready), SCAN_CHUNK):
        chunk = ready[start : start + SCAN_CHUNK]
        try:
            rows = _read_logs(cursor, chunk, states)
        except psycopg2.Error:
            rows = {}
            for schema in chunk:
                try:
                    rows.update(_read_logs(cursor, [schema], states))
                except psycopg2.Error as exc:
                    states[schema].unreadable = error_text(exc)
        for schema in chunk:
            if states[schema].unreadable is None:
                states[schema].log = found = Log.from_rows(rows.get(schema, ()), alike)
                states[schema].damage = found.damage


def _say_which_columns(
    cursor: Cursor, schemas: Sequence[str], states: dict[str, SchemaState]
) -> None:
    """The damage of logs whose columns are not log.LAYOUT's: which are missing or wrong."""
    cursor.execute(COLUMNS_SQL, {"log": log.TABLE, "schemas": list(schemas)})
    found: dict[str, dict[str, str]] = {schema: {} for schema in schemas}
    for schema, column, kind in cursor.fetchall():
        found[schema][column] = kind
    for schema in schemas:
        columns, damage = found[schema], []
        for column in log.LAYOUT:
            expected = log.layout_type(column)
            if column not in columns and column != log.RUN_COLUMN:
                damage.append(f"its column {column} is missing")
            elif column in columns and columns[column] != expected:
                damage.append(f"its column {column} is {columns[column]}, not {expected}")
        states[schema].damage = tuple(damage)


def _read_logs(
    cursor: Cursor, schemas: Sequence[str], states: dict[str, SchemaState]
) -> dict[str, list[list[Any]]]:
    selects = [
        sql.SQL("SELECT {}, {} FROM {}").format(
            sql.Literal(schema),
            log.columns(states[schema].has_run),
            sql.Identifier(schema, log.TABLE),
        )
        for schema in schemas
    ]
    cursor.execute(sql.SQL(" UNION ALL ").join(selects))
    rows: dict[str, list[list[Any]]] = {}
    for schema, *row in cursor.fetchall():
        rows.setdefault(schema, []).append(row)
    return rows


class Stop(threading.Event):
    """Set to stop starting new schemas; `signalled` says a SIGINT or SIGTERM asked for it."""

    signalled = False


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """A Stop set by SIGINT or SIGTERM: stop starting new schemas, let running ones finish."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.signalled = True
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_schemas(
    params: Mapping[str, str],
    work: Iterable[SchemaResult],
    action: Callable[[Connection, SchemaResult], SchemaResult],
    *,
    direction: Direction,
    jobs: int,
    fail_fast: bool = False,
    on_result: Callable[[SchemaResult], None] | None = None,
    reconnect_every: int = RECONNECT_EVERY,
) -> RunResult:
    """Run `action(connection, result)` on each schema of `work` over at most `jobs` worker
    connections (autocommit psycopg2 connections, reused from schema to schema, each replaced
    after `reconnect_every` schemas)."""
    work = list(work)
    run = RunResult(direction, jobs=jobs)
    started = time.perf_counter()
    queue = iter(work)
    take = threading.Lock()

    def worker() -> None:
        """Take schemas one at a time until none are left, on one connection for them all."""
        connection, served = None, 0
        try:
            while (result := _next(queue, take)) is not None:
                if stop.is_set():
                    result.skipped = True
                    continue
                if connection is not None and served >= reconnect_every:
                    connection.close()  # its backend's catalog caches go with it
                    connection = None
                if connection is None:
                    try:
                        connection, served = connect(params), 0
                    except ConnectionFailed as exc:  # the server is gone: start nothing more
                        result.skipped = True
                        result.fail(str(exc))
                        stop.set()
                        continue
                try:
                    if served:  # each schema starts from a clean session
                        clean_session(connection)
                    served += 1
                    action(connection, result)
                except ConnectionLost as lost:
                    result.fail(lost.reason)
                    result.in_doubt = lost if lost.committing and lost.migrations else None
                except TenantsError as exc:  # about this schema only: the rest go on
                    result.fail(str(exc))
                except psycopg2.Error as exc:  # outside any migration: a dropped connection
                    closed = connection.closed
                    result.fail(connection_lost(exc) if closed else error_text(exc))
                if connection.closed or connection.info.transaction_status != IDLE:
                    connection.close()  # a session left in an unknown state is not reused:
                    connection = None  # the next schema gets a fresh one
                if result.failure and fail_fast:
                    stop.set()
                if on_result:
                    on_result(result)
        finally:
            if connection is not None:
                connection.close()

    with stop_on_signals() as stop:
        workers = max(1, min(jobs, len(work)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(worker) for _ in range(workers)]:
                future.result()
        run.interrupted = stop.signalled
    settle(params, [r for r in work if r.in_doubt])
    run.schemas = work
    run.duration = time.perf_counter() - started
    return run


def settle(params: Mapping[str, str], results: Sequence[SchemaResult]) -> None:
    """Tell what became of schemas whose connection broke as their COMMIT went out, from their
    logs: done if the log reached where the commit would have left it, failed (nothing of it
    applied) if it is where the transaction began. Left unknown if the server cannot be
    reached, or the log says neither."""
    if not results:
        return
    try:
        connection = connect(params)
    except ConnectionFailed:
        return
    try:
        states = scan(connection.cursor(), [r.schema for r in results])
    except psycopg2.Error:
        return
    finally:
        connection.close()
    for result in results:
        lost, position = result.in_doubt, states[result.schema].log.position
        if lost is None:
            continue  # nothing was in doubt
        if position == lost.position:
            result.migrations += lost.migrations
            result.failure, result.in_doubt = None, None
        elif position == lost.start:
            result.in_doubt = None
            result.fail(f"{lost.reason}; its transaction did not commit: nothing of it stays")


def _next(queue: Iterator[SchemaResult], lock: threading.Lock) -> SchemaResult | None:
    with lock:
        return next(queue, None)
