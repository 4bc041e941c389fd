"""What to do to a schema, given its log: the migrations pending, the ones a rollback undoes,
drift between files and what a schema recorded, and (for dry runs) their SQL.

A plan is asked by the engine, under the schema's lock, which migrations to run next; it is made
per schema and remembers what it chose, so a schema's work that takes several transactions (a
non-transactional migration, a retry) stays one batch, one rollback target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar
from weakref import WeakKeyDictionary

from yoyo.migrations import Migration, MigrationList, topological_sort

from .errors import Drift, MigrationsMissing, UsageError, WouldEmpty, few
from .log import ACCEPT, AppliedMigration, Log, migration_checksum

T = TypeVar("T")


class Plan(Protocol):
    """What the engine asks of a plan: which migrations to run next (for `operation`), the batch
    their log rows record, and the hooks that follow them (see engine.migrate_schema)."""

    operation: str
    batch: int | None
    hooks: Sequence[Migration]

    def choose(self, log: Log) -> list[Migration]: ...


class ApplyPlan:
    """Apply what is pending, as one batch; refuse a schema with drift unless allowed."""

    operation = "apply"

    def __init__(
        self,
        schema: str,
        migrations: MigrationList,
        allow_drift: bool = False,
        alike: ByList[Pending] | None = None,
    ) -> None:
        self.schema, self.migrations, self.allow_drift = schema, migrations, allow_drift
        self.hooks: Sequence[Migration] = migrations.post_apply
        self.batch: int | None = None
        #: The log it was last asked about, and its answer: a run asks once when it scans and
        #: again when the engine starts on the same log.
        self._chose: tuple[Log, list[Migration]] | None = None
        #: Answers by applied list, shared by the plans of one run (see ByList).
        self._alike = alike or pending_by_list(migrations, allow_drift)

    def choose(self, log: Log) -> list[Migration]:
        if self._chose is not None and self._chose[0] is log:
            return self._chose[1]
        problems, todo = self._alike(log.applied)
        if problems:
            raise Drift(self.schema, problems)
        if self.batch is None:  # one batch for the whole run, even over several transactions
            self.batch = log.last_batch + 1
        self._chose = (log, todo)
        return todo


@dataclass(frozen=True)
class RollbackTarget:
    """Which applied migrations to undo: what one run applied (`run`), the last N (`steps`),
    all after one (`to`), or, given none, the schema's last batch (logs from before runs)."""

    steps: int | None = None
    to: str | None = None
    run: int | None = None
    #: Undo a schema's base tables (its first batch), or the tenant registry, if asked to.
    yes: bool = False
    #: Chosen by walking back one deploy (no target given): where what is left of a schema is
    #: its base tables, there is nothing to roll back, rather than a refusal.
    deploy: bool = False

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.steps, self.to, self.run)) > 1:
            raise UsageError("give one of --steps, --to and --run")
        if self.steps is not None and self.steps < 1:
            raise UsageError("--steps must be at least 1")

    def select(self, applied: Sequence[AppliedMigration]) -> list[AppliedMigration]:
        """The rows to roll back, newest first."""
        if self.to is not None:
            ids = [row.migration_id for row in applied]
            if self.to not in ids:
                raise UsageError(f"migration {self.to} is not applied")
            chosen = applied[ids.index(self.to) + 1 :]
        elif self.steps is not None:
            chosen = applied[-self.steps :]
        elif self.run is not None:
            chosen = [row for row in applied if row.run == self.run]
        else:
            last = max((row.batch or 0 for row in applied), default=None)
            chosen = [row for row in applied if (row.batch or 0) == last]
        return list(reversed(chosen))


class RollbackPlan:
    """Undo the target's migrations, newest first; the target is chosen once, by the first
    transaction, and later ones undo what of it is still applied.

    Undoing a schema's first batch (a tenant's base tables, from provisioning) is refused
    unless the target says yes, and so is whatever `protect` objects to (for public: dropping
    the registry while tenants are registered).
    """

    operation = "rollback"
    hooks: Sequence[Migration] = ()
    batch: int | None = None

    def __init__(
        self,
        schema: str,
        migrations: MigrationList,
        target: RollbackTarget,
        protect: Callable[[list[Migration]], str | None] = lambda todo: None,
    ):
        self.schema, self.target, self.protect = schema, target, protect
        self.files = {m.hash: m for m in migrations}
        self.chosen: list[str] | None = None

    def choose(self, log: Log) -> list[Migration]:
        if self.chosen is None:
            rows = self.target.select(log.applied)
            if missing := [r.migration_id for r in rows if r.migration_hash not in self.files]:
                raise MigrationsMissing(
                    f"cannot roll back {few(missing)} in {self.schema}: no such file"
                )
            if self.target.deploy and not self.target.yes and self._base_only(rows, log):
                rows = []  # only provisioning is left: walking back deploys stops there
            if not self.target.yes:
                self._refuse(rows, log.applied)
            self.chosen = [row.migration_hash for row in rows]
        still_applied = {row.migration_hash for row in log.applied}
        return [self.files[h] for h in self.chosen if h in still_applied]

    def _base_only(self, rows: list[AppliedMigration], log: Log) -> bool:
        return self.schema != "public" and bool(_base(rows, log.applied))

    def _refuse(self, rows: list[AppliedMigration], applied: list[AppliedMigration]) -> None:
        base = _base(rows, applied)
        if base and self.schema != "public":
            raise WouldEmpty(
                f"rolling back {self.schema} would undo its base tables (its first batch: "
                f"{few(base)}): pass --yes to do it anyway"
            )
        if reason := self.protect([self.files[row.migration_hash] for row in rows]):
            raise WouldEmpty(f"{reason}: pass --yes to do it anyway")


def _base(rows: list[AppliedMigration], applied: list[AppliedMigration]) -> list[str]:
    """Those of `rows` in the schema's first batch: its base tables, from provisioning."""
    first = min((row.batch or 0 for row in applied), default=None)
    return [row.migration_id for row in rows if (row.batch or 0) == first]


#: What is pending (and the drift) for each distinct log a run meets, per folder of migrations:
#: thousands of tenants share a handful of logs, and sorting them is the costly part.
_worked_out: WeakKeyDictionary[MigrationList, dict] = WeakKeyDictionary()


def _pending(
    migrations: MigrationList, applied: tuple[AppliedMigration, ...], allow_drift: bool
) -> tuple[list[str], list[Migration]]:
    known = _worked_out.setdefault(migrations, {})
    key = (allow_drift, tuple((row.migration_id, row.checksum) for row in applied))
    if key not in known:
        problems = [] if allow_drift else drift(applied, migrations)
        known[key] = (problems, [] if problems else pending(migrations, applied))
    return known[key]


class ByList(Generic[T]):
    """An answer about an applied list, worked out once per list object: the scan gives every
    tenant at head, and every tenant of one group, the same list (see pool.scan), and at 100,000
    tenants even making each one's key for an answer by content took half a second. It keeps
    the lists it answered (so that an id stays their own): make one per run."""

    def __init__(self, answer: Callable[[list[AppliedMigration]], T]) -> None:
        self._answer = answer
        self._found: dict[int, tuple[list[AppliedMigration], T]] = {}

    def __call__(self, applied: list[AppliedMigration]) -> T:
        kept = self._found.get(id(applied))
        if kept is not None and kept[0] is applied:
            return kept[1]
        answer = self._answer(applied)
        self._found[id(applied)] = (applied, answer)
        return answer


#: What is pending and the drift, for one applied list.
Pending = tuple[list[str], list[Migration]]


def pending_by_list(migrations: MigrationList, allow_drift: bool) -> ByList[Pending]:
    """What is pending for each applied list a run meets (see ByList)."""
    return ByList(lambda applied: _pending(migrations, tuple(applied), allow_drift))


def pending(migrations: MigrationList, applied: Sequence[AppliedMigration]) -> list[Migration]:
    """The migrations not in `applied`, in the order yoyo would apply them."""
    done = {row.migration_hash for row in applied}
    return list(topological_sort(m for m in migrations if m.hash not in done))


class Drifted(NamedTuple):
    """An applied migration whose file changed since, or is gone."""

    migration_id: str
    file: Migration | None  # as it is now; None: gone

    def __str__(self) -> str:
        return drift_words(self.migration_id, gone=self.file is None)


def drift_words(migration_id: str, gone: bool) -> str:
    if gone:
        return f"{migration_id} was applied but its file is gone"
    return f"{migration_id} changed since it was applied"


def drifted(applied: Sequence[AppliedMigration], migrations: MigrationList) -> list[Drifted]:
    """Applied migrations whose file changed since, or no longer exists: drift, the one way it
    is worked out (migrate refuses it, status shows it, repair accepts it)."""
    files = {m.hash: m for m in migrations}
    found = []
    for row in applied:
        migration = files.get(row.migration_hash)
        if migration is None:
            found.append(Drifted(row.migration_id, None))
        elif row.checksum and row.checksum != migration_checksum(migration):
            found.append(Drifted(row.migration_id, migration))
    return found


def drift(applied: Sequence[AppliedMigration], migrations: MigrationList) -> list[str]:
    """Drift, in words."""
    return [str(problem) for problem in drifted(applied, migrations)]


def migration_sql(migration: Migration, operation: str) -> list[str]:
    """The statements a migration runs for `operation` ("apply" or "rollback")."""
    if not migration.is_raw_sql():
        return [f"-- Python migration {migration.path}: runs its steps' code"]
    script = migration.rollback_script if operation == "rollback" else migration.script
    if script is None:
        return []
    shown = []
    for start, text in script.statements():
        data = script.copy_data(start)
        shown.append(f"{text};" if data is None else f"{text};\n{data}\\.")
    return shown


class RepairPlan:
    """Accept the files of applied migrations as they are now: for each one that changed since
    it was applied, a log row recording its current checksum (never an update of the old row).
    An applied migration whose file is gone is an error, or, if `forget_missing`, unmarked."""

    def __init__(
        self,
        schema: str,
        migrations: MigrationList,
        only: str | None = None,
        forget_missing: bool = False,
    ):
        self.schema, self.only, self.forget_missing = schema, only, forget_missing
        self.migrations = migrations

    def choose(self, log: Log) -> list[tuple[Migration, str, None]]:
        marks, missing = [], []
        for problem in drifted(log.applied, self.migrations):
            if self.only is not None and problem.migration_id != self.only:
                continue
            if problem.file is not None:
                marks.append((problem.file, ACCEPT, None))
            elif self.forget_missing:
                marks.append((Migration(problem.migration_id, None, None), "unmark", None))
            else:
                missing.append(problem.migration_id)
        if missing:
            raise MigrationsMissing(
                f"{self.schema}: {', '.join(missing)} applied but the file is gone: restore it, "
                "or pass --forget-missing to forget it was applied"
            )
        return marks
