"""The invoke tasks: the original pnpm scripts' command set, as a thin skin over `commands`.

Each task parses its flags, calls one function, renders the result, and turns a TenantsError into
one line on stderr and an exit code.
"""

from __future__ import annotations

import functools

import psycopg2
from invoke import Collection, task
from invoke.exceptions import Exit
from rich.console import Console

from . import commands, embedded, report
from .db import error_text
from .errors import TenantsError, UsageError
from .settings import Settings

out = Console(highlight=False, soft_wrap=True)

JOBS_HELP = f"tenants migrated at once (default {commands.DEFAULT_JOBS}; connections: jobs + 1)"
LOCK_WAIT_HELP = "seconds to wait for a schema locked by another run (default 60)"
TENANT_HELP = "only this tenant's org id"
JSON_HELP = "also write a machine-readable report to this file"
STEPS_HELP = "roll back this many migrations instead of the last batch"
TO_HELP = "roll back every migration applied after this migration id"


def edge(function):
    """Turn the package's errors into a message on stderr and an exit code, never a traceback."""

    @functools.wraps(function)
    def wrapper(c, *args, **kwargs):
        try:
            return function(c, *args, **kwargs)
        except TenantsError as exc:
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except psycopg2.Error as exc:
            raise Exit(f"error: database: {error_text(exc)}", code=1) from None

    return wrapper


def _settings() -> Settings:
    return Settings.load(".")


def _number(value, name: str, kind=int):
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"--{name} must be a number, not {value!r}") from None


def _finish(run, what: str, json_file: str | None) -> None:
    report.run_summary(out, run, what)
    if json_file:
        report.write_json(json_file, report.run_json(run))
    if not run.ok:
        raise Exit(code=1)


@task(help={"lock_wait": LOCK_WAIT_HELP})
@edge
def migrate_master(c, lock_wait=None):
    """Apply pending master migrations (migrations/master) to the public schema."""
    run = commands.migrate_master(_settings(), lock_wait=_number(lock_wait, "lock-wait", float))
    _finish(run, "public", None)


@task(
    help={
        "tenant": TENANT_HELP,
        "jobs": JOBS_HELP,
        "fail_fast": "stop starting tenants after the first failure",
        "lock_wait": LOCK_WAIT_HELP,
        "json": JSON_HELP,
    }
)
@edge
def migrate_tenants(c, tenant=None, jobs=commands.DEFAULT_JOBS, fail_fast=False, lock_wait=None,
                    json=None):  # fmt: skip
    """Apply pending tenant migrations (migrations/tenant) to every tenant schema."""
    jobs = _number(jobs, "jobs")
    out.print(f"migrating tenants with {jobs} jobs", style="dim")
    with report.progress(out, "tenants") as tick:
        run = commands.migrate_tenants(
            _settings(),
            tenant=tenant,
            jobs=jobs,
            fail_fast=fail_fast,
            lock_wait=_number(lock_wait, "lock-wait", float),
            on_result=tick,
        )
    _finish(run, "tenants", json)


@task(help={"steps": STEPS_HELP, "to": TO_HELP, "lock_wait": LOCK_WAIT_HELP})
@edge
def rollback_master(c, steps=None, to=None, lock_wait=None):
    """Roll back the public schema's last batch of master migrations."""
    run = commands.rollback_master(
        _settings(),
        steps=_number(steps, "steps"),
        to=to,
        lock_wait=_number(lock_wait, "lock-wait", float),
    )
    _finish(run, "public", None)


@task(
    help={
        "tenant": TENANT_HELP,
        "steps": STEPS_HELP,
        "to": TO_HELP,
        "jobs": JOBS_HELP,
        "fail_fast": "stop starting tenants after the first failure",
        "lock_wait": LOCK_WAIT_HELP,
        "json": JSON_HELP,
    }
)
@edge
def rollback_tenants(c, tenant=None, steps=None, to=None, jobs=commands.DEFAULT_JOBS,
                     fail_fast=False, lock_wait=None, json=None):  # fmt: skip
    """Roll back each tenant's last batch of tenant migrations."""
    jobs = _number(jobs, "jobs")
    with report.progress(out, "tenants") as tick:
        run = commands.rollback_tenants(
            _settings(),
            tenant=tenant,
            steps=_number(steps, "steps"),
            to=to,
            jobs=jobs,
            fail_fast=fail_fast,
            lock_wait=_number(lock_wait, "lock-wait", float),
            on_result=tick,
        )
    _finish(run, "tenants", json)


@task(help={"org_id": "the organization's Clerk id, e.g. org_2abc123def456"})
@edge
def provision_tenant(c, org_id):
    """Register an organization, create its schema and apply every tenant migration."""
    report.provisioned(out, commands.provision_tenant(_settings(), org_id))


@task(help={"name": "what the migration does, e.g. add_column", "py": "a Python migration"})
@edge
def make_master(c, name, py=False):
    """Create a new master migration in migrations/master and print its path."""
    for path in commands.make_migration(_settings(), "master", name, py=py):
        out.print(str(path))


@task(help={"name": "what the migration does, e.g. add_column", "py": "a Python migration"})
@edge
def make_tenant(c, name, py=False):
    """Create a new tenant migration in migrations/tenant and print its path."""
    for path in commands.make_migration(_settings(), "tenant", name, py=py):
        out.print(str(path))


@task(help={"all": "list every tenant, not only those behind", "json": JSON_HELP})
@edge
def status(c, all=False, json=None):
    """Applied and pending migrations of public and of every tenant."""
    result = commands.status(_settings())
    report.status(out, result, show_all=all)
    if json:
        report.write_json(json, report.status_json(result))


@task(help={"stop": "stop the embedded server", "reset": "stop it and delete its data"})
@edge
def db(c, stop=False, reset=False):
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
        out.print(f'psql "{dsn}"')


ns = Collection(
    migrate_master,
    migrate_tenants,
    rollback_master,
    rollback_tenants,
    provision_tenant,
    make_master,
    make_tenant,
    status,
    db,
)
