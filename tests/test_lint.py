"""invoke lint: squawk on the pending migration files, configured as the tool runs them, each
finding weighed across the tenants from the catalog; and --lint refusing a run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from psycopg2 import sql

from yoyo_tenants import (
    make_migration,
    migrate_master,
    migrate_tenants,
    provision_tenant,
    schema_for,
)
from yoyo_tenants.errors import ConfigError, LintFailed, UnsafeMigration, UsageError
from yoyo_tenants.lint import lint

from .conftest import (
    REPO,
    TENANT_IDS,
    applied_ids,
    query,
    run_invoke,
    tables,
    user_env,
    write_migration,
)
from .test_waves import register

ORGS = ["org_lint1", "org_lint2", "org_lint3"]
EMAIL = "20300101000000_widen_email"
#: A comment first, so that squawk's 0-based line numbers would show as line 1 if uncorrected.
WIDEN = (
    "-- emails grew\n"
    "ALTER TABLE org_users ALTER COLUMN email TYPE varchar(500);\n"
    "CREATE INDEX org_users_email ON org_users (email);\n"
)
#: Runs under the tool's timeouts and in its transaction: nothing for squawk to say.
CLEAN = "ALTER TABLE org_users ADD COLUMN nickname TEXT;\n"


@pytest.fixture
def fleet(project):
    """Public migrated and three tenants provisioned."""
    assert migrate_master(project).ok
    register(project, ORGS)
    assert migrate_tenants(project).ok
    return project


def found(report) -> list[tuple[str, int, str]]:
    return [(f.path.name, f.line, f.rule) for f in report.findings]


def cli(settings, *args, **env):
    shutil.copy(REPO / "tasks.py", settings.root)
    return run_invoke(settings.root, *args, env=user_env(settings.connection, **env))


def test_a_rewrite_is_found_at_its_line_with_its_help_and_the_timeout_rules_stay_off(fleet):
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)

    report = lint(fleet)

    assert found(report) == [
        (f"{EMAIL}.sql", 2, "changing-column-type"),
        (f"{EMAIL}.sql", 2, "prefer-text-field"),
        (f"{EMAIL}.sql", 3, "require-concurrent-index-creation"),
    ]
    assert report.findings[1].help == "Use a `TEXT` field with a `CHECK` constraint."
    assert report.rules_off == ("require-lock-timeout", "require-statement-timeout")
    assert [p.name for p in report.files] == [f"{EMAIL}.sql"]  # the applied ones are not pending


def test_a_transactional_file_is_linted_as_one_and_a_non_transactional_file_is_not(fleet):
    write_migration(fleet.tenant_dir, "20300101000000_in_transaction", CLEAN)
    write_migration(fleet.tenant_dir, "20300101000100_alone", "-- transactional: false\n" + CLEAN)

    # Without a transaction, a statement failing half-way could not simply be run again.
    assert found(lint(fleet)) == [("20300101000100_alone.sql", 2, "prefer-robust-stmts")]


def test_a_finding_is_shown_once_per_file_line_and_rule(fleet):
    write_migration(
        fleet.tenant_dir,
        "20300101000000_two_indexes",
        "-- transactional: false\n"
        "CREATE INDEX CONCURRENTLY a ON org_users (email); "
        "CREATE INDEX CONCURRENTLY b ON org_users (name);\n",
    )

    assert found(lint(fleet)) == [("20300101000000_two_indexes.sql", 2, "prefer-robust-stmts")]


def test_each_finding_is_weighed_across_the_tenants_from_the_catalog(fleet):
    schemas = [schema_for(org) for org in ORGS]
    for schema in schemas:
        query(
            fleet.connection,
            sql.SQL(
                "INSERT INTO {} (clerk_user_id, email) "
                "SELECT 'user_' || g, 'u' || g || '@example.com' FROM generate_series(1, 700) g"
            ).format(sql.Identifier(schema, "org_users")),
        )
    for schema in schemas[:2]:  # the third is never analysed: its reltuples stays -1
        query(fleet.connection, sql.SQL("ANALYZE {}").format(sql.Identifier(schema, "org_users")))
    catalog = query(
        fleet.connection,
        "SELECT sum(c.reltuples) FILTER (WHERE c.reltuples >= 0),"
        " count(*) FILTER (WHERE c.reltuples < 0),"
        " sum(pg_relation_size(c.oid)) FILTER (WHERE c.reltuples < 0)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = ANY(%s) AND c.relname = 'org_users'",
        (schemas,),
    )[0]
    assert catalog[:2] == (1400, 1) and catalog[2] > 0
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)

    weight = lint(fleet).findings[0].weight

    assert (weight.schemas, weight.rows, weight.unanalysed) == (3, 1400, 1)
    assert weight.unanalysed_bytes == catalog[2]
    assert str(weight) == (
        "org_users in 3 tenants: about 1,400 rows in all (pg_class.reltuples); "
        f"1 not analysed ({catalog[2] // 1024} kB on disk)"
    )


def test_a_table_is_weighed_where_its_statement_runs(fleet):
    """Master files run in public; a tenant file's unqualified table is in every tenant, its
    public.name table in public, and a table in a schema of its own in none of them."""
    write_migration(
        fleet.master_dir,
        "20300101000000_focus_index",
        "CREATE INDEX focus_areas_name ON focus_areas (name);\n",
    )
    write_migration(
        fleet.tenant_dir,
        "20300101000000_notes",
        "CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT);\n",
    )
    write_migration(
        fleet.tenant_dir,
        "20300101000100_indexes",
        "CREATE INDEX notes_body ON notes (body);\n"
        "CREATE INDEX focus_areas_slug ON public.focus_areas (slug);\n"
        "CREATE INDEX events_at ON audit.events (at);\n",
    )

    weights = [(f.line, str(f.weight)) for f in lint(fleet).findings]

    assert weights == [
        (1, "public.focus_areas: not analysed (empty)"),
        (1, "notes is in no tenant yet"),
        (2, "public.focus_areas: not analysed (empty)"),
        (3, "None"),
    ]


def test_all_lints_every_file_and_files_only_those_named(fleet, monkeypatch):
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)
    monkeypatch.chdir(fleet.root)

    every = lint(fleet, every=True)
    named = lint(fleet, files=[EMAIL, f"migrations/tenant/{TENANT_IDS[2]}.sql"])

    assert len(every.files) == 5 + 4  # the master files, and the tenant files with the new one
    assert [p.name for p in named.files] == [f"{EMAIL}.sql", f"{TENANT_IDS[2]}.sql"]
    with pytest.raises(UsageError, match="nope is not a migration in migrations/master or "):
        lint(fleet, files=["nope"])


def test_the_project_chooses_the_rules(fleet):
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)
    chosen = replace(
        fleet, lint_exclude=("prefer-text-field",), lint_include=("require-lock-timeout",)
    )

    assert found(lint(chosen)) == [
        (f"{EMAIL}.sql", 2, "changing-column-type"),
        (f"{EMAIL}.sql", 2, "require-lock-timeout"),
        (f"{EMAIL}.sql", 3, "require-concurrent-index-creation"),
    ]
    with pytest.raises(ConfigError, match="squawk refused the lint rules .*no-such-rule"):
        lint(replace(fleet, lint_exclude=("no-such-rule",)))


def test_the_tools_own_refusals_come_first(fleet):
    write_migration(fleet.tenant_dir, EMAIL, "ALTER TABLE org_users ADD COLUMN x TEXT;\nCOMMIT;\n")

    with pytest.raises(UnsafeMigration, match="line 2: COMMIT would commit"):
        lint(fleet)


# -- the command line ----------------------------------------------------------------------------


def test_invoke_lint_prints_each_finding_with_weight_and_help_and_exits_1(fleet):
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)

    done = cli(fleet, "lint")

    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[:3] == [
        f"migrations/tenant/{EMAIL}.sql line 2: changing-column-type: Changing a column type "
        "requires an `ACCESS EXCLUSIVE` lock on the table which blocks reads and writes while "
        "the table is rewritten. Changing the type of the column may also break other clients "
        "reading from the table.",
        "  org_users in 3 tenants: 3 not analysed (empty)",
        f"migrations/tenant/{EMAIL}.sql line 2: prefer-text-field: Changing the size of a "
        "`varchar` field requires an `ACCESS EXCLUSIVE` lock, that will prevent all reads and "
        "writes to the table.",
    ]
    assert done.stdout.splitlines()[-1] == (
        "lint: 3 findings in 1 of 1 file (rules off: require-lock-timeout, "
        "require-statement-timeout)"
    )
    assert done.stderr == "error: lint: 3 findings (rules are chosen in pyproject.toml)\n"


def test_invoke_lint_exits_0_when_nothing_is_found(fleet):
    write_migration(fleet.tenant_dir, "20300101000000_nickname", CLEAN)

    done = cli(fleet, "lint")

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "lint: no findings in 1 file (rules off: require-lock-timeout, require-statement-timeout)\n"
    )


def test_a_squawk_toml_in_the_project_is_not_read(fleet, monkeypatch):
    """The rules are chosen in one place, pyproject.toml: squawk's own file (which it looks for
    from its working folder up) would replace them, or leave files out."""
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)
    (fleet.root / ".squawk.toml").write_text('excluded_paths = ["*email*"]\n')
    monkeypatch.chdir(fleet.root)

    assert len(lint(fleet).findings) == 3


def without_squawk() -> str:
    """PATH without any folder holding a squawk."""
    folders = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(f for f in folders if not (Path(f) / "squawk").exists())


def test_squawk_beside_python_is_found_without_being_on_path(fleet, monkeypatch):
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)
    monkeypatch.setenv("PATH", without_squawk())

    assert len(lint(fleet).findings) == 3


def test_without_squawk_lint_and_a_run_with_lint_exit_2_with_one_line(fleet, tmp_path):
    """A Python whose environment has no squawk (a virtualenv sharing this one's packages,
    but not its scripts), and no squawk on PATH."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
        check=True,
    )
    python = venv / "bin" / "python"
    write_migration(fleet.tenant_dir, "20300101000000_nickname", CLEAN)
    shutil.copy(REPO / "tasks.py", fleet.root)
    env = user_env(fleet.connection, PATH=without_squawk())

    for args in (["lint"], ["migrate-tenants", "--lint"]):
        done = subprocess.run(
            [python, "-m", "invoke", *args],
            cwd=fleet.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr == (
            "error: squawk is not installed: pip install 'yoyo-tenants[lint]' "
            "(or put squawk on PATH)\n"
        )
    assert all(applied_ids(fleet.connection, schema_for(org)) == TENANT_IDS for org in ORGS)


# -- --lint --------------------------------------------------------------------------------------


def test_migrate_tenants_with_lint_refuses_pending_files_with_findings(fleet):
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)

    with pytest.raises(LintFailed) as refused:
        migrate_tenants(fleet, lint=True)

    assert all(applied_ids(fleet.connection, schema_for(org)) == TENANT_IDS for org in ORGS)
    assert len(refused.value.findings) == 3
    assert str(refused.value) == (
        "--lint: squawk has 3 findings in the pending migrations, so nothing was run: "
        f"{fleet.tenant_dir / EMAIL}.sql line 2: changing-column-type and 2 more "
        "(invoke lint shows them)"
    )


def test_a_run_with_lint_goes_ahead_when_nothing_is_found(fleet):
    write_migration(fleet.tenant_dir, "20300101000000_nickname", CLEAN)

    assert migrate_tenants(fleet, lint=True).ok

    last = {applied_ids(fleet.connection, schema_for(org))[-1] for org in ORGS}
    assert last == {"20300101000000_nickname"}


def test_migrate_master_and_provision_tenant_with_lint_refuse_too(fleet):
    write_migration(
        fleet.master_dir,
        "20300101000000_focus_index",
        "CREATE INDEX focus_areas_name ON public.focus_areas (name);\n",
    )
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)

    with pytest.raises(LintFailed, match="require-concurrent-index-creation"):
        migrate_master(fleet, lint=True)
    with pytest.raises(LintFailed) as refused:
        provision_tenant(fleet, "org_lint4", lint=True)

    # A new org gets every tenant file: the shipped ones' findings count too.
    assert [(f.path.name, f.rule) for f in refused.value.findings] == [
        (f"{TENANT_IDS[2]}.sql", "prefer-bigint-over-int"),
        (f"{EMAIL}.sql", "changing-column-type"),
        (f"{EMAIL}.sql", "prefer-text-field"),
        (f"{EMAIL}.sql", "require-concurrent-index-creation"),
    ]

    assert "20300101000000_focus_index" not in applied_ids(fleet.connection, "public")
    assert schema_for("org_lint4") not in {
        row[0] for row in query(fleet.connection, "SELECT nspname FROM pg_namespace")
    }
    assert query(fleet.connection, "SELECT count(*) FROM public.tenants")[0][0] == 3


def test_invoke_migrate_tenants_lint_is_one_error_line_and_exit_1(fleet):
    write_migration(fleet.tenant_dir, EMAIL, WIDEN)

    done = cli(fleet, "migrate-tenants", "--lint")

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "error: --lint: squawk has 3 findings in the pending migrations, so nothing was run: "
        f"migrations/tenant/{EMAIL}.sql line 2: changing-column-type and 2 more "
        "(invoke lint shows them)\n"
    )
    assert "org_users_email" not in tables(fleet.connection, schema_for(ORGS[0]))


def test_python_migrations_are_named_as_not_linted(fleet):
    made = make_migration(fleet, "tenant", "backfill", py=True)
    write_migration(fleet.tenant_dir, "20990101000000_nickname", CLEAN)

    report = lint(fleet)

    assert report.python == [p for p in made if p.suffix == ".py"][:1]
    assert [p.name for p in report.files] == ["20990101000000_nickname.sql"]
