"""Prefect for the benchmark: one local API server for every timed mergeline run, and the cost of
Prefect itself (an empty flow with that server, and with the ephemeral API a plain
`mergeline merge` starts when PREFECT_API_URL is not set)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.serve import wait_for_api

from .measure import Measurement, run_measured

EMPTY_FLOW = """
import time
t0 = time.perf_counter()
from prefect import flow
t1 = time.perf_counter()

@flow(name="bench-empty")
def empty() -> int:
    return 1

empty()
t2 = time.perf_counter()
print(f"IMPORT {t1 - t0:.3f} FLOW {t2 - t1:.3f}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME (a SQLite file under .bench)."""

    def __init__(self, python: str, home: Path, log: Path):
        self.python, self.home, self.log_path = python, Path(home), Path(log)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def env(self) -> dict:
        return {"PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_URL": self.url}

    def __enter__(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env()}
        env.pop("PREFECT_API_URL")
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [self.python, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            wait_for_api(self.proc, self.url, timeout=300)
        except RuntimeError as exc:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{exc}; see {self.log_path}") from None
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers only
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def empty_flow(python: str, env: dict) -> tuple[Measurement, float, float]:
    """An empty @flow in a fresh interpreter: (measurement, import seconds, flow seconds)."""
    m = run_measured([python, "-c", EMPTY_FLOW], env=env, timeout=600)
    if m.returncode != 0:
        raise RuntimeError(f"empty flow failed ({m.returncode}): {m.stderr[-2000:]}")
    line = next(ln for ln in m.stdout.splitlines() if ln.startswith("IMPORT"))
    parts = line.split()
    return m, float(parts[1]), float(parts[3])


if __name__ == "__main__":  # quick manual check: python -m benchmarks.prefect_env
    with PrefectServer(sys.executable, Path(".bench/prefect-home"), Path(".bench/prefect-server.log")) as srv:
        print("server up in", round(srv.startup_s, 1), "s at", srv.url)
        print(empty_flow(sys.executable, {**os.environ, **srv.env()})[1:])
