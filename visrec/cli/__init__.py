"""`visrec <stage>`: every pipeline stage as a command calling the same library function.

Each subcommand lives in `visrec/cli/<name>.py` and defines `HELP`,
`add_arguments(parser)` and `run(args)`. Command modules import heavy libraries
(torch, Beam, ScaNN) inside `run`, so `visrec --help` stays fast.

May import every other package; only `visrec.__main__` and the tests import it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from visrec.core.errors import GateFailed, UserError

# Subcommand name -> module under visrec.cli, in the order a run goes through them.
COMMANDS: dict[str, str] = {
    "demo-data": "demo_data",
    "init-models": "init_models",
    "resolve-data": "resolve_data",
    "prepare": "prepare",
    "train": "train",
    "embed": "embed",
    "build-index": "build_index",
    "evaluate": "evaluate",
    "deploy": "deploy",
    "approve": "approve",
    "promote": "promote",
    "rollback": "rollback",
    "releases": "releases",
    "runs": "runs",
    "serve": "serve",
    "compact-journal": "compact_journal",
    "ingest": "ingest",
    "join-events": "join_events",
    "experiment": "experiment",
    "ab-report": "ab_report",
    "compile": "compile",
    "run-local": "run_local",
    "submit": "submit",
    "schedule": "schedule",
    "schedules": "schedules",
    "study": "study",
}


def _load(module: str):
    try:
        return importlib.import_module(f"visrec.cli.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"visrec.cli.{module}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visrec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name, module in COMMANDS.items():
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        rc = args._run(args)
    except UserError as exc:
        print(f"visrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"visrec {args.command}: gate failed: {exc}", file=sys.stderr)
        return 3
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
