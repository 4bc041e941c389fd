"""The commands, as plain functions: what the invoke tasks call, and what programs and tests call.

Each takes the `Settings` and returns what it did; each raises a `TenantsError` on a failure the
user can act on. None of them prints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from yoyo.migrations import Migration, MigrationList

from . import citus, log, registry, runs, scaffold
from .db import connect, one_row, server_params
from .engine import mark_schema, migrate_schema
from .errors import TenantsError, UsageError
from .inspection import damaged, log_damage, read_status
from .loading import load_migrations
from .log import Log
from .plan import (
    ApplyPlan,
    Drift,
    Plan,
    RepairPlan,
    RollbackPlan,
    RollbackTarget,
    migration_sql,
    pending_by_list,
)
from .pool import RunResult, SchemaState, run_schemas, scan
from .registry import Tenant
from .results import Command, Direction, RunOptions, SchemaResult
from .server import prepare_run
from .settings import Settings
from .sqlfiles import drops_table
from .waves import OnWave, Rollout

#: Tenants migrated at once unless --jobs says otherwise.
DEFAULT_JOBS = min(8, 2 * (os.cpu_count() or 2))
PUBLIC = "public"

OnResult = Callable[[SchemaResult], None]
#: Called once a run has scanned, before any schema is started: (schemas with work, schemas in all).
OnStart = Callable[[int, int], None]
#: Makes the plan for one schema (plans remember what they chose: one per schema).
PlanFor = Callable[[str], Plan]


@dataclass
class Run:
    """A run to make: which command, over which schemas, planned how, with what options."""

    command: Command
    tenants: list[Tenant]
    plans: Plans
    options: RunOptions
    jobs: int = 1
    fail_fast: bool = False
    dry_run: bool = False
    on_result: OnResult | None = None
    on_start: OnStart | None = None
    #: The migrations a run applies: schemas the heads index says are at their head need no read.
    index: MigrationList | None = None
    rollout: Rollout | None = None


# -- master --------------------------------------------------------------------------------------


def migrate_master(
    settings: Settings, dry_run: bool = False, lint: bool = False, **options: Any
) -> RunResult:
    """Apply pending master migrations to the public schema (refused, with `lint`, if squawk
    finds anything in them: see lint.py).

    `options` are RunOptions fields: lock_wait, lock_timeout, statement_timeout, retries, ...
    """
    migrations = load_migrations(settings.master_dir, public=True)
    opts = RunOptions.of(settings, **options)
    if lint:
        from .lint import refuse_unclean  # only with --lint: start-up

        refuse_unclean(settings, True, [Tenant(None, PUBLIC)])
    return _run(
        settings,
        Run(
            Command.MIGRATE_MASTER,
            [Tenant(None, PUBLIC)],
            Applying(migrations, opts.allow_drift),
            opts,
            dry_run=dry_run,
            index=migrations,
        ),
    )


def rollback_master(
    settings: Settings,
    steps: int | None = None,
    to: str | None = None,
    run: int | None = None,
    yes: bool = False,
    dry_run: bool = False,
    **options: Any,
) -> RunResult:
    """Undo what the last `migrate-master` run applied to public (or its last `steps`
    migrations, all after `to`, or what run `run` applied). Dropping the tenant registry while
    tenants are registered is refused unless `yes`."""
    migrations = load_migrations(settings.master_dir, public=True)
    target = RollbackTarget(steps=steps, to=to, run=run, yes=yes)
    opts = RunOptions.of(settings, **options)
    return _run(
        settings,
        Run(
            Command.ROLLBACK_MASTER,
            [Tenant(None, PUBLIC)],
            RollingBack(migrations, target, Command.MIGRATE_MASTER, protect=_registry_kept),
            opts,
            dry_run=dry_run,
        ),
    )


# -- tenants -------------------------------------------------------------------------------------


def migrate_tenants(
    settings: Settings,
    tenant: str | None = None,
    jobs: int = DEFAULT_JOBS,
    fail_fast: bool = False,
    dry_run: bool = False,
    on_result: OnResult | None = None,
    on_start: OnStart | None = None,
    lint: bool = False,
    waves: str | None = None,
    wave_pause: float = 0.0,
    wave_check: str | None = None,
    on_wave: OnWave | None = None,
    **options: Any,
) -> RunResult:
    """Apply pending tenant migrations to every registered tenant (or to the one org id given).

    Which tenants are behind is read for all of them in a few queries; only those are connected
    to, over at most `jobs` worker connections (plus this one). `on_start` is told how many that
    is before the first starts, `on_result` of each as it ends. `options` are RunOptions fields.

    With `lint`, refused if squawk finds anything in the pending files (see lint.py). With
    `waves` ("1,5%,25%,all"), the tenants go in waves, each after the one before came through
    and, after `wave_pause` seconds, the command `wave_check` exited 0; `on_wave` is told of
    each as it ends (see waves.py).
    """
    migrations = load_migrations(settings.tenant_dir)
    opts = RunOptions.of(settings, **options)
    rollout = None
    if waves is not None:
        if tenant is not None:
            raise UsageError("give one of --tenant and --waves")
        rollout = Rollout.of(settings, waves, wave_pause, wave_check, on_wave)
    elif wave_check is not None or wave_pause:
        raise UsageError("--wave-check and --wave-pause go with --waves")
    tenants = _tenants(settings, tenant, jobs)
    if lint:
        from .lint import refuse_unclean  # only with --lint: start-up

        refuse_unclean(settings, False, tenants)
    run = Run(Command.MIGRATE_TENANTS, tenants, Applying(migrations, opts.allow_drift), opts)
    run.jobs, run.fail_fast, run.dry_run = jobs, fail_fast, dry_run
    run.on_result, run.on_start, run.index, run.rollout = on_result, on_start, migrations, rollout
    return _run(settings, run)


def rollback_tenants(
    settings: Settings,
    tenant: str | None = None,
    steps: int | None = None,
    to: str | None = None,
    run: int | None = None,
    yes: bool = False,
    jobs: int = DEFAULT_JOBS,
    fail_fast: bool = False,
    dry_run: bool = False,
    on_result: OnResult | None = None,
    on_start: OnStart | None = None,
    **options: Any,
) -> RunResult:
    """Undo the last deploy: in every tenant, what the most recent `migrate-tenants` run applied
    there, and nothing in tenants it did not change. Or what run `run` applied, or each tenant's
    last `steps` migrations, or all after `to`. Undoing a tenant's base tables (its first batch,
    from provisioning) is refused unless `yes`."""
    migrations = load_migrations(settings.tenant_dir)
    target = RollbackTarget(steps=steps, to=to, run=run, yes=yes)
    opts = RunOptions.of(settings, **options)
    plans = RollingBack(migrations, target, Command.MIGRATE_TENANTS)
    rollback = Run(Command.ROLLBACK_TENANTS, _tenants(settings, tenant, jobs), plans, opts)
    rollback.jobs, rollback.fail_fast, rollback.dry_run = jobs, fail_fast, dry_run
    rollback.on_result, rollback.on_start = on_result, on_start
    return _run(settings, rollback)


class Applying:
    """Each schema's plan: apply what is pending (see plan.ApplyPlan)."""

    def __init__(self, migrations: MigrationList, allow_drift: bool):
        self.migrations, self.allow_drift = migrations, allow_drift

    def planner(self, states: dict[str, SchemaState], cursor: Cursor) -> PlanFor:
        # This run's: the plans of tenants the scan found alike share their answers.
        alike = pending_by_list(self.migrations, self.allow_drift)
        return partial(
            ApplyPlan, migrations=self.migrations, allow_drift=self.allow_drift, alike=alike
        )


class RollingBack:
    """Each schema's plan: undo `target`, or with no target given, the last run of `deploys`
    that applied anything in these schemas (logs from before runs: each schema's last batch).

    A `to` that names no migration file is refused here, once, before any schema is read: in
    each schema it could only fail as "not applied"."""

    def __init__(
        self,
        migrations: MigrationList,
        target: RollbackTarget,
        deploys: Command,
        protect: Callable[[Cursor], Callable[[list[Migration]], str | None]] | None = None,
    ):
        if target.to is not None and target.to not in {m.id for m in migrations}:
            raise UsageError(f"--to {target.to}: no migration file has that id")
        self.migrations, self.target, self.deploys, self.protect = (
            migrations, target, deploys, protect
        )  # fmt: skip

    def planner(self, states: dict[str, SchemaState], cursor: Cursor) -> PlanFor:
        target = self.target
        if (target.steps, target.to, target.run) == (None, None, None):
            last = last_deploy(cursor, states, self.deploys)
            target = replace(target, run=last, deploy=True)
        guard = self.protect(cursor) if self.protect else _nothing_protected
        return partial(RollbackPlan, migrations=self.migrations, target=target, protect=guard)


#: What makes each schema's plan, given what the scan read and the run's cursor.
Plans = Applying | RollingBack


def _nothing_protected(todo: list[Migration]) -> str | None:
    return None


def last_deploy(cursor: Cursor, states: dict[str, SchemaState], command: Command) -> int | None:
    """The most recent run of `command` that applied a migration still applied somewhere."""
    found = {row.run for state in states.values() for row in state.applied if row.run}
    return next((run for run in runs.of_command(cursor, command.value) if run in found), None)


def _registry_kept(cursor: Cursor) -> Callable[[list[Migration]], str | None]:
    """For public: a rollback must not drop the tenant registry while tenants are registered."""
    registered = 0
    if registry.exists(cursor):
        cursor.execute("SELECT count(*) FROM public.tenants")
        registered = one_row(cursor)[0]

    def check(todo: list[Migration]) -> str | None:
        for migration in todo:
            script = getattr(migration, "rollback_script", None)
            if registered and script and drops_table(script, PUBLIC, "tenants"):
                return (
                    f"rolling back {migration.id} would drop public.tenants, the registry of "
                    f"{registered} tenants (their schemas would stay)"
                )
        return None

    return check


def _tenants(settings: Settings, org_id: str | None, jobs: int) -> list[Tenant]:
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    connection = connect(server_params(settings))
    try:
        cursor = connection.cursor()
        if org_id is not None:
            return [registry.tenant_of(cursor, org_id, settings.tenants_query)]
        return registry.list_tenants(cursor, settings.tenants_query)
    finally:
        connection.close()


def _run(settings: Settings, run: Run) -> RunResult:
    """Scan the schemas' logs (judging from the heads index against `run.index` when given),
    plan each schema once, then hand those with work to the engine as one run, in the waves of
    `run.rollout` if given (or, in a dry run, say what it would do)."""
    started = time.perf_counter()
    tenants, options, direction = run.tenants, run.options, run.command.direction
    params = server_params(settings)
    connection = connect(params)
    try:
        cursor = connection.cursor()
        if run.rollout:
            tenants = run.rollout.order(cursor, tenants, settings.tenants_query)
        states = scan(cursor, [t.schema for t in tenants], run.index)
        planner = run.plans.planner(states, cursor)
        plans = {t.schema: planner(t.schema) for t in tenants}
        if run.dry_run:
            result = _dry_run(tenants, states, plans, direction, settings)
            if run.rollout:
                busy = [r for r in result.schemas if r.migrations]
                result.waves = run.rollout.split(busy, len(tenants))
            result.duration = time.perf_counter() - started
            return result
        idle, work = {}, []
        for t in tenants:
            schema = SchemaResult(t.schema, t.org_id)
            state = states[t.schema]
            if not state.exists:
                schema.fail(f"schema {t.schema} of {t.org_id} does not exist")
                idle[t.schema] = schema
            elif state.unreadable:
                schema.fail(f"the log of {t.schema} cannot be read: {state.unreadable}")
                idle[t.schema] = schema
            elif damage := log_damage(state, t, settings):
                schema.fail(damaged(t.schema, damage))
                idle[t.schema] = schema
            elif _needs_work(state, plans[t.schema]):
                work.append(schema)
            else:
                idle[t.schema] = schema
        if work:  # the server is checked, and Citus detected, only for a run that writes
            options = prepare_run(connection, options, settings.citus, write=True)
            options = replace(options, run=runs.start(cursor, run.command.value))
    finally:
        connection.close()

    if run.on_start:
        run.on_start(len(work), len(tenants))

    def action(connection: Connection, result: SchemaResult) -> SchemaResult:
        known, prelude = starting_point(states[result.schema], result.schema, options.citus)
        plan = plans[result.schema]
        return migrate_schema(connection, plan, result, options, known=known, prelude=prelude)

    def run_work(schemas: list[SchemaResult]) -> RunResult:
        return run_schemas(
            params,
            schemas,
            action,
            direction=direction,
            jobs=run.jobs,
            fail_fast=run.fail_fast,
            on_result=run.on_result,
        )

    if run.rollout and work:  # one run, in waves: the same run number on every log row
        done = run.rollout.run(run.rollout.split(work, len(tenants)), run_work, options.run)
    else:
        done = run_work(work)
    by_schema = {r.schema: r for r in done.schemas}
    done.schemas = [by_schema.get(t.schema) or idle[t.schema] for t in tenants]
    done.duration = time.perf_counter() - started
    done.run = options.run
    return done


def _needs_work(state: SchemaState, plan: Plan) -> bool:
    """Whether a scanned schema has anything for `plan` to do (a plan's verdict on its own log,
    or a log table to make or convert)."""
    if not state.tables_ready or state.old_layout:
        return True
    try:
        return bool(plan.choose(state.log))
    except TenantsError:
        return True  # drift or a missing file: the engine reports it, for this schema


def starting_point(
    state: SchemaState, schema: str, citus: bool
) -> tuple[Log | None, list[sql.Composed]]:
    """How the engine starts on a scanned schema: the log it knows, and the statements that make
    its log table what a run writes to. A schema with yoyo's tables is read under its lock, and
    converted there."""
    if state.old_layout:
        return None, []
    if not state.tables_ready:
        return Log([]), log.create_sql(schema, citus)
    return state.log, [] if state.has_run else [log.add_run_sql(schema)]


# -- dry runs ------------------------------------------------------------------------------------


def _dry_run(
    tenants: list[Tenant],
    states: dict[str, SchemaState],
    plans: dict[str, Plan],
    direction: Direction,
    settings: Settings,
) -> RunResult:
    """What a run would do, read from the catalog in a few queries; nothing is written."""
    run = RunResult(direction, dry_run=True)
    for t in tenants:
        result = SchemaResult(t.schema, t.org_id)
        state = states[t.schema]
        if not state.exists:
            result.fail(f"schema {t.schema} does not exist")
        elif damage := log_damage(state, t, settings):
            result.fail(damaged(t.schema, damage))
        elif state.old_layout:
            result.fail(f"{t.schema} keeps yoyo's tables, which a real run converts first")
        else:
            try:
                todo = plans[t.schema].choose(state.log)
            except Drift as exc:
                result.fail(f"{exc} (would be refused)")
                todo = []
            except TenantsError as exc:
                result.fail(str(exc))
                todo = []
            for migration in todo:
                result.migrations.append(migration.id)
                result.sql += [f"-- {migration.id}", *migration_sql(migration, direction.value)]
        run.schemas.append(result)
    return run


# -- new migrations ------------------------------------------------------------------------------


def make_migration(settings: Settings, kind: str, name: str, py: bool = False) -> list[Path]:
    """Create a new master or tenant migration file; return the paths created."""
    directory = {"master": settings.master_dir, "tenant": settings.tenant_dir}[kind]
    return scaffold.new_migration(directory, name, py=py)


# -- repair --------------------------------------------------------------------------------------


def repair(
    settings: Settings,
    migration: str | None = None,
    forget_missing: bool = False,
    dry_run: bool = False,
    jobs: int = DEFAULT_JOBS,
) -> RunResult:
    """Accept edits to applied migrations, as Flyway's repair does: in public and every tenant,
    each applied migration (or only `migration`) whose file changed since gets a log row with
    its checksum as it is now; afterwards verify passes and status shows no drift. A file that
    is gone stays an error unless `forget_missing` (then the migration is unmarked)."""
    master = load_migrations(settings.master_dir, public=True)
    tenant_migrations = load_migrations(settings.tenant_dir)
    known = {m.id for m in [*master, *tenant_migrations]}
    if migration is not None and migration not in known and not forget_missing:
        raise UsageError(f"no migration {migration} in {settings.master_dir} or "
                         f"{settings.tenant_dir}")  # fmt: skip
    params = server_params(settings)
    connection = connect(params)
    try:
        cursor = connection.cursor()
        options = prepare_run(connection, RunOptions.of(settings), settings.citus, not dry_run)
        report, states = read_status(settings, cursor, from_index=False)
        folders = {PUBLIC: master, **{t.schema: tenant_migrations for t in report.tenants}}
        orgs = {t.schema: t.org_id for t in report.tenants}
        results, work, plans = [], [], {}
        for schema, migrations in folders.items():
            result = SchemaResult(schema, orgs.get(schema))
            results.append(result)
            if damage := log_damage(states[schema], Tenant(orgs.get(schema), schema), settings):
                result.fail(damaged(schema, damage))
                continue
            if not states[schema].tables_ready or states[schema].unreadable:
                continue
            plans[schema] = RepairPlan(schema, migrations, migration, forget_missing)
            try:
                marks = plans[schema].choose(states[schema].log)
            except TenantsError as exc:
                result.fail(str(exc))
                continue
            if dry_run:
                result.migrations = [m.id for m, _, _ in marks]
            elif marks:
                work.append(result)
        if work:
            options = replace(options, run=runs.start(cursor, Command.REPAIR.value))
    finally:
        connection.close()
    if dry_run:
        return RunResult(Direction.REPAIR, results, dry_run=True)

    def action(connection: Connection, result: SchemaResult) -> SchemaResult:
        marks = mark_schema(connection, result.schema, options, plans[result.schema].choose)
        result.migrations = [m.id for m, _, _ in marks]
        return result

    done = run_schemas(params, work, action, direction=Direction.REPAIR, jobs=jobs)
    done.schemas, done.run = results, options.run
    return done


# -- Citus ---------------------------------------------------------------------------------------


def move_tenant(settings: Settings, org_id: str, to: str) -> tuple[str | None, str]:
    """Move a tenant's schema to another Citus worker ("host:port"), online, under its lock;
    where it was and where it is."""
    connection = connect(server_params(settings))
    try:
        tenant = registry.tenant_of(connection.cursor(), org_id, settings.tenants_query)
        return citus.move(connection, tenant.schema, to, RunOptions.of(settings))
    finally:
        connection.close()
