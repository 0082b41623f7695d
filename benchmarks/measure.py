"""Run one command as a child process and measure it: wall time, CPU time, peak RSS.

Peak RSS is the kernel's ru_maxrss for the command (wait4 gives each child its own rusage), so
every tool is measured the same way: the largest resident set of the process, file pages it
maps included. Linux carries a process's peak over exec from the process that spawned it, so
the command is started by a small launcher interpreter, never by this one: started from here,
every command would report at least this process's own peak (it loads merged outputs to compare
them). A sampler also polls /proc for the command's peak anonymous memory (RssAnon), which
leaves out mapped input files and shared libraries, for the record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    cpu_s: float            # user + system of the child (and its waited-for children)
    peak_rss_bytes: int     # ru_maxrss
    peak_anon_bytes: int    # sampled RssAnon peak (0 if not sampled)
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stdout"] = d["stdout"][-4000:]
        d["stderr"] = d["stderr"][-4000:]
        return d


# Runs in `python -S`: spawn the command, wait for it, write its rusage as JSON to argv[1].
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"wall": time.perf_counter() - t0, "cpu": ru.ru_utime + ru.ru_stime,
               "maxrss": ru.ru_maxrss * 1024, "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _child_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: str | None = None, timeout: float | None = None,
                 sample_every: float = 0.05) -> Measurement:
    """Run cmd to completion through the launcher; stdout/stderr captured to temp files (no pipe
    back-pressure). A command past its timeout is killed with its launcher (returncode -9)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory(prefix="bench-measure-") as tmp:
        report = os.path.join(tmp, "rusage.json")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, report, *cmd], env=env, cwd=cwd,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        peak_anon = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_anon
            child = None
            while not done.is_set():
                child = child or _child_of(proc.pid)
                if child:
                    peak_anon = max(peak_anon, _rss_anon(child))
                done.wait(sample_every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        try:
            with open(report) as f:
                usage = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):  # killed, or the launcher could not start it
            usage = {"wall": wall, "cpu": 0.0, "maxrss": 0, "returncode": proc.returncode or -9}
        out.seek(0)
        err.seek(0)
        return Measurement(cmd=list(cmd), returncode=usage["returncode"], wall_s=usage["wall"],
                           cpu_s=usage["cpu"], peak_rss_bytes=usage["maxrss"], peak_anon_bytes=peak_anon,
                           stdout=out.read(), stderr=err.read())
