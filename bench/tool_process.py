"""The tool in a process of its own, so that the bench can measure its peak memory.

A scenario's tool side runs in a child process that the bench starts for that scenario (and
ends after it): the child imports yoyo_tenants, then runs the commands the bench asks for, one
request a line on stdin, one reply a line on stdout. Each reply carries the seconds of the call
alone, timed in the child, as a program calling the API sees them (not the interpreter's start).
Its peak is the child's own high-water mark of resident memory (VmHWM), read by the child as it
ends: whatever it imported, parsed and kept counts, across every call of that scenario, as it
would in a program that migrates or provisions several times.

Whole-process commands (``invoke ...``) are run by `run_process`, through a small launcher
(this file, ``--measure``) that starts the command, reaps it with os.wait4 and reports its
ru_maxrss and its wall time. Not straight from the bench: Linux carries the parent's peak into
a child's ru_maxrss (at exec, the high-water mark of the memory it was forked or vforked from is
kept), so a child of the bench would report at least the bench's own size. The launcher's own
size, about 12 MB, is then the floor of what it can report. Linux only (/proc, ru_maxrss in kB).

    python bench/tool_process.py CONFIG_JSON                   (the tool's process: ToolProcess)
    python bench/tool_process.py --measure RESULT_FILE -- COMMAND...       (see run_process)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def _mb(kilobytes: int) -> float:
    return kilobytes / 1024


@dataclass
class Finished:
    """A whole process, run to its end."""

    seconds: float  # wall time from its start to its exit
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float  # its peak resident memory (ru_maxrss)


def run_process(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Finished:
    """Run `command` to its end; its wall time and peak memory, from the launcher."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as scratch,
    ):
        result = Path(scratch) / "result.json"
        launcher = [sys.executable, __file__, "--measure", str(result), "--", *command]
        done = subprocess.run(
            launcher, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if not result.exists():
            raise SystemExit(f"the launcher failed ({done.returncode}): {stderr}")
        measured = json.loads(result.read_text())
        return Finished(measured["seconds"], done.returncode, stdout, stderr, measured["peak_mb"])


def measure(result: Path, command: Sequence[str]) -> int:
    """The launcher: run `command` (stdin, stdout, stderr its own), then write its seconds and
    peak memory to `result`; exit with its status."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
    result.write_text(json.dumps({"seconds": seconds, "peak_mb": _mb(usage.ru_maxrss)}))
    return process.returncode


class ToolProcess:
    """The parent's side: a child serving one scenario's calls (`call`), then its peak (`close`)."""

    def __init__(self, config: Mapping[str, object]):
        self.process = subprocess.Popen(
            [sys.executable, __file__, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        #: Its resident memory once yoyo_tenants is imported, before any call.
        self.start_mb: float = self._reply()["rss_mb"]
        self.peak_mb: float | None = None

    def call(self, command: str, **args: object) -> dict:
        """Run one command in the child; its reply (seconds, what was done)."""
        self.process.stdin.write(json.dumps({"command": command, **args}) + "\n")
        self.process.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise SystemExit(f"{command} in the tool process: {reply['error']}")
        return reply

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise SystemExit("the tool process ended early (its stderr is above)")
        return json.loads(line)

    def close(self) -> float | None:
        """End the child; its peak resident memory over every call, in MB."""
        if self.process.returncode is None:
            self.process.stdin.close()  # the child answers with its peak, and ends
            last = self.process.stdout.readline()
            self.process.wait()
            self.process.stdout.close()
            if last:
                self.peak_mb = json.loads(last)["peak_mb"]
        return self.peak_mb

    def __enter__(self) -> ToolProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the child -----------------------------------------------------------------------------------


def _memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return _mb(int(line.split()[1]))
    raise RuntimeError(f"no {field} in /proc/self/status")


def serve(config: dict) -> None:
    # The replies get stdout to themselves: anything else printing goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import yoyo_tenants

    def settings(dbname: str) -> yoyo_tenants.Settings:
        return yoyo_tenants.Settings(
            root=Path(config["root"]),
            connection={**config["params"], "dbname": dbname},
            master_dir=Path(config["master_dir"]),
            tenant_dir=Path(config["tenant_dir"]),
        )

    def run_result(run) -> dict:
        failed = [[r.schema, str(r.error)] for r in run.failed][:3]
        return {"ok": run.ok, "done": run.count("done"), "failed": failed}

    def provisioned(done) -> dict:
        return {"ok": done.created, "done": len(done.migrations), "failed": []}

    commands = {
        "migrate_tenants": lambda s, r: run_result(yoyo_tenants.migrate_tenants(s, jobs=r["jobs"])),
        "rollback_tenants": lambda s, r: run_result(
            yoyo_tenants.rollback_tenants(s, jobs=r["jobs"])
        ),
        "provision_tenant": lambda s, r: provisioned(yoyo_tenants.provision_tenant(s, r["org"])),
    }
    replies.write(json.dumps({"rss_mb": round(_memory_mb("VmRSS"), 1)}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            started = time.perf_counter()
            reply = commands[request["command"]](settings(request["dbname"]), request)
            reply["seconds"] = time.perf_counter() - started
        except Exception as exc:  # reported to the bench, which stops
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    replies.write(json.dumps({"peak_mb": _memory_mb("VmHWM")}) + "\n")
    replies.flush()


if __name__ == "__main__":
    if sys.argv[1] == "--measure":
        assert sys.argv[3] == "--", sys.argv
        sys.exit(measure(Path(sys.argv[2]), sys.argv[4:]))
    serve(json.loads(sys.argv[1]))
