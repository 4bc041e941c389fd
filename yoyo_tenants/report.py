"""How results look: rich tables and progress on a terminal, plain lines elsewhere, or JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .commands import Standing, Status
from .engine import Outcome, SchemaResult
from .provisioning import Deprovisioned, Provisioned
from .runner import RunResult

#: Seconds between progress lines when stdout is not a terminal.
PLAIN_PROGRESS_EVERY = 5.0

VERB = {"apply": "applied", "rollback": "rolled back"}


def run_summary(console: Console, run: RunResult, what: str) -> None:
    """Per-schema lines for what changed, then a one-line summary and any failures."""
    verb = VERB[run.direction]
    if what == "public":
        public = run.schemas[0]
        if public.migrations:
            console.print(f"public: {verb} {', '.join(public.migrations)}")
        elif not public.failure:
            console.print(
                "public: nothing to " + ("apply" if run.direction == "apply" else "roll back")
            )
        _failures(console, run)
        return
    for result in run.schemas:
        if result.migrations:
            name = _name(result)
            console.print(
                f"{name}: {verb} {len(result.migrations)}: {', '.join(result.migrations)}"
            )
    applying = run.direction == "apply"
    parts = [
        f"{run.count(Outcome.DONE)} {'migrated' if applying else 'rolled back'}",
        f"{run.count(Outcome.UP_TO_DATE)} {'up to date' if applying else 'unchanged'}",
        f"{run.count(Outcome.FAILED)} failed",
    ]
    if run.count(Outcome.SKIPPED):
        parts.append(f"{run.count(Outcome.SKIPPED)} skipped (locked)")
    if run.count(Outcome.NOT_STARTED):
        parts.append(f"{run.count(Outcome.NOT_STARTED)} not started")
    ran = f" (run {run.run})" if run.run else ""
    console.print(f"{what}: {', '.join(parts)} in {run.duration:.2f}s{ran}")
    if run.interrupted:
        console.print("interrupted: no new schema was started after the signal")
    _failures(console, run)


def _failures(console: Console, run: RunResult) -> None:
    # Plain lines, not a table: ids and errors must survive narrow terminals and CI logs whole.
    for r in run.failed:
        console.print(failure(r))


def failure(r: SchemaResult) -> str:
    migration = r.failure.migration if r.failure else None
    where = f" in {migration}" if migration else ""
    return f"{r.outcome.value}: {_name(r)}{where}: {r.failure or 'the run stopped first'}"


def run_error(run: RunResult) -> str:
    """The one line for stderr when a run did not do everything."""
    if len(run.failed) == 1:
        return f"error: {failure(run.failed[0])}"
    stopped = " (interrupted)" if run.interrupted else ""
    return f"error: {len(run.failed)} of {len(run.schemas)} schemas not done{stopped}"


def run_json(run: RunResult) -> dict:
    return {
        "direction": run.direction,
        "run": run.run,
        "jobs": run.jobs,
        "interrupted": run.interrupted,
        "duration": round(run.duration, 4),
        "counts": {outcome.value: run.count(outcome) for outcome in Outcome},
        "dry_run": run.dry_run,
        "schemas": [
            {
                "org_id": r.org_id,
                "schema": r.schema,
                "status": r.outcome.value,
                "migrations": r.migrations,
                "failed_migration": r.failure.migration if r.failure else None,
                "error": str(r.failure) if r.failure else None,
                "sqlstate": r.failure.sqlstate if r.failure else None,
                "file": r.failure.path if r.failure else None,
                "line": r.failure.line if r.failure else None,
                "duration": round(r.duration, 4),
            }
            for r in run.schemas
        ],
    }


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def progress(console: Console, label: str) -> Iterator[Callable[[SchemaResult], None]]:
    """A callback for each finished schema: a bar on a terminal, a line every few seconds if not.

    The total is unknown until the run has scanned its tenants, so the bar counts up.
    """
    if console.is_terminal:
        bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        task = bar.add_task(label, total=None)
        with bar:
            yield lambda result: bar.advance(task)
        return
    count, last = 0, time.monotonic()

    def tick(result: SchemaResult) -> None:
        nonlocal count, last
        count += 1
        if time.monotonic() - last >= PLAIN_PROGRESS_EVERY:
            last = time.monotonic()
            console.print(f"{label}: {count} schemas done")

    yield tick


def provisioned(console: Console, result: Provisioned) -> None:
    t = result.tenant
    if result.dry_run:
        what = "would provision" if result.created else "would bring up to date"
        console.print(f"dry run: {what} {t.org_id} in schema {t.schema}")
        for line in result.sql:
            console.print(f"  {line}")
        return
    if result.created:
        head = f"provisioned {t.org_id} in schema {t.schema}"
    else:
        head = f"{t.org_id} was already provisioned in schema {t.schema}"
    tail = f"applied {', '.join(result.migrations)}" if result.migrations else "up to date"
    console.print(f"{head}: {tail}")


def deprovisioned(console: Console, result: Deprovisioned) -> None:
    t = result.tenant
    if result.archive:
        console.print(f"archived schema {t.schema} to {result.archive}")
    if result.dropped:
        console.print(f"dropped schema {t.schema} and the registry row of {t.org_id}")
        return
    console.print(f"would drop schema {t.schema} of {t.org_id}, with its tables:")
    for table in result.tables:
        console.print(f"  {table}")
    console.print("run again with --yes to drop them (--archive FILE to pg_dump them first)")


def dry_run(console: Console, run: RunResult) -> None:
    """Per schema, what a run would do: migration ids and their SQL."""
    verb = "apply" if run.direction == "apply" else "roll back"
    for result in run.schemas:
        if result.failure:
            console.print(f"-- {_name(result)}: {result.failure}")
        elif result.migrations:
            console.print(f"-- {_name(result)}: would {verb} {', '.join(result.migrations)}")
            for line in result.sql:
                console.print(f"   {line}")
    busy = sum(1 for r in run.schemas if r.migrations)
    console.print(
        f"dry run: {busy} of {len(run.schemas)} schemas would change; nothing was changed"
    )


def status(console: Console, report: Status, show_all: bool) -> None:
    m = report.master
    console.print(
        f"public: {m.state}, {len(m.applied)} applied, {len(m.pending)} pending"
        + (f" ({', '.join(m.pending)})" if m.pending else "")
    )
    for problem in m.drift:
        console.print(f"public: drift: {problem}")
    states: dict[str, int] = {}
    for t in report.tenants:
        key = t.standing.value
        states[key] = states.get(key, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none registered"
    console.print(f"tenants: {len(report.tenants)} ({summary}); head {report.tenant_head}")
    shown = [t for t in report.tenants if show_all or t.standing != Standing.AT_HEAD]
    if shown:
        table = Table("org id", "schema", "state", "applied", "pending")
        for column in table.columns:
            column.overflow = "fold"  # ids are useless cut short
        for t in shown:
            pending = ", ".join(t.pending + t.drift)
            table.add_row(t.org_id, t.schema, t.state, str(len(t.applied)), pending)
        console.print(table)


def status_json(report: Status) -> dict:
    def schema(s):
        return {
            "org_id": s.org_id,
            "schema": s.schema,
            "state": s.state,
            "applied": s.applied,
            "pending": s.pending,
            "unknown": s.unknown,
            "changed": s.changed,
        }

    return {
        "master": schema(report.master),
        "master_head": report.master_head,
        "tenant_head": report.tenant_head,
        "tenants": [schema(t) for t in report.tenants],
    }


def _name(result: SchemaResult) -> str:
    return f"{result.org_id} ({result.schema})" if result.org_id else result.schema
