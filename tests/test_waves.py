"""migrate-tenants --waves: the canary first and alone, each later wave only after the one before
came through (and the app's check passed), all of it one run that rollback-tenants undoes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import psycopg2
import pytest
from psycopg2 import sql

from yoyo_tenants import migrate_master, migrate_tenants, rollback_tenants
from yoyo_tenants import schema_for as schema
from yoyo_tenants.errors import ConfigError, UsageError
from yoyo_tenants.results import SchemaResult
from yoyo_tenants.waves import Rollout, parse

from .conftest import (
    REPO,
    TENANT_IDS,
    applied_ids,
    query,
    run_invoke,
    user_env,
    write_migration,
)

ORGS = [f"org_wave{i}" for i in range(1, 6)]
#: With 5 tenants: the canary, then up to 40% (2) in all, then the other 3.
WAVES = "1,40%,all"
CHECKED = "20300101000000_email_has_at"
#: Fails in a tenant holding an email without an '@'.
CHECK_EMAILS = (
    "ALTER TABLE org_users ADD CONSTRAINT email_has_at CHECK (email LIKE '%@%');\n",
    "ALTER TABLE org_users DROP CONSTRAINT email_has_at;\n",
)
#: Records, in checked.txt, what each --wave-check was told.
RECORD = (
    'echo "$YOYO_TENANTS_WAVE|$YOYO_TENANTS_WAVE_TENANTS|$YOYO_TENANTS_WAVE_SCHEMAS|'
    '$YOYO_TENANTS_RUN" >> checked.txt'
)


def register(settings, orgs: list[str]) -> None:
    """Register `orgs` and create their (empty) schemas in one statement, as provisioning
    would; a migrate-tenants run then brings them to head."""
    schemas = [schema(org) for org in orgs]
    creates = sql.SQL(" ").join(
        sql.SQL("CREATE SCHEMA {};").format(sql.Identifier(name)) for name in schemas
    )
    query(
        settings.connection,
        sql.SQL(
            "INSERT INTO public.tenants (clerk_org_id, schema_name) "
            "SELECT * FROM unnest(%s::text[], %s::text[]); {}"
        ).format(creates),
        (orgs, schemas),
    )


@pytest.fixture
def fleet(project):
    """Public migrated, five tenants provisioned (in ORGS' order), and a new migration."""
    assert migrate_master(project).ok
    register(project, ORGS)
    assert migrate_tenants(project).ok
    write_migration(project.tenant_dir, CHECKED, *CHECK_EMAILS)
    return project


def bad_email(settings, org: str) -> None:
    query(
        settings.connection,
        sql.SQL("INSERT INTO {} (clerk_user_id, email) VALUES ('user_1', 'nobody')").format(
            sql.Identifier(schema(org), "org_users")
        ),
    )


def checked_in(settings) -> list[str]:
    """The tenants whose log has the new migration applied."""
    return [org for org in ORGS if CHECKED in applied_ids(settings.connection, schema(org))]


def runs_of(settings) -> dict[str, int]:
    """Each tenant's run number on the log row that applied the new migration."""
    found = {}
    for org in checked_in(settings):
        log = sql.Identifier(schema(org), "_yoyo_log")
        found[org] = query(
            settings.connection,
            sql.SQL("SELECT run FROM {} WHERE migration_id = %s AND operation = 'apply'").format(
                log
            ),
            (CHECKED,),
        )[-1][0]
    return found


def outcomes(run) -> dict[str, str]:
    return {r.org_id: r.outcome.value for r in run.schemas}


def cli(settings, *args):
    shutil.copy(REPO / "tasks.py", settings.root)
    return run_invoke(settings.root, *args, env=user_env(settings.connection))


# -- stopping ------------------------------------------------------------------------------------


def test_a_migration_failing_in_the_canary_leaves_every_other_tenant_untouched(fleet):
    bad_email(fleet, ORGS[0])

    run = migrate_tenants(fleet, waves=WAVES)

    assert not run.ok
    assert outcomes(run) == {ORGS[0]: "failed"} | {org: "not started" for org in ORGS[1:]}
    assert checked_in(fleet) == []
    assert all(applied_ids(fleet.connection, schema(org)) == TENANT_IDS for org in ORGS)
    assert [(w.size, w.tenants, w.started) for w in run.waves] == [
        ("1", ORGS[:1], True),
        ("40%", ORGS[1:2], False),
        ("all", ORGS[2:], False),
    ]


def test_a_failing_wave_check_stops_before_wave_2_and_is_told_the_waves_tenants(fleet):
    run = migrate_tenants(fleet, waves=WAVES, wave_check=RECORD + "; exit 3")

    assert outcomes(run) == {ORGS[0]: "done"} | {org: "not started" for org in ORGS[1:]}
    assert checked_in(fleet) == ORGS[:1]
    assert (fleet.root / "checked.txt").read_text() == f"1|{ORGS[0]}|{schema(ORGS[0])}|{run.run}\n"
    assert (run.waves[0].check.exit_code, run.waves[1].started) == (3, False)


def test_a_passing_check_runs_between_waves_and_not_after_the_last(fleet):
    run = migrate_tenants(fleet, waves=WAVES, wave_check=RECORD, wave_pause=0.01)

    assert run.ok and checked_in(fleet) == ORGS
    assert (fleet.root / "checked.txt").read_text().splitlines() == [
        f"1|{ORGS[0]}|{schema(ORGS[0])}|{run.run}",
        f"2|{ORGS[1]}|{schema(ORGS[1])}|{run.run}",
    ]


def test_waves_compose_with_jobs_fail_fast_lock_timeout_and_retries(fleet, database):
    app = psycopg2.connect(**database)  # an app transaction holding a lock in the second tenant
    app.cursor().execute(f"SELECT count(*) FROM {schema(ORGS[1])}.org_users")
    try:
        run = migrate_tenants(
            fleet,
            waves="1,all",
            jobs=1,
            fail_fast=True,
            lock_timeout=0.2,
            retries=1,
            retry_pause=0.05,
        )
    finally:
        app.close()

    assert outcomes(run) == {ORGS[0]: "done", ORGS[1]: "failed"} | {
        org: "not started" for org in ORGS[2:]
    }
    failed = run.schemas[1]
    assert (failed.failure.sqlstate, failed.retries) == ("55P03", 1)
    assert run.jobs == 1 and checked_in(fleet) == ORGS[:1]


# -- one run -------------------------------------------------------------------------------------


def test_the_waves_are_one_run_which_rollback_tenants_undoes(fleet):
    run = migrate_tenants(fleet, waves=WAVES)
    assert run.ok and runs_of(fleet) == {org: run.run for org in ORGS}

    undone = rollback_tenants(fleet)

    assert undone.ok and checked_in(fleet) == []
    assert all(applied_ids(fleet.connection, schema(org)) == TENANT_IDS for org in ORGS)


def test_a_run_stopped_between_waves_by_a_signal_goes_on_as_a_new_run(fleet):
    """The check stands for whatever stops a deploy between waves: a Ctrl-C, a SIGTERM."""
    stopped = cli(fleet, "migrate-tenants", "--waves", WAVES, "--wave-check", "kill -INT $PPID")

    assert stopped.returncode == 1, stopped.stderr
    assert checked_in(fleet) == ORGS[:1]
    assert "waves: 1 of 3 ran; stopped after wave 1: interrupted" in stopped.stdout
    first = runs_of(fleet)[ORGS[0]]

    again = cli(fleet, "migrate-tenants", "--waves", WAVES)

    assert again.returncode == 0, again.stdout + again.stderr
    assert runs_of(fleet) == {ORGS[0]: first} | {org: first + 1 for org in ORGS[1:]}
    # It goes on with the tenants not at head: its canary is the next in line.
    assert "wave 1 of 3 (1: 1 tenant, the canary): 1 migrated, 0 failed in " in again.stdout
    assert f"{ORGS[1]} ({schema(ORGS[1])}): applied 1: {CHECKED}" in again.stdout
    assert "at head: 5 of 5 tenants (org_wave1, org_wave2, org_wave3 and 2 more)" in again.stdout


# -- what the user sees --------------------------------------------------------------------------


def test_output_and_json_report_each_wave(fleet):
    bad_email(fleet, ORGS[1])
    report = fleet.root / "run.json"

    done = cli(fleet, "migrate-tenants", "--waves", WAVES, "--json", str(report))

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[1].startswith("wave 1 of 3 (1: 1 tenant, the canary): 1 migrated, 0 failed in ")
    assert lines[2].startswith("wave 2 of 3 (40%: 1 tenant): 0 migrated, 1 failed in ")
    assert lines[-2:] == [
        "waves: 2 of 3 ran; stopped after wave 2: 1 tenant not done",
        f"at head: 1 of 5 tenants ({ORGS[0]})",
    ]
    waves = json.loads(report.read_text())["waves"]
    assert [(w["wave"], w["size"], w["started"], w["tenants"]) for w in waves] == [
        (1, "1", True, ORGS[:1]),
        (2, "40%", True, ORGS[1:2]),
        (3, "all", False, ORGS[2:]),
    ]
    assert [[f["org_id"] for f in w["failures"]] for w in waves] == [[], [ORGS[1]], []]
    assert 'check constraint "email_has_at"' in waves[1]["failures"][0]["error"]
    assert waves[0]["duration"] > 0 and waves[2]["duration"] == 0
    assert waves[0]["check"] is None


def test_a_dry_run_shows_the_waves_and_their_tenants(fleet):
    done = cli(fleet, "migrate-tenants", "--waves", WAVES, "--dry-run")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-4:] == [
        f"wave 1 of 3 (1: 1 tenant, the canary): {ORGS[0]}",
        f"wave 2 of 3 (40%: 1 tenant): {ORGS[1]}",
        f"wave 3 of 3 (all: 3 tenants): {', '.join(ORGS[2:])}",
        "dry run: 5 of 5 schemas would change; nothing was changed",
    ]
    assert checked_in(fleet) == []


def test_a_plain_run_is_one_wave_as_before(fleet):
    done = cli(fleet, "migrate-tenants")

    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith(("wave", "at head"))]
    assert checked_in(fleet) == ORGS


# -- canaries ------------------------------------------------------------------------------------


def test_named_canaries_go_first(fleet):
    named = replace(fleet, canary_tenants=(ORGS[3],))

    run = migrate_tenants(named, waves="1,all", dry_run=True)

    assert [w.tenants for w in run.waves] == [[ORGS[3]], [*ORGS[:3], ORGS[4]]]


def test_canaries_may_be_a_query_checked_like_tenants_query(fleet):
    chosen = replace(
        fleet,
        canary_tenants="SELECT clerk_org_id, schema_name FROM public.tenants "
        f"WHERE clerk_org_id IN ('{ORGS[2]}', '{ORGS[4]}') ORDER BY id DESC",
    )

    run = migrate_tenants(chosen, waves="2,all", dry_run=True)

    assert [w.tenants for w in run.waves] == [[ORGS[4], ORGS[2]], [ORGS[0], ORGS[1], ORGS[3]]]
    with pytest.raises(ConfigError, match="canary-tenants must return two columns"):
        migrate_tenants(replace(fleet, canary_tenants="SELECT 1"), waves="1,all")
    writes = "WITH d AS (DELETE FROM public.tenants RETURNING clerk_org_id, schema_name) "
    with pytest.raises(ConfigError, match="canary-tenants tried to write"):
        migrate_tenants(replace(fleet, canary_tenants=writes + "SELECT * FROM d"), waves="1,all")
    registered = query(fleet.connection, "SELECT count(*) FROM public.tenants")
    assert checked_in(fleet) == [] and registered == [(len(ORGS),)]
    with pytest.raises(ConfigError, match="canary-tenants.*public"):
        migrate_tenants(replace(fleet, canary_tenants="SELECT 'org_x', 'public'"), waves="1,all")


def test_a_canary_that_is_not_a_tenant_is_refused_before_anything_runs(fleet):
    with pytest.raises(ConfigError, match="canary-tenants: it names org_gone, which is not a "):
        migrate_tenants(replace(fleet, canary_tenants=("org_gone",)), waves="1,all")

    assert checked_in(fleet) == []


# -- sizes ---------------------------------------------------------------------------------------


def work(count: int) -> list[SchemaResult]:
    return [SchemaResult(f"s{i}") for i in range(count)]


@pytest.mark.parametrize(
    "fleet_size, pending, sizes",
    [
        (100, 100, [1, 4, 20, 75]),
        (10, 10, [1, 1, 8]),  # 5% of 10 is no tenant: that wave is left out
        (100, 30, [1, 4, 20, 5]),  # a re-run: percentages of all tenants, over those left
        (100, 3, [1, 2]),
        (1, 1, [1]),
    ],
)
def test_sizes_are_cumulative_and_a_wave_adding_no_tenant_is_left_out(fleet_size, pending, sizes):
    rollout = Rollout(parse("1,5%,25%,all"))

    waves = rollout.split(work(pending), fleet_size)

    assert [len(w.results) for w in waves] == sizes
    assert [w.number for w in waves] == list(range(1, len(sizes) + 1))


@pytest.mark.parametrize(
    "text, says",
    [
        ("1,5%", "the last wave, and only the last, is 'all'"),
        ("1,all,5%", "the last wave, and only the last, is 'all'"),
        ("10,5,all", "sizes are cumulative, so each is larger"),
        ("5%,5%,all", "sizes are cumulative, so each is larger"),
        ("1,100%,all", "a percentage is above 0% and below 100% ('all')"),
        ("0,all", "expected tenant counts and percentages, e.g. 1,5%,25%,all"),
        ("one,all", "expected tenant counts and percentages, e.g. 1,5%,25%,all"),
        ("1,,all", "expected tenant counts and percentages, e.g. 1,5%,25%,all"),
    ],
)
def test_wrong_sizes_are_usage_errors(text, says):
    with pytest.raises(UsageError) as refused:
        parse(text)

    assert str(refused.value) == f"--waves {text}: {says}"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--waves", "1,5%"], "error: --waves 1,5%: the last wave, and only the last, is 'all'"),
        (
            ["--waves", "1,all", "--wave-pause", "x"],
            "error: --wave-pause must be a number, not 'x'",
        ),
    ],
)
def test_wrong_wave_flags_are_one_line_and_exit_2_before_anything_runs(fleet, args, says):
    done = cli(fleet, "migrate-tenants", *args)

    assert (done.returncode, done.stdout, done.stderr) == (2, "", says + "\n")
    assert checked_in(fleet) == []


@pytest.mark.parametrize(
    "flags, says",
    [
        ({"wave_check": "true"}, "--wave-check and --wave-pause go with --waves"),
        ({"wave_pause": 1.0}, "--wave-check and --wave-pause go with --waves"),
        ({"waves": "1,all", "tenant": ORGS[0]}, "give one of --tenant and --waves"),
        ({"waves": "1,all", "wave_check": " "}, "--wave-check is empty"),
    ],
)
def test_wave_options_that_do_not_go_together_are_usage_errors(project, flags, says):
    with pytest.raises(UsageError) as refused:  # before it connects: nothing is set up
        migrate_tenants(project, **flags)

    assert str(refused.value) == says
