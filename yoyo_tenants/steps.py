"""Python migrations: what yoyo's steps expect of a backend, run inside a schema's session.

yoyo hands a step's SQL to `backend.cursor()` and a step's function `backend.connection`. Here
both are the session's connection, with every statement their cursors run checked as a migration
file is (sqlfiles.check_sql), so that a `COMMIT` in Python ends no schema's transaction half-way;
results of a step's SQL are not printed (yoyo prints them to stdout); yoyo's nested transactions
are savepoints inside the migration's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import psycopg2
from psycopg2 import extensions, sql

from .sqlfiles import check_sql

#: Savepoints of a Python migration's step groups, numbered within it.
STEP_SAVEPOINT = "yoyo_tenants_step_{}"


class Steps:
    """A yoyo backend as far as a migration's steps use one."""

    DatabaseError = psycopg2.DatabaseError
    has_transactional_ddl = True

    def __init__(self, connection, public: bool, where: str, transactional: bool = True):
        self.connection = CheckedConnection(connection, public, where, transactional)
        self._own = connection  # for the savepoints below, which are ours, not the migration's
        self._savepoints = 0

    def cursor(self):
        return self.connection.cursor(quiet=True)

    @property
    def needs_commit(self) -> bool:
        """Whether the steps ran SQL whose effect stays hidden until it commits (see
        sqlfiles.Script.needs_commit)."""
        return self.connection.needs_commit

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._savepoints += 1
        name = sql.Identifier(STEP_SAVEPOINT.format(self._savepoints))
        cursor = self._own.cursor()
        cursor.execute(sql.SQL("SAVEPOINT {}").format(name))
        try:
            yield
        except self.DatabaseError:
            cursor.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(name))
            raise
        cursor.execute(sql.SQL("RELEASE SAVEPOINT {}").format(name))

    @contextmanager
    def disable_transactions(self) -> Iterator[None]:
        yield  # a non-transactional migration: the session is outside any transaction already


class CheckedConnection:
    """A psycopg2 connection whose cursors check what they run; anything else is the
    connection's own."""

    def __init__(self, connection, public: bool, where: str, transactional: bool = True):
        self._connection, self._public, self._where = connection, public, where
        self._transactional = transactional
        self.needs_commit = False

    def cursor(self, *args, cursor_factory=None, quiet: bool = False, **kwargs):
        factory = cursor_factory or self._connection.cursor_factory or extensions.cursor
        cursor = self._connection.cursor(*args, cursor_factory=_checked(factory, quiet), **kwargs)
        cursor.public, cursor.where, cursor.owner = self._public, self._where, self
        cursor.transactional = self._transactional
        return cursor

    def __getattr__(self, name):
        return getattr(self._connection, name)


@cache
def _checked(factory: type, quiet: bool) -> type:
    """`factory`'s cursors, checking each statement before sending it (and, if `quiet`,
    showing yoyo no result rows to print)."""

    class Checked(factory):
        public, where, owner, transactional = False, "", None, True

        def _check(self, query) -> None:
            if isinstance(query, sql.Composable):
                query = query.as_string(self)
            if isinstance(query, bytes):
                query = query.decode(extensions.encodings.get(self.connection.encoding, "utf-8"))
            needs_commit = check_sql(query, self.public, self.where, self.transactional)
            if needs_commit and self.owner is not None:
                self.owner.needs_commit = True

        def execute(self, query, vars=None):
            # Checked as the server will read it: a parameter can name an enum value too.
            self._check(query if vars is None else self.mogrify(query, vars))
            return super().execute(query, vars)

        def executemany(self, query, vars_list):
            vars_list = list(vars_list)
            for vars in vars_list[:1] or [None]:
                self._check(query if vars is None else self.mogrify(query, vars))
            return super().executemany(query, vars_list)

        def copy_expert(self, query, file, size=8192):
            self._check(query)
            return super().copy_expert(query, file, size)

    if quiet:
        Checked.description = property(lambda self: None)
    return Checked
