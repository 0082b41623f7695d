"""The `mergeline` command line.

Each area adds its own subcommands (add_parser functions); errors that users can fix print one
line and a hint, never a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergeline",
        description="Merge fine-tuned expert checkpoints (local or S3) into one model, with provenance.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from flows import catalog_cli, eval_cli, merge_cli, serve

    merge_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    catalog_cli.add_parser(sub)
    serve.add_parser(sub)  # serve, watch, nightly
    return parser


def prefect_defaults() -> None:
    """Defaults for the Prefect API a command may start itself (a user's own settings win): 120 s
    for the ephemeral server to answer (Prefect's 20 s is too short on a busy 2-core machine), and
    no telemetry from it (offline machines log an ERROR for each failed send)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@contextlib.contextmanager
def watched_run():
    """Settings for a flow run this terminal waits on: no heartbeats, unless the user set their frequency.

    A heartbeat only lets a Prefect automation mark a run nobody watches as crashed (`mergeline serve`
    creates that automation for its deployments' runs). A terminal sees its own run die, and a re-run
    resumes from the finished layers. Heartbeats cost every run up to a second at its end: the engine
    joins their thread, which sleeps in whole seconds.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    _no_console_tracebacks_for(user_errors())
    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix (bad input, a refused output, an unreachable store): one line, status 2."""
    from botocore.exceptions import BotoCoreError, ClientError

    from storage import StorageError

    return ValueError, OSError, StorageError, BotoCoreError, ClientError


def _no_console_tracebacks_for(errors: tuple[type[BaseException], ...]) -> None:
    """Prefect's console log prints a traceback with each failed task and flow; for a user error
    the message is enough (the command ends with it, and the Prefect UI keeps the traceback)."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    for logger in [logging.getLogger(), *map(logging.getLogger, list(logging.Logger.manager.loggerDict))]:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not hasattr(handler, "mergeline_plain_format"):
                handler.mergeline_plain_format = handler.format

                def format(record, handler=handler) -> str:  # a copy: the API handler keeps the traceback
                    if record.exc_info and isinstance(record.exc_info[1], errors):
                        record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
                    return handler.mergeline_plain_format(record)

                handler.format = format


def main(argv: list[str] | None = None) -> int:
    prefect_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except user_errors() as exc:
        print(f"mergeline: error: {_one_line(exc)}", file=sys.stderr)
        hint = getattr(exc, "hint", None) or _hint_for(exc)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergeline: interrupted; a re-run resumes from the finished layers", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if "\n" not in text or isinstance(exc, ValueError) else text.splitlines()[0]


def _hint_for(exc: BaseException) -> str | None:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return "configure AWS credentials the way boto3 reads them (AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws)"
    if isinstance(exc, EndpointConnectionError):
        return "check AWS_ENDPOINT_URL / network access to the object store"
    return None


def run() -> None:
    """The console script: main(), then exit without tearing the interpreter down.

    Unloading torch, Prefect and their modules takes about a second on a small machine and does
    nothing for a finished command. What an exit does before that still runs, in the interpreter's
    order: threads' exit hooks first (Prefect drains its log and event queues there), then the exit
    handlers (Prefect stops the ephemeral API server there; in the other order the last logs went
    to a stopped server, and every bare `mergeline merge` ended "Error logging to API"), then output
    is flushed. An unexpected exception still exits the usual way.
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    threading._shutdown()  # what Py_Finalize runs first: threading._register_atexit hooks, then joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`mergeline ... | head`)
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
