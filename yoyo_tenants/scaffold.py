"""New migration files, named so that yoyo applies them in the order they were made."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from yoyo.migrations import heads, read_migrations

from .errors import UsageError

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MAX_NAME_LENGTH = 80

PY_TEMPLATE = '''"""
{name}
"""

from yoyo import step

__depends__ = {{{depends}}}

steps = [
    step(
        "",  # apply
        "",  # rollback
    )
]
'''
SQL_TEMPLATE = "-- {name}\n-- depends: {depends}\n\n"
ROLLBACK_TEMPLATE = "-- undo {name}: statements in the order they should run\n\n"


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME.fullmatch(name):
        shown = name if len(name) <= MAX_NAME_LENGTH else name[:MAX_NAME_LENGTH] + "..."
        raise UsageError(
            f"invalid migration name {shown!r}: use letters, digits and underscores, "
            f"starting with a letter (at most {MAX_NAME_LENGTH} characters), e.g. add_column"
        )
    return name


def new_migration(
    directory: Path, name: str, py: bool = False, now: datetime | None = None
) -> list[Path]:
    """Create a migration (and, for SQL, its ``.rollback.sql`` twin); return the paths made.

    The id is a UTC timestamp and the name (``20261125103000_add_column``); like ``yoyo new`` the
    new migration depends on the current heads.
    """
    check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    existing = read_migrations(str(directory))
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    # Two migrations made in the same second would sort by name, not by age: keep ids increasing.
    latest = max((m.id.split("_", 1)[0] for m in existing), default="")
    if stamp <= latest and latest.isdigit():
        stamp = str(int(latest) + 1)
    migration_id = f"{stamp}_{name}"
    depends = sorted(m.id for m in heads(existing))
    if py:
        path = directory / f"{migration_id}.py"
        path.write_text(PY_TEMPLATE.format(name=name, depends=", ".join(map(repr, depends))))
        return [path]
    path = directory / f"{migration_id}.sql"
    rollback = directory / f"{migration_id}.rollback.sql"
    path.write_text(SQL_TEMPLATE.format(name=name, depends="  ".join(depends)))
    rollback.write_text(ROLLBACK_TEMPLATE.format(name=name))
    return [path, rollback]
