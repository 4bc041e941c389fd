"""Deploys in waves: `migrate-tenants --waves 1,5%,25%,all` migrates one tenant first (the
canary), alone, and each later wave only once every tenant before it came through (and the
app's own check, `--wave-check`, passed).

Sizes are cumulative: `1` is one tenant, `5%` up to 5% of all tenants in total, `all` the rest.
Tenants go in a stable order, the registry's, with the project's `canary-tenants` first, so a
re-run picks the same canary. The waves are one run (one number in public.yoyo_tenants_runs):
`rollback-tenants` undoes every wave it applied. A stopped run leaves the later waves not
started; running it again is a new run, which goes on with the tenants not at head.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from psycopg2.extensions import cursor as Cursor

from . import registry
from .errors import ConfigError, UsageError
from .pool import NOT_DONE, RunResult, stop_on_signals
from .registry import Tenant
from .results import Direction, SchemaResult
from .settings import Settings

#: What a --wave-check command is told: the wave's number, its tenants' org ids and schemas
#: (separated by spaces), and the run's number.
WAVE_ENV = "YOYO_TENANTS_WAVE"
TENANTS_ENV = "YOYO_TENANTS_WAVE_TENANTS"
SCHEMAS_ENV = "YOYO_TENANTS_WAVE_SCHEMAS"
RUN_ENV = "YOYO_TENANTS_RUN"
ALL = "all"
TABLE = "pyproject.toml [tool.yoyo-tenants]"


@dataclass(frozen=True)
class Size:
    """How many tenants the waves up to this one hold in all: `count` tenants, `percent` of
    all tenants, or (neither) all of them."""

    text: str  # as written: "1", "5%", "all"
    count: int | None = None
    percent: float | None = None

    def reach(self, fleet: int) -> int:
        if self.count is not None:
            return min(self.count, fleet)
        if self.percent is not None:
            return int(fleet * self.percent / 100)  # "up to": 5% of 10 tenants is none
        return fleet


def parse(text: str) -> tuple[Size, ...]:
    """The sizes of `--waves`: comma-separated tenant counts and percentages, growing, ending
    with `all`. UsageError otherwise."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() == ALL:
            sizes.append(Size(ALL))
        elif part.endswith("%"):
            sizes.append(Size(part, percent=_number(part[:-1], text, float)))
        else:
            sizes.append(Size(part, count=_number(part, text, int)))
    if sizes[-1].text != ALL or any(s.text == ALL for s in sizes[:-1]):
        raise UsageError(f"--waves {text}: the last wave, and only the last, is 'all'")
    for kind in ("count", "percent"):
        given = [getattr(s, kind) for s in sizes if getattr(s, kind) is not None]
        if given != sorted(set(given)):  # each larger than the one before
            raise UsageError(f"--waves {text}: sizes are cumulative, so each is larger")
    if any(s.percent is not None and not 0 < s.percent < 100 for s in sizes):
        raise UsageError(f"--waves {text}: a percentage is above 0% and below 100% ('all')")
    return tuple(sizes)


Number = TypeVar("Number", int, float)


def _number(value: str, text: str, kind: Callable[[str], Number]) -> Number:
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise UsageError(
            f"--waves {text}: expected tenant counts and percentages, e.g. 1,5%,25%,all"
        )
    return number


@dataclass
class Check:
    """What `--wave-check` said after a wave: its exit code, or why it could not start."""

    command: str
    exit_code: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def __str__(self) -> str:
        if self.error:
            return f"the check could not start: {self.error}"
        return f"the check exited {self.exit_code}"


@dataclass
class Wave:
    """One wave of a run: its tenants' results (shared with the run's), once it ran."""

    number: int
    size: str
    results: list[SchemaResult]
    started: bool = False
    duration: float = 0.0
    check: Check | None = None

    @property
    def not_done(self) -> list[SchemaResult]:
        """Its tenants that failed, were skipped, or were not started (after --fail-fast)."""
        return [r for r in self.results if r.outcome in NOT_DONE]

    @property
    def ok(self) -> bool:
        return self.started and not self.not_done and (self.check is None or self.check.ok)

    @property
    def tenants(self) -> list[str]:
        return [r.org_id or r.schema for r in self.results]


OnWave = Callable[[Wave, int], None]
#: Runs the engine on some schemas of the run (run_schemas with the run's other arguments).
RunWave = Callable[[list[SchemaResult]], RunResult]


@dataclass
class Rollout:
    """How a run goes out in waves: their sizes, the canaries, and what happens between."""

    sizes: tuple[Size, ...]
    canaries: tuple[str, ...] | str | None = None  # org ids, or a query (Settings.canary_tenants)
    pause: float = 0.0
    check: str | None = None
    root: Path = field(default_factory=Path.cwd)  # where the check runs
    on_wave: OnWave | None = None  # told of each wave as it ends, and how many there are

    @classmethod
    def of(
        cls,
        settings: Settings,
        waves: str,
        pause: float = 0.0,
        check: str | None = None,
        on_wave: OnWave | None = None,
    ) -> Rollout:
        """The rollout `--waves`, `--wave-pause` and `--wave-check` ask for; UsageError if
        they are wrong."""
        if pause < 0:
            raise UsageError("--wave-pause must be a number of seconds")
        if check is not None and not check.strip():
            raise UsageError("--wave-check is empty")
        return cls(parse(waves), settings.canary_tenants, pause, check, settings.root, on_wave)

    def order(self, cursor: Cursor, tenants: list[Tenant], query: str | None) -> list[Tenant]:
        """`tenants` with the canaries first (in the order they are named), the rest in theirs.
        ConfigError if a canary is not one of them: the run would start somewhere unplanned."""
        if self.canaries is None:
            return tenants
        if isinstance(self.canaries, str):  # read, not trusted: as tenants-query is
            source = f"{TABLE} canary-tenants"
            rows = registry.read_query(cursor, self.canaries, source)
            named = [t.schema for t in registry.check_tenant_rows(rows, source)]
            key, what = (lambda t: t.schema), "its query returns schema"
        else:
            named, key, what = list(self.canaries), (lambda t: t.org_id), "it names"
        by_key = {key(t): t for t in tenants}
        unknown = [name for name in named if name not in by_key]
        if unknown:
            of = "" if query is None else " of tenants-query"
            raise ConfigError(
                f"{TABLE} canary-tenants: {what} {unknown[0]}, which is not a tenant{of}"
            )
        first = set(named)
        return [by_key[name] for name in dict.fromkeys(named)] + [
            t for t in tenants if key(t) not in first
        ]

    def split(self, work: Sequence[SchemaResult], fleet: int) -> list[Wave]:
        """The waves of `work` (the tenants with something to do, in order); `fleet`, the
        number of all tenants, is what percentages are of. A wave that would add no tenant
        is left out."""
        waves: list[Wave] = []
        start = 0
        for size in self.sizes:
            end = len(work) if size.text == ALL else min(len(work), max(start, size.reach(fleet)))
            if end > start:
                waves.append(Wave(len(waves) + 1, size.text, list(work[start:end])))
            start = end
        return waves

    def run(self, waves: list[Wave], run_wave: RunWave, run: int | None) -> RunResult:
        """Run `waves` one after the other; stop at the first with a failure, or whose check
        failed, and leave the rest not started."""
        done = RunResult(Direction.APPLY)
        with stop_on_signals() as stop:  # between waves: in a wave, run_schemas has its own
            for wave in waves:
                wave.started = True
                result = run_wave(wave.results)
                done.jobs, done.direction = result.jobs, result.direction
                wave.duration = result.duration
                done.interrupted |= result.interrupted
                more = wave is not waves[-1] and not wave.not_done and not result.interrupted
                if more and self.pause:
                    stop.wait(self.pause)
                if more and self.check and not stop.is_set():
                    wave.check = self._check(self.check, wave, run)
                done.interrupted |= stop.signalled
                if self.on_wave:
                    self.on_wave(wave, len(waves))
                if not wave.ok or done.interrupted:
                    break
        for wave in waves:
            if not wave.started:
                for schema in wave.results:
                    schema.skipped = True
        done.schemas = [r for wave in waves for r in wave.results]
        done.waves = waves
        return done

    def _check(self, command: str, wave: Wave, run: int | None) -> Check:
        """Run the app's check (`command`) on the wave just done, with its tenants in the
        environment."""
        env = {
            **os.environ,
            WAVE_ENV: str(wave.number),
            TENANTS_ENV: " ".join(wave.tenants),
            SCHEMAS_ENV: " ".join(r.schema for r in wave.results),
            RUN_ENV: "" if run is None else str(run),
        }
        try:
            done = subprocess.run(command, shell=True, cwd=self.root, env=env)
        except OSError as exc:  # the environment is too large for the system, say
            return Check(command, None, exc.strerror)
        return Check(command, done.returncode)
