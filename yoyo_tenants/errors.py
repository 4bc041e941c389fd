"""The errors a user can act on.

Library code raises these; only the task layer turns them into one line on stderr and an exit code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lint import Finding


class TenantsError(Exception):
    """Base of every error yoyo-tenants reports to a user."""

    exit_code = 1


class UsageError(TenantsError):
    """The command line or an argument is wrong (bad org id, bad migration name, ...)."""

    exit_code = 2


class ConfigError(TenantsError):
    """A DB_* setting or DATABASE_URL is wrong or incomplete."""

    exit_code = 2


class ConnectionFailed(TenantsError):
    """The database could not be reached or refused us."""


class NotReady(TenantsError):
    """The database lacks something a command needs (master migrations, an extension)."""


class UnknownTenant(TenantsError):
    """No tenant is registered for that org id."""


class SchemaCollision(TenantsError):
    """Two org ids hash to the same tenant schema name."""


class MigrationFailed(TenantsError):
    """A migration failed in a schema, and was rolled back; `failure` says where and why."""

    def __init__(self, schema: str, failure: Failure):
        self.schema, self.failure = schema, failure
        self.migration_id = failure.migration or "-"
        super().__init__(f"migration {self.migration_id} failed in schema {schema}: {failure}")


class Drift(TenantsError):
    """Applied migrations' files changed or vanished since: the schema is left alone."""

    def __init__(self, schema: str, problems: list[str]):
        self.problems = problems
        shown = "; ".join(problems[:FEW]) + (
            f"; and {len(problems) - FEW} more" if len(problems) > FEW else ""
        )
        super().__init__(f"drift in {schema}: {shown} (fix the files, or pass --allow-drift)")


class LogDamaged(TenantsError):
    """A schema's log holds what no run writes: it is no evidence of what the schema holds, so
    the schema is left as it is (verify names what is wrong)."""

    def __init__(self, schema: str, damage: list[str]):
        self.schema, self.damage = schema, damage
        super().__init__(
            f"the log of {schema} is damaged: {'; '.join(damage)} (left as it is: see verify)"
        )


class WouldEmpty(TenantsError):
    """A rollback would undo what makes a schema usable: refused unless asked for (--yes)."""


class UnsafeMigration(TenantsError):
    """A migration file holds a statement that may not run where it would (see sqlfiles.py).

    Nothing has been written when this is raised: files are checked before any schema is
    touched.
    """

    exit_code = 2

    def __init__(self, path: str | Path, line: int | None, problem: str):
        self.path, self.line, self.problem = path, line, problem
        where = f"{_shown(path)} line {line}" if line else _shown(path)
        super().__init__(f"{where}: {problem}")


#: Names (org ids, migration ids) a message gives before counting the rest.
FEW = 3


def few(items: Sequence[str], shown: int = FEW) -> str:
    """The first `shown` of many names, and how many more there are: `a, b, c and 7 more`.
    A message stays one readable line whatever the count."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


def _shown(path: str | Path) -> str:
    """A path as a user would type it: relative to the working directory when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class LintFailed(TenantsError):
    """squawk reported findings in migration files a run would apply (see lint.py)."""

    def __init__(self, message: str, findings: list[Finding]):
        self.findings = findings
        super().__init__(message)


class LintUnavailable(TenantsError):
    """squawk, the linter, is not installed or could not run as configured."""

    exit_code = 2


class MigrationsMissing(TenantsError):
    """A schema has applied migrations whose files no longer exist."""


class LockBusy(TenantsError):
    """Another run held a schema's lock for longer than we were willing to wait."""


@dataclass(frozen=True)
class Failure:
    """Why a schema's work stopped, as a value: rendered to text only at the edge."""

    message: str  # PostgreSQL's words (first line) and our advice, or ours alone
    migration: str | None = None  # the migration that was running, if one was
    sqlstate: str | None = None
    path: str | None = None  # the file holding the failing statement, with its line
    line: int | None = None

    def at(self, path: str, line: int) -> Failure:
        return replace(self, path=path, line=line)

    def with_note(self, note: str) -> Failure:
        return replace(self, message=f"{self.message} ({note})")

    def __str__(self) -> str:
        if self.path and self.line:
            return f"{_shown(self.path)} line {self.line}: {self.message}"
        return self.message
