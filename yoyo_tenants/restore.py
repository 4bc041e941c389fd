"""Restoring an archived tenant, trusting nothing in its archive that was not checked.

A restore runs what the archive holds: pg_restore executes each entry's SQL as the archive states
it (what `pg_restore --list` shows is a summary, and even the search path it sets first is the
archive's to say), and loading the data runs any function a CHECK constraint calls. So, after
the checks of archives.py (its record here, unless `unrecorded`; its table of contents; its
label; an unrecorded archive holds no functions unless `trust_code`), pg_restore runs in one
transaction, without the archive's owners and grants, logged in as a role made for this restore
that owns the new schema and may write nothing else: the grants to PUBLIC are checked first (it
has no others), and afterwards it must own nothing outside the schema, and the schema's log
must be sound. Then the schema passes to the restoring user, the role is dropped, and the
registry row written. Making the role takes CREATEROLE (or a superuser); where the role cannot be
made or used, the restore stops, unless `trust_code`: then the archive is restored as the user,
its code trusted to run with the user's privileges.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import errors, sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from . import citus, log, registry
from .archives import (
    Contents,
    comment_sql,
    fingerprint,
    read_contents,
    read_label,
    recorded,
    referenced,
    refused,
    restore_entries,
)
from .db import connect, one_row, server_params
from .errors import ConnectionFailed, NotReady, SchemaCollision, TenantsError, UsageError
from .pool import scan
from .registry import Tenant
from .results import RunOptions
from .session import MessageFailed, Session
from .settings import Settings


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
        record = recorded(cursor, digest, size)
        if record is None and not unrecorded:
            raise refused(archive, f"no archive of this database has its sha256 ({digest[:16]}"
                           "...): it changed since it was written, or was written elsewhere or "
                           "before archives were recorded; --unrecorded restores it if you know "
                           "where it comes from")  # fmt: skip
        contents = read_contents(archive)
        tenant, found = read_label(archive, contents)
        if record is not None and tuple(record) != (tenant.org_id, tenant.schema):
            raise refused(archive, f"it was recorded for {record[0]}, not {tenant.org_id}")
        if record is None and contents.code and not trust_code:
            raise refused(archive, f"it holds code from elsewhere ({', '.join(contents.code)}): "
                           "--trust-code restores it if you trust that code")  # fmt: skip
        _check_free(cursor, tenant, archive)
        restore = _Restore(connection, params, settings, tenant, contents, archive)
        return restore.run(found["comment"], found["row"], trust_code)
    finally:
        connection.close()


def _check_free(cursor: Cursor, tenant: Tenant, archive: Path) -> None:
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

    def __init__(
        self,
        connection: Connection,
        params: Mapping[str, str],
        settings: Settings,
        tenant: Tenant,
        contents: Contents,
        archive: Path,
    ) -> None:
        self.connection, self.cursor = connection, connection.cursor()
        self.params, self.settings = params, settings
        self.tenant, self.contents, self.archive = tenant, contents, archive
        self.schema = sql.Identifier(tenant.schema)
        self.role: str | None = None
        self.made_schema = self.role_dropped = False
        self.on_citus = citus.installed(self.cursor)

    def run(self, comment: str | None, row: dict[str, Any], trust_code: bool) -> Restored:
        try:
            self._load(self._confined(trust_code))
            if self.role:
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
        authorization: sql.Composable = sql.SQL("")
        if owner is not None:
            authorization = sql.SQL(" AUTHORIZATION {}").format(sql.Identifier(owner))
        try:
            self.cursor.execute(
                sql.SQL("BEGIN; {}CREATE SCHEMA {}{}; COMMIT").format(
                    sql.SQL(local), self.schema, authorization
                )
            )
        except errors.DuplicateSchema:  # made since it was checked: not this restore's to drop
            raise SchemaCollision(
                f"schema {self.tenant.schema} was made meanwhile: {self.archive} was not restored"
            ) from None
        self.made_schema = True

    def _confined(self, trust_code: bool) -> Mapping[str, str]:
        """The schema, and the connection parameters to restore into it with: as a role made
        for the restore, or, only if that cannot be and the user trusts the archive's code, as
        the user."""
        try:
            return self._confine()
        except _Unconfined as exc:
            user = self.connection.info.user
            if not trust_code:
                raise NotReady(
                    f"restoring {self.archive} runs its code under a role made for it, which "
                    f"may write only its schema; {exc}, or pass --trust-code to run it as {user} "
                    "(nothing was restored)"
                ) from None
        self._undo()
        self.made_schema = self.role_dropped = False
        self.role = None
        self._make_schema(owner=None)
        return self.params

    def _confine(self) -> dict[str, str]:
        """Make the role, and the schema it owns; the connection parameters to log in as it.
        _Unconfined if that cannot be."""
        user = self.connection.info.user
        self.cursor.execute(
            "SELECT rolsuper, rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
        superuser, may = one_row(self.cursor)
        if not may:
            raise _Unconfined(f"making it takes CREATEROLE: ALTER ROLE {user} CREATEROLE")
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
        for table in referenced(self.archive, self.contents):
            grant = sql.SQL("GRANT REFERENCES ON {} TO {}").format(table, sql.Identifier(role))
            self.cursor.execute(grant)
        self.cursor.execute(WRITABLE_SQL, {"role": role, "schema": self.tenant.schema})
        if writable := [what for (what,) in self.cursor.fetchall()]:
            more = f" and {len(writable) - 3} more" if len(writable) > 3 else ""
            raise _Unconfined(
                f"every role may write {', '.join(writable[:3])}{more} (a grant to PUBLIC), "
                "and so could it: revoke that"
            )
        confined = {**self.params, "user": role, "password": password}
        try:
            connect(confined).close()
        except ConnectionFailed as exc:
            raise _Unconfined(
                f"it could not log in ({exc}): let it in with a password (pg_hba.conf)"
            ) from None
        return confined

    def _load(self, params: Mapping[str, str]) -> None:
        restore_entries(
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
            raise refused(self.archive, f"its log is damaged: {'; '.join(problems)}")

    def _finish(self, comment: str | None, row: dict[str, Any]) -> None:
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
            session = Session(self.connection, self.tenant.schema, RunOptions.of(self.settings))
            prelude = registry.reregister_sql(self.tenant.schema, row, _columns(self.cursor))
            session.begin(prelude)
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
            self.cursor.execute("ROLLBACK")  # a transaction a failure left open
        if self.made_schema:
            self.cursor.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(self.schema))
        if self.role and not self.role_dropped:
            role = sql.Identifier(self.role)
            self.cursor.execute(sql.SQL("DROP OWNED BY {}; DROP ROLE {}").format(role, role))


class _Unconfined(Exception):
    """A restore cannot run under a role of its own: why, and what would let it."""


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


def _columns(cursor: Cursor) -> list[str]:
    """The registry's columns a row can be given (not an identity or generated one)."""
    cursor.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = 'tenants' AND is_identity = 'NO' AND is_generated = 'NEVER' "
        "ORDER BY ordinal_position"
    )
    return [name for (name,) in cursor.fetchall()]
