"""Output made for hundreds of tenants: a line per tenant that changed or failed, `--quiet`,
`--verbose`, `status` grouped before it lists, a progress bar with a total, and lines that stay
whole at any width when piped.

The tenant migrations are the tiny `t<N>` ones of test_scale; tenants are registered in bulk."""

from __future__ import annotations

import io
import re
import shutil
import subprocess

import pytest
from rich.console import Console

from yoyo_tenants import commands, report
from yoyo_tenants.registry import Tenant, schema_for

from .conftest import REPO, applied_ids, conflicting_table, run_invoke
from .test_scale import Scale, _query

JOBS = "2"
LONG_ORG = "org_" + "Z" * 60  # 64 characters, the longest org id there is


def invoke(scale: Scale, *args: str, columns: str | None = "300") -> subprocess.CompletedProcess:
    """A task as a user runs it, its output piped (not a terminal), COLUMNS as given."""
    if not (scale.settings.root / "tasks.py").exists():
        shutil.copy(REPO / "tasks.py", scale.settings.root)
    env = scale.env()
    env.pop("COLUMNS")
    if columns is not None:
        env["COLUMNS"] = columns
    return run_invoke(scale.settings.root, *args, env=env)


def register(scale: Scale, orgs: list[str]) -> list[Tenant]:
    """Register these orgs with empty schemas, in one statement."""
    tenants = [Tenant(org, schema_for(org)) for org in orgs]
    _query(
        scale.params,
        "INSERT INTO public.tenants (clerk_org_id, schema_name) SELECT * FROM unnest(%s, %s)",
        ([t.org_id for t in tenants], [t.schema for t in tenants]),
    )
    _query(scale.params, "".join(f"CREATE SCHEMA {t.schema};" for t in tenants))
    return tenants


def orgs(start: int, count: int) -> list[str]:
    return [f"org_out{i:04d}" for i in range(start, start + count)]


def migrated_line(tenant: Tenant, ids: list[str]) -> str:
    return f"{tenant.org_id} ({tenant.schema}): applied {len(ids)}: {', '.join(ids)}"


@pytest.fixture
def crowd(project) -> Scale:
    """Public migrated, two tenant migrations, 297 tenants at head."""
    for path in project.tenant_dir.iterdir():
        path.unlink()
    assert commands.migrate_master(project).ok
    scale = Scale(project)
    scale.ids = [scale.migration(1), scale.migration(2)]
    scale.at_head = register(scale, orgs(0, 297))
    assert scale.migrate(jobs=4).ok
    return scale


@pytest.fixture
def three_new(crowd) -> list[Tenant]:
    """Three tenants registered since, so that a run over 300 changes three."""
    return register(crowd, orgs(297, 3))


@pytest.fixture
def one_broken(crowd) -> Tenant:
    """A new tenant with the longest org id, whose t2 already exists: its run fails in t2's
    migration (t1's commits)."""
    (broken,) = register(crowd, [LONG_ORG])
    conflicting_table(crowd.params, broken.schema, "t2")
    return broken


def summary_of(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("tenants: ")]


# -- runs ----------------------------------------------------------------------------------------


def test_a_run_over_300_tenants_where_3_changed_prints_the_header_3_lines_and_the_summary(
    crowd, three_new
):
    done = invoke(crowd, "migrate-tenants", "--jobs", JOBS)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + 3 + 1, done.stdout
    assert lines[0] == "migrating 3 of 300 tenants with 2 jobs"
    assert sorted(lines[1:4]) == sorted(migrated_line(t, crowd.ids) for t in three_new)
    assert re.fullmatch(
        r"tenants: 3 migrated, 297 up to date, 0 failed in \d+\.\d\ds \(run \d+\)", lines[4]
    )
    assert all(applied_ids(crowd.params, t.schema) == crowd.ids for t in three_new)


def test_failures_get_a_line_each_after_the_changed_tenants_and_before_the_summary(
    crowd, three_new, one_broken
):
    done = invoke(crowd, "migrate-tenants", "--jobs", JOBS)

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + 3 + 1 + 1, done.stdout
    assert lines[0] == "migrating 4 of 301 tenants with 2 jobs"
    assert sorted(lines[1:4]) == sorted(migrated_line(t, crowd.ids) for t in three_new)
    assert lines[4].startswith(f"failed: {LONG_ORG} ({one_broken.schema}) in {crowd.ids[1]}: ")
    assert 'relation "t2" already exists' in lines[4]
    assert lines[5].startswith("tenants: 3 migrated, 297 up to date, 1 failed in ")
    assert done.stderr == f"error: {lines[4]}\n"


def test_quiet_prints_only_failures_and_the_summary(crowd, three_new, one_broken):
    done = invoke(crowd, "migrate-tenants", "--jobs", JOBS, "--quiet")

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith(f"failed: {LONG_ORG} ({one_broken.schema}) in {crowd.ids[1]}: ")
    assert lines[1].startswith("tenants: 3 migrated, 297 up to date, 1 failed in ")
    assert all(applied_ids(crowd.params, t.schema) == crowd.ids for t in three_new)

    again = invoke(crowd, "migrate-tenants", "-q")
    assert again.returncode == 1
    assert len(again.stdout.splitlines()) == 2, again.stdout
    assert again.stdout.splitlines()[1].startswith("tenants: 0 migrated, 300 up to date, 1 failed")


def test_verbose_prints_a_line_for_every_tenant_also_those_up_to_date(crowd, three_new):
    done = invoke(crowd, "migrate-tenants", "--jobs", JOBS, "--verbose")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + 300 + 1
    tenant_lines = lines[1:-1]
    for t in crowd.at_head:
        assert f"{t.org_id} ({t.schema}): up to date" in tenant_lines
    for t in three_new:
        assert migrated_line(t, crowd.ids) in tenant_lines
    assert summary_of(lines) == [lines[-1]]

    both = invoke(crowd, "migrate-tenants", "-q", "-v")
    assert both.returncode == 2 and both.stdout == ""
    assert both.stderr == "error: give one of --quiet and --verbose\n"


def test_rollback_tenants_prints_its_job_count_and_a_line_per_tenant_it_changed(crowd, three_new):
    assert crowd.migrate(jobs=4).count("done") == 3  # the last deploy: the three new tenants

    done = invoke(crowd, "rollback-tenants", "--jobs", "3", "--yes")  # their first batch

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "rolling back 3 of 300 tenants with 3 jobs"
    assert sorted(lines[1:4]) == sorted(
        f"{t.org_id} ({t.schema}): rolled back 2: {', '.join(reversed(crowd.ids))}"
        for t in three_new
    )
    assert lines[4].startswith("tenants: 3 rolled back, 297 unchanged, 0 failed in ")
    assert len(lines) == 5
    assert all(applied_ids(crowd.params, t.schema) == [] for t in three_new)


def test_one_job_and_one_tenant_read_right(crowd, three_new):
    done = invoke(crowd, "migrate-tenants", "--tenant", three_new[0].org_id, "-j", "1")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "migrating 1 of 1 tenant with 1 job"


# -- progress ------------------------------------------------------------------------------------


def test_on_a_terminal_the_progress_bar_shows_the_total_and_the_time_left(crowd, three_new):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    seen = []

    with report.progress(console, "tenants") as progress:

        def start(work, total):
            seen.append((work, total))
            progress.start(work, total)

        run = crowd.migrate(jobs=2, on_start=start, on_result=progress)
        task = progress.bar.tasks[0]
        progress.bar.refresh()

    assert run.ok and seen == [(3, 300)]
    assert (task.total, task.completed) == (3, 3)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())
    assert re.search(r"\b3/3 +(-:--:--|\d+:\d\d:\d\d) left", shown), shown


def test_off_a_terminal_progress_lines_say_how_many_of_how_many(crowd, three_new, monkeypatch):
    console = Console(file=io.StringIO(), soft_wrap=True)
    monkeypatch.setattr(report, "PLAIN_PROGRESS_EVERY", 0.0)

    with report.progress(console, "tenants") as progress:
        crowd.migrate(jobs=1, on_start=progress.start, on_result=progress)

    lines = console.file.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"tenants: {n} of 3 done" for n in (1, 2, 3)]
    assert lines[0].endswith("s left") and lines[-1].endswith("about 0s left")


# -- status --------------------------------------------------------------------------------------


@pytest.fixture
def mixed(project) -> Scale:
    """300 tenants: 290 at head, 4 behind by 2, 3 behind by 1, 1 never migrated, one whose schema
    is gone and one whose log cannot be read."""
    for path in project.tenant_dir.iterdir():
        path.unlink()
    assert commands.migrate_master(project).ok
    scale = Scale(project)
    ids = scale.ids = [scale.migration(1), scale.migration(2), scale.migration(3)]
    scale.at_head = register(scale, orgs(0, 290))
    assert scale.migrate(jobs=4).ok
    hidden = scale.tenant_dir.parent / "hidden"
    hidden.mkdir()
    for migration_id in ids[1:]:
        for path in scale.tenant_dir.glob(f"{migration_id}*"):
            path.rename(hidden / path.name)
    scale.behind_2 = register(scale, orgs(290, 4))
    for t in scale.behind_2:
        assert scale.migrate(tenant=t.org_id).ok
    for path in hidden.glob(f"{ids[1]}*"):
        path.rename(scale.tenant_dir / path.name)
    scale.behind_1 = register(scale, orgs(294, 3))
    for t in scale.behind_1:
        assert scale.migrate(tenant=t.org_id).ok
    for path in hidden.iterdir():
        path.rename(scale.tenant_dir / path.name)
    scale.never, scale.missing, scale.damaged = register(scale, orgs(297, 3))
    _query(scale.params, f"DROP SCHEMA {scale.missing.schema}")
    _query(scale.params, f"CREATE TABLE {scale.damaged.schema}._yoyo_log (batch int)")
    return scale


def rendered(result: commands.Status, listed=None, width: int = 80) -> list[str]:
    console = Console(file=io.StringIO(), highlight=False, soft_wrap=True, width=width)
    report.status(console, result, listed)
    return console.file.getvalue().splitlines()


def test_status_of_300_tenants_is_a_few_grouped_lines_with_the_first_org_ids(mixed):
    result = commands.status(mixed.settings)
    lines = rendered(result)

    ids = mixed.ids
    few = ", ".join(t.org_id for t in mixed.behind_2[:3])
    assert lines == [
        "public: at head, 5 applied, 0 pending",
        f"tenants: 300 registered; head {ids[-1]}",
        "  290 at head: org_out0000, org_out0001, org_out0002 and 287 more",
        f"  4 behind by 2 ({ids[1]}, {ids[2]}): {few} and 1 more",
        f"  3 behind by 1 ({ids[2]}): " + ", ".join(t.org_id for t in mixed.behind_1),
        f"  1 never migrated: {mixed.never.org_id}",
        f"  1 schema missing: {mixed.missing.org_id}",
        f"  1 log damaged: {mixed.damaged.org_id}",
        "(status --all lists every tenant, status --tenant ORG one)",
    ]


def test_status_all_lists_every_tenant_after_the_summary_one_line_each(mixed):
    result = commands.status(mixed.settings)
    lines = rendered(result, result.tenants)

    assert len(lines) == 8 + 300
    listed = lines[8:]
    behind = mixed.behind_1[0]
    assert (
        f"{behind.org_id} ({behind.schema}): behind by 1; 2 applied; pending {mixed.ids[2]}"
        in listed
    )
    at_head = mixed.at_head[0]
    assert f"{at_head.org_id} ({at_head.schema}): at head; 3 applied" in listed
    damaged = next(line for line in listed if line.startswith(mixed.damaged.org_id))
    assert "log damaged" in damaged and "its column id is missing" in damaged


def test_status_tenant_lists_that_one_tenant_and_an_unknown_one_is_an_error(mixed):
    behind = mixed.behind_2[0]

    done = invoke(mixed, "status", "--tenant", behind.org_id)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 8 + 1
    assert lines[-1] == (
        f"{behind.org_id} ({behind.schema}): behind by 2; 1 applied; "
        f"pending {mixed.ids[1]}, {mixed.ids[2]}"
    )
    assert invoke(mixed, "status", "-a").stdout.count("\n") == 8 + 300

    unknown = invoke(mixed, "status", "--tenant", "org_nobody")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr == "error: no tenant is registered for org_nobody\n"
    invalid = invoke(mixed, "status", "--tenant", "nobody")
    assert invalid.returncode == 2 and invalid.stderr.startswith("error: invalid org id 'nobody'")


def test_status_table_on_a_terminal_keeps_ids_whole_in_a_narrow_window(mixed):
    result = commands.status(mixed.settings)
    console = Console(file=io.StringIO(), force_terminal=True, width=70, color_system=None)

    report.status(console, result, result.tenants[-10:])

    text = console.file.getvalue()
    for t in result.tenants[-10:]:
        assert re.search(rf"\b{t.org_id}\b.*\b{t.schema}\b", text), t.org_id


# -- nothing wraps when piped --------------------------------------------------------------------


#: A tenant's line in status: an org id, its schema, then where it stands.
TENANT_LINE = re.compile(r"org_[A-Za-z0-9]+ \(tid_[0-9a-f]{10}\): ")


def test_piped_lines_stay_whole_at_any_width(crowd, one_broken):
    schema = one_broken.schema
    for columns in ["40", "80", "200", None]:
        migrate = invoke(crowd, "migrate-tenants", columns=columns)
        status = invoke(crowd, "status", "--all", columns=columns)

        assert migrate.returncode == 1, columns
        lines = migrate.stdout.splitlines()
        assert len(lines) == 3, (columns, lines)
        assert lines[1].startswith(f"failed: {LONG_ORG} ({schema}) in {crowd.ids[1]}: ")
        assert lines[1].endswith('relation "t2" already exists')
        assert migrate.stderr.splitlines() == [f"error: {lines[1]}"]
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert len(lines) == 4 + 298, (columns, lines[:6])
        assert all(TENANT_LINE.match(line) for line in lines[4:]), (columns, lines)
        assert f"{LONG_ORG} ({schema}): behind by 1; 1 applied; pending {crowd.ids[1]}" in lines


def test_status_groups_name_drift_and_old_layout_and_count_the_rarer_ways_of_being_behind():
    ids = [f"2025010200000{n}_t{n}" for n in range(1, 9)]

    def tenant(n: int, **fields) -> commands.SchemaStatus:
        org = f"org_g{n:03d}"
        applied = fields.pop("applied", ids)
        pending = [m for m in ids if m not in applied]
        return commands.SchemaStatus(
            schema_for(org), org, True, applied, pending, fields.pop("unknown", []), **fields
        )

    tenants = [
        *[tenant(n, applied=ids[:n]) for n in range(1, 8)],  # seven ways of being behind
        tenant(8, applied=ids[:1]),
        tenant(9, changed=[ids[0]]),
        tenant(10, unknown=["20240101000000_gone"]),
        tenant(11, old_layout=True),
    ]
    result = commands.Status(tenants[0], tenants, ids[0], ids[-1])

    assert report.status_groups(result) == [
        f"tenants: 11 registered; head {ids[-1]}",
        f"  2 behind by 7 ({', '.join(ids[1:4])} and 4 more): org_g001, org_g008",
        f"  1 behind by 6 ({', '.join(ids[2:5])} and 3 more): org_g002",
        f"  1 behind by 5 ({', '.join(ids[3:6])} and 2 more): org_g003",
        f"  1 behind by 4 ({', '.join(ids[4:7])} and 1 more): org_g004",
        f"  1 behind by 3 ({', '.join(ids[5:8])}): org_g005",
        "  2 behind in 2 other ways",
        "  2 with drift: org_g009, org_g010",
        "  1 in the old layout: org_g011",
    ]
    assert report.plural(1, "job") == "1 job" and report.plural(2, "job") == "2 jobs"
    assert report.plural(0, "tenant") == "0 tenants"
