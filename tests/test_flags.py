"""Flags that mean one thing: the same short flag for the same option in every task, numbers
shown as numbers, and a bad command line as one `error:` line and exit 2 before anything runs.

The flags are read from invoke's own parser contexts for the collection, as `invoke` builds
them; the command line itself is run only where it is what is tested."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from invoke import Program

from yoyo_tenants import commands
from yoyo_tenants.tasks import ns

from .conftest import REPO, applied_ids, copy_migrations, run_invoke, run_program, user_env
from .test_output import register
from .test_scale import Scale

#: The options that take a number, as a user would guess them from their names and help.
NUMERIC = {
    "jobs",
    "steps",
    "run",
    "retries",
    "lock-wait",
    "lock-timeout",
    "statement-timeout",
    "wave-pause",
}


def contexts():
    return ns.to_contexts()


def short_flags(context) -> dict[str, str]:
    """A task's short flags, each with its option's long name."""
    return {name: arg.names[0] for arg in context.args.values() for name in arg.names[1:]}


def test_a_short_flag_means_the_same_option_in_every_task():
    meaning: dict[str, set[str]] = {}
    short_of: dict[str, set[str | None]] = {}
    for context in contexts():
        shorts = short_flags(context)
        for letter, option in shorts.items():
            assert len(letter) == 1, (context.name, letter)
            meaning.setdefault(letter, set()).add(option)
        for arg in context.args.values():
            letters = [n for n in arg.names[1:] if len(n) == 1]
            short_of.setdefault(arg.names[0], set()).add(letters[0] if letters else None)

    assert {letter: options for letter, options in meaning.items() if len(options) > 1} == {}
    # and an option has its letter in every task it is in, or in none
    assert {option: s for option, s in short_of.items() if len(s) > 1} == {}
    assert meaning["t"] == {"tenant"} and "to" not in {o for s in meaning.values() for o in s}


def test_no_short_flag_hides_one_of_invokes_own():
    core = {name for arg in Program().core_args() for name in arg.names if len(name) == 1}
    for context in contexts():
        assert not set(short_flags(context)) & core, context.name


def test_help_shows_numeric_options_as_numbers_and_every_valued_option_with_its_value():
    seen = set()
    for context in contexts():
        for flag_spec, _ in context.help_tuples():
            long_spec = flag_spec.split(", ")[-1]
            name = long_spec.removeprefix("--").split("=")[0]
            arg = context.args[name]
            if name in NUMERIC:
                seen.add(name)
                assert long_spec == f"--{name}=INT", (context.name, flag_spec)
            elif arg.takes_value:
                assert long_spec == f"--{name}=STRING", (context.name, flag_spec)
            else:
                assert "=" not in long_spec, (context.name, flag_spec)
    assert seen == NUMERIC


def cli(cwd, *args, env=None) -> subprocess.CompletedProcess:
    return run_invoke(cwd, *args, env=user_env(**(env or {})), timeout=60)


@pytest.fixture
def folder(tmp_path):
    """A project folder with no database configured: none may be needed, or started."""
    shutil.copy(REPO / "tasks.py", tmp_path)
    copy_migrations(tmp_path)
    yield tmp_path
    assert not (tmp_path / ".yoyo-tenants").exists()


def test_invoke_help_shows_the_numbers_and_the_short_flags(folder):
    done = cli(folder, "--help", "rollback-tenants")

    assert done.returncode == 0, done.stderr
    for spec in ["--jobs=INT", "--steps=INT", "--run=INT", "--lock-wait=INT", "--to=STRING"]:
        assert spec in done.stdout
    for spec in ["-t STRING, --tenant=STRING", "-j INT, --jobs=INT", "-q, --quiet", "-y, --yes"]:
        assert spec in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("provision-tenant",),
        ("provision-tenant", "--dry-run"),
        ("make-tenant",),
        ("deprovision-tenant", "--yes"),
        ("migrate-tenants", "--nope"),
        ("migrate-tenants", "--jobs"),
        ("status", "--tenant"),
    ],
    ids=" ".join,
)
def test_a_command_line_the_program_cannot_parse_exits_2_with_one_error_line(folder, args):
    done = run_program(folder, *args, env=user_env(), timeout=60)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    if args[0] in ("provision-tenant", "deprovision-tenant"):
        assert "'org_id'" in lines[0]
    if args[-1] == "--jobs":
        assert lines[0] == "error: Flag --jobs needed value and was not given one!"


@pytest.mark.parametrize(
    "args", [("provision-tenant",), ("migrate-tenants", "--nope")], ids=" ".join
)
def test_invoke_itself_prints_its_parser_s_one_line_and_exits_1(folder, args):
    # invoke's own program, which the package leaves as it is: its message, its exit code.
    done = cli(folder, *args)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.fixture
def crowd(project) -> Scale:
    """Public migrated; 50 tenants migrated twice (two batches)."""
    for path in project.tenant_dir.iterdir():
        path.unlink()
    assert commands.migrate_master(project).ok
    scale = Scale(project)
    scale.ids = [scale.migration(1)]
    scale.tenants = register(scale, [f"org_flag{i:03d}" for i in range(50)])
    assert scale.migrate(jobs=4).ok
    scale.ids.append(scale.migration(2))
    assert scale.migrate(jobs=4).ok
    shutil.copy(REPO / "tasks.py", project.root)
    return scale


def test_a_mistyped_to_is_one_usage_error_before_anything_runs(crowd):
    env = crowd.env()

    done = cli(crowd.settings.root, "rollback-tenants", "--to", "20250102000001_tl", env=env)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""  # not even the header: arguments are checked first
    assert done.stderr == "error: --to 20250102000001_tl: no migration file has that id\n"
    assert all(applied_ids(crowd.params, t.schema) == crowd.ids for t in crowd.tenants)

    master = cli(crowd.settings.root, "rollback-master", "--to", "nope", env=env)
    assert master.returncode == 2
    assert master.stderr == "error: --to nope: no migration file has that id\n"


@pytest.mark.parametrize(
    "args",
    [
        ("migrate-tenants", "--jobs", "0"),
        ("rollback-tenants", "-j", "0"),
        ("migrate-tenants", "--lock-wait", "soon"),
        ("rollback-tenants", "--statement-timeout", "nan"),
        ("rollback-tenants", "--steps", "2", "--to", "20250102000001_t1"),
    ],
    ids=" ".join,
)
def test_bad_arguments_are_usage_errors_before_the_header(crowd, args):
    done = cli(crowd.settings.root, *args, env=crowd.env())

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: ")
    assert all(applied_ids(crowd.params, t.schema) == crowd.ids for t in crowd.tenants)


def test_seconds_may_have_decimals(crowd):
    done = cli(crowd.settings.root, "migrate-tenants", "--lock-wait", "0.5", env=crowd.env())

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("migrating 0 of 50 tenants with ")
