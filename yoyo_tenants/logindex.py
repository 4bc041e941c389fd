"""An index of every schema's log, in public: where each log ends and what it says is applied.

Finding out which of 10,000 tenants are behind by reading their logs opens 10,000 relations
(and on Citus, 10,000 remote tables). `public.yoyo_tenants_heads` has one row per schema,
written by the engine in the same transaction as that schema's log rows: its log table (by oid),
the log's position, a digest of the migrations applied (ids and checksums) and its last batch.
A run reads it in one query; schemas whose digest is the head's need nothing, the others are
grouped by digest and one log per group is read to plan them.

The per-schema log stays the truth: the engine checks, under the schema's lock, that the log
still ends where the index said, and reads it again if not. A row is used only while its log
table is the one it names, in the schema it names, so a schema dropped, restored from a dump,
renamed or re-created reads as unindexed and its log is read whole. A schema changed behind the
tool's back by anything that writes its log without the index (an older yoyo-tenants, a hand
INSERT) is seen when the tool next works on it, and by `verify`, which rebuilds the index.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from psycopg2 import errors, sql
from psycopg2.extensions import cursor as Cursor
from yoyo.migrations import MigrationList

from . import log
from .db import public_table
from .log import AppliedMigration, Log, migration_checksum

if TYPE_CHECKING:
    from .pool import SchemaState

TABLE = sql.Identifier("public", "yoyo_tenants_heads")
CREATE_SQL = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {heads} ("
    "schema_name TEXT PRIMARY KEY, "
    "log_table OID NOT NULL, "
    "position INTEGER NOT NULL, "
    "applied TEXT NOT NULL, "
    "batch INTEGER)"
).format(heads=TABLE)
UPSERT_SQL = sql.SQL(
    "INSERT INTO {heads} (schema_name, log_table, position, applied, batch) "
    "VALUES ({schema}, (quote_ident({schema}) || '.' || quote_ident({log}))::regclass, "
    "{position}, {applied}, {batch}) "
    "ON CONFLICT (schema_name) DO UPDATE SET log_table = EXCLUDED.log_table, "
    "position = EXCLUDED.position, applied = EXCLUDED.applied, batch = EXCLUDED.batch"
)
#: A damaged log's row, made to name no table (see rebuild).
UNLINK_SQL = sql.SQL(
    "UPDATE {heads} SET log_table = 0, position = 0, applied = '', batch = NULL "
    "WHERE schema_name = %s"
).format(heads=TABLE)
#: The rows still describing the log they name: the same table, named _yoyo_log, in that schema,
#: with every column a run reads and writes, and this user allowed to (the schema and the
#: table). Any other schema's log is read whole (and, if it cannot be, reported by name).
#: Each row looks its table up by oid, a lookup per row whatever the statistics say: planned as
#: a join, once pg_class had been analyzed the planner expected one log table after the checks
#: and scanned the index once per log table (3,000 tenants: 0.84 s instead of 0.15 s; growing
#: with the square of the tenants). OFFSET 0 keeps the subquery from being flattened into one.
READ_SQL = sql.SQL(
    "SELECT h.schema_name, h.position, h.applied, h.batch FROM {heads} h "
    "CROSS JOIN LATERAL (SELECT c.oid, c.relnamespace FROM pg_class c "
    "WHERE c.oid = h.log_table AND c.relname = %(log)s "
    "AND c.relnamespace = to_regnamespace(quote_ident(h.schema_name)) OFFSET 0) c "
    "WHERE h.schema_name = ANY(%(schemas)s) "
    "AND has_schema_privilege(c.relnamespace, 'USAGE') "
    "AND has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT') "
    "AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid "
    "AND a.attname = ANY(%(columns)s) AND NOT a.attisdropped) = %(count)s"
).format(heads=TABLE)
#: Schemas plain yoyo has migrated (its tables, which a run converts): the index cannot know.
OLD_LAYOUT_SQL = (
    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relname = %(old)s AND n.nspname = ANY(%(schemas)s)"
)


FURTHEST_SQL = sql.SQL(
    "SELECT schema_name FROM {heads} WHERE schema_name <> 'public' ORDER BY position DESC LIMIT 1"
).format(heads=TABLE)


def upsert_sql(schema: str, after: Log) -> sql.Composed:
    """The schema's row, as a transaction leaves its log (`after`, with its position)."""
    return UPSERT_SQL.format(
        heads=TABLE,
        schema=sql.Literal(schema),
        log=sql.Literal(log.TABLE),
        position=sql.Literal(after.position),
        applied=sql.Literal(digest_of(after.applied)),
        batch=sql.Literal(after.last_batch),
    )


def forget_sql(schema: str) -> sql.Composed:
    """Drops a schema's row (its schema is being dropped)."""
    return sql.SQL("DELETE FROM {} WHERE schema_name = {}").format(TABLE, sql.Literal(schema))


def digest(applied: Iterable[tuple[str, str | None]]) -> str:
    """Of a set of (migration id, checksum): the same set, in any order, the same digest."""
    text = "\n".join(f"{mid}\t{checksum or ''}" for mid, checksum in sorted(applied))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def digest_of(applied: Sequence[AppliedMigration]) -> str:
    return digest((row.migration_id, row.checksum) for row in applied)


def head_digest(migrations: MigrationList) -> str:
    """The digest of a schema with every migration applied, as the files are now."""
    return digest((m.id, migration_checksum(m)) for m in migrations)


def exists(cursor: Cursor) -> bool:
    return public_table(cursor, "yoyo_tenants_heads")


def ensure(cursor: Cursor) -> bool:
    """Make the index if it is not there; False if this user may not (runs then read logs)."""
    if exists(cursor):
        return True
    try:
        with contextlib.suppress(errors.UniqueViolation):  # another run made it a moment ago
            cursor.execute(CREATE_SQL)
    except errors.InsufficientPrivilege:
        return False
    return True


def read(cursor: Cursor, schemas: Sequence[str]) -> dict[str, tuple[int, str, int | None]]:
    """Valid index rows of `schemas`: schema -> (position, digest, batch)."""
    params = {"log": log.TABLE, "schemas": list(schemas), "columns": list(log.COLUMN_NAMES)}
    cursor.execute(READ_SQL, {**params, "count": len(log.COLUMN_NAMES)})
    rows = cursor.fetchall()
    return {schema: (position, applied, batch) for schema, position, applied, batch in rows}


def old_layouts(cursor: Cursor, schemas: Sequence[str]) -> set[str]:
    cursor.execute(OLD_LAYOUT_SQL, {"old": log.OLD_TABLE, "schemas": list(schemas)})
    return {row[0] for row in cursor.fetchall()}


def rebuild(cursor: Cursor, states: dict[str, SchemaState]) -> list[str]:
    """Make the index say what the logs in `states` (schema -> pool.SchemaState, read whole)
    say; the schemas whose row said otherwise (a missing row is added, not counted). A damaged
    log's row is made to name no table, so that runs read that log whole (and refuse it)."""
    if not ensure(cursor):
        return []
    readable = [s for s, state in states.items() if state.tables_ready and not state.unreadable]
    rows = read(cursor, readable)
    wrong = []
    for schema in readable:
        found = states[schema].log
        expected = (found.position, digest_of(found.applied), found.last_batch)
        if states[schema].damage:
            if schema in rows:  # a row naming no table: the next run reads the log, and stops
                cursor.execute(UNLINK_SQL, (schema,))
            continue
        if rows.get(schema, expected) != expected:
            wrong.append(schema)
        if rows.get(schema) != expected:
            cursor.execute(upsert_sql(schema, found))
    return wrong
