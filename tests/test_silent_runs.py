"""A mergeline run whose process dies is marked Crashed by the automation `mergeline serve` and
infra/local-deploy.sh create (flows/silent_runs.py), on a real Prefect server with its trigger services."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.states import Completed, Running

from flows.silent_runs import NAME, ensure_silent_run_automation


@flow(name="silent-runs-probe")
def probe() -> None:
    pass


def _automations(client) -> list:
    return [a for a in client.read_automations() if a.name == NAME]


def _running_run(client, tag: str):
    run = client.create_flow_run(probe, tags=[tag])
    client.set_flow_run_state(run.id, Running())
    return run


def _heartbeat(run, tag: str) -> None:
    """The event Prefect's engine emits for a flow run, every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds."""
    emit_event(event="prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"},
               related=[{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}])


def test_a_mergeline_run_whose_heartbeats_stop_is_crashed_and_no_other(prefect_api):
    ensure_silent_run_automation(heartbeat_s=30)
    ensure_silent_run_automation(heartbeat_s=4)          # restarting serve updates it, never adds one
    with get_client(sync_client=True) as client:
        [automation] = _automations(client)
        assert automation.trigger.within.total_seconds() == 12     # three missed 4 s heartbeats
        silent, finished, foreign = (_running_run(client, t) for t in ("mergeline", "mergeline", "other"))
        for run, tag in ((silent, "mergeline"), (finished, "mergeline"), (foreign, "other")):
            _heartbeat(run, tag)
        EventsWorker.drain_all()
        client.set_flow_run_state(finished.id, Completed())

        def state(run):
            return client.read_flow_run(run.id).state

        deadline = time.monotonic() + 90
        while not state(silent).is_crashed():
            assert time.monotonic() < deadline, f"the silent run stayed {state(silent).type}"
            time.sleep(1)
        assert "no heartbeat for 12 s" in state(silent).message
        assert state(finished).is_completed()   # its state change was the event the automation expected
        assert state(foreign).is_running()      # not a mergeline run


def test_serve_creates_the_automation_before_serving(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        for a in _automations(client):
            client.delete_automation(a.id)
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--recipes", str(tmp_path),
                                  "--experts", str(tmp_path / "experts")], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not _automations(client):
                assert serve.poll() is None, serve.stderr.read()[-2000:]
                assert time.monotonic() < deadline, "mergeline serve created no automation"
                time.sleep(1)
        finally:
            serve.terminate()
            serve.wait(30)
        [automation] = _automations(client)
        assert automation.trigger.within.total_seconds() == 3 * 180    # Prefect's default heartbeat, 180 s
