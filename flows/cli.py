"""The `mergeline` command line.

Each area adds its own subcommands (add_parser functions); errors that users can fix print one
line and a hint, never a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergeline",
        description="Merge fine-tuned expert checkpoints (local or S3) into one model, with provenance.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from flows import catalog_cli, merge_cli, serve

    merge_cli.add_parser(sub)
    catalog_cli.add_parser(sub)
    serve.add_parser(sub)  # serve, watch, nightly
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"mergeline: error: {exc}", file=sys.stderr)
        hint = getattr(exc, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
