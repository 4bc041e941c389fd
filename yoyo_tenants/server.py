"""What a run needs to know of the server, read in one query before it starts: whether it is a
Citus coordinator, how it reads strings, whether the heads index is there and may be kept, and
(for provisioning) whether some tenant is at the files' head."""

from __future__ import annotations

from dataclasses import dataclass, replace

from psycopg2 import errors, sql
from psycopg2.extensions import connection as Connection
from yoyo.migrations import MigrationList

from . import logindex
from .db import one_row
from .errors import NotReady
from .results import RunOptions

STATE_SQL = sql.SQL(
    "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus'), "
    "current_setting('standard_conforming_strings') = 'on', "
    "to_regclass({heads}) IS NOT NULL, "
    "has_table_privilege(to_regclass({heads}), 'INSERT') "
    "AND has_table_privilege(to_regclass({heads}), 'UPDATE'), NULL"
).format(heads=sql.Literal("public.yoyo_tenants_heads"))
#: The same, and whether some tenant is at `head`, or there are none: one query, where the
#: index is there and readable (it is, after the first run that wrote).
FLEET_STATE_SQL = sql.SQL(
    "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus'), "
    "current_setting('standard_conforming_strings') = 'on', true, "
    "has_table_privilege({table}, 'INSERT') AND has_table_privilege({table}, 'UPDATE'), "
    "NOT EXISTS (SELECT FROM {heads} WHERE schema_name <> 'public') "
    "OR EXISTS (SELECT FROM {heads} WHERE applied = {head})"
)


@dataclass(frozen=True)
class ServerState:
    citus: bool
    strings_on: bool  # standard_conforming_strings: backslashes read as the files were checked
    indexed: bool  # public.yoyo_tenants_heads is there
    may_index: bool  # and this user may keep it
    fleet_at_head: bool | None  # some tenant is at the files' head, or none are (if asked)


def read_server(connection: Connection, fleet: MigrationList | None = None) -> ServerState:
    """The server's state, in one query; with `fleet`, whether some tenant is at its head."""
    cursor = connection.cursor()
    if fleet is not None:
        query = FLEET_STATE_SQL.format(
            table=sql.Literal("public.yoyo_tenants_heads"),
            heads=logindex.TABLE,
            head=sql.Literal(logindex.head_digest(fleet)),
        )
        try:
            cursor.execute(query)
            return ServerState(*one_row(cursor))
        except (errors.UndefinedTable, errors.InsufficientPrivilege):
            pass  # no index yet (a first run), or not readable: then nobody can say
    cursor.execute(STATE_SQL)
    return ServerState(*one_row(cursor))


def prepare_run(
    connection: Connection,
    options: RunOptions,
    citus: str = "auto",
    write: bool = False,
    state: ServerState | None = None,
) -> RunOptions:
    """`options` fitted to the server: every statement alone on a Citus coordinator (`citus`:
    "auto" detects it, "on" forces it, "off" forbids it), and, for a run that writes, the heads
    index kept (and made, the first time). NotReady when the server would read migration files
    otherwise than they were checked, or the index is there but this user may not keep it."""
    state = state or read_server(connection)
    if not state.strings_on:
        raise NotReady(
            "standard_conforming_strings is off for this database or user, so the server would "
            "read backslashes in migration files otherwise than they were checked: turn it on "
            "(ALTER DATABASE ... SET standard_conforming_strings = on, the default)"
        )
    if write and state.indexed and not state.may_index:
        raise NotReady(
            "the user may not keep public.yoyo_tenants_heads, the index of every schema's log: "
            "GRANT INSERT, UPDATE ON public.yoyo_tenants_heads to it"
        )
    indexed = state.indexed
    if write and not indexed:
        indexed = logindex.ensure(connection.cursor())
    per_message = state.citus if citus == "auto" else citus == "on"
    return replace(options, citus=per_message, heads=write and indexed)
