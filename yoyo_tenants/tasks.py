"""The invoke tasks: the original pnpm scripts' command set, as a thin skin over the Python API.

Each task parses its flags, calls one function, renders the result, and turns a TenantsError into
one line on stderr and an exit code.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, overload

import psycopg2
from invoke import Collection, Context, Program, Task, task
from invoke.exceptions import Exit, ParseError
from invoke.parser import Argument
from rich.console import Console

from . import commands, embedded, inspection, provisioning, registry, report
from .db import error_text
from .errors import TenantsError, UnknownTenant, UsageError
from .pool import RunResult
from .settings import Settings

# markup off: migration SQL is full of [brackets] that rich would take for styles.
# soft_wrap: lines stay whole (rich would wrap them at COLUMNS, 80 if unset, splitting ids).
out = Console(highlight=False, soft_wrap=True, markup=False)

HELP = {
    "tenant": "only this tenant's org id",
    "jobs": f"tenants migrated at once (default {commands.DEFAULT_JOBS}; connections: jobs + 1)",
    "fail_fast": "stop starting tenants after the first failure",
    "quiet": "print only failures and the summary",
    "verbose": "print a line for every tenant, also those left as they were",
    "lock_wait": "seconds to wait for a schema another run is migrating (default 60)",
    "lock_timeout": "seconds a statement may wait for a table lock (default 5; "
    "env YOYO_TENANTS_LOCK_TIMEOUT)",
    "statement_timeout": "seconds a statement may run (default 0: no limit; "
    "env YOYO_TENANTS_STATEMENT_TIMEOUT)",
    "retries": "retries, with doubling pauses, of a migration that hit the lock timeout "
    "(default 2)",
    "allow_drift": "migrate schemas whose applied migration files changed or vanished",
    "dry_run": "print the migrations and SQL that would run, per schema; change nothing",
    "json": "also write a machine-readable report to this file",
    "steps": "roll back this many migrations of each schema instead of the last deploy",
    "to": "roll back every migration applied after this migration id",
    "run": "roll back what this run (its number, printed by migrate) applied",
    "yes": "also undo a schema's base tables (its first batch) or the tenant registry",
    "repair_invalid_indexes": "drop invalid indexes an interrupted CREATE INDEX CONCURRENTLY "
    "left behind, before a non-transactional migration builds them again",
    "lint": "refuse to run if squawk finds anything in the pending files (see invoke lint)",
    "waves": "tenants in waves of these cumulative sizes, e.g. 1,5%,25%,all: each starts only "
    "once the one before had no failure",
    "wave_pause": "seconds to wait after each wave before the next (with --waves)",
    "wave_check": "a command that must exit 0 after each wave before the next; it gets the "
    "wave's org ids in YOYO_TENANTS_WAVE_TENANTS",
}
RUN_FLAGS = ("lock_wait", "lock_timeout", "statement_timeout", "retries", "allow_drift", "dry_run")
APPLY_FLAGS = (*RUN_FLAGS, "repair_invalid_indexes")

#: The short flags, by option: one letter means one option in every task that has it, and no
#: other option has one (invoke would give each task its own letters, first come first served).
#: None is one of invoke's own (-c -d -e -f -h -l -p -r -w), which a task's flag would hide.
SHORT = {
    "tenant": "t",
    "jobs": "j",
    "quiet": "q",
    "verbose": "v",
    "fail_fast": "x",
    "dry_run": "n",
    "yes": "y",
    "all": "a",
}
#: The options that take a number, and which kind (seconds may have decimals).
Count = Literal["jobs", "steps", "run", "retries"]
Seconds = Literal["lock_wait", "lock_timeout", "statement_timeout", "wave_pause"]
NUMBERS: dict[str, type[int] | type[float]] = {
    **dict.fromkeys(get_args(Count), int),
    **dict.fromkeys(get_args(Seconds), float),
}


class _Option(Argument):
    """An option as invoke's parser names it in an error: by its flag (`--jobs`), not a repr."""

    def __repr__(self) -> str:
        return f"--{self.names[0]}"


class _Number(_Option):
    """A number option: INT in --help, and its text passed to the task as typed. invoke would
    convert it while parsing and end a mistyped one in a traceback; the task checks it instead
    (see _number). Seconds show as INT too, the only number invoke's help knows."""

    def set_value(self, value: object, cast: bool = True) -> None:
        super().set_value(value, cast=False)


class Command(Task):
    """invoke's Task with this project's flags: SHORT's short flags only, NUMBERS as numbers."""

    def __init__(self, body: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(body, auto_shortflags=False, **kwargs)

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        return [_option(arg) for arg in super().get_arguments(ignore_unknown_help)]


def _option(arg: Argument) -> _Option:
    number = arg.name in NUMBERS
    return (_Number if number else _Option)(
        names=(*arg.names, SHORT[arg.name]) if arg.name in SHORT else arg.names,
        kind=int if number else arg.kind,
        default=arg.default,
        help=arg.help,
        positional=arg.positional,
        optional=arg.optional,
        incrementable=arg.incrementable,
        attr_name=arg.attr_name,
    )


@overload
def command(body: Callable[..., Any], /) -> Command: ...
@overload
def command(*, help: dict[str, str]) -> Callable[[Callable[..., Any]], Command]: ...
def command(*args: Any, **kwargs: Any) -> Command | Callable[[Callable[..., Any]], Command]:
    """@task for this project's tasks (see Command)."""
    return task(*args, klass=Command, **kwargs)


Result = TypeVar("Result")


def edge(function: Callable[..., Result]) -> Callable[..., Result]:
    """Turn the package's errors into a message on stderr and an exit code, never a traceback."""

    @functools.wraps(function)
    def wrapper(c: Context, *args: Any, **kwargs: Any) -> Result:
        try:
            return function(c, *args, **kwargs)
        except TenantsError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except psycopg2.Error as exc:
            raise Exit(f"error: database: {error_text(exc)}", code=1) from None

    return wrapper


def _settings() -> Settings:
    return Settings.load(".")


@overload
def _number(value: str | None, name: Count) -> int | None: ...
@overload
def _number(value: str | None, name: Seconds) -> float | None: ...
def _number(value: str | None, name: str) -> float | None:
    """A number option's value (typed as text; see _Number), or None if it was not given."""
    if value is None:
        return None
    kind = NUMBERS[name]
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if number < 0 or not math.isfinite(number):
        raise UsageError(f"--{name.replace('_', '-')} must be a number, not {value!r}")
    return number


def _jobs(value: str | None) -> int:
    jobs = _number(value, "jobs")
    if jobs is None:
        return commands.DEFAULT_JOBS
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    return jobs


def _detail(quiet: bool, verbose: bool) -> report.Detail:
    if quiet and verbose:
        raise UsageError("give one of --quiet and --verbose")
    if quiet:
        return report.Detail.QUIET
    return report.Detail.ALL if verbose else report.Detail.CHANGES


def _run_options(
    lock_wait: str | None,
    lock_timeout: str | None,
    statement_timeout: str | None,
    retries: str | None,
    allow_drift: bool,
    dry_run: bool,
) -> dict[str, Any]:
    return {
        "lock_wait": _number(lock_wait, "lock_wait"),
        "lock_timeout": _number(lock_timeout, "lock_timeout"),
        "statement_timeout": _number(statement_timeout, "statement_timeout"),
        "retries": _number(retries, "retries"),
        "allow_drift": allow_drift,
        "dry_run": dry_run,
    }


def _starting(
    progress: report.RunProgress, direction: str, jobs: int, detail: report.Detail
) -> commands.OnStart:
    """A run's on_start: the header line (unless quiet), and the progress's total."""

    def start(work: int, total: int) -> None:
        if detail is not report.Detail.QUIET:
            report.run_header(out, direction, work, total, jobs)
        progress.start(work, total)

    return start


def _writable(path: str | None) -> str | None:
    """`path`, checked before anything runs: a report the run could not write would be lost."""
    if path is None:
        return None
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir() or not os.access(target if target.exists() else folder, os.W_OK):
        raise UsageError(f"--json {path}: cannot write there")
    return path


def _finish(
    run: RunResult, what: str, json_file: str | None, detail: report.Detail = report.Detail.CHANGES
) -> None:
    if run.dry_run:
        report.dry_run(out, run)
    else:
        report.run_summary(out, run, what, detail)
        if run.waves:
            report.waves_summary(out, run)
    if json_file:
        report.write_json(json_file, report.run_json(run))
    if not run.ok:
        raise Exit(report.run_error(run), code=1)


def _help(*names: str) -> dict[str, str]:
    return {name: HELP[name] for name in names}


@command(help=_help("lint", *APPLY_FLAGS))
@edge
def migrate_master(c: Context, lint: bool = False, lock_wait: str | None = None,
                   lock_timeout: str | None = None, statement_timeout: str | None = None,
                   retries: str | None = None, allow_drift: bool = False, dry_run: bool = False,
                   repair_invalid_indexes: bool = False) -> None:  # fmt: skip
    """Apply pending master migrations (migrations/master) to the public schema."""
    options = _run_options(
        lock_wait, lock_timeout, statement_timeout, retries, allow_drift, dry_run
    )
    run = commands.migrate_master(
        _settings(), lint=lint, repair_invalid_indexes=repair_invalid_indexes, **options
    )
    _finish(run, "public", None)


@command(
    help=_help("tenant", "jobs", "fail_fast", "quiet", "verbose", "json", "lint", "waves",
               "wave_pause", "wave_check", *APPLY_FLAGS)
)  # fmt: skip
@edge
def migrate_tenants(c: Context, tenant: str | None = None, jobs: str | None = None,
                    fail_fast: bool = False, quiet: bool = False, verbose: bool = False,
                    json: str | None = None, lint: bool = False, waves: str | None = None,
                    wave_pause: str | None = None, wave_check: str | None = None,
                    lock_wait: str | None = None, lock_timeout: str | None = None,
                    statement_timeout: str | None = None, retries: str | None = None,
                    allow_drift: bool = False, dry_run: bool = False,
                    repair_invalid_indexes: bool = False) -> None:  # fmt: skip
    """Apply pending tenant migrations (migrations/tenant) to every tenant schema."""
    options = _run_options(
        lock_wait, lock_timeout, statement_timeout, retries, allow_drift, dry_run
    )
    options["repair_invalid_indexes"] = repair_invalid_indexes
    workers, detail, json = _jobs(jobs), _detail(quiet, verbose), _writable(json)
    with report.progress(out, "tenants") as progress:
        run = commands.migrate_tenants(
            _settings(),
            tenant=tenant,
            jobs=workers,
            fail_fast=fail_fast,
            on_start=_starting(progress, "apply", workers, detail),
            on_result=progress,
            lint=lint,
            waves=waves,
            wave_pause=_number(wave_pause, "wave_pause") or 0.0,
            wave_check=wave_check,
            on_wave=lambda wave, count: report.wave_done(out, wave, count),
            **options,
        )
    _finish(run, "tenants", json, detail)


@command(help=_help("steps", "to", "run", "yes", *RUN_FLAGS))
@edge
def rollback_master(c: Context, steps: str | None = None, to: str | None = None,
                    run: str | None = None, yes: bool = False, lock_wait: str | None = None,
                    lock_timeout: str | None = None, statement_timeout: str | None = None,
                    retries: str | None = None, allow_drift: bool = False,
                    dry_run: bool = False) -> None:  # fmt: skip
    """Undo what the last migrate-master run applied to the public schema."""
    options = _run_options(
        lock_wait, lock_timeout, statement_timeout, retries, allow_drift, dry_run
    )
    result = commands.rollback_master(
        _settings(), steps=_number(steps, "steps"), to=to, run=_number(run, "run"), yes=yes,
        **options,
    )  # fmt: skip
    _finish(result, "public", None)


@command(
    help=_help("tenant", "steps", "to", "run", "yes", "jobs", "fail_fast", "quiet", "verbose",
               "json", *RUN_FLAGS)
)  # fmt: skip
@edge
def rollback_tenants(c: Context, tenant: str | None = None, steps: str | None = None,
                     to: str | None = None, run: str | None = None, yes: bool = False,
                     jobs: str | None = None, fail_fast: bool = False, quiet: bool = False,
                     verbose: bool = False, json: str | None = None, lock_wait: str | None = None,
                     lock_timeout: str | None = None, statement_timeout: str | None = None,
                     retries: str | None = None, allow_drift: bool = False,
                     dry_run: bool = False) -> None:  # fmt: skip
    """Undo the last deploy: what the most recent migrate-tenants run applied, in each tenant."""
    options = _run_options(
        lock_wait, lock_timeout, statement_timeout, retries, allow_drift, dry_run
    )
    step_count, run_number, workers = _number(steps, "steps"), _number(run, "run"), _jobs(jobs)
    detail, json = _detail(quiet, verbose), _writable(json)
    with report.progress(out, "tenants") as progress:
        result = commands.rollback_tenants(
            _settings(),
            tenant=tenant,
            steps=step_count,
            to=to,
            run=run_number,
            yes=yes,
            jobs=workers,
            fail_fast=fail_fast,
            on_start=_starting(progress, "rollback", workers, detail),
            on_result=progress,
            **options,
        )
    _finish(result, "tenants", json, detail)


@command(
    help={
        "org_id": "the organization's Clerk id, e.g. org_2abc123def456",
        "dry_run": HELP["dry_run"],
        "allow_drift": "provision even if the tenants applied migration files that changed since",
        "lint": HELP["lint"],
    }
)
@edge
def provision_tenant(
    c: Context, org_id: str, dry_run: bool = False, allow_drift: bool = False, lint: bool = False
) -> None:
    """Register an organization, create its schema and apply every tenant migration."""
    done = provisioning.provision_tenant(
        _settings(), org_id, dry_run=dry_run, allow_drift=allow_drift, lint=lint
    )
    report.provisioned(out, done)


@command(
    help={
        "org_id": "the organization's Clerk id",
        "yes": "really drop the schema and its data (without it, only list what would go)",
        "archive": "first pg_dump the schema to this file; nothing is dropped if that fails",
    }
)
@edge
def deprovision_tenant(
    c: Context, org_id: str, yes: bool = False, archive: str | None = None
) -> None:
    """Drop a tenant's schema and registry row, in one transaction (only with --yes)."""
    result = provisioning.deprovision_tenant(_settings(), org_id, yes=yes, archive=archive)
    report.deprovisioned(out, result)
    if not result.dropped:
        raise Exit(code=1)


@command(
    help={
        "org_id": "the organization's Clerk id",
        "to": "the worker to move it to, host:port (as status shows the nodes)",
    }
)
@edge
def move_tenant(c: Context, org_id: str, to: str) -> None:
    """Citus: move a tenant's schema to another worker, online, under the schema's lock."""
    was, now = commands.move_tenant(_settings(), org_id, to)
    out.print(f"{org_id}: on {now}" + (f" (was on {was})" if was != now else " already"))


@command(
    help={
        "archive": "the file deprovision-tenant --archive wrote",
        "unrecorded": "restore an archive this database has no record of (made before records "
        "were kept, or in another database); every other check still runs",
        "trust_code": "trust the archive's code: restore an unrecorded archive's functions, and "
        "run it as you where it cannot run under a role of its own",
    }
)
@edge
def restore_tenant(
    c: Context, archive: str, unrecorded: bool = False, trust_code: bool = False
) -> None:
    """Bring back a tenant archived by deprovisioning: its schema, data and registry row."""
    done = provisioning.restore_tenant(
        _settings(), archive, unrecorded=unrecorded, trust_code=trust_code
    )
    report.restored(out, done)


@command(
    help={
        "migration": "accept only this migration's edits (its id)",
        "forget_missing": "forget applied migrations whose file is gone (unmark them)",
        "dry_run": "show what would be accepted; change nothing",
    }
)
@edge
def repair(
    c: Context, migration: str | None = None, forget_missing: bool = False, dry_run: bool = False
) -> None:
    """Accept edits to applied migrations: record their files' checksums as they are now."""
    run = commands.repair(
        _settings(), migration=migration, forget_missing=forget_missing, dry_run=dry_run
    )
    report.repaired(out, run)
    if not run.ok:
        raise Exit(report.run_error(run), code=1)


@command(help={"name": "what the migration does, e.g. add_column", "py": "a Python migration"})
@edge
def make_master(c: Context, name: str, py: bool = False) -> None:
    """Create a new master migration in migrations/master and print its path."""
    for path in commands.make_migration(_settings(), "master", name, py=py):
        out.print(str(path))


@command(help={"name": "what the migration does, e.g. add_column", "py": "a Python migration"})
@edge
def make_tenant(c: Context, name: str, py: bool = False) -> None:
    """Create a new tenant migration in migrations/tenant and print its path."""
    for path in commands.make_migration(_settings(), "tenant", name, py=py):
        out.print(str(path))


@command(
    help={
        "all": "after the summary, list every tenant",
        "tenant": "after the summary, list this tenant (its org id)",
        "json": HELP["json"],
    }
)
@edge
def status(
    c: Context, all: bool = False, tenant: str | None = None, json: str | None = None
) -> None:
    """Applied and pending migrations of public and of every tenant, grouped by where they stand."""
    if all and tenant is not None:
        raise UsageError("give one of --all and --tenant")
    if tenant is not None:
        registry.check_org_id(tenant)
    result = inspection.status(_settings())
    listed = result.tenants if all else None
    if tenant is not None:
        listed = [t for t in result.tenants if t.org_id == tenant]
        if not listed:
            raise UnknownTenant(f"no tenant is registered for {tenant}")
    report.status(out, result, listed)
    if json:
        report.write_json(json, report.status_json(result))


@command
@edge
def verify(c: Context) -> None:
    """Check public and every tenant against the migration files and registry (exit 1 if not)."""
    problems = inspection.verify(_settings())
    for problem in problems:
        out.print(problem)
    if problems:
        raise Exit(f"error: verify found {report.plural(len(problems), 'problem')}", code=1)
    out.print("verify: public and every tenant match the migration files and the registry")


@command(
    help={
        "all": "lint every migration file, not only the pending ones",
        "files": "lint only these migration files: their paths or ids, separated by commas",
    }
)
@edge
def lint(c: Context, all: bool = False, files: str | None = None) -> None:
    """Lint the pending migration files with squawk; each finding weighed across the tenants."""
    names = [name.strip() for name in (files or "").split(",") if name.strip()]
    if files is not None and not names:
        raise UsageError("--files names no file")
    from . import lint as linting  # only here: start-up

    result = linting.lint(_settings(), files=names, every=all)
    report.lint(out, result)
    if not result.ok:
        count = report.plural(len(result.findings), "finding")
        raise Exit(f"error: lint: {count} (rules are chosen in pyproject.toml)", code=1)


@command(help={"stop": "stop the embedded server", "reset": "stop it and delete its data"})
@edge
def db(c: Context, stop: bool = False, reset: bool = False) -> None:
    """Show how to reach the embedded database (psql), or stop or reset it."""
    settings = _settings()
    if not settings.embedded:
        raise UsageError("a database is configured (DB_HOST or DATABASE_URL): nothing embedded")
    if reset:
        embedded.reset(settings.data_dir)
        out.print(f"deleted {settings.data_dir / 'pgdata'}")
    elif stop:
        out.print("stopped" if embedded.stop(settings.data_dir) else "not running")
    else:
        params = embedded.ensure_running(settings.data_dir)
        dsn = " ".join(f"{k}={v}" for k, v in params.items() if k != "application_name")
        out.print(f'{embedded.bin_dir() / "psql"} "{dsn}"')


ns = Collection(
    migrate_master,
    migrate_tenants,
    rollback_master,
    rollback_tenants,
    provision_tenant,
    deprovision_tenant,
    restore_tenant,
    repair,
    move_tenant,
    make_master,
    make_tenant,
    lint,
    status,
    verify,
    db,
)


@command
def version(c: Context) -> None:
    """Print yoyo-tenants' version (invoke --version prints invoke's own, before tasks load)."""
    from . import __version__

    out.print(f"yoyo-tenants {__version__}")


ns.add_task(version)


class TenantsProgram(Program):
    """The tasks as a program of their own (`yoyo-tenants`, `python -m yoyo_tenants`).

    A command line its parser cannot read (a missing argument, an unknown flag) is one `error:`
    line and exit 2, like every other bad input; invoke's own program prints the parser's
    message and exits 1."""

    def parse_core(self, argv: list[str] | None) -> None:
        try:
            super().parse_core(argv)
        except ParseError as exc:
            raise Exit(f"error: {exc}", code=2) from None

    def parse_tasks(self) -> None:
        try:
            super().parse_tasks()
        except ParseError as exc:
            raise Exit(f"error: {exc}", code=2) from None


def _program() -> TenantsProgram:
    from . import __version__

    return TenantsProgram(
        namespace=ns, name="yoyo-tenants", binary="yoyo-tenants", version=__version__
    )


def main() -> None:
    """The `yoyo-tenants` command."""
    _program().run()
