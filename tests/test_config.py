"""The project's `[tool.yoyo-tenants]` table in pyproject.toml: migration folders and the tenants
query, every key optional, anything else refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from yoyo_tenants import make_migration, migrate_master, provision_tenant, schema_for
from yoyo_tenants.errors import ConfigError
from yoyo_tenants.settings import Settings

from .conftest import (
    MASTER_IDS,
    REPO,
    TENANT_IDS,
    applied_ids,
    copy_migrations,
    run_invoke,
    user_env,
)

TABLE = "pyproject.toml [tool.yoyo-tenants]"


def project(tmp_path: Path, pyproject: str | bytes | None) -> Path:
    if isinstance(pyproject, str):
        (tmp_path / "pyproject.toml").write_text(pyproject)
    elif pyproject is not None:
        (tmp_path / "pyproject.toml").write_bytes(pyproject)
    return tmp_path


def refusal(root: Path) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.load(root, environ={})
    assert info.value.exit_code == 2
    return str(info.value)


# -- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pyproject",
    [
        None,
        '[project]\nname = "app"\n',
        "[tool.ruff]\nline-length = 100\n",
        "[tool.yoyo-tenants]\n",
    ],
    ids=["no pyproject.toml", "no tool table", "another tool's table", "empty table"],
)
def test_without_settings_the_folders_and_the_registry_are_the_defaults(tmp_path, pyproject):
    settings = Settings.load(project(tmp_path, pyproject), environ={})
    assert settings.master_dir == tmp_path.resolve() / "migrations" / "master"
    assert settings.tenant_dir == tmp_path.resolve() / "migrations" / "tenant"
    assert settings.tenants_query is None


def test_this_repository_s_own_pyproject_means_the_defaults():
    settings = Settings.load(REPO, environ={})
    assert (settings.master_dir, settings.tenant_dir) == (
        REPO / "migrations" / "master",
        REPO / "migrations" / "tenant",
    )


# -- the keys ------------------------------------------------------------------------------------


def test_every_key_is_read(tmp_path):
    root = project(
        tmp_path,
        "[tool.yoyo-tenants]\n"
        'master-migrations = "db/shared"\n'
        'tenant-migrations = "db/./per-org/"\n'
        'tenants-query = """\n'
        "    SELECT id, schema_name FROM public.accounts WHERE active\n"
        '"""\n',
    )
    settings = Settings.load(root, environ={})
    assert settings.master_dir == tmp_path.resolve() / "db" / "shared"
    assert settings.tenant_dir == tmp_path.resolve() / "db" / "per-org"
    assert settings.tenants_query == "SELECT id, schema_name FROM public.accounts WHERE active"


def test_the_deploy_keys_are_read(tmp_path):
    for folder in ("listed", "queried", "none"):
        (tmp_path / folder).mkdir()
    listed = project(
        tmp_path / "listed",
        "[tool.yoyo-tenants]\n"
        'canary-tenants = ["org_canary1", "org_canary2"]\n'
        'lint-exclude = ["prefer-bigint-over-int"]\n'
        'lint-include = ["require-timeout-settings"]\n',
    )
    queried = project(
        tmp_path / "queried",
        "[tool.yoyo-tenants]\n"
        "canary-tenants = 'SELECT clerk_org_id, schema_name FROM public.tenants WHERE internal'\n",
    )

    settings = Settings.load(listed, environ={})
    assert settings.canary_tenants == ("org_canary1", "org_canary2")
    assert settings.lint_exclude == ("prefer-bigint-over-int",)
    assert settings.lint_include == ("require-timeout-settings",)
    assert Settings.load(queried, environ={}).canary_tenants == (
        "SELECT clerk_org_id, schema_name FROM public.tenants WHERE internal"
    )
    assert Settings.load(project(tmp_path / "none", None), environ={}).canary_tenants is None


def test_one_key_leaves_the_others_at_their_defaults(tmp_path):
    root = project(tmp_path, '[tool.yoyo-tenants]\ntenant-migrations = "sql/tenant"\n')
    settings = Settings.load(root, environ={})
    assert settings.master_dir == tmp_path.resolve() / "migrations" / "master"
    assert settings.tenant_dir == tmp_path.resolve() / "sql" / "tenant"
    assert settings.tenants_query is None


def test_the_folders_are_relative_to_the_project_not_to_the_working_folder(tmp_path, monkeypatch):
    root = tmp_path / "app"
    root.mkdir()
    project(root, '[tool.yoyo-tenants]\nmaster-migrations = "db/master"\n')
    monkeypatch.chdir(tmp_path)
    assert Settings.load("app", environ={}).master_dir == root.resolve() / "db" / "master"


# -- refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, says",
    [
        ("tenant-migrations = 1", "tenant-migrations must be a string"),
        ('master-migrations = ["a", "b"]', "master-migrations must be a string"),
        ("tenant-migrations = { path = 'x' }", "tenant-migrations must be a string"),
        ("tenants-query = 42", "tenants-query must be a string"),
        ("tenants-query = true", "tenants-query must be a string"),
        ('tenants-query = "  \\n "', "tenants-query is empty"),
        ('tenants-query = "SELECT 1\\u0000"', "tenants-query contains a NUL character"),
        ('tenant-migrations = "/srv/migrations/tenant"', "tenant-migrations must be a folder"),
        ('tenant-migrations = "../shared/tenant"', "tenant-migrations must be a folder"),
        ('master-migrations = "db/../../master"', "master-migrations must be a folder"),
        ('master-migrations = ""', "master-migrations must be a folder"),
        ('tenant-migrations = "migrations/master/"', "are the same folder"),
        ('tenant_migrations = "db/tenant"', "unknown key 'tenant_migrations'"),
        ('tenant-query = "SELECT 1"', "unknown key 'tenant-query'"),
        ("canary-tenants = 1", "canary-tenants must be a query or a list of org ids"),
        ('canary-tenants = ["org_a", 2]', "canary-tenants must be a query or a list of org ids"),
        ('canary-tenants = [" "]', "canary-tenants must be a query or a list of org ids"),
        ("canary-tenants = []", "canary-tenants is empty"),
        ('canary-tenants = " "', "canary-tenants is empty"),
        ('lint-exclude = "prefer-text-field"', "lint-exclude must be a list of squawk rule names"),
        ('lint-include = ["--config=/etc/x"]', "lint-include: '--config=/etc/x' is not a squawk "),
        ('lint-exclude = ["Prefer Text"]', "lint-exclude: 'Prefer Text' is not a squawk rule"),
    ],
)
def test_a_wrong_key_or_value_is_a_config_error_naming_the_key(tmp_path, line, says):
    message = refusal(project(tmp_path, f"[tool.yoyo-tenants]\n{line}\n"))
    assert message.startswith(f"{TABLE} ")
    assert says in message


def test_an_unknown_key_is_named_with_the_known_ones(tmp_path):
    message = refusal(project(tmp_path, '[tool.yoyo-tenants]\nmigrations = "db"\n'))
    assert message == (
        f"{TABLE} has an unknown key 'migrations' (known: master-migrations, tenant-migrations, "
        "tenants-query, canary-tenants, lint-exclude, lint-include)"
    )


def test_the_table_itself_must_be_a_table(tmp_path):
    root = project(tmp_path, '[tool]\nyoyo-tenants = "migrations"\n')
    assert refusal(root) == f"{TABLE} must be a table"


@pytest.mark.parametrize(
    "content, says",
    [
        ('[tool.yoyo-tenants]\ntenant-migrations = "db\n', "pyproject.toml is not valid TOML: "),
        (b"[project]\ndescription = 'caf\xe9'\n", "pyproject.toml is not valid UTF-8"),
    ],
    ids=["not TOML", "not UTF-8"],
)
def test_a_pyproject_that_cannot_be_read_is_a_config_error(tmp_path, content, says):
    assert refusal(project(tmp_path, content)).startswith(says)


def test_invoke_stops_at_a_wrong_value_with_one_line_and_exit_2(tmp_path):
    (tmp_path / "tasks.py").write_text((REPO / "tasks.py").read_text())
    project(tmp_path, "[tool.yoyo-tenants]\ntenant-migrations = 1\n")

    done = run_invoke(tmp_path, "make-tenant", "add_column", env=user_env())

    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {TABLE} tenant-migrations must be a string\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyproject.toml", "tasks.py"]


# -- used ----------------------------------------------------------------------------------------


def test_migrations_in_the_configured_folders_are_the_ones_applied(tmp_path, database):
    shipped = copy_migrations(tmp_path / "shipped")
    (tmp_path / "db").mkdir()
    (shipped / "master").rename(tmp_path / "db" / "shared")
    (shipped / "tenant").rename(tmp_path / "db" / "per-org")
    project(
        tmp_path,
        '[tool.yoyo-tenants]\nmaster-migrations = "db/shared"\ntenant-migrations = "db/per-org"\n',
    )
    env = {
        "DB_HOST": database["host"],
        "DB_PORT": database["port"],
        "DB_USER": database["user"],
        "DB_NAME": database["dbname"],
    }
    settings = Settings.load(tmp_path, environ=env)

    assert migrate_master(settings).ok
    provision_tenant(settings, "org_2abc123def456")
    made = make_migration(settings, "tenant", "add_nickname")

    assert applied_ids(database, "public") == MASTER_IDS
    assert applied_ids(database, schema_for("org_2abc123def456")) == TENANT_IDS
    assert all(path.parent == tmp_path.resolve() / "db" / "per-org" for path in made)
    assert not (tmp_path / "migrations").exists()
