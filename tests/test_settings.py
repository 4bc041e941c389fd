"""Settings: DB_* variables or DATABASE_URL to libpq parameters, `.env`, the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest

from yoyo_tenants import migrate_master
from yoyo_tenants.errors import ConfigError
from yoyo_tenants.settings import Settings, connection_params, describe

from .conftest import applied_ids, tables

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


# -- no server configured: embedded ----------------------------------------------------------------


def test_no_db_host_and_no_database_url_means_the_embedded_database(tmp_path):
    env = {"DB_PORT": "5433", "DB_USER": "app", "DB_PASSWORD": SECRET, "DB_SSL": "true"}
    assert connection_params(env) == {}
    settings = Settings.load(tmp_path, environ=env)
    assert settings.connection == {}
    assert settings.embedded
    assert settings.data_dir == tmp_path.resolve() / ".yoyo-tenants"


@pytest.mark.parametrize("host", ["", "   "])
def test_a_blank_db_host_means_the_embedded_database(host):
    assert connection_params({"DB_HOST": host, "DB_NAME": "x"}) == {}


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
