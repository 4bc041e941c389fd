"""A psycopg2 connection that sends bookkeeping SQL together with the next statement.

At thousands of schemas a run's cost is its round trips, and yoyo opens a savepoint before every
migration: a round trip that does nothing but wait for the next one. Here such statements wait in
`connection.deferred` and go out in the same message as the next statement run on any cursor of
the connection, yoyo's or a Python migration's. (PostgreSQL runs the statements of one message in
order, so a savepoint still exists when the statement after it fails.)
"""

from __future__ import annotations

from psycopg2 import extensions, sql


class DeferringCursor(extensions.cursor):
    def execute(self, query, vars=None):
        pending = self.connection.take_deferred()
        if pending and not self.name:  # a named cursor wraps its query in DECLARE: send apart
            if isinstance(query, sql.Composable):
                query = query.as_string(self.connection)
            elif isinstance(query, bytes):
                query = query.decode(self.connection.encoding_name)
            if vars is not None:
                pending = pending.replace("%", "%%")
            query = pending + query
        elif pending:
            self.connection.cursor(cursor_factory=extensions.cursor).execute(pending)
        return super().execute(query, vars)

    def executemany(self, query, vars_list):
        self.connection.flush_deferred()
        return super().executemany(query, vars_list)

    def callproc(self, procname, parameters=None):
        self.connection.flush_deferred()
        return super().callproc(procname, parameters)


class DeferringConnection(extensions.connection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cursor_factory = DeferringCursor
        self.deferred: list[str] = []

    @property
    def encoding_name(self) -> str:
        return extensions.encodings.get(self.encoding, "utf-8")

    def defer(self, statement: str) -> None:
        """Send `statement` ahead of the next one executed on this connection."""
        self.deferred.append(statement)

    def take_deferred(self) -> str:
        if not self.deferred:
            return ""
        pending = "; ".join(self.deferred) + "; "
        self.deferred.clear()
        return pending

    def flush_deferred(self) -> None:
        if pending := self.take_deferred():
            self.cursor(cursor_factory=extensions.cursor).execute(pending)
