"""Migration SQL as PostgreSQL reads it: split into statements by the server's own grammar (pglast,
bindings to libpg_query) and checked before anything runs.

A transactional migration runs inside its schema's transaction, beside its log row, with the
schema's search path set for that transaction only. A statement that ends that transaction
(COMMIT), opens another (BEGIN), juggles savepoints, or moves the session somewhere else (SET
search_path, SET ROLE, RESET ALL, DISCARD) would commit half a tenant, write into public, or leak
into the next tenant the connection serves. A file holding one is refused, by line, before any
schema is touched; `check_sql` does the same for the SQL of a Python migration's steps as they
run. What a statement can do at run time that no parser sees (a function or DO block calling
set_config) is caught by the engine's guard after each migration (see engine.py).

A file is read as psql reads it: the data lines after a `COPY ... FROM stdin;` (up to a line
`\\.`) are data, not SQL. Two more things are told before anything runs: the statements that
PostgreSQL will not run inside a transaction block (a transactional file holding one is refused),
and the ones whose effects PostgreSQL hides from the rest of their transaction (`ALTER TYPE ...
ADD VALUE`): a migration holding one commits before the next migration runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pglast import ast, parser, visitors
from pglast.enums import (
    AlterTableType,
    ObjectType,
    ReindexObjectType,
    TransactionStmtKind,
    VariableSetKind,
)
from yoyo.migrations import parse_metadata_from_sql_comments

from .errors import UnsafeMigration

#: Settings a migration may not change (they say where its tables go and whose they are), as
#: a user writes them.
SESSION_SETTINGS = {
    "search_path": "search_path",
    "role": "ROLE",
    "session_authorization": "SESSION AUTHORIZATION",
}
#: What each transaction statement would do to a migration run in its schema's transaction.
TRANSACTION_ADVICE = {
    TransactionStmtKind.TRANS_STMT_BEGIN: "BEGIN would start a transaction inside the one "
    "the migration already runs in (with its log row): remove it",
    TransactionStmtKind.TRANS_STMT_START: "START TRANSACTION would start a transaction inside "
    "the one the migration already runs in (with its log row): remove it",
    TransactionStmtKind.TRANS_STMT_COMMIT: "COMMIT would commit the schema's work half-way, "
    "without its log row: remove it (each migration already runs in one transaction), or mark "
    "the file '-- transactional: false' if it must commit as it goes",
    TransactionStmtKind.TRANS_STMT_ROLLBACK: "ROLLBACK would end the schema's transaction "
    "half-way: remove it (a failing statement already rolls the whole migration back)",
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: "SAVEPOINT would interfere with the savepoint "
    "each migration runs in: remove it (a migration is already all or nothing)",
    TransactionStmtKind.TRANS_STMT_RELEASE: "RELEASE SAVEPOINT would interfere with the "
    "savepoint each migration runs in: remove it",
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "ROLLBACK TO SAVEPOINT would interfere with "
    "the savepoint each migration runs in: remove it",
    TransactionStmtKind.TRANS_STMT_PREPARE: "PREPARE TRANSACTION would end the schema's "
    "transaction half-way: remove it",
    TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED: "COMMIT PREPARED cannot run inside the "
    "schema's transaction: run it by hand",
    TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED: "ROLLBACK PREPARED cannot run inside the "
    "schema's transaction: run it by hand",
}
#: How the server reads backslashes in strings: the parser here reads them as it does when on.
STRINGS = "standard_conforming_strings"
STRINGS_ADVICE = (
    "changing standard_conforming_strings (other than to on) would make the server read "
    "backslashes in later strings differently than this check did: remove it (write E'...' "
    "strings where backslashes escape)"
)
WRAPPED = (
    "is wrapped in BEGIN; ... COMMIT;, but each migration already runs in its own transaction "
    "(with its log row): remove those two statements"
)


#: A statement of a file: where it starts and ends in the file's text, and its parse tree.
Parsed = tuple[int, int, ast.Node]


@dataclass(frozen=True)
class Script:
    """A migration file's SQL, as read: its text and where each statement starts and ends."""

    path: Path
    text: str
    #: (start, end) character offsets of each statement in `text`, in order.
    spans: tuple[tuple[int, int], ...]
    transactional: bool
    depends: tuple[str, ...]
    #: The data of each COPY ... FROM stdin, by the start of its statement: where its lines
    #: start and end in `text`, and where the SQL goes on after them (past the `\\.` line).
    data: Mapping[int, tuple[int, int, int]] = field(default_factory=dict)
    #: It adds an enum value, which PostgreSQL lets nothing use before the adding transaction
    #: commits: the schema's transaction commits after it (see engine.py).
    needs_commit: bool = False

    def statements(self) -> Iterator[tuple[int, str]]:
        """Each statement's start offset and text."""
        for start, end in self.spans:
            yield start, self.text[start:end]

    def copy_data(self, start: int) -> str | None:
        """The data lines of the COPY ... FROM stdin starting at `start` (None: not one)."""
        found = self.data.get(start)
        return None if found is None else self.text[found[0] : found[1]]

    def pieces(self) -> Iterator[tuple[int, str, str | None]]:
        """The file as it can be sent: (offset, text, None) for a run of SQL statements that can
        go in one message, (offset, statement, data) for a COPY ... FROM stdin and its data."""
        done = 0
        for start, end in self.spans:
            if start not in self.data:
                continue
            if self.text[done:start].strip():
                yield done, self.text[done:start], None
            yield start, self.text[start:end], self.copy_data(start)
            done = self.data[start][2]
        if self.text[done:].strip():
            yield done, self.text[done:], None

    def line_at(self, offset: int) -> int:
        """The 1-based line of the character at `offset`."""
        return self.text.count("\n", 0, max(0, offset)) + 1


def read_script(path: Path, public: bool) -> Script:
    """Read and check a .sql migration (or its .rollback.sql); UnsafeMigration if it may not run.

    `public`: the file migrates the public schema, which may set its search path for the
    transaction (SET LOCAL) and create extensions; a tenant migration may do neither.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeMigration(path, None, f"is not valid UTF-8 (byte {exc.start})") from None
    try:
        parsed, data = parse(text)
    except parser.ParseError as exc:
        offset = exc.args[1] if len(exc.args) > 1 else 0
        line = text.count("\n", 0, offset) + 1
        raise UnsafeMigration(path, line, f"{exc.args[0]} (PostgreSQL 18's parser)") from None
    except CopyDataError as exc:
        raise UnsafeMigration(path, text.count("\n", 0, exc.offset) + 1, str(exc)) from None
    spans = tuple((start, end) for start, end, _ in parsed)
    # Directives (-- depends:, -- transactional:) are the comments before the first statement.
    head = text[: spans[0][0]] if spans else text
    directives, _, _ = parse_metadata_from_sql_comments(head)
    transactional = directives.get("transactional", "true").strip().lower() != "false"
    script = Script(
        path,
        text,
        spans,
        transactional,
        tuple(directives.get("depends", "").split()),
        data,
        any(_hidden_until_commit(node) for _, _, node in parsed),
    )
    problem = _problem(parsed, text, transactional, public)
    if problem:
        offset, message = problem
        raise UnsafeMigration(path, None if offset is None else script.line_at(offset), message)
    return script


class CopyDataError(ValueError):
    """A COPY ... FROM stdin whose data does not start on the next line."""

    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset = offset


#: The line that ends a COPY's data, as psql reads it.
END_OF_DATA = re.compile(r"^\\\.\r?$", re.MULTILINE)


def parse(text: str) -> tuple[list[Parsed], dict[int, tuple[int, int, int]]]:
    """The statements of `text`, and the data of each COPY ... FROM stdin by its start, read as
    psql reads a file: after such a statement's line come data lines, up to a line holding only
    `\\.` (or the end of the text). ParseError (its location in `text`) if it is not SQL."""
    statements: list[Parsed] = []
    data: dict[int, tuple[int, int, int]] = {}
    done = 0
    while done < len(text):
        rest = text[done:]
        raw: Sequence[ast.RawStmt]
        failed: parser.ParseError | None
        try:
            raw, failed = parser.parse_sql(rest), None
        except parser.ParseError as exc:
            # Everything before the error is SQL; data lines after a COPY are the usual cause.
            raw, failed = _complete_before(rest, exc.args[1]), exc
        copy = None
        for statement in raw:
            # pglast types every field as optional; the parser's statements have them all.
            start = done + (statement.stmt_location or 0)
            end = start + statement.stmt_len if statement.stmt_len else len(text)
            node = statement.stmt
            assert node is not None
            statements.append((start, end, node))
            if _copy_from_stdin(node):
                copy = (start, end)
                break
        if copy is None:
            if failed is not None:
                raise parser.ParseError(failed.args[0], done + failed.args[1])
            break
        done = _read_copy_data(text, *copy, data)
    return statements, data


def _complete_before(text: str, location: int) -> Sequence[ast.RawStmt]:
    """The whole statements of `text` before `location`, where the parser stopped: up to the
    last semicolon before it (the text up to there is SQL, or the parser would have stopped
    sooner)."""
    ends = [token.end for token in parser.scan(text[:location]) if token.name == "ASCII_59"]
    return parser.parse_sql(text[: ends[-1] + 1]) if ends else ()


def _read_copy_data(text: str, start: int, end: int, data: dict[int, tuple[int, int, int]]) -> int:
    """Note the data of the COPY at start:end; returns where the SQL goes on after it."""
    semicolon = text.find(";", end)
    if semicolon < 0:  # the file's last statement: no data
        data[start] = (len(text), len(text), len(text))
        return len(text)
    newline = text.find("\n", semicolon)
    newline = len(text) if newline < 0 else newline
    after = text[semicolon + 1 : newline].strip()
    if after and not after.startswith("--"):
        raise CopyDataError(
            semicolon, "COPY ... FROM stdin must end its line: its data starts on the next line"
        )
    first = min(newline + 1, len(text))
    marker = END_OF_DATA.search(text, first)
    if marker is None:
        data[start] = (first, len(text), len(text))
        return len(text)
    data[start] = (first, marker.start(), marker.end())
    return marker.end()


def _copy_from_stdin(node: ast.Node) -> bool:
    return (
        isinstance(node, ast.CopyStmt)
        and bool(node.is_from)
        and node.filename is None
        and not node.is_program
    )


def _hidden_until_commit(node: ast.Node) -> bool:
    """Whether PostgreSQL hides the statement's effect from the rest of its transaction: a new
    enum value cannot be used before the transaction that added it commits (ALTER TYPE)."""
    return isinstance(node, ast.AlterEnumStmt) and node.oldVal is None


def drops_table(script: Script, schema: str, table: str) -> bool:
    """Whether `script` drops `schema`.`table` (named as such, or unqualified)."""
    for _, _, node in parse(script.text)[0]:
        if isinstance(node, ast.DropStmt) and node.removeType == ObjectType.OBJECT_TABLE:
            names = [[part.sval for part in name] for name in node.objects or ()]
            if [schema, table] in names or [table] in names:
                return True
    return False


def is_transaction_control(text: str) -> bool:
    """Whether `text` is one statement that begins or ends a transaction (False if it is not
    SQL pglast reads, such as a statement with %(name)s parameters)."""
    try:
        raw = parser.parse_sql(text)
    except parser.ParseError:
        return False
    return len(raw) == 1 and isinstance(raw[0].stmt, ast.TransactionStmt)


def check_sql(text: str, public: bool, where: str, transactional: bool = True) -> bool:
    """Check SQL a Python migration's step runs, as read_script checks a file; whether it must
    commit before the next migration runs (see Script.needs_commit)."""
    try:
        parsed, _ = parse(text)
    except (parser.ParseError, CopyDataError):
        return False  # the server will say what is wrong with it
    if problem := _problem(parsed, text, transactional, public):
        raise UnsafeMigration(Path(where), None, problem[1])
    return any(_hidden_until_commit(node) for _, _, node in parsed)


def _problem(
    parsed: Sequence[Parsed], text: str, transactional: bool, public: bool
) -> tuple[int | None, str] | None:
    """The first statement that may not run, as (offset, what to do), or None."""
    if transactional and _wrapped(parsed):
        return None, WRAPPED
    for start, end, node in parsed:
        if transactional and isinstance(node, ast.TransactionStmt):
            assert node.kind is not None  # the parser always sets it
            return start, TRANSACTION_ADVICE[node.kind]
        if transactional and (name := outside_transaction(node)):
            return start, (
                f"{name} cannot run inside a transaction block, and this file runs in one: make "
                "'-- transactional: false' its first line (a .rollback.sql is marked on its own), "
                "in a migration of its own if the rest must stay in a transaction"
            )
        if not public and (name := _extension_change(node)):
            return start, (
                f"{name} in a tenant migration: an extension is the database's, not a tenant's "
                "(every tenant would run it, at once): put it in a master migration "
                "(migrations/master), e.g. CREATE EXTENSION IF NOT EXISTS name WITH SCHEMA public"
            )
        if isinstance(node, ast.CopyStmt) and not node.is_from and node.filename is None:
            return start, (
                "COPY ... TO stdout would send rows to the migration tool, which has nowhere to "
                "put them: remove it"
            )
        if message := _session_change(node, text[start:end], public):
            return start, message
    return None


def outside_transaction(node: ast.Node) -> str | None:
    """The name of a statement PostgreSQL never runs inside a transaction block, or None."""
    if isinstance(node, ast.IndexStmt) and node.concurrent:
        return "CREATE INDEX CONCURRENTLY"
    if isinstance(node, ast.DropStmt) and node.concurrent:
        return "DROP INDEX CONCURRENTLY"
    if isinstance(node, ast.ReindexStmt):
        if any(option.defname == "concurrently" for option in node.params or ()):
            return "REINDEX CONCURRENTLY"
        if node.kind in _REINDEX_MANY:
            return f"REINDEX {_REINDEX_MANY[node.kind]}"
    if isinstance(node, ast.VacuumStmt) and node.is_vacuumcmd:
        return "VACUUM"
    if isinstance(node, ast.ClusterStmt) and node.relation is None:
        return "CLUSTER without a table"
    if isinstance(node, ast.AlterDatabaseStmt) and any(
        option.defname == "tablespace" for option in node.options or ()
    ):
        return "ALTER DATABASE ... SET TABLESPACE"
    if isinstance(node, ast.AlterTableStmt) and any(
        command.subtype == AlterTableType.AT_DetachPartition and command.def_.concurrent
        for command in node.cmds or ()
    ):
        return "DETACH PARTITION ... CONCURRENTLY"
    return _NEVER_IN_TRANSACTION.get(type(node))


_REINDEX_MANY = {
    ReindexObjectType.REINDEX_OBJECT_SCHEMA: "SCHEMA",
    ReindexObjectType.REINDEX_OBJECT_SYSTEM: "SYSTEM",
    ReindexObjectType.REINDEX_OBJECT_DATABASE: "DATABASE",
}
_NEVER_IN_TRANSACTION = {
    ast.AlterSystemStmt: "ALTER SYSTEM",
    ast.CreatedbStmt: "CREATE DATABASE",
    ast.DropdbStmt: "DROP DATABASE",
    ast.CreateTableSpaceStmt: "CREATE TABLESPACE",
    ast.DropTableSpaceStmt: "DROP TABLESPACE",
}


def _extension_change(node: ast.Node) -> str | None:
    """The name of a statement that creates, drops or changes an extension, or None."""
    if isinstance(node, ast.CreateExtensionStmt):
        return "CREATE EXTENSION"
    if isinstance(node, (ast.AlterExtensionStmt, ast.AlterExtensionContentsStmt)):
        return "ALTER EXTENSION"
    if isinstance(node, ast.DropStmt) and node.removeType == ObjectType.OBJECT_EXTENSION:
        return "DROP EXTENSION"
    if (
        isinstance(node, ast.AlterObjectSchemaStmt)
        and node.objectType == ObjectType.OBJECT_EXTENSION
    ):
        return "ALTER EXTENSION"
    return None


def _wrapped(parsed: Sequence[Parsed]) -> bool:
    starts = (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START)
    first, last = (parsed[0][2], parsed[-1][2]) if parsed else (None, None)
    return (
        len(parsed) >= 2
        and isinstance(first, ast.TransactionStmt)
        and first.kind in starts
        and isinstance(last, ast.TransactionStmt)
        and last.kind == TransactionStmtKind.TRANS_STMT_COMMIT
    )


def _session_change(node: ast.Node, statement: str, public: bool) -> str | None:
    """What is wrong with a statement that changes where or as whom the migration runs."""
    if isinstance(node, ast.DiscardStmt):
        return "DISCARD would drop the session's state, the schema's search path too: remove it"
    if isinstance(node, ast.VariableSetStmt):
        if node.kind == VariableSetKind.VAR_RESET_ALL:
            return (
                "RESET ALL would reset the schema's search path and timeouts: reset only what "
                "the migration set (RESET name)"
            )
        name = (node.name or "").lower()
        if name == STRINGS and not (node.kind == VariableSetKind.VAR_SET_VALUE and _is_on(node)):
            return STRINGS_ADVICE
        if name in SESSION_SETTINGS:
            what = f"{_verb(node)} {SESSION_SETTINGS[name]}"
            return _setting_advice(name, bool(node.is_local), public, what)
        return None
    # A statement's text can only call set_config by spelling its name, or with a U& escape.
    lowered = statement.lower()
    if "set_config" in lowered or "u&" in lowered:
        for setting, value, local in _set_config_calls(node):
            if setting is None:
                return "set_config with a setting name computed at run time: name it literally"
            if setting == STRINGS and not _on(value):
                return STRINGS_ADVICE
            if setting in SESSION_SETTINGS:
                return _setting_advice(setting, local, public, f"set_config('{setting}', ...)")
    return None


def _is_on(node: ast.VariableSetStmt) -> bool:
    """Whether SET gives the setting the one value 'on'."""
    args = node.args or ()
    return len(args) == 1 and _on(args[0])


def _on(node: object) -> bool:
    value = _constant(node)
    return value is True or (isinstance(value, str) and value.lower() in ("on", "true", "yes", "1"))


def _verb(node: ast.VariableSetStmt) -> str:
    return "RESET" if node.kind == VariableSetKind.VAR_RESET else "SET"


def _setting_advice(name: str, local: bool, public: bool, what: str) -> str | None:
    if name == "search_path":
        if public and local:
            return None  # the master migrations' own transaction: gone at its end
        if public:
            return f"{what} would outlive the migration's transaction: use SET LOCAL search_path"
        return (
            f"{what} would move the migration out of its tenant schema (it runs with search_path "
            "'<tenant schema>, public'): remove it, and name shared tables as public.name"
        )
    return (
        f"{what} would run the rest of the schema's work, and its log row, as another role: "
        "remove it, and grant the migrating user what it needs instead"
    )


def _set_config_calls(node: ast.Node) -> list[tuple[str | None, object, bool]]:
    """(setting name, value node, is_local) of each set_config call in `node`; the name is None
    where it is not a constant."""
    calls: list[tuple[str | None, object, bool]] = []

    class Calls(visitors.Visitor):
        def visit_FuncCall(self, ancestors: visitors.Ancestor, call: ast.FuncCall) -> None:
            funcname, args = call.funcname or (), call.args or ()
            if funcname[-1].sval.lower() != "set_config" or len(args) != 3:
                return
            name_arg, value, local_arg = args
            constant = _constant(name_arg)
            local = _constant(local_arg)
            name = constant.lower() if isinstance(constant, str) else None
            calls.append((name, value, local is True or local == "t"))

    Calls()(node)
    return calls


def _constant(node: object) -> str | bool | None:
    """The value of a constant argument (a string, a boolean), or None."""
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const) and not node.isnull:
        value = node.val
        if isinstance(value, ast.String):
            return value.sval
        if isinstance(value, ast.Boolean):
            return value.boolval
    return None
