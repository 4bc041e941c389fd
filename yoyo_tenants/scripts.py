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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pglast import ast, parser, visitors
from pglast.enums import ObjectType, TransactionStmtKind, VariableSetKind
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


@dataclass(frozen=True)
class Script:
    """A migration file's SQL, as read: its text and where each statement starts and ends."""

    path: Path
    text: str
    #: (start, end) character offsets of each statement in `text`, in order.
    spans: tuple[tuple[int, int], ...]
    transactional: bool
    depends: tuple[str, ...]

    def statements(self) -> Iterator[tuple[int, str]]:
        """Each statement's start offset and text."""
        for start, end in self.spans:
            yield start, self.text[start:end]

    def line_at(self, offset: int) -> int:
        """The 1-based line of the character at `offset`."""
        return self.text.count("\n", 0, max(0, offset)) + 1


def read_script(path: Path, public: bool) -> Script:
    """Read and check a .sql migration (or its .rollback.sql); UnsafeMigration if it may not run.

    `public`: the file migrates the public schema, which may set its search path for the
    transaction (SET LOCAL); a tenant migration may not set it at all.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeMigration(path, None, f"is not valid UTF-8 (byte {exc.start})") from None
    try:
        raw = parser.parse_sql(text)
    except parser.ParseError as exc:
        offset = exc.args[1] if len(exc.args) > 1 else 0
        line = text.count("\n", 0, offset) + 1
        raise UnsafeMigration(path, line, f"{exc.args[0]} (PostgreSQL 18's parser)") from None
    spans = tuple(
        (s.stmt_location, s.stmt_location + s.stmt_len if s.stmt_len else len(text)) for s in raw
    )
    # Directives (-- depends:, -- transactional:) are the comments before the first statement.
    head = text[: spans[0][0]] if spans else text
    directives, _, _ = parse_metadata_from_sql_comments(head)
    transactional = directives.get("transactional", "true").strip().lower() != "false"
    script = Script(path, text, spans, transactional, tuple(directives.get("depends", "").split()))
    problem = _problem(raw, text, transactional, public)
    if problem:
        offset, message = problem
        raise UnsafeMigration(path, None if offset is None else script.line_at(offset), message)
    return script


def drops_table(script: Script, schema: str, table: str) -> bool:
    """Whether `script` drops `schema`.`table` (named as such, or unqualified)."""
    for statement in parser.parse_sql(script.text):
        node = statement.stmt
        if isinstance(node, ast.DropStmt) and node.removeType == ObjectType.OBJECT_TABLE:
            names = [[part.sval for part in name] for name in node.objects]
            if [schema, table] in names or [table] in names:
                return True
    return False


def check_sql(text: str, public: bool, where: str) -> None:
    """Check SQL a Python migration's step runs, as read_script checks a file."""
    try:
        raw = parser.parse_sql(text)
    except parser.ParseError:
        return  # the server will say what is wrong with it
    if problem := _problem(raw, text, transactional=True, public=public):
        raise UnsafeMigration(Path(where), None, problem[1])


def _problem(
    raw: Sequence[ast.RawStmt], text: str, transactional: bool, public: bool
) -> tuple[int | None, str] | None:
    """The first statement that may not run, as (offset, what to do), or None."""
    if transactional and _wrapped(raw):
        return None, WRAPPED
    for statement in raw:
        node = statement.stmt
        if transactional and isinstance(node, ast.TransactionStmt):
            return statement.stmt_location, TRANSACTION_ADVICE[node.kind]
        if message := _session_change(node, text, statement, public):
            return statement.stmt_location, message
    return None


def _wrapped(raw: Sequence[ast.RawStmt]) -> bool:
    starts = (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START)
    return (
        len(raw) >= 2
        and isinstance(raw[0].stmt, ast.TransactionStmt)
        and raw[0].stmt.kind in starts
        and isinstance(raw[-1].stmt, ast.TransactionStmt)
        and raw[-1].stmt.kind == TransactionStmtKind.TRANS_STMT_COMMIT
    )


def _session_change(node, text: str, statement: ast.RawStmt, public: bool) -> str | None:
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
    start = statement.stmt_location
    end = start + statement.stmt_len if statement.stmt_len else len(text)
    lowered = text[start:end].lower()
    if "set_config" in lowered or "u&" in lowered:
        for name, value, local in _set_config_calls(node):
            if name is None:
                return "set_config with a setting name computed at run time: name it literally"
            if name == STRINGS and not _on(value):
                return STRINGS_ADVICE
            if name in SESSION_SETTINGS:
                return _setting_advice(name, local, public, f"set_config('{name}', ...)")
    return None


def _is_on(node: ast.VariableSetStmt) -> bool:
    """Whether SET gives the setting the one value 'on'."""
    return len(node.args or ()) == 1 and _on(node.args[0])


def _on(node) -> bool:
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


def _set_config_calls(node) -> list[tuple[str | None, object, bool]]:
    """(setting name, value node, is_local) of each set_config call in `node`; the name is None
    where it is not a constant."""
    calls = []

    class Calls(visitors.Visitor):
        def visit_FuncCall(self, ancestors, call):
            if call.funcname[-1].sval.lower() != "set_config" or len(call.args or ()) != 3:
                return
            name_arg, value, local_arg = call.args
            name = _constant(name_arg)
            local = _constant(local_arg)
            name = name.lower() if isinstance(name, str) else None
            calls.append((name, value, local is True or local == "t"))

    Calls()(node)
    return calls


def _constant(node):
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
