"""make_migration: new master and tenant migrations, named to apply in the order they were made."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
from yoyo.migrations import heads, read_migrations

from yoyo_tenants import make_migration
from yoyo_tenants.errors import UsageError
from yoyo_tenants.scaffold import new_migration
from yoyo_tenants.settings import Settings

from .conftest import copy_migrations

MASTER_HEAD = "20250101000400_citus_reference_tables"
TENANT_HEAD = "20250101000200_create_chat_messages"
ID = re.compile(r"(\d{14})_(\w+)")


@pytest.fixture
def files(tmp_path) -> Settings:
    """A project with copies of the real migrations; no database is needed to make migrations."""
    copy_migrations(tmp_path)
    return Settings.load(tmp_path, environ={})


def _ids(directory: Path) -> list[str]:
    return [m.id for m in read_migrations(str(directory))]


def _heads(directory: Path) -> set[str]:
    return {m.id for m in heads(read_migrations(str(directory)))}


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize(
    ("kind", "head"), [("master", MASTER_HEAD), ("tenant", TENANT_HEAD)], ids=["master", "tenant"]
)
def test_make_creates_an_sql_migration_and_its_rollback_twin(files, kind, head):
    directory = files.master_dir if kind == "master" else files.tenant_dir
    before = _ids(directory)
    old_heads = _heads(directory)
    assert head in old_heads

    paths = make_migration(files, kind, "add_nickname")

    sql, rollback = paths
    assert sql.parent == rollback.parent == directory
    match = ID.fullmatch(sql.stem)
    assert match and match.group(2) == "add_nickname"
    assert rollback.name == f"{sql.stem}.rollback.sql"
    assert sql.is_file() and rollback.is_file()
    assert head in sql.read_text().splitlines()[1].split()
    # yoyo sees exactly one new migration, after the existing ones, depending on the old heads
    # (like `yoyo new`: the shipped migrations declare no dependencies, so each of them is a head).
    assert _ids(directory) == [*before, sql.stem]
    migration = read_migrations(str(directory))[-1]
    migration.load()
    assert {m.id for m in migration.depends} == old_heads
    assert _heads(directory) == {sql.stem}
    assert migration.steps == []  # comments only until the user writes SQL


def test_make_master_does_not_touch_the_tenant_folder(files):
    tenant_before = _listing(files.tenant_dir)
    make_migration(files, "master", "seed_focus_areas")
    assert _listing(files.tenant_dir) == tenant_before


def test_migration_ids_increase_even_when_made_in_the_same_second(files):
    made = [make_migration(files, "tenant", f"step_{n}")[0].stem for n in range(5)]

    stamps = [ID.fullmatch(m).group(1) for m in made]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 5
    assert _ids(files.tenant_dir)[-5:] == made
    # each depends on the one made just before it
    migrations = read_migrations(str(files.tenant_dir))
    for previous, migration in zip(migrations[-5:-1], migrations[-4:], strict=True):
        migration.load()
        assert {m.id for m in migration.depends} == {previous.id}


def test_migration_ids_increase_when_the_clock_says_the_same_second(tmp_path):
    now = datetime(2026, 11, 25, 10, 30, 0, tzinfo=timezone.utc)
    first = new_migration(tmp_path, "first", now=now)[0].stem
    second = new_migration(tmp_path, "second", now=now)[0].stem
    third = new_migration(tmp_path, "third", py=True, now=now)[0].stem
    assert first == "20261125103000_first"
    assert second == "20261125103001_second"
    assert third == "20261125103002_third"
    assert _ids(tmp_path) == [first, second, third]


def test_a_new_migration_sorts_after_one_with_a_future_timestamp(tmp_path):
    (tmp_path / "20991231235959_from_the_future.sql").write_text("SELECT 1;\n")
    made = new_migration(tmp_path, "now")[0].stem
    assert made > "20991231235959_from_the_future"
    assert _ids(tmp_path) == ["20991231235959_from_the_future", made]


def test_make_py_produces_a_python_migration_yoyo_can_load(files):
    old_heads = _heads(files.tenant_dir)
    (path,) = make_migration(files, "tenant", "backfill_settings", py=True)

    assert path.suffix == ".py"
    assert path.parent == files.tenant_dir
    assert not path.with_suffix(".rollback.sql").exists()
    migrations = read_migrations(str(files.tenant_dir))
    assert migrations[-1].id == path.stem
    migration = migrations[-1]
    migration.load()
    assert not migration.is_raw_sql()
    assert TENANT_HEAD in migration.module.__depends__
    assert migration.module.__depends__ == old_heads
    assert {m.id for m in migration.depends} == old_heads
    assert len(migration.steps) == 1


def test_a_second_py_migration_depends_on_the_first(files):
    (first,) = make_migration(files, "master", "one", py=True)
    (second,) = make_migration(files, "master", "two", py=True)
    migration = read_migrations(str(files.master_dir))[-1]
    assert migration.id == second.stem
    migration.load()
    assert {m.id for m in migration.depends} == {first.stem}


def test_make_in_an_empty_project_creates_the_folder_and_depends_on_nothing(tmp_path):
    settings = Settings.load(tmp_path, environ={})
    sql, rollback = make_migration(settings, "tenant", "create_things")
    assert sql.parent == tmp_path.resolve() / "migrations" / "tenant"
    migration = read_migrations(str(sql.parent))[0]
    migration.load()
    assert migration.depends == set()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a b",
        "1st",
        "_leading",
        "add-column",
        "../escape",
        "a/b",
        "naïve",
        "x" * 81,
        "a\x00b",
        "a;rm -rf",
    ],
    ids=lambda n: repr(n)[:20],
)
def test_a_bad_migration_name_is_a_usage_error_and_creates_nothing(files, name):
    before = (_listing(files.master_dir), _listing(files.tenant_dir))
    with pytest.raises(UsageError) as info:
        make_migration(files, "tenant", name)
    assert info.value.exit_code == 2
    assert "invalid migration name" in str(info.value)
    assert len(str(info.value)) < 300
    assert (_listing(files.master_dir), _listing(files.tenant_dir)) == before
    assert not (files.root / "escape.sql").exists()


def test_the_longest_allowed_name_is_accepted(files):
    sql, _ = make_migration(files, "tenant", "x" * 80)
    assert sql.stem.endswith("_" + "x" * 80)
