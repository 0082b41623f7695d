"""Run one command as a child process and measure it: wall time, CPU time, peak RSS.

Peak RSS is the kernel's ru_maxrss for that child (os.wait4 gives each child its own rusage), so
every tool is measured the same way: the largest resident set of the process (or of any of its own
children that it waited for). A sampler also polls /proc/<pid>/status for the peak anonymous
memory (RssAnon), which leaves out pages of input files mapped into memory, for the record.
"""

from __future__ import annotations

import os
import subprocess
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


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: str | None = None, timeout: float | None = None,
                 sample_every: float = 0.05) -> Measurement:
    """Run cmd to completion; stdout/stderr captured to temp files (no pipe back-pressure)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peak_anon = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_anon
            while not done.is_set():
                peak_anon = max(peak_anon, _rss_anon(proc.pid))
                done.wait(sample_every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measurement(cmd=list(cmd), returncode=proc.returncode, wall_s=wall,
                           cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_bytes=usage.ru_maxrss * 1024,
                           peak_anon_bytes=peak_anon, stdout=out.read(), stderr=err.read())
