"""How results look: rich tables and progress on a terminal, plain lines elsewhere, or JSON.

Output is made for thousands of tenants: a run prints a line for each tenant it changed or that
failed, never for one it left as it was (unless asked, Detail.ALL), and `status` groups tenants
before it lists any. Off a terminal nothing is wrapped or cut: every line stays whole, however
narrow COLUMNS says the screen is.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from .errors import few
from .inspection import SchemaStatus, Standing, Status
from .pool import RunResult
from .provisioning import Deprovisioned, Provisioned, Restored
from .results import Outcome, SchemaResult
from .waves import Wave

if TYPE_CHECKING:  # what only some commands draw is imported when they draw it (start-up)
    from rich.table import Table

    from .lint import Report as LintReport

#: Seconds between progress lines when stdout is not a terminal.
PLAIN_PROGRESS_EVERY = 5.0
#: Ways of being behind listed by `status` before the rest are counted in one line.
BEHIND_GROUPS = 5

VERB = {"apply": "applied", "rollback": "rolled back", "repair": "accepted"}
#: How `status` names a group of tenants, where the standing's own word does not read right.
GROUP = {Standing.DRIFT: "with drift", Standing.OLD_LAYOUT: "in the old layout"}
DOING = {"apply": "migrating", "rollback": "rolling back"}
#: Outcomes that leave a tenant at the head of the files (after a run that applies).
AT_HEAD = (Outcome.DONE, Outcome.UP_TO_DATE)
FAILED = (Outcome.FAILED, Outcome.SKIPPED, Outcome.UNKNOWN)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """A count and its noun in the number the count asks for: `1 job`, `2 jobs`."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


class Detail(Enum):
    """Which schemas a run's report gives a line of their own (the summary is always there)."""

    QUIET = "quiet"  # those that failed or were skipped
    CHANGES = "changes"  # also those the run changed
    ALL = "all"  # every schema: also those left as they were, or not started

    @property
    def outcomes(self) -> set[Outcome]:
        failed = {Outcome.FAILED, Outcome.SKIPPED, Outcome.UNKNOWN}
        if self is Detail.QUIET:
            return failed
        if self is Detail.CHANGES:
            return failed | {Outcome.DONE}
        return set(Outcome)


# -- runs ----------------------------------------------------------------------------------------


def run_header(console: Console, direction: str, work: int, total: int, jobs: int) -> None:
    """The line a tenant run starts with, once it knows how many tenants it has work for."""
    console.print(
        f"{DOING[direction]} {work} of {plural(total, 'tenant')} with {plural(jobs, 'job')}",
        style="dim",
    )


def run_summary(
    console: Console, run: RunResult, what: str, detail: Detail = Detail.CHANGES
) -> None:
    """A line for each schema `detail` asks for (those done or left as they were first, then
    those not done), then the one-line summary."""
    verb = VERB[run.direction]
    if what == "public":
        public = run.schemas[0]
        if public.migrations:
            console.print(f"public: {verb} {', '.join(public.migrations)}")
        elif not public.failure:
            console.print(
                "public: nothing to " + ("apply" if run.direction == "apply" else "roll back")
            )
        _failures(console, run, set(Outcome))
        return
    shown = detail.outcomes
    for result in run.schemas:
        if result.outcome in shown and result.outcome in (Outcome.DONE, Outcome.UP_TO_DATE):
            console.print(_done(result, run.direction))
    _failures(console, run, shown)
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
    if run.count(Outcome.UNKNOWN):
        parts.append(
            f"{run.count(Outcome.UNKNOWN)} unknown (the server went away as they committed)"
        )
    ran = f" (run {run.run})" if run.run else ""
    if not applying and run.ok and not run.count(Outcome.DONE):
        console.print(f"{what}: nothing to roll back")
    partly = [r for r in run.failed if r.migrations]  # committed some before failing
    if partly:
        done = plural(sum(len(r.migrations) for r in partly), "migration")
        failed = plural(len(partly), "failed schema")
        ran += f"; {failed} {VERB[run.direction]} {done} before failing"
    console.print(f"{what}: {', '.join(parts)} in {run.duration:.2f}s{ran}")
    if run.interrupted:
        console.print("interrupted: no new schema was started after the signal")


def _done(result: SchemaResult, direction: str) -> str:
    if result.migrations:
        migrations = ", ".join(result.migrations)
        return f"{_name(result)}: {VERB[direction]} {len(result.migrations)}: {migrations}"
    return f"{_name(result)}: " + ("up to date" if direction == "apply" else "nothing to roll back")


def _failures(console: Console, run: RunResult, shown: set[Outcome]) -> None:
    # Plain lines, not a table: ids and errors must survive narrow terminals and CI logs whole.
    for r in run.failed:
        if r.outcome in shown:
            console.print(failure(r, run.direction))


def failure(r: SchemaResult, direction: str = "apply") -> str:
    """A schema that was not done, in one line. A rollback that undid some migrations before it
    failed says which (they stay undone: see engine.py); a migrate's summary counts those."""
    migration = r.failure.migration if r.failure else None
    where = f" in {migration}" if migration else ""
    line = f"{r.outcome.value}: {_name(r)}{where}: {r.failure or 'the run stopped first'}"
    if r.migrations and direction == "rollback":
        line += f" (rolled back {len(r.migrations)} before it: {few(r.migrations)})"
    return line


def run_error(run: RunResult) -> str:
    """The one line for stderr when a run did not do everything."""
    if len(run.failed) == 1:
        return f"error: {failure(run.failed[0], run.direction)}"
    stopped = " (interrupted)" if run.interrupted else ""
    return f"error: {len(run.failed)} of {plural(len(run.schemas), 'schema')} not done{stopped}"


def run_json(run: RunResult) -> dict[str, Any]:
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
                # Failed after committing some migrations (those in "migrations").
                "partial": bool(r.failure and r.migrations),
                "failed_migration": r.failure.migration if r.failure else None,
                "error": str(r.failure) if r.failure else None,
                "sqlstate": r.failure.sqlstate if r.failure else None,
                "file": r.failure.path if r.failure else None,
                "line": r.failure.line if r.failure else None,
                "duration": round(r.duration, 4),
            }
            for r in run.schemas
        ],
        **({"waves": [wave_json(w) for w in run.waves]} if run.waves else {}),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


class _Bar:
    """Progress on a terminal: a bar, done of total, and the time left."""

    def __init__(self, console: Console, label: str):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=console,
            transient=True,
        )
        self.task = self.bar.add_task(label, total=None)

    def start(self, work: int, total: int) -> None:
        self.bar.update(self.task, total=work)

    def __call__(self, result: SchemaResult) -> None:
        self.bar.advance(self.task)


class _Lines:
    """Progress off a terminal: a line every PLAIN_PROGRESS_EVERY seconds, never a redraw."""

    def __init__(self, console: Console, label: str):
        self.console, self.label = console, label
        self.work: int | None = None
        self.done = 0
        self.started = self.last = time.monotonic()
        self.lock = threading.Lock()  # schemas end on the run's worker threads

    def start(self, work: int, total: int) -> None:
        self.work, self.started = work, time.monotonic()

    def __call__(self, result: SchemaResult) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if now - self.last < PLAIN_PROGRESS_EVERY:
                return
            self.last = now
            if self.work is None:
                self.console.print(f"{self.label}: {self.done} done")
                return
            left = (now - self.started) / self.done * (self.work - self.done)
            self.console.print(
                f"{self.label}: {self.done} of {self.work} done, about {_seconds(left)} left"
            )


#: What `progress` gives a run: its `on_start` (start) and its `on_result` (the call).
RunProgress = _Bar | _Lines


@contextmanager
def progress(console: Console, label: str) -> Iterator[RunProgress]:
    """Progress of a run: pass it as the run's `on_start` (which gives it the total once the run
    has scanned) and its `on_result` (called as each schema ends)."""
    if not console.is_terminal:
        yield _Lines(console, label)
        return
    shown = _Bar(console, label)
    with shown.bar:
        yield shown


def _seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def repaired(console: Console, run: RunResult) -> None:
    """What `repair` accepted (or, in a dry run, would accept), per schema, then a summary."""
    verb = "would accept" if run.dry_run else "accepted"
    changed = [r for r in run.schemas if r.migrations]
    for result in changed:
        console.print(f"{_name(result)}: {verb} {', '.join(result.migrations)}")
    for result in run.failed:
        console.print(failure(result))
    ran = f" (run {run.run})" if run.run else ""
    done = "nothing was changed" if run.dry_run else f"{len(changed)} changed{ran}"
    console.print(f"repair: {plural(len(changed), 'schema')} with edits to accept; {done}")


def restored(console: Console, result: Restored) -> None:
    t = result.tenant
    tables = ", ".join(result.tables) or "no tables"
    console.print(f"restored {t.org_id} in schema {t.schema} from {result.archive}: {tables}")


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
    for wave in run.waves:
        console.print(f"{_wave_name(wave, len(run.waves))}: {', '.join(wave.tenants)}")
    busy = sum(1 for r in run.schemas if r.migrations)
    console.print(
        f"dry run: {busy} of {plural(len(run.schemas), 'schema')} would change; nothing was changed"
    )


# -- status --------------------------------------------------------------------------------------


def status(console: Console, report: Status, listed: Sequence[SchemaStatus] | None = None) -> None:
    """Public's line, the tenants grouped by where they stand, then those `listed`, one each."""
    m = report.master
    console.print(
        f"public: {m.state}, {len(m.applied)} applied, {len(m.pending)} pending"
        + (f" ({', '.join(m.pending)})" if m.pending else "")
    )
    for problem in m.drift:
        console.print(f"public: drift: {problem}")
    for line in status_groups(report):
        console.print(line)
    if listed is None:
        if any(t.standing != Standing.AT_HEAD for t in report.tenants):
            console.print("(status --all lists every tenant, status --tenant ORG one)")
    elif console.is_terminal:
        console.print(_status_table(listed))
    else:
        for t in listed:
            console.print(_status_line(t))


def status_groups(report: Status) -> list[str]:
    """The tenants in a few lines: how many stand where, and the first few org ids of each."""
    tenants = report.tenants
    if not tenants:
        return ["tenants: none registered"]
    lines = [f"tenants: {len(tenants)} registered; head {report.tenant_head}"]
    by_standing: dict[Standing, list[SchemaStatus]] = {}
    for t in tenants:
        by_standing.setdefault(t.standing, []).append(t)
    for standing in Standing:
        group = by_standing.get(standing, [])
        if standing == Standing.BEHIND and group:
            lines += _behind(group)
        elif group:
            name = GROUP.get(standing, standing.value)
            lines.append(f"  {len(group)} {name}: {few([t.org_id or t.schema for t in group])}")
    return lines


def _behind(group: list[SchemaStatus]) -> list[str]:
    """Tenants behind, grouped by what they lack, the largest groups first."""
    lacking: dict[tuple[str, ...], list[str]] = {}
    for t in group:
        lacking.setdefault(tuple(t.pending), []).append(t.org_id or t.schema)
    ordered = sorted(lacking.items(), key=lambda item: -len(item[1]))
    lines = [
        f"  {len(orgs)} behind by {len(pending)} ({few(pending)}): {few(orgs)}"
        for pending, orgs in ordered[:BEHIND_GROUPS]
    ]
    rest = sum(len(orgs) for _, orgs in ordered[BEHIND_GROUPS:])
    if rest:
        ways = plural(len(ordered) - BEHIND_GROUPS, "other way", "other ways")
        lines.append(f"  {rest} behind in {ways}")
    return lines


def _status_line(t: SchemaStatus) -> str:
    parts = [t.state, f"{len(t.applied)} applied"]
    if t.node:
        parts.append(f"on {t.node}")
    if t.pending:
        parts.append(f"pending {', '.join(t.pending)}")
    parts += [f"drift: {problem}" for problem in t.drift]
    if t.unreadable:
        parts.append(t.unreadable)
    parts += t.damage
    return f"{t.org_id} ({t.schema}): {'; '.join(parts)}"


def _status_table(listed: Sequence[SchemaStatus]) -> Table:
    from rich.table import Table

    placed = any(t.node for t in listed)  # on Citus: the worker holding each
    table = Table("org id", "schema", *(["node"] if placed else []), "state", "applied", "pending")
    for column in table.columns[: 4 if placed else 3]:
        column.no_wrap = True  # an id cut in two is no id: the pending list gives way
    table.columns[-2].justify = "right"
    for t in listed:
        pending = ", ".join(
            t.pending + t.drift + ([t.unreadable] if t.unreadable else []) + t.damage
        )
        node = [t.node or ""] if placed else []
        table.add_row(t.org_id, t.schema, *node, t.state, str(len(t.applied)), pending)
    return table


def status_json(report: Status) -> dict[str, Any]:
    def schema(s: SchemaStatus) -> dict[str, Any]:
        return {
            "org_id": s.org_id,
            "schema": s.schema,
            "state": s.state,
            "applied": s.applied,
            "pending": s.pending,
            "unknown": s.unknown,
            "changed": s.changed,
            "damage": s.damage,
            "node": s.node,
        }

    return {
        "master": schema(report.master),
        "master_head": report.master_head,
        "tenant_head": report.tenant_head,
        "tenants": [schema(t) for t in report.tenants],
    }


def _name(result: SchemaResult) -> str:
    return f"{result.org_id} ({result.schema})" if result.org_id else result.schema


# -- waves ---------------------------------------------------------------------------------------


def wave_done(console: Console, wave: Wave, waves: int) -> None:
    """The line a wave ends with, and its check's if one ran."""
    done = sum(1 for r in wave.results if r.outcome == Outcome.DONE)
    console.print(
        f"{_wave_name(wave, waves)}: {done} migrated, {len(_failures_of(wave))} failed "
        f"in {wave.duration:.2f}s"
    )
    if wave.check is not None:
        console.print(f"wave {wave.number}: {wave.check}")


def waves_summary(console: Console, run: RunResult) -> None:
    """After a run in waves: which waves ran, why it stopped, and which tenants are at head."""
    started = [w for w in run.waves if w.started]
    line = f"waves: {len(started)} of {len(run.waves)} ran"
    if len(started) < len(run.waves):
        last = started[-1]
        if last.not_done:
            why = f"{plural(len(last.not_done), 'tenant')} not done"
        else:
            why = str(last.check) if last.check and not last.check.ok else "interrupted"
        line += f"; stopped after wave {last.number}: {why}"
    console.print(line)
    at_head = [r.org_id or r.schema for r in run.schemas if r.outcome in AT_HEAD]
    listed = f" ({few(at_head)})" if at_head else ""
    console.print(f"at head: {len(at_head)} of {plural(len(run.schemas), 'tenant')}{listed}")


def wave_json(wave: Wave) -> dict[str, Any]:
    check = None
    if wave.check is not None:
        check = {
            "command": wave.check.command,
            "exit_code": wave.check.exit_code,
            "error": wave.check.error,
        }
    return {
        "wave": wave.number,
        "size": wave.size,
        "started": wave.started,
        "tenants": wave.tenants,
        "duration": round(wave.duration, 4),
        "failures": [
            {
                "org_id": r.org_id,
                "schema": r.schema,
                "status": r.outcome.value,
                "error": str(r.failure) if r.failure else None,
            }
            for r in _failures_of(wave)
        ],
        "check": check,
    }


def _failures_of(wave: Wave) -> list[SchemaResult]:
    """Its tenants that failed or were skipped (not those a stop left not started)."""
    return [r for r in wave.results if r.outcome in FAILED]


def _wave_name(wave: Wave, waves: int) -> str:
    canary = ", the canary" if wave.number == 1 and waves > 1 else ""
    tenants = plural(len(wave.results), "tenant")
    return f"wave {wave.number} of {waves} ({wave.size}: {tenants}{canary})"


# -- lint ----------------------------------------------------------------------------------------


def lint(console: Console, report: LintReport) -> None:
    """Each finding with its weight across the fleet and its help, then one summary line."""
    for finding in report.findings:
        console.print(str(finding))
        if finding.weight is not None:
            console.print(f"  {finding.weight}")
        if finding.help:
            console.print(f"  help: {finding.help}")
    if report.python:
        shown = ", ".join(p.name for p in report.python)
        console.print(f"not linted (Python migrations): {shown}")
    off = f" (rules off: {', '.join(report.rules_off)})" if report.rules_off else ""
    if not report.files:
        console.print("lint: no SQL migration file to lint" + off)
        return
    linted = plural(len(report.files), "file")
    if report.ok:
        console.print(f"lint: no findings in {linted}{off}")
        return
    files = len({f.path for f in report.findings})
    console.print(f"lint: {plural(len(report.findings), 'finding')} in {files} of {linted}{off}")
