"""Citus schema-based sharding: where each tenant schema lives, and moving one.

With `citus.enable_schema_based_sharding` on, every new tenant schema becomes a distributed
schema, its tables together on one worker node. The engine migrates them as it does on
PostgreSQL, one statement a message (see results.RunOptions.citus); this module is the little
that is Citus's own.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg2 import errors
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from . import log
from .db import one_row
from .errors import LockBusy, NotReady, UsageError
from .results import RunOptions
from .session import lock_key

#: The node of each distributed schema: the placement of a shard of one of its tables.
NODES_SQL = """
    SELECT s.schemaid::regnamespace::text, n.nodename || ':' || n.nodeport
    FROM pg_dist_schema s
    JOIN LATERAL (
        SELECT p.logicalrelid FROM pg_dist_partition p WHERE p.colocationid = s.colocationid
        LIMIT 1
    ) t ON true
    JOIN pg_dist_shard sh ON sh.logicalrelid = t.logicalrelid
    JOIN pg_dist_placement pl ON pl.shardid = sh.shardid
    JOIN pg_dist_node n ON n.groupid = pl.groupid
    WHERE s.schemaid::regnamespace::text = ANY(%s)
"""


def installed(cursor: Cursor) -> bool:
    cursor.execute("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')")
    return one_row(cursor)[0]


def nodes(cursor: Cursor, schemas: Sequence[str]) -> dict[str, str]:
    """schema -> "host:port" of the worker holding it ({} when the server is not Citus)."""
    if not installed(cursor):
        return {}
    cursor.execute(NODES_SQL, (list(schemas),))
    return dict(cursor.fetchall())


def move(
    connection: Connection, schema: str, to: str, options: RunOptions
) -> tuple[str | None, str]:
    """Move `schema` to the worker `to` ("host:port") with citus_schema_move, in its default
    (online) mode, holding the schema's lock meanwhile, so that no run migrates it as it moves.
    Returns where it was and where it is."""
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--to {to!r}: give the worker as host:port, as status shows it")
    cursor = connection.cursor()
    if not installed(cursor):
        raise NotReady("this server is not a Citus coordinator: there is nothing to move")
    was = nodes(cursor, [schema]).get(schema)
    if was is None:
        raise NotReady(f"schema {schema} is not a distributed schema: it has no node to leave")
    if was == to:
        return was, to
    key = lock_key(schema)
    try:
        cursor.execute(
            "SELECT set_config('lock_timeout', %s, false); "
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))",
            (f"{round(options.wait * 1000)}ms", key),
        )
        # A log made before it had to move online has no replica identity yet.
        cursor.execute(log.movable_sql(schema))
        cursor.execute(
            "SELECT citus_schema_move(%s::regnamespace, %s, %s)", (schema, host, int(port))
        )
    except errors.LockNotAvailable:
        raise LockBusy(f"schema {schema} is locked by another run") from None
    finally:
        cursor.execute("RESET lock_timeout; SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                       (key,))  # fmt: skip
    return was, nodes(cursor, [schema]).get(schema, to)
