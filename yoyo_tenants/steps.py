"""Python migrations: what yoyo's steps expect of a backend, run inside a schema's session.

yoyo hands a step's SQL to `backend.cursor()` and a step's function `backend.connection`. Here
both are the session's connection, with every statement their cursors run checked as a migration
file is (sqlfiles.check_sql), so that a `COMMIT` in Python ends no schema's transaction half-way;
results of a step's SQL are not printed (yoyo prints them to stdout); yoyo's nested transactions
are savepoints inside the migration's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, cast

import psycopg2
from psycopg2 import extensions, sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from .db import Params, Query
from .sqlfiles import check_sql

#: Savepoints of a Python migration's step groups, numbered within it.
STEP_SAVEPOINT = "yoyo_tenants_step_{}"


class Steps:
    """A yoyo backend as far as a migration's steps use one."""

    DatabaseError = psycopg2.DatabaseError
    has_transactional_ddl = True

    def __init__(
        self, connection: Connection, public: bool, where: str, transactional: bool = True
    ) -> None:
        self.connection = CheckedConnection(connection, public, where, transactional)
        self._own = connection  # for the savepoints below, which are ours, not the migration's
        self._savepoints = 0

    def cursor(self) -> CheckedCursor:
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

    def __init__(
        self, connection: Connection, public: bool, where: str, transactional: bool = True
    ) -> None:
        self._connection, self._public, self._where = connection, public, where
        self._transactional = transactional
        self.needs_commit = False

    def cursor(
        self,
        *args: Any,
        cursor_factory: type[Cursor] | None = None,
        quiet: bool = False,
        **kwargs: Any,
    ) -> CheckedCursor:
        # None unless set, though types-psycopg2 types it as always a callable.
        default: type[Cursor] | None = self._connection.cursor_factory  # type: ignore[assignment]
        factory: type[Cursor] = cursor_factory or default or extensions.cursor
        # A class is hashable, which mypy does not see (python/mypy#11470).
        checked = _checked(factory, quiet)  # type: ignore[arg-type]
        cursor = self._connection.cursor(*args, cursor_factory=checked, **kwargs)
        cursor.public, cursor.where, cursor.owner = self._public, self._where, self
        cursor.transactional = self._transactional
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


class CheckedCursor(extensions.cursor):
    """A cursor checking each statement before sending it; the cursor class of a step's
    connection is mixed in after it (see _checked)."""

    public: bool = False
    where: str = ""
    owner: CheckedConnection | None = None
    transactional: bool = True

    def _check(self, query: Query) -> None:
        if isinstance(query, sql.Composable):
            query = query.as_string(self)
        if isinstance(query, bytes):
            query = query.decode(extensions.encodings.get(self.connection.encoding, "utf-8"))
        needs_commit = check_sql(query, self.public, self.where, self.transactional)
        if needs_commit and self.owner is not None:
            self.owner.needs_commit = True

    def execute(self, query: Query, vars: Params = None) -> None:
        # Checked as the server will read it: a parameter can name an enum value too.
        self._check(query if vars is None else self.mogrify(query, vars))
        return super().execute(query, vars)

    def executemany(self, query: Query, vars_list: Iterable[Params]) -> None:
        vars_list = list(vars_list)
        for vars in vars_list[:1] or [None]:
            self._check(query if vars is None else self.mogrify(query, vars))
        return super().executemany(query, vars_list)

    # `file`: whatever psycopg2's copy_expert takes.
    def copy_expert(self, query: Query, file: Any, size: int = 8192) -> None:
        self._check(query)
        return super().copy_expert(query, file, size)


@cache
def _checked(factory: type[Cursor], quiet: bool) -> type[CheckedCursor]:
    """`factory`'s cursors, checking each statement before sending it (and, if `quiet`,
    showing yoyo no result rows to print)."""
    # Made at run time: the checks come first, then whichever cursor class the step asked for
    # (one that checks already, as a checked cursor's own class does, keeps its checks).
    bases = (factory,) if issubclass(factory, CheckedCursor) else (CheckedCursor, factory)
    namespace = {"description": property(lambda self: None)} if quiet else {}
    return cast(type[CheckedCursor], type("Checked", bases, namespace))
