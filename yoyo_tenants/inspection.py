"""Where every schema stands: `status` (from the heads index where it can) and `verify` (from
every log itself, each one treated as evidence), as plain functions that print nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from psycopg2.extensions import cursor as Cursor
from yoyo.migrations import MigrationList

from . import citus, log, logindex, registry
from .db import connect, server_params
from .errors import LogDamaged
from .loading import load_migrations
from .log import AppliedMigration
from .plan import ByList, drift_words, drifted
from .pool import SchemaState, scan
from .registry import Tenant
from .settings import Settings

PUBLIC = "public"
OLD_LAYOUT = "keeps yoyo's migration tables, which the next migrate converts to one log"
UNLOGGED = f"it has tables but no migration log ({log.TABLE})"


def log_damage(state: SchemaState, tenant: Tenant, settings: Settings) -> list[str]:
    """Why a scanned schema's log is no evidence of what the schema holds (see
    SchemaState.damage); for a registered tenant also tables without a log, which provisioning
    makes with the schema. (A schema a tenants-query names may hold tables before a first run
    adopts it; public holds the app's own.)"""
    problems = list(state.damage)
    registered = tenant.org_id is not None and settings.tenants_query is None
    if registered and state.unlogged_tables:
        problems.append(UNLOGGED)
    return problems


def damaged(schema: str, damage: list[str]) -> str:
    return str(LogDamaged(schema, damage))


# -- status --------------------------------------------------------------------------------------


class Standing(str, Enum):
    """Where a schema stands against the migration files (the values are the words shown)."""

    AT_HEAD = "at head"
    BEHIND = "behind"
    DRIFT = "drift"
    NEVER_MIGRATED = "never migrated"
    OLD_LAYOUT = "old layout"
    SCHEMA_MISSING = "schema missing"
    UNREADABLE = "log unreadable"  # damaged, or a privilege missing
    DAMAGED = "log damaged"  # read, but no evidence (see SchemaState.damage)


@dataclass
class SchemaStatus:
    schema: str
    org_id: str | None
    exists: bool
    applied: list[str]
    pending: list[str]
    unknown: list[str]  # applied, but no such file any more
    changed: list[str] = field(default_factory=list)  # applied, and the file changed since
    old_layout: bool = False  # keeps yoyo's tables: the next migrate converts them
    unreadable: str | None = None  # why its log could not be read
    node: str | None = None  # on Citus, the worker holding it (host:port)
    damage: list[str] = field(default_factory=list)  # why its log is no evidence

    @property
    def drift(self) -> list[str]:
        return [drift_words(m, gone=False) for m in self.changed] + [
            drift_words(m, gone=True) for m in self.unknown
        ]

    @property
    def standing(self) -> Standing:
        if not self.exists:
            return Standing.SCHEMA_MISSING
        if self.unreadable:
            return Standing.UNREADABLE
        if self.damage:
            return Standing.DAMAGED
        if self.old_layout:
            return Standing.OLD_LAYOUT
        if self.changed or self.unknown:
            return Standing.DRIFT
        if not self.applied:
            return Standing.NEVER_MIGRATED
        if self.pending:
            return Standing.BEHIND
        return Standing.AT_HEAD

    @property
    def state(self) -> str:
        """The standing in words: "behind by 2" rather than "behind"."""
        if self.standing == Standing.BEHIND:
            return f"behind by {len(self.pending)}"
        return self.standing.value


@dataclass
class Status:
    master: SchemaStatus
    tenants: list[SchemaStatus]
    master_head: str | None
    tenant_head: str | None


def status(settings: Settings) -> Status:
    """Applied and pending migrations of public and of every tenant, in a few queries in all."""
    connection = connect(server_params(settings))
    try:
        return read_status(settings, connection.cursor(), from_index=True)[0]
    finally:
        connection.close()


def read_status(
    settings: Settings, cursor: Cursor, from_index: bool
) -> tuple[Status, dict[str, SchemaState]]:
    """The status, and every schema's state as read (from the heads index where it is there
    and `from_index`, else from the logs themselves)."""
    master = load_migrations(settings.master_dir, public=True)
    tenant_migrations = load_migrations(settings.tenant_dir)
    states = scan(cursor, [PUBLIC], master if from_index else None)
    if settings.tenants_query is not None:
        tenants = registry.list_tenants(cursor, settings.tenants_query)
    else:
        tenants = registry.list_tenants(cursor) if registry.exists(cursor) else []
    states.update(
        scan(cursor, [t.schema for t in tenants], tenant_migrations if from_index else None)
    )
    public = Tenant(None, PUBLIC)
    judged = _judged(tenant_migrations)
    report = Status(
        master=_schema_status(public, states[PUBLIC], _judged(master), settings),
        tenants=[_schema_status(t, states[t.schema], judged, settings) for t in tenants],
        master_head=master[-1].id if master else None,
        tenant_head=tenant_migrations[-1].id if tenant_migrations else None,
    )
    placed = citus.nodes(cursor, [t.schema for t in tenants])
    for t in report.tenants:
        t.node = placed.get(t.schema)
    return report, states


@dataclass
class _Judgement:
    """Where one applied list stands against the files."""

    applied: list[str]
    pending: list[str]
    unknown: list[str]
    changed: list[str]


def _judged(migrations: MigrationList) -> ByList[_Judgement]:
    """Judgements of applied lists against `migrations`, each distinct list judged once: at
    100,000 tenants, judging every tenant's list again took most of status's time. Lists the
    heads index shares are found by identity (ByList), logs read whole alike by their rows."""
    by_rows: dict[tuple, _Judgement] = {}

    def judge(applied: list[AppliedMigration]) -> _Judgement:
        rows = tuple((row.migration_id, row.checksum) for row in applied)
        if rows not in by_rows:
            hashes = {row.migration_hash for row in applied}
            problems = drifted(applied, migrations)
            by_rows[rows] = _Judgement(
                applied=[m.id for m in migrations if m.hash in hashes],
                pending=[m.id for m in migrations if m.hash not in hashes],
                unknown=[p.migration_id for p in problems if p.file is None],
                changed=[p.migration_id for p in problems if p.file is not None],
            )
        return by_rows[rows]

    return ByList(judge)


def _schema_status(
    tenant: Tenant, state: SchemaState, judged: ByList[_Judgement], settings: Settings
) -> SchemaStatus:
    judgement = judged(state.applied)
    return SchemaStatus(
        schema=tenant.schema,
        org_id=tenant.org_id,
        exists=state.exists,
        old_layout=state.old_layout,
        unreadable=state.unreadable,
        damage=log_damage(state, tenant, settings),
        applied=judgement.applied,
        pending=judgement.pending,
        unknown=judgement.unknown,
        changed=judgement.changed,
    )


# -- verify --------------------------------------------------------------------------------------


def verify(settings: Settings) -> list[str]:
    """Every way the database disagrees with the migration files and the registry.

    Drift in public or any tenant, logs that cannot be read or are damaged (see log_damage),
    registered tenants without a schema, and ``tid_`` schemas that no tenant is registered for,
    all read from the logs themselves. The heads index is rebuilt from them (see logindex.py); a
    row that disagreed with its log is a problem too. An empty list means all is well.
    """
    connection = connect(server_params(settings))
    try:
        cursor = connection.cursor()
        report, states = read_status(settings, cursor, from_index=False)
        problems = [f"public: {p}" for p in report.master.drift]
        problems += [f"public: log damaged: {p}" for p in report.master.damage]
        if report.master.standing == Standing.NEVER_MIGRATED:
            problems.append("public has never been migrated: run invoke migrate-master")
        elif settings.tenants_query is None and not registry.exists(cursor):
            problems.append(f"public: {registry.REGISTRY_MISSING}")
        if report.master.old_layout:
            problems.append(f"public: {OLD_LAYOUT} (run invoke migrate-master)")
        for t in report.tenants:
            if not t.exists:
                problems.append(f"{t.org_id}: schema {t.schema} is missing")
            elif t.old_layout:
                problems.append(
                    f"{t.org_id} ({t.schema}): {OLD_LAYOUT} (run invoke migrate-tenants)"
                )
            elif states[t.schema].unreadable:
                problems.append(f"{t.org_id} ({t.schema}): {states[t.schema].unreadable}")
            problems += [f"{t.org_id} ({t.schema}): log damaged: {p}" for p in t.damage]
            problems += [f"{t.org_id} ({t.schema}): {p}" for p in t.drift]
        problems += [
            f"{schema}: the heads index did not match its log (the log was changed by "
            "something other than yoyo-tenants); rebuilt from the log"
            for schema in logindex.rebuild(cursor, states)
        ]
        if settings.tenants_query is not None:
            return problems  # which schemas are tenants is the query's to say, not a prefix
        cursor.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY nspname",
            (registry.SCHEMA_PREFIX.replace("_", "\\_") + "%",),
        )
        registered = {t.schema for t in report.tenants}
        problems += [
            f"schema {name} has no registry row"
            for (name,) in cursor.fetchall()
            if name not in registered
        ]
    finally:
        connection.close()
    return problems
