"""The automation that marks a mergeline run Crashed when its heartbeats stop.

A worker or `mergeline serve` process that dies (OOM kill, evicted pod, lost machine) leaves its
flow run Running for ever: nothing is left to report the end. Prefect's flow runs send heartbeat
events (every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, 180 by default), but only an automation on
the server acts on their absence, and a self-hosted server has none until someone creates it
(docs.prefect.io/v3/advanced/detect-zombie-flows). `mergeline serve` and infra/local-deploy.sh
create this one; it acts on runs tagged `mergeline` only, the tag every mergeline deployment has.
A run merged from a terminal sends no heartbeats (flows.cli.watched_run) and is never matched.
"""

from __future__ import annotations

from datetime import timedelta

NAME = "mergeline: crash runs whose heartbeats stopped"
TAG = "mergeline"
MISSED_BEATS = 3          # Prefect Cloud's managed automation waits for three missed heartbeats too


def silent_run_automation(heartbeat_s: int, missed: int = MISSED_BEATS):
    """After a heartbeat of a `mergeline`-tagged flow run, expect another event of that run (a
    heartbeat or a state change) within `missed` heartbeat intervals, or mark the run Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=NAME,
        description=f"Marks a flow run tagged {TAG!r} Crashed when {missed} heartbeats in a row "
                    f"({heartbeat_s} s apart) do not arrive: its process died without reporting.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},   # any event of the run: a heartbeat, or a state by any name
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.tag.{TAG}", "prefect.resource.role": "tag"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_s * missed),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {heartbeat_s * missed} s: the process running this flow died; "
                    "a re-run resumes from the finished layers",
        )],
    )


def ensure_silent_run_automation(heartbeat_s: int | None = None, missed: int = MISSED_BEATS):
    """Create the automation on the current Prefect API, or bring an existing one (by name) up to
    date, so restarting `serve` never adds a second. Returns it, or None when heartbeats are off."""
    from prefect.automations import Automation
    from prefect.settings import get_current_settings

    if heartbeat_s is None:
        heartbeat_s = get_current_settings().flows.heartbeat_frequency
    if heartbeat_s is None:
        return None
    wanted = silent_run_automation(heartbeat_s, missed)
    try:
        existing = Automation.read(name=NAME)
    except ValueError:  # "Automation with name ... not found"
        return wanted.create()
    wanted.id = existing.id
    wanted.update()
    return wanted


if __name__ == "__main__":  # infra/local-deploy.sh: python -m flows.silent_runs
    import argparse

    argparse.ArgumentParser(
        prog="python -m flows.silent_runs",
        description=f"Create (or update) the automation {NAME!r} on the Prefect API that PREFECT_API_URL "
        "names: it marks a run tagged 'mergeline' Crashed once its heartbeats stop.").parse_args()
    made = ensure_silent_run_automation()
    print(f"automation {NAME!r}: " + (f"{made.id}" if made else "not created (PREFECT_FLOWS_HEARTBEAT_FREQUENCY is off)"))
