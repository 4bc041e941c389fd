"""A schema's migration log: one table inside the schema, one row per operation, never updated.

yoyo keeps three tables per schema (what is applied, a log of operations, the layout's version),
each with an index, and the log with a TOAST table: eight relations, which cost a new tenant about
half as much again as its own DDL, and which a run has to open in every schema it touches.
Here one table does the work of all three:

* every apply, rollback, mark, unmark (and post-apply hook) is a row, numbered 1, 2, ... in the
  order they happened; rows are numbered under the schema's advisory lock, so no sequence;
* what is applied is what the rows say, read in that order: a migration whose last apply or mark
  no rollback or unmark has undone since;
* the number of the last row is the log's position: while it stays put nothing has changed, so a
  run can check in one cheap statement that a schema is still as a scan saw it;
* the table has no index (a few rows per migration, always read whole) and no TOAST table:
  its columns are sized so that the widest row stays under TOAST's 2 kB threshold at 4 bytes a
  character. The layout is told by its columns (``batch``), so no version table either.
"""

from __future__ import annotations

import getpass
import hashlib
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple
from weakref import WeakKeyDictionary

from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from yoyo.migrations import Migration, hash_function

TABLE = "_yoyo_log"
#: A column only the current layout has: a schema whose log lacks it is not ready.
LAYOUT_COLUMN = "batch"
#: What yoyo keeps (and yoyo-tenants 0.1 kept, with batch and checksum columns): a table of the
#: migrations applied, beside yoyo's log of operations and a version table.
OLD_TABLE = "_yoyo_migration"
VERSION_TABLE = "_yoyo_version"

DEFINITION = (
    "id INTEGER NOT NULL, "
    "migration_id VARCHAR(255) NOT NULL, "
    "operation VARCHAR(10) NOT NULL, "
    "batch INTEGER, "
    "checksum VARCHAR(64), "
    "username VARCHAR(63), "
    "hostname VARCHAR(95), "
    "created_at_utc TIMESTAMP NOT NULL, "
    "run BIGINT"
)
CREATE_SQL = sql.SQL("CREATE TABLE IF NOT EXISTS {log} (" + DEFINITION + ")")
COLUMN_NAMES = (
    "id", "migration_id", "operation", "batch", "checksum", "username", "hostname",
    "created_at_utc", "run",
)  # fmt: skip
#: A log from before runs were recorded gets the column the first time a run writes to it.
RUN_COLUMN = "run"
#: Every column as DEFINITION makes it: its type as PostgreSQL names it, and a VARCHAR's length.
#: A log whose column is missing (but run: a log from before runs gets it) or of another type is
#: damaged.
LAYOUT = {
    "id": ("integer", None),
    "migration_id": ("character varying", 255),
    "operation": ("character varying", 10),
    "batch": ("integer", None),
    "checksum": ("character varying", 64),
    "username": ("character varying", 63),
    "hostname": ("character varying", 95),
    "created_at_utc": ("timestamp without time zone", None),
    "run": ("bigint", None),
}

ADD_RUN_SQL = sql.SQL("ALTER TABLE {log} ADD COLUMN IF NOT EXISTS run BIGINT")
#: That layout to this one, in the caller's transaction: each applied migration becomes an apply
#: row, in the order 0.1 read them; yoyo's log is kept, renamed, as history.
UPGRADE_SQL = sql.SQL(
    "ALTER TABLE {old} ADD COLUMN IF NOT EXISTS batch INTEGER NOT NULL DEFAULT 0; "
    "ALTER TABLE {old} ADD COLUMN IF NOT EXISTS checksum VARCHAR(64); "
    "ALTER TABLE IF EXISTS {log} RENAME TO _yoyo_log_v1; "
    "{create}; "
    "INSERT INTO {log} (id, migration_id, operation, batch, checksum, created_at_utc) "
    "SELECT row_number() OVER (ORDER BY batch, applied_at_utc, migration_id), migration_id, "
    "'apply', batch, checksum, coalesce(applied_at_utc, timezone('UTC', now())) FROM {old}; "
    "DROP TABLE {old}; "
    "DROP TABLE IF EXISTS {version}"
)
#: A log row: its number (the caller's, who holds the schema's lock and knows the log's end),
#: then the values a migration's rows share in every schema of a run (see RowValues).
INSERT_SQL = sql.SQL(
    "INSERT INTO {log} (created_at_utc, id, migration_id, operation, batch, checksum, username, "
    "hostname, run) VALUES (timezone('UTC', statement_timestamp()), {id}, {values})"
)


def insert_sql(schema: str, number: int, values: sql.Composable) -> sql.Composed:
    return INSERT_SQL.format(
        log=sql.Identifier(schema, TABLE), id=sql.Literal(number), values=values
    )


class RowValues:
    """The values of log rows, quoted once for all the schemas of a run: at thousands of
    schemas, quoting is most of what the client does. One per run (see RunOptions.rows)."""

    KEPT = 10_000

    def __init__(self) -> None:
        self._quoted: dict[tuple, sql.SQL] = {}

    def values(
        self, row: tuple[str, str, int | None, str | None, int | None], connection: Connection
    ) -> sql.SQL:
        """(migration id, operation, batch, checksum, run) and who writes them, as SQL."""
        key = (*row, connection.encoding)
        found = self._quoted.get(key)
        if found is None:
            identity = log_identity()
            literals = [*row[:4], identity["username"], identity["hostname"], row[4]]
            text = sql.SQL(", ").join(map(sql.Literal, literals)).as_string(connection)
            if len(self._quoted) >= self.KEPT:
                self._quoted.clear()
            found = self._quoted[key] = sql.SQL(text)
        return found


def columns(has_run: bool) -> sql.Composed:
    """What Log.from_rows reads, in this order (a log from before runs has none to read)."""
    run = sql.SQL("run") if has_run else sql.SQL("NULL::bigint")
    return sql.SQL("id, migration_id, operation, batch, checksum, {}").format(run)


def rows_sql(schema: str, has_run: bool = True) -> sql.Composed:
    return sql.SQL("SELECT {} FROM {}").format(columns(has_run), sql.Identifier(schema, TABLE))


class Layout(NamedTuple):
    """How a schema keeps its log, as LAYOUT_SQL reads it."""

    exists: bool  # _yoyo_log is there, in the current layout (it has a batch column)
    has_run: bool  # it records runs (a log from before them gets the column)
    old: bool  # yoyo's tables are there instead (see UPGRADE_SQL)


#: The layout of the logs of many schemas, in one query: the scan's, and a session's for its own
#: schema. A schema that does not exist has no row.
LAYOUT_SQL = sql.SQL(
    "SELECT n.nspname, b.attname IS NOT NULL, r.attname IS NOT NULL, "
    "EXISTS (SELECT 1 FROM pg_class o WHERE o.relnamespace = n.oid AND o.relname = {old}) "
    "FROM pg_namespace n "
    "LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = {log} "
    "LEFT JOIN pg_attribute b ON b.attrelid = c.oid AND b.attname = {batch} AND NOT b.attisdropped "
    "LEFT JOIN pg_attribute r ON r.attrelid = c.oid AND r.attname = {run} AND NOT r.attisdropped "
    "WHERE n.nspname = ANY({schemas})"
)


def layout_sql(schemas: list[str]) -> sql.Composed:
    return LAYOUT_SQL.format(
        old=sql.Literal(OLD_TABLE),
        log=sql.Literal(TABLE),
        batch=sql.Literal(LAYOUT_COLUMN),
        run=sql.Literal(RUN_COLUMN),
        schemas=sql.Literal(schemas),
    )


#: yoyo's table of applied migrations (an old layout) as log rows, in yoyo's order.
OLD_ROWS_SQL = sql.SQL(
    "SELECT row_number() OVER (ORDER BY applied_at_utc, migration_id), migration_id, 'apply', "
    "NULL::integer, NULL::text, NULL::bigint FROM {old}"
)


def old_rows_sql(schema: str) -> sql.Composed:
    return OLD_ROWS_SQL.format(old=sql.Identifier(schema, OLD_TABLE))


def making_sql(schema: str, layout: Layout, citus: bool) -> list[sql.Composed]:
    """What makes a schema's log what a run writes to: converted from yoyo's tables, made, or
    given its run column; nothing if it is so already."""
    if layout.old:
        return [upgrade_sql(schema)]
    if not layout.exists:
        return create_sql(schema, citus)
    if not layout.has_run:
        return [add_run_sql(schema)]
    return []


#: On Citus, a log moves with its schema online (citus_schema_move copies it by logical
#: replication, which needs a replica identity): it is made with a primary key, which costs no
#: statement of its own (every DDL statement there is a round trip to every worker). A log
#: made without one is given REPLICA IDENTITY FULL before its schema moves.
CITUS_CREATE_SQL = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {log} (" + DEFINITION + ", PRIMARY KEY (id))"
)
MOVABLE_SQL = sql.SQL("ALTER TABLE {log} REPLICA IDENTITY FULL")


def create_sql(schema: str, citus: bool = False) -> list[sql.Composed]:
    """The statements that make a schema's log (movable online on Citus)."""
    table = sql.Identifier(schema, TABLE)
    return [(CITUS_CREATE_SQL if citus else CREATE_SQL).format(log=table)]


def movable_sql(schema: str) -> sql.Composed:
    return MOVABLE_SQL.format(log=sql.Identifier(schema, TABLE))


def add_run_sql(schema: str) -> sql.Composed:
    return ADD_RUN_SQL.format(log=sql.Identifier(schema, TABLE))


def upgrade_sql(schema: str) -> sql.Composed:
    return UPGRADE_SQL.format(
        log=sql.Identifier(schema, TABLE),
        old=sql.Identifier(schema, OLD_TABLE),
        version=sql.Identifier(schema, VERSION_TABLE),
        create=create_sql(schema)[0],
    )


def layout_type(column: str) -> str:
    """A column's type as PostgreSQL's format_type() writes it."""
    name, length = LAYOUT[column]
    return name if length is None else f"{name}({length})"


def layout_params() -> dict[str, list]:
    """The layout as (name, type, type modifier) arrays for the catalog query (a VARCHAR's
    modifier is its length plus PostgreSQL's 4-byte header)."""
    return {
        "names": list(LAYOUT),
        "types": [name for name, _ in LAYOUT.values()],
        "typmods": [-1 if length is None else length + 4 for _, length in LAYOUT.values()],
    }


APPLIED = ("apply", "mark")
UNDONE = ("rollback", "unmark")
#: The file of an applied migration as it is now is accepted (`invoke repair`): its checksum
#: becomes this row's; it stays where it was in the order of what is applied.
ACCEPT = "accept"
#: Logged, never applied: a post-apply hook runs after every run that applied something.
HOOK = "post-apply"
OPERATIONS = (*APPLIED, *UNDONE, ACCEPT, HOOK)
USERNAME_WIDTH, HOSTNAME_WIDTH = 63, 95


@cache
def log_identity() -> dict[str, str]:
    """Who writes the log rows. (yoyo looks these up for every row; socket.getfqdn() alone can
    take milliseconds.)"""
    return {
        "username": getpass.getuser()[:USERNAME_WIDTH],
        "hostname": socket.getfqdn()[:HOSTNAME_WIDTH],
    }


@cache
def migration_hash(migration_id: str) -> str:
    """yoyo's hash of a migration: of its id, not its content (see migration_checksum)."""
    return hash_function(migration_id.encode("utf-8")).hexdigest()


class AppliedMigration(NamedTuple):
    """A migration the log says is applied (a tuple: a scan makes one per row of thousands)."""

    migration_id: str
    batch: int | None
    checksum: str | None
    run: int | None = None  # the run that applied it (None: provisioning, or an older tool)

    @property
    def migration_hash(self) -> str:
        return migration_hash(self.migration_id)


@dataclass
class Log:
    """What a schema's log says: the migrations applied, oldest first, and its position."""

    applied: list[AppliedMigration]
    position: int = 0
    #: Its last batch, when known without its rows (from the heads index: see logindex.py).
    batch: int | None = None
    #: What in its rows no run writes (see from_rows): such a log is no evidence.
    damage: tuple[str, ...] = ()

    @property
    def last_batch(self) -> int:
        if self.batch is not None:
            return self.batch
        return max((row.batch or 0 for row in self.applied), default=0)

    def after(self, done: Iterable[tuple[Migration, str]], batch: int | None) -> Log:
        """What is applied once `done` ((migration, operation) pairs, in order, recording
        `batch` with what they apply) is logged too; its position is not known here."""
        applied = {row.migration_id: row for row in self.applied}
        for migration, operation in done:
            if operation in APPLIED:
                applied.pop(migration.id, None)
                applied[migration.id] = AppliedMigration(
                    migration.id, batch, migration_checksum(migration)
                )
            elif operation in UNDONE:
                applied.pop(migration.id, None)
            elif operation == ACCEPT and migration.id in applied:
                row = applied[migration.id]
                applied[migration.id] = row._replace(checksum=migration_checksum(migration))
        return Log(list(applied.values()))

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Sequence[Any]],
        alike: dict[AppliedMigration, AppliedMigration] | None = None,
    ) -> Log:
        """From rows of `columns()`, in any order. What no run writes is noted in `damage` (in
        the same pass: a scan reads thousands of logs): ids that are not 1, 2, 3, ... (a row
        twice, or one deleted), an operation no run logs, a rollback or unmark of a migration
        that was not applied then. Given `alike`, the logs read with it share their equal rows
        (a scan keeps 100,000 logs, most of them the same rows)."""
        applied: dict[str, AppliedMigration] = {}
        damage: list[str] = []
        position, numbered = 0, True
        for row in sorted(rows, key=lambda row: (row[0] is None, row[0])):
            number, migration_id, operation, batch, checksum, run = row
            if numbered and number != position + 1:  # the first misnumbering says enough
                damage.append(_misnumbered(number, position + 1))
                numbered = False
            position = position if number is None else number
            if operation in UNDONE and migration_id not in applied:
                damage.append(f"row {number} undoes {migration_id}, which was not applied")
            if operation in APPLIED or operation in UNDONE:
                applied.pop(migration_id, None)  # a re-apply moves to the end
            if operation in APPLIED:
                # Interned: 100,000 logs repeat the same few ids and checksums (verify keeps
                # every log: 556 MB at 100,000 tenants with a copy of each per row).
                applied[migration_id] = AppliedMigration(
                    sys.intern(migration_id), batch, _interned(checksum), run
                )
            elif operation == ACCEPT and migration_id in applied:
                applied[migration_id] = applied[migration_id]._replace(checksum=checksum)
            elif operation not in OPERATIONS:
                damage.append(f"row {number} has an unknown operation {operation!r}")
        rows_kept = list(applied.values())
        if alike is not None:
            rows_kept = [alike.setdefault(row, row) for row in rows_kept]
        return cls(rows_kept, position, damage=tuple(damage))


def _interned(text: str | None) -> str | None:
    return None if text is None else sys.intern(text)


def _misnumbered(number: int | None, expected: int) -> str:
    if number is None:
        return "a row has no id"
    if expected == 1:
        return f"its ids start at {number}, not 1"
    if number == expected - 1:
        return f"id {number} is there twice"
    return f"its ids jump from {expected - 1} to {number}: a row is missing"


_checksums: WeakKeyDictionary[Migration, str] = WeakKeyDictionary()


def migration_checksum(migration: Migration) -> str:
    """sha256 of a migration's file and, for SQL, its .rollback.sql twin, as first read.

    Kept per Migration object, so a run records the content it loaded even if the file changes
    while it runs, and a fresh read_migrations() sees an edited file.
    """
    checksum = _checksums.get(migration)
    if checksum is None:
        path = Path(migration.path)
        digest = hashlib.sha256(path.read_bytes())
        rollback = path.with_suffix(".rollback.sql")
        if path.suffix == ".sql" and rollback.exists():
            digest.update(b"\0rollback\0" + rollback.read_bytes())
        checksum = _checksums[migration] = digest.hexdigest()
    return checksum
