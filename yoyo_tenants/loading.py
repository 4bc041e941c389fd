"""Migration folders: found the way yoyo finds them, read with PostgreSQL's grammar, checked
before anything runs, and kept while their files stay as they are."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NoReturn

from yoyo import exceptions as yoyo_exceptions
from yoyo.migrations import Migration, MigrationList, read_migrations

from .errors import NotReady
from .log import migration_checksum
from .sqlfiles import Script, read_script

#: A folder's files as they were read: (name, size, time stamp in ns) of each.
Files = tuple[tuple[str, int, int], ...]
#: Migration folders already read: (path, public) -> (what its files were, what they said).
_loaded: dict[tuple[Path, bool], tuple[Files, MigrationList]] = {}
#: Files changed this recently are read again: a file rewritten within the file system's clock
#: tick keeps its time stamp (git calls such entries racy).
RACY_NS = 2_000_000_000


class SqlMigration(Migration):
    """A .sql migration (and its .rollback.sql), read and checked by sqlfiles.read_script.

    yoyo splits SQL files with sqlparse (4.6 GB of memory for a 4 MB file of INSERTs) and has no
    notion of a statement that may not run; this reads them once with the server's own grammar.
    The engine runs `script` and `rollback_script`, never yoyo's steps.
    """

    def __init__(self, migration_id: str, path: str, source_dir: str, public: bool) -> None:
        super().__init__(migration_id, path, source_dir)
        self.public = public
        self.script: Script | None = None
        self.rollback_script: Script | None = None
        self.requires: set[Migration] = set()

    def load(self) -> None:
        if self.loaded:
            return
        path = Path(self.path)
        self.script = read_script(path, self.public)
        rollback = path.with_suffix(".rollback.sql")
        self.rollback_script = read_script(rollback, self.public) if rollback.exists() else None
        self.source = self.script.text
        self.use_transactions = self.script.transactional

    @property
    def loaded(self) -> bool:
        """Read once its script is (yoyo's own test is whether it has steps, which this has
        none of: see process_steps)."""
        return self.script is not None

    @property
    def depends(self) -> set[Migration]:
        self.load()
        return self.requires

    def process_steps(self, backend: object, direction: str, force: bool = False) -> NoReturn:
        raise TypeError(f"{self.id} is run by yoyo_tenants' engine, not step by step")


def load_migrations(directory: Path, public: bool = False) -> MigrationList:
    """Read, parse and check every migration in `directory`, once for all the schemas of a run.

    `public`: the folder migrates the public schema (see sqlfiles.read_script). Kept while the
    folder's files stay as they are, so a program that provisions tenants as organizations sign
    up parses them once, not at every signup. UnsafeMigration if any file may not run.
    """
    if not directory.is_dir():
        raise NotReady(f"migrations folder {directory} does not exist")
    directory = directory.resolve()
    files = _files(directory)
    cached = _loaded.get((directory, public))
    if cached and cached[0] == files:
        return cached[1]
    migrations = _read(directory, public)
    if all(time.time_ns() - mtime > RACY_NS for _, _, mtime in files):
        _loaded[(directory, public)] = (files, migrations)
    return migrations


def _files(directory: Path) -> Files:
    entries = [(e.name, e.stat()) for e in os.scandir(directory) if e.is_file()]
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in entries))


def _read(directory: Path, public: bool) -> MigrationList:
    found = read_migrations(str(directory))  # yoyo's discovery: order, post-apply hooks
    ours = {
        m.id: SqlMigration(m.id, m.path, m.source_dir, public) if m.is_raw_sql() else m
        for m in [*found, *found.post_apply]
    }
    for migration in ours.values():
        try:
            migration.load()
        except yoyo_exceptions.BadMigration as exc:
            raise NotReady(f"cannot load migration {migration.path}: {exc.args[-1]}") from None
        migration_checksum(migration)  # now, before worker threads share the migrations
    for migration in ours.values():
        if isinstance(migration, SqlMigration):
            assert migration.script is not None  # loaded above
            for required in migration.script.depends:
                if required not in ours:
                    raise NotReady(f"{migration.path} depends on {required}, which is not there")
                migration.requires.add(ours[required])
    return MigrationList([ours[m.id] for m in found], [ours[m.id] for m in found.post_apply])
