"""What a run is told (RunOptions) and what it reports of each schema (SchemaResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import Failure
from .log import RowValues

if TYPE_CHECKING:
    from .settings import Settings


class Direction(str, Enum):
    """What a run does to the schemas it changes (the values are the words reports use)."""

    APPLY = "apply"
    ROLLBACK = "rollback"
    REPAIR = "repair"


class Command(str, Enum):
    """The commands that are runs, by the names their runs are recorded under (see runs.py)."""

    MIGRATE_MASTER = "migrate-master"
    ROLLBACK_MASTER = "rollback-master"
    MIGRATE_TENANTS = "migrate-tenants"
    ROLLBACK_TENANTS = "rollback-tenants"
    REPAIR = "repair"

    @property
    def direction(self) -> Direction:
        return _DIRECTIONS[self]


_DIRECTIONS = {
    Command.MIGRATE_MASTER: Direction.APPLY,
    Command.MIGRATE_TENANTS: Direction.APPLY,
    Command.ROLLBACK_MASTER: Direction.ROLLBACK,
    Command.ROLLBACK_TENANTS: Direction.ROLLBACK,
    Command.REPAIR: Direction.REPAIR,
}


@dataclass(frozen=True)
class RunOptions:
    """How a run treats locks, timeouts, drift, failures and the server's messages."""

    #: Seconds to wait for a schema another run holds; then the schema is skipped.
    lock_wait: float | None = None
    #: Seconds a migration statement may wait for a table lock before it gives up (0: forever).
    #: Short, so that an ALTER queued behind a long app transaction does not queue the app's
    #: own traffic behind it.
    lock_timeout: float = 5.0
    #: Seconds a migration statement may run (0: no limit).
    statement_timeout: float = 0.0
    #: How often a migration that hit lock_timeout is retried, with doubling pauses.
    retries: int = 2
    retry_pause: float = 0.5
    #: Apply to schemas whose applied migrations' files changed or vanished.
    allow_drift: bool = False
    #: Citus mode: every migration statement and savepoint in a message of its own (Citus
    #: forwards a DDL statement's whole message to its workers), the guard checked on the
    #: coordinator, and logs made movable online (citus_schema_move needs a replica identity).
    citus: bool = False
    #: The run the log rows name (see runs.py); None for provisioning.
    run: int | None = None
    #: Keep public.yoyo_tenants_heads up to date with each log written (see logindex.py).
    heads: bool = False
    #: Drop invalid indexes (left by an interrupted CREATE INDEX CONCURRENTLY) before running a
    #: non-transactional migration, which rebuilds them.
    repair_invalid_indexes: bool = False
    #: The log rows' values, quoted once for all the schemas of the run.
    rows: RowValues = field(default_factory=RowValues, compare=False, repr=False)

    @property
    def wait(self) -> float:
        return 60.0 if self.lock_wait is None else self.lock_wait

    @classmethod
    def of(cls, settings: Settings, **options: Any) -> RunOptions:
        """The settings' timeouts, overridden by `options` (fields; None: not given)."""
        given = {key: value for key, value in options.items() if value is not None}
        given.setdefault("lock_timeout", settings.lock_timeout)
        given.setdefault("statement_timeout", settings.statement_timeout)
        return cls(**given)


class Outcome(str, Enum):
    """What a run did to a schema (the values are the words reports use)."""

    DONE = "done"
    UP_TO_DATE = "up to date"
    FAILED = "failed"
    SKIPPED = "skipped"  # locked by another run
    NOT_STARTED = "not started"  # the run stopped first
    UNKNOWN = "unknown"  # the connection broke as it committed, and no log could be read since


@dataclass
class SchemaResult:
    """What one run did (or, in a dry run, would do) to one schema."""

    schema: str
    org_id: str | None = None
    migrations: list[str] = field(default_factory=list)  # applied or rolled back, in order
    failure: Failure | None = None
    skipped: bool = False  # locked by another run, or not started because the run stopped
    duration: float = 0.0
    sql: list[str] = field(default_factory=list)  # dry runs: what would be executed
    retries: int = 0
    #: The connection broke while the schema's COMMIT was on its way: what it would have made.
    in_doubt: ConnectionLost | None = None

    @property
    def outcome(self) -> Outcome:
        if self.in_doubt:
            return Outcome.UNKNOWN
        if self.failure and self.skipped:
            return Outcome.SKIPPED
        if self.failure:
            return Outcome.FAILED
        if self.skipped:
            return Outcome.NOT_STARTED
        return Outcome.DONE if self.migrations else Outcome.UP_TO_DATE

    def fail(self, message: str, **fields: Any) -> None:
        self.failure = Failure(message, **fields)


class ConnectionLost(Exception):
    """The connection broke during a message. Unless that message carried the COMMIT, nothing
    of the transaction stays; if it did, whether it landed is for the log to tell: it did if
    the log has reached `position`, with `migrations` applied (or rolled back)."""

    def __init__(
        self, reason: str, committing: bool, start: int, position: int, migrations: list[str]
    ) -> None:
        super().__init__(reason)
        self.reason, self.committing = reason, committing
        self.start, self.position, self.migrations = start, position, migrations
