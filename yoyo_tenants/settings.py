"""Where the database is and where the migrations are: read from the environment, `.env` and the
`[tool.yoyo-tenants]` table of `pyproject.toml`.

The variables are the original Knex tool's (DB_HOST, DB_PORT, DB_USER, DB_PASSWORD, DB_NAME, DB_SSL,
DB_SSL_CERT_PATH, DB_SSL_REJECT_UNAUTHORIZED), plus DATABASE_URL as a one-line alternative. With
none of them set, the commands use a project-local embedded PostgreSQL. Nothing is guessed: a
`.env` line that cannot be read, or DB_* variables without DB_HOST, are errors.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, overload

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from psycopg2 import ProgrammingError
from psycopg2.extensions import parse_dsn

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

VARIABLES = (
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_PASSWORD",
    "DB_NAME",
    "DB_SSL",
    "DB_SSL_CERT_PATH",
    "DB_SSL_REJECT_UNAUTHORIZED",
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_TABLE = "pyproject.toml [tool.yoyo-tenants]"
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})|%00")
#: The keys of [tool.yoyo-tenants].
KEYS = (
    "master-migrations",
    "tenant-migrations",
    "tenants-query",
    "canary-tenants",
    "lint-exclude",
    "lint-include",
)
#: A squawk rule's name (it goes on squawk's command line, so nothing that could be a flag).
_RULE = re.compile(r"[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know before it connects."""

    root: Path
    #: libpq keyword parameters; empty when the embedded database is used.
    connection: Mapping[str, str] = field(default_factory=dict, repr=False)
    master_dir: Path = Path("migrations/master")
    tenant_dir: Path = Path("migrations/tenant")
    #: Seconds a migration statement may wait for a lock, and may run (0: no limit).
    lock_timeout: float = 5.0
    statement_timeout: float = 0.0
    #: "on": every migration statement in a message of its own, as Citus needs; "auto": so
    #: when the server has the citus extension; "off": never.
    citus: str = "auto"
    #: SQL returning (tenant id, schema name) rows; None: the registry, public.tenants.
    tenants_query: str | None = None
    #: The tenants a deploy in waves starts with: their org ids, or SQL returning (tenant id,
    #: schema name) rows like tenants_query; None: the first in the registry's order.
    canary_tenants: tuple[str, ...] | str | None = None
    #: squawk rules `lint` leaves out, beyond those the tool satisfies, and opt-in rules it adds.
    lint_exclude: tuple[str, ...] = ()
    lint_include: tuple[str, ...] = ()

    @property
    def embedded(self) -> bool:
        return not self.connection

    @property
    def data_dir(self) -> Path:
        """The embedded database's home, inside the project and ignored by git."""
        return self.root / ".yoyo-tenants"

    @classmethod
    def load(cls, root: Path | str = ".", environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings for the project in `root`; the real environment wins over `.env`."""
        root = Path(root).resolve()
        master_dir, tenant_dir, tenants_query = project_config(root)
        deploy = deploy_config(root)
        env = read_dotenv(root / ".env")
        env.update(os.environ if environ is None else environ)
        return cls(
            root=root,
            connection=connection_params(env),
            master_dir=master_dir,
            tenant_dir=tenant_dir,
            lock_timeout=_seconds(env, "YOYO_TENANTS_LOCK_TIMEOUT", 5.0),
            statement_timeout=_seconds(env, "YOYO_TENANTS_STATEMENT_TIMEOUT", 0.0),
            citus=_choice(env, "YOYO_TENANTS_CITUS", ("auto", "on", "off")),
            tenants_query=tenants_query,
            **deploy,
        )


# -- .env ----------------------------------------------------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    """The variables `.env` at `path` sets ({} when there is none).

    A line python-dotenv cannot parse, or bytes that are not UTF-8, are errors naming the line:
    python-dotenv itself only logs a warning and goes on without the line. The line's text is
    never shown: it may hold a password.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM would otherwise become part of the first name
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f".env line {line} is not valid UTF-8") from None
    for binding in parse_stream(io.StringIO(text)):
        # A binding's text starts with the blank lines before it; the line we name does not.
        before = binding.original.string
        line = binding.original.line + before[: len(before) - len(before.lstrip())].count("\n")
        if binding.error:
            raise ConfigError(
                f".env line {line} cannot be parsed: write NAME=value, and quote a value that "
                "holds quotes, spaces or '#' as a whole"
            )
        if binding.value is None and _ours(binding.key):
            name = binding.key
            raise ConfigError(
                f".env line {line}: {name} has no '=' (write {name}= to leave it empty)"
            )
    values = dotenv_values(stream=io.StringIO(text))  # parsed again, for its ${VAR} expansion
    return {name: value for name, value in values.items() if value is not None}


def _ours(name: str | None) -> bool:
    return name is not None and (name in VARIABLES or name.startswith("YOYO_TENANTS_"))


# -- the server ----------------------------------------------------------------------------------


def connection_params(env: Mapping[str, str]) -> dict[str, str]:
    """Map the DB_* variables (or DATABASE_URL) to libpq keyword parameters.

    A variable whose value is empty or blank counts as unset. Returns an empty dict when none is
    set: use the embedded database. DB_* variables without DB_HOST are an error, not the embedded
    database.
    """
    for name in VARIABLES:
        if "\x00" in env.get(name, ""):
            raise ConfigError(f"{name} contains a NUL character")
    url = env.get("DATABASE_URL", "").strip()
    host = env.get("DB_HOST", "").strip()
    if url:
        params = url_params(url)
    elif host:
        params = {
            "host": host,
            "port": _port(env.get("DB_PORT", "5432")),
            "user": env.get("DB_USER") or "postgres",
            "dbname": env.get("DB_NAME") or "postgres",
        }
        if env.get("DB_PASSWORD"):
            params["password"] = env["DB_PASSWORD"]
    else:
        given = ", ".join(name for name in VARIABLES if env.get(name, "").strip())
        if given:
            raise ConfigError(
                f"DB_HOST is empty or unset but {given} {'are' if ',' in given else 'is'} set: "
                f"set DB_HOST (or DATABASE_URL) to use a server, or unset {given} to use the "
                "embedded database"
            )
        return {}
    if "DB_SSL" in env or "sslmode" not in params:
        params.update(ssl_params(env))
    params.setdefault("connect_timeout", "10")
    params.setdefault("application_name", "yoyo-tenants")
    return params


def url_params(url: str) -> dict[str, str]:
    """libpq parameters from a DATABASE_URL; never a message that quotes it.

    libpq ends the user name and password at the first '@', and only looks for one before the
    first '/': an '@' or '/' left unencoded in a password moves the rest of it into the host,
    port, database name or another parameter, which messages do show. Such URLs are refused.
    """
    scheme, _, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        raise ConfigError("DATABASE_URL must be a URL starting with postgresql:// or postgres://")
    credentials, at, after = rest.partition("@")
    if at and ("/" in credentials or "@" in after):
        raise ConfigError(
            "DATABASE_URL has an '@' that does not end the user name and password: write '@' "
            "and '/' in the user name, password and parameters as %40 and %2F"
        )
    if _PERCENT.search(url):
        raise ConfigError(
            "DATABASE_URL has a '%' that is not followed by two hex digits (or is %00): write a "
            "'%' in the password as %25"
        )
    try:
        params = parse_dsn(url)
    except UnicodeDecodeError:
        raise ConfigError("DATABASE_URL has percent-encoded bytes that are not UTF-8") from None
    except ProgrammingError:
        # libpq's reason quotes the URL or a part of it, password included: say only what is
        # wrong, and chain nothing that a traceback would print.
        raise ConfigError(
            "DATABASE_URL is not a valid PostgreSQL connection URL "
            "(postgresql://user:password@host:port/dbname?param=value)"
        ) from None
    if not all(not port or _is_port(port) for port in params.get("port", "").split(",")):
        raise ConfigError("DATABASE_URL's port must be a port number")
    return params


def ssl_params(env: Mapping[str, str]) -> dict[str, str]:
    """DB_SSL=true verifies the server (verify-full) unless DB_SSL_REJECT_UNAUTHORIZED=false."""
    if not _flag(env, "DB_SSL", default=False):
        return {"sslmode": "disable"}
    if not _flag(env, "DB_SSL_REJECT_UNAUTHORIZED", default=True):
        # No sslrootcert here: with one present, libpq's "require" quietly verifies the CA.
        return {"sslmode": "require"}
    params = {"sslmode": "verify-full"}
    cert_path = env.get("DB_SSL_CERT_PATH", "").strip()
    if cert_path:
        if not Path(cert_path).is_file():
            raise ConfigError(f"DB_SSL_CERT_PATH {cert_path!r} is not a readable file")
        params["sslrootcert"] = str(Path(cert_path).resolve())
    return params


def describe(params: Mapping[str, str]) -> str:
    """A connection's name for messages: user@host:port/dbname, never the password."""
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return printable(f"{params.get('user', '')}@{host}:{port}/{params.get('dbname', '')}")


def printable(text: str) -> str:
    """`text` with control characters escaped, so that a message stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- pyproject.toml ------------------------------------------------------------------------------


def project_config(root: Path) -> tuple[Path, Path, str | None]:
    """The master and tenant migration folders and the tenants query, from `[tool.yoyo-tenants]`
    in `root`'s pyproject.toml. Every key is optional; an unknown key is an error."""
    table = _yoyo_tenants_table(root / "pyproject.toml")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"{_TABLE} has an unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    master_dir = _folder(root, table, "master-migrations", "migrations/master")
    tenant_dir = _folder(root, table, "tenant-migrations", "migrations/tenant")
    if master_dir == tenant_dir:
        raise ConfigError(f"{_TABLE} master-migrations and tenant-migrations are the same folder")
    query = _string(table, "tenants-query", None)
    if query is not None and not query.strip():
        raise ConfigError(f"{_TABLE} tenants-query is empty")
    return master_dir, tenant_dir, None if query is None else query.strip()


class Deploy(TypedDict):
    """The Settings fields deploy_config reads."""

    canary_tenants: tuple[str, ...] | str | None
    lint_exclude: tuple[str, ...]
    lint_include: tuple[str, ...]


def deploy_config(root: Path) -> Deploy:
    """The Settings fields of a safe deploy (canary tenants, lint rules) from
    `[tool.yoyo-tenants]`; every key is optional (project_config checks for unknown ones)."""
    table = _yoyo_tenants_table(root / "pyproject.toml")
    given = table.get("canary-tenants")
    canaries: tuple[str, ...] | str | None = None
    if isinstance(given, str):
        canaries = _string(table, "canary-tenants", given).strip()
        if not canaries:
            raise ConfigError(f"{_TABLE} canary-tenants is empty")
    elif given is not None:
        canaries = _names(table, "canary-tenants", "a query or a list of org ids")
        if not canaries:
            raise ConfigError(f"{_TABLE} canary-tenants is empty")
    rules = {
        key: _names(table, key, "a list of squawk rule names")
        for key in ("lint-exclude", "lint-include")
    }
    for key, names in rules.items():
        for name in names:
            if not _RULE.fullmatch(name):
                raise ConfigError(f"{_TABLE} {key}: {name!r} is not a squawk rule name")
    return {
        "canary_tenants": canaries,
        "lint_exclude": rules["lint-exclude"],
        "lint_include": rules["lint-include"],
    }


def _names(table: Mapping[str, object], key: str, what: str) -> tuple[str, ...]:
    """A list of non-empty strings (an empty tuple when the key is not there)."""
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{_TABLE} {key} must be {what}")
    if any("\x00" in v for v in value):
        raise ConfigError(f"{_TABLE} {key} contains a NUL character")
    return tuple(v.strip() for v in value)


def _yoyo_tenants_table(path: Path) -> dict[str, object]:
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("pyproject.toml is not valid UTF-8") from None
    try:
        tool = tomllib.loads(text).get("tool", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"pyproject.toml is not valid TOML: {exc}") from None
    table = tool.get("yoyo-tenants", {}) if isinstance(tool, dict) else {}
    if not isinstance(table, dict):
        raise ConfigError(f"{_TABLE} must be a table")
    return table


@overload
def _string(table: Mapping[str, object], key: str, default: str) -> str: ...
@overload
def _string(table: Mapping[str, object], key: str, default: None) -> str | None: ...
def _string(table: Mapping[str, object], key: str, default: str | None) -> str | None:
    value = table.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{_TABLE} {key} must be a string")
    if value is not None and "\x00" in value:
        raise ConfigError(f"{_TABLE} {key} contains a NUL character")
    return value


def _folder(root: Path, table: Mapping[str, object], key: str, default: str) -> Path:
    """A migrations folder: a path relative to the project root that stays inside it. The
    project's pyproject.toml is shared, so a path that only exists on one machine is refused."""
    value = _string(table, key, default)
    folder = Path(os.path.normpath(root / value)) if value else None
    if folder is None or Path(value).is_absolute() or not folder.is_relative_to(root):
        raise ConfigError(f"{_TABLE} {key} must be a folder inside the project, relative to it")
    return folder


# -- values --------------------------------------------------------------------------------------


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 10**6:
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
    return seconds


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {env[name]!r}")
    return value


def _port(value: str) -> str:
    if not _is_port(value):
        raise ConfigError(f"DB_PORT must be a port number, not {value!r}")
    return str(int(value))


def _is_port(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9]{1,5}", value.strip())) and 0 < int(value) < 65536
