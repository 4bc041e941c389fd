"""What a run would do, without doing it: the SQL of a migration, and drift between files and
what a schema recorded when it applied them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from yoyo.migrations import Migration, MigrationList, read_sql_migration

from .log import AppliedMigration, migration_checksum


def migration_sql(migration: Migration, direction: str) -> list[str]:
    """The statements a migration runs in `direction` ("apply" or "rollback")."""
    if not migration.path.endswith(".sql"):
        return [f"-- Python migration {Path(migration.path).name}: runs its steps' code"]
    path = Path(migration.path)
    if direction == "rollback":
        path = path.with_suffix(".rollback.sql")
    return read_sql_migration(str(path))[2]


def drift(applied: Sequence[AppliedMigration], migrations: MigrationList) -> list[str]:
    """Applied migrations whose file changed since, or no longer exists."""
    files = {m.hash: m for m in migrations}
    problems = []
    for row in applied:
        migration = files.get(row.migration_hash)
        if migration is None:
            problems.append(f"{row.migration_id} was applied but its file is gone")
        elif row.checksum and row.checksum != migration_checksum(migration):
            problems.append(f"{row.migration_id} changed since it was applied")
    return problems
