"""`mergeline catalog ...` subcommands (placeholder until the catalog lands)."""


def add_parser(sub) -> None:
    p = sub.add_parser("catalog", help="query the lineage and metrics catalog")
    p.set_defaults(run=lambda args: print("catalog: not implemented yet") or 1)
