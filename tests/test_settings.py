"""Settings: DB_* variables or DATABASE_URL to libpq parameters, `.env`, the embedded default."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from psycopg2 import sql

from yoyo_tenants import migrate_master
from yoyo_tenants.db import connect
from yoyo_tenants.errors import ConfigError, ConnectionFailed
from yoyo_tenants.settings import Settings, connection_params, describe

from . import servers
from .conftest import REPO, Admin, applied_ids, run_invoke, tables, user_env

BASE = {"DB_HOST": "db.example.com", "DB_USER": "app", "DB_NAME": "coaching"}
SECRET = "s3cr3t-Pa55word"


# -- DB_SSL --------------------------------------------------------------------------------------


def test_db_ssl_true_verifies_the_server_against_the_resolved_cert_path(tmp_path, monkeypatch):
    cert = tmp_path / "certs" / "ca.pem"
    cert.parent.mkdir()
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.chdir(tmp_path)

    params = connection_params({**BASE, "DB_SSL": "true", "DB_SSL_CERT_PATH": "certs/ca.pem"})

    assert params["sslmode"] == "verify-full"
    assert params["sslrootcert"] == str(cert.resolve())
    assert Path(params["sslrootcert"]).is_absolute()


def test_db_ssl_true_without_a_cert_path_still_verifies_the_server():
    params = connection_params({**BASE, "DB_SSL": "true"})
    assert params["sslmode"] == "verify-full"
    assert "sslrootcert" not in params


def test_db_ssl_reject_unauthorized_false_encrypts_without_verifying(tmp_path):
    cert = tmp_path / "ca.pem"
    cert.write_text("x")
    params = connection_params(
        {
            **BASE,
            "DB_SSL": "true",
            "DB_SSL_REJECT_UNAUTHORIZED": "false",
            "DB_SSL_CERT_PATH": str(cert),
        }
    )
    assert params["sslmode"] == "require"
    assert "sslrootcert" not in params


@pytest.mark.parametrize("value", [None, "false", "0", "no", "off", ""])
def test_db_ssl_unset_or_false_disables_ssl(value):
    env = dict(BASE) if value is None else {**BASE, "DB_SSL": value}
    assert connection_params(env)["sslmode"] == "disable"


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", " on "])
def test_db_ssl_accepts_the_usual_spellings_of_true(value):
    assert connection_params({**BASE, "DB_SSL": value})["sslmode"] == "verify-full"


@pytest.mark.parametrize(
    "env",
    [
        {"DB_SSL": "maybe"},
        {"DB_SSL": "ture"},
        {"DB_SSL": "true", "DB_SSL_REJECT_UNAUTHORIZED": "nope"},
    ],
    ids=["DB_SSL=maybe", "DB_SSL=ture", "DB_SSL_REJECT_UNAUTHORIZED=nope"],
)
def test_a_bad_boolean_is_a_config_error_naming_the_variable(env):
    with pytest.raises(ConfigError) as info:
        connection_params({**BASE, **env})
    name = "DB_SSL_REJECT_UNAUTHORIZED" if "DB_SSL_REJECT_UNAUTHORIZED" in env else "DB_SSL"
    assert name in str(info.value)
    assert info.value.exit_code == 2


def test_a_missing_cert_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as info:
        connection_params({**BASE, "DB_SSL": "true", "DB_SSL_CERT_PATH": str(missing)})
    assert "DB_SSL_CERT_PATH" in str(info.value)
    assert str(missing) in str(info.value)


# -- DB_* ----------------------------------------------------------------------------------------


def test_db_variables_map_to_libpq_parameters():
    params = connection_params(
        {**BASE, "DB_PORT": "6543", "DB_PASSWORD": SECRET, "DB_SSL": "false"}
    )
    assert params == {
        "host": "db.example.com",
        "port": "6543",
        "user": "app",
        "dbname": "coaching",
        "password": SECRET,
        "sslmode": "disable",
        "connect_timeout": "10",
        "application_name": "yoyo-tenants",
    }


def test_db_host_alone_defaults_to_postgres_on_5432():
    params = connection_params({"DB_HOST": "localhost"})
    assert (params["port"], params["user"], params["dbname"]) == ("5432", "postgres", "postgres")
    assert "password" not in params


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-1", "54 32", "5432.0", "²"])
def test_a_bad_db_port_is_a_config_error(port):
    with pytest.raises(ConfigError) as info:
        connection_params({**BASE, "DB_PORT": port})
    assert "DB_PORT" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("name", ["DB_HOST", "DB_PASSWORD", "DATABASE_URL", "DB_SSL"])
def test_a_nul_character_in_a_variable_is_a_config_error(name):
    with pytest.raises(ConfigError) as info:
        connection_params({**BASE, name: "x\x00y"})
    assert name in str(info.value)


# -- DATABASE_URL --------------------------------------------------------------------------------


def test_database_url_is_an_alternative_to_the_db_variables():
    params = connection_params({"DATABASE_URL": f"postgresql://app:{SECRET}@db.internal:5433/crm"})
    assert params["host"] == "db.internal"
    assert params["port"] == "5433"
    assert params["user"] == "app"
    assert params["password"] == SECRET
    assert params["dbname"] == "crm"
    assert params["sslmode"] == "disable"


def test_database_url_wins_over_db_host():
    params = connection_params({**BASE, "DATABASE_URL": "postgresql://u@urlhost/urldb"})
    assert (params["host"], params["dbname"], params["user"]) == ("urlhost", "urldb", "u")


def test_database_url_sslmode_is_kept_unless_db_ssl_is_set():
    url = "postgresql://u@h/d?sslmode=require"
    assert connection_params({"DATABASE_URL": url})["sslmode"] == "require"
    assert connection_params({"DATABASE_URL": url, "DB_SSL": "true"})["sslmode"] == "verify-full"


def test_a_malformed_database_url_is_a_config_error_that_hides_the_password():
    with pytest.raises(ConfigError) as info:
        connection_params({"DATABASE_URL": f"postgresql://app:{SECRET}@[::1/crm"})
    assert "DATABASE_URL" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "password", ["Pa/ss9word", "12/34", "p@ssword", "p@ss/word", "/leading", "trailing@"]
)
def test_a_password_with_an_unencoded_slash_or_at_is_refused_without_showing_any_of_it(password):
    """libpq would read `app:Pa/ss9word@db/crm` as host `app`, port `Pa`, database
    `ss9word@db/crm`: before, the message then showed `@app:Pa/ss9word@db...`."""
    with pytest.raises(ConfigError) as info:
        connection_params({"DATABASE_URL": f"postgresql://app:{password}@db.internal/crm"})
    message = str(info.value)
    assert message.startswith("DATABASE_URL has an '@' that does not end the user name")
    assert "%40" in message and "%2F" in message
    assert message == refusal("postgresql://app:x/y@db.internal/crm")  # one fixed sentence


@pytest.mark.parametrize("password", ["Pa/ss9word", "p@ss:w%rd?#", " a b ", "é€"])
def test_a_percent_encoded_password_is_read_back_exactly(password):
    url = f"postgresql://app:{quote(password, safe='')}@db.internal:5433/crm"
    params = connection_params({"DATABASE_URL": url})
    assert (params["user"], params["password"]) == ("app", password)
    assert (params["host"], params["port"], params["dbname"]) == ("db.internal", "5433", "crm")


@pytest.mark.parametrize(
    "url, says",
    [
        (f"host=db.internal password={SECRET}", "must be a URL starting with postgresql://"),
        (f"mysql://app:{SECRET}@db/crm", "must be a URL starting with postgresql://"),
        (f"postgresql://app:{SECRET}%zz@db/crm", "'%' that is not followed by two hex digits"),
        (f"postgresql://app:{SECRET}%00@db/crm", "'%' that is not followed by two hex digits"),
        (f"postgresql://app:{SECRET}@db:fivefour/crm", "port must be a port number"),
        (f"postgresql://app:{SECRET}@db/crm?application_name=a@b", "'@' that does not end"),
        (f"postgresql://app:{SECRET}@db/crm?nosuchparam=1", "not a valid PostgreSQL connection"),
    ],
    ids=["key=value", "mysql", "bad percent", "%00", "port", "@ in a parameter", "unknown param"],
)
def test_a_database_url_libpq_cannot_use_is_one_line_that_never_echoes_it(url, says):
    with pytest.raises(ConfigError) as info:
        connection_params({"DATABASE_URL": url})
    message = str(info.value)
    assert says in message
    assert SECRET not in message and "db" not in message.replace("dbname", "")
    assert "\n" not in message
    # nothing chained either: a traceback would print libpq's text, which quotes the URL
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def refusal(url: str) -> str:
    with pytest.raises(ConfigError) as info:
        connection_params({"DATABASE_URL": url})
    return str(info.value)


def test_a_database_url_may_name_several_hosts_and_a_socket_folder():
    several = connection_params({"DATABASE_URL": "postgresql://u@h1:5432,h2:5433/d"})
    assert (several["host"], several["port"]) == ("h1,h2", "5432,5433")
    socket_folder = connection_params({"DATABASE_URL": "postgresql:///d?host=/run/pg&port=5"})
    assert (socket_folder["host"], socket_folder["port"]) == ("/run/pg", "5")


# -- no server configured: embedded ----------------------------------------------------------------


def test_no_db_variable_and_no_database_url_means_the_embedded_database(tmp_path):
    env = {"YOYO_TENANTS_LOCK_TIMEOUT": "3", "PGHOST": "elsewhere"}
    assert connection_params(env) == {}
    settings = Settings.load(tmp_path, environ=env)
    assert settings.connection == {}
    assert settings.embedded
    assert settings.data_dir == tmp_path.resolve() / ".yoyo-tenants"


@pytest.mark.parametrize(
    "env",
    [{"DB_HOST": ""}, {"DB_HOST": "   "}, {"DB_HOST": "", "DB_NAME": "", "DATABASE_URL": " "}],
    ids=["DB_HOST empty", "DB_HOST blank", "all empty"],
)
def test_variables_that_are_all_empty_mean_the_embedded_database(env):
    assert connection_params(env) == {}


@pytest.mark.parametrize(
    "env, named",
    [
        (
            {"DB_PORT": "5433", "DB_USER": "app", "DB_PASSWORD": SECRET},
            "DB_PORT, DB_USER, DB_PASSWORD",
        ),
        ({"DB_HOST": "", "DB_NAME": "f2"}, "DB_NAME is set"),
        ({"DB_HOST": "  ", "DB_SSL": "false"}, "DB_SSL is set"),
        ({"DATABASE_URL": "", "DB_SSL_CERT_PATH": "ca.pem"}, "DB_SSL_CERT_PATH"),
    ],
    ids=["no DB_HOST", "empty DB_HOST", "blank DB_HOST", "empty DATABASE_URL"],
)
def test_db_variables_without_db_host_are_a_config_error_not_the_embedded_database(env, named):
    """Before: these silently migrated a fresh embedded database."""
    with pytest.raises(ConfigError) as info:
        connection_params(env)
    message = str(info.value)
    assert message.startswith("DB_HOST is empty or unset but ")
    assert named in message
    assert SECRET not in message
    assert info.value.exit_code == 2


# -- .env ----------------------------------------------------------------------------------------


def test_dotenv_is_read_from_the_project_root(tmp_path):
    (tmp_path / ".env").write_text("DB_HOST=filehost\nDB_NAME=filedb\nDB_PORT=6000\n")
    settings = Settings.load(tmp_path, environ={})
    assert settings.connection["host"] == "filehost"
    assert settings.connection["dbname"] == "filedb"
    assert settings.connection["port"] == "6000"
    assert settings.master_dir == tmp_path.resolve() / "migrations" / "master"
    assert settings.tenant_dir == tmp_path.resolve() / "migrations" / "tenant"


def test_the_real_environment_wins_over_dotenv(tmp_path):
    (tmp_path / ".env").write_text("DB_HOST=filehost\nDB_NAME=filedb\nDB_PASSWORD=filepass\n")
    settings = Settings.load(tmp_path, environ={"DB_HOST": "envhost", "DB_PASSWORD": "envpass"})
    assert settings.connection["host"] == "envhost"
    assert settings.connection["password"] == "envpass"
    assert settings.connection["dbname"] == "filedb"  # not overridden: still from .env


def test_database_url_in_the_environment_wins_over_db_host_in_dotenv(tmp_path):
    (tmp_path / ".env").write_text("DB_HOST=filehost\n")
    settings = Settings.load(tmp_path, environ={"DATABASE_URL": "postgresql://u@urlhost/d"})
    assert settings.connection["host"] == "urlhost"


def test_a_bad_value_in_dotenv_is_a_config_error(tmp_path):
    (tmp_path / ".env").write_text("DB_HOST=h\nDB_PORT=fivefourthreetwo\n")
    with pytest.raises(ConfigError, match="DB_PORT"):
        Settings.load(tmp_path, environ={})


@pytest.mark.parametrize(
    "text, line",
    [
        ('DB_HOST=h\nDB_NAME="f2"x\n', 2),
        ("DB NAME=f2\n", 1),
        (f'DB_HOST=h\n\n\n# the password:\nDB_PASSWORD="{SECRET}\nDB_NAME=f2\n', 5),
        ("APP_SECRET='f2'x\nDB_HOST=h\n", 1),
    ],
    ids=["text after quotes", "space in name", "unclosed quote", "not our variable"],
)
def test_a_dotenv_line_python_dotenv_cannot_parse_is_a_config_error_naming_it(tmp_path, text, line):
    """Before: python-dotenv logged a warning, dropped the line, and with DB_NAME gone the
    `postgres` database was migrated."""
    (tmp_path / ".env").write_text(text)
    with pytest.raises(ConfigError) as info:
        Settings.load(tmp_path, environ={})
    message = str(info.value)
    assert message.startswith(f".env line {line} cannot be parsed: ")
    assert "f2" not in message and SECRET not in message  # the line is never shown
    assert info.value.exit_code == 2


def test_a_dotenv_that_is_not_utf8_is_a_config_error_naming_the_line(tmp_path):
    (tmp_path / ".env").write_bytes(b"DB_HOST=h\n# caf\xe9\nDB_NAME=app\n")
    with pytest.raises(ConfigError, match=r"^\.env line 2 is not valid UTF-8$"):
        Settings.load(tmp_path, environ={})


def test_a_dotenv_saved_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / ".env").write_text("\ufeffDB_HOST=filehost\n", encoding="utf-8")
    assert Settings.load(tmp_path, environ={}).connection["host"] == "filehost"


def test_one_of_our_names_without_an_equals_sign_in_dotenv_is_a_config_error(tmp_path):
    (tmp_path / ".env").write_text("APP_FLAG\nDB_HOST=h\n\nDB_NAME\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(tmp_path, environ={})
    assert str(info.value) == ".env line 4: DB_NAME has no '=' (write DB_NAME= to leave it empty)"


def test_an_empty_db_host_in_dotenv_with_other_db_variables_is_a_config_error(tmp_path):
    (tmp_path / ".env").write_text("DB_HOST=\nDB_NAME=app\nDB_PASSWORD=\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(tmp_path, environ={})
    assert str(info.value).startswith("DB_HOST is empty or unset but DB_NAME is set: ")


def test_an_empty_db_host_in_the_environment_does_not_fall_back_to_the_embedded_database(tmp_path):
    (tmp_path / ".env").write_text("DB_HOST=filehost\nDB_NAME=app\n")
    with pytest.raises(ConfigError, match="DB_HOST is empty or unset but DB_NAME is set"):
        Settings.load(tmp_path, environ={"DB_HOST": ""})


def test_the_example_dotenv_copied_as_is_keeps_the_embedded_database(tmp_path):
    example = (REPO / ".env.example").read_text()
    (tmp_path / ".env").write_text(example)
    assert Settings.load(tmp_path, environ={}).embedded

    server_lines = ("# DB_HOST=", "# DB_PORT=", "# DB_USER=", "# DB_PASSWORD=", "# DB_NAME=")
    uncommented = "\n".join(
        line.removeprefix("# ") if line.startswith(server_lines) else line
        for line in example.splitlines()
    )
    (tmp_path / ".env").write_text(uncommented)
    settings = Settings.load(tmp_path, environ={})
    assert describe(settings.connection) == "app@localhost:5432/app"
    assert settings.connection["sslmode"] == "disable"


def invoke(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_invoke(cwd, *args, env=user_env())


@pytest.mark.parametrize(
    "text, says",
    [('DB_NAME="f2"x\n', "error: .env line 1 cannot be parsed"), ("DB_HOST=\nDB_NAME=f2\n", "")],
    ids=["unparseable line", "empty DB_HOST"],
)
def test_invoke_stops_at_a_bad_dotenv_with_one_line_and_exit_2(tmp_path, text, says):
    (tmp_path / "tasks.py").write_text((REPO / "tasks.py").read_text())
    (tmp_path / ".env").write_text(text)

    done = invoke(tmp_path, "make-tenant", "add_column")  # needs settings, never a database

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(says or "error: DB_HOST is empty or unset but DB_NAME is set")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "migrations").exists()
    assert not (tmp_path / ".yoyo-tenants").exists()


# -- never the password --------------------------------------------------------------------------


def test_describe_never_contains_the_password():
    from_vars = connection_params({**BASE, "DB_PASSWORD": SECRET, "DB_PORT": "6543"})
    from_url = connection_params({"DATABASE_URL": f"postgresql://app:{SECRET}@h:5433/crm"})
    assert describe(from_vars) == "app@db.example.com:6543/coaching"
    assert describe(from_url) == "app@h:5433/crm"
    for params in (from_vars, from_url):
        assert SECRET not in describe(params)


def test_settings_repr_never_contains_the_password(tmp_path):
    settings = Settings.load(tmp_path, environ={**BASE, "DB_PASSWORD": SECRET})
    assert settings.connection["password"] == SECRET
    assert SECRET not in repr(settings)


# -- a real connection ---------------------------------------------------------------------------


def test_settings_loaded_from_db_variables_connect_and_migrate_master(project, database):
    env = {
        "DB_HOST": database["host"],  # the server's unix socket directory
        "DB_PORT": database["port"],
        "DB_USER": database["user"],
        "DB_NAME": database["dbname"],
    }
    settings = Settings.load(project.root, environ=env)
    assert not settings.embedded
    assert settings.connection["sslmode"] == "disable"

    run = migrate_master(settings)

    assert run.ok
    assert {"tenants", "focus_areas", "coaching_categories"} <= tables(database, "public")
    master = sorted(p.stem for p in settings.master_dir.glob("*.sql") if ".rollback" not in p.name)
    assert applied_ids(database, "public") == master
    assert run.schemas[0].migrations == master


# -- never the password, whatever it holds -------------------------------------------------------

ROLE = "pw_app"
RIGHT = "Right-horse-battery-staple"
INNOCENT = "zQ7xK2mWp9vL"  # a wrong password none of our messages could contain by chance
HOW = ("DB_PASSWORD", "DATABASE_URL percent-encoded", "DATABASE_URL as typed")
TARGETS = ("wrong password", "unreachable", "malformed")
PASSWORDS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=24),
    st.text("/@:%?#[]'\" \\ae5é€", min_size=1, max_size=8),
    st.sampled_from(["Pa/ss9word", "p@ss", "s", "se", "e ", "%", "%2F", "ü", "'", '"', " "]),
)


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture(scope="module")
def guarded():
    """A PostgreSQL on TCP where ROLE logs in with its password (scram-sha-256)."""
    with servers.postgres(hba=("host all all 127.0.0.1/32 scram-sha-256",)) as postgres:
        with Admin(postgres.socket_params()) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(RIGHT)
                )
            )
        yield postgres


@pytest.fixture(scope="module")
def ports(guarded):
    return {"wrong password": str(guarded.port), "unreachable": closed_port(), "malformed": "x"}


def env_for(how: str, password: str, port: str) -> dict[str, str]:
    if how == "DB_PASSWORD":
        return {
            "DB_HOST": "127.0.0.1",
            "DB_PORT": port,
            "DB_USER": ROLE,
            "DB_NAME": "postgres",
            "DB_PASSWORD": password,
        }
    if how == "DATABASE_URL percent-encoded":
        password = quote(password, safe="")
    return {"DATABASE_URL": f"postgresql://{ROLE}:{password}@127.0.0.1:{port}/postgres"}


def what_the_user_sees(root: Path, env: dict[str, str]) -> list[str]:
    """The error's message and repr, and the settings' repr when they loaded."""
    try:
        loaded = Settings.load(root, environ=env)
    except ConfigError as exc:
        return [str(exc), repr(exc)]
    with pytest.raises(ConnectionFailed) as info:
        connect(loaded.connection).close()
    return [str(info.value), repr(info.value), repr(loaded)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def innocent(root, ports):
    """What the user sees, per way and target, with a password that cannot occur in it."""
    return {
        (how, target): what_the_user_sees(root, env_for(how, INNOCENT, port))
        for how in HOW
        for target, port in ports.items()
    }


# The fixed sentences that refuse a DATABASE_URL libpq would misread.
MISREAD = {refusal(f"postgresql://u:{typed}@h/d") for typed in ("a/b", "a%zb", "%FF")}


def test_the_right_password_connects_and_a_wrong_one_is_refused_by_the_server(
    guarded, root, innocent
):
    """The control for the tests below: the server does check the password."""
    for how in HOW:
        loaded = Settings.load(root, environ=env_for(how, RIGHT, str(guarded.port)))
        connect(loaded.connection).close()
        refused = innocent[how, "wrong password"][0]
        assert refused.startswith(f"cannot connect to {ROLE}@127.0.0.1:{guarded.port}/postgres: ")
        assert f'password authentication failed for user "{ROLE}"' in refused
    assert "Connection refused" in innocent["DB_PASSWORD", "unreachable"][0]
    assert "DB_PORT must be a port number" in innocent["DB_PASSWORD", "malformed"][0]
    assert "DATABASE_URL's port must be" in innocent["DATABASE_URL as typed", "malformed"][0]


@pytest.mark.parametrize("password", ["s", "se", "e", "on", "ec"])
def test_a_short_password_does_not_mangle_the_message(root, ports, innocent, password):
    """Before: it was replaced by *** in libpq's words ("Name or ***rvice not known")."""
    for (how, target), expected in innocent.items():
        assert what_the_user_sees(root, env_for(how, password, ports[target])) == expected


@hypothesis.settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(password=PASSWORDS, how=st.sampled_from(HOW), target=st.sampled_from(TARGETS))
def test_a_password_never_shows_whatever_it_holds(root, ports, innocent, password, how, target):
    """The user sees exactly what they would see with another password: so no part and no form
    of it shows, and nothing was masked. Only a URL that libpq would misread (an unencoded '@'
    or '/', a stray '%') is refused instead, with a fixed sentence."""
    seen = what_the_user_sees(root, env_for(how, password, ports[target]))

    assert all(text.isprintable() for text in seen)  # one line, no control characters
    if seen != innocent[how, target]:
        assert how == "DATABASE_URL as typed"
        assert seen[0] in MISREAD
    ours = " ".join([*innocent[how, target], *MISREAD])
    for form in {password, quote(password, safe=""), repr(password)}:
        if form not in ours:  # a form our own words hold by chance ("e") proves nothing
            assert not any(form in text for text in seen)
