"""Flags that several subcommands share, so each is defined (and documented) once."""

from __future__ import annotations

import argparse
from typing import Any

from visrec.core.errors import UserError
from visrec.stages.configs import EMBED_DEVICES, EMBED_PRECISIONS


def add_encoder_placement_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """`--device` and `--precision` of an image encoder on Beam workers (`check_encoder_placement`)."""
    parser.add_argument("--device", choices=EMBED_DEVICES, default=defaults["device"],
                        help="where the encoder runs on each worker (default: %(default)s = GPU when present)")
    parser.add_argument("--precision", choices=EMBED_PRECISIONS, default=defaults["precision"],
                        help="bf16 autocast or fp32 on each worker (default: bf16 on a GPU, fp32 on CPU)")


def add_beam_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """`--runner` and the Beam pipeline options given after `--` (read back with `beam_options`)."""
    parser.add_argument("--runner", default=defaults["runner"],
                        help="Beam runner: DirectRunner or DataflowRunner (default: %(default)s)")
    parser.add_argument("beam_options", nargs=argparse.REMAINDER,
                        help="Beam pipeline options after --, e.g. -- --project=P --region=R --temp_location=gs://...")


def beam_options(args: argparse.Namespace) -> list[str]:
    """The Beam pipeline options a command line gave after `--`."""
    return [flag for flag in args.beam_options if flag != "--"]


class FileDefault:
    """A flag's default that a config file may replace: argparse keeps it untouched unless the flag
    is given (a given flag always wins), and `--help` shows the value."""

    def __init__(self, value: Any):
        self.value = value

    def __str__(self) -> str:
        return str(self.value)


def file_defaults(defaults: dict[str, Any]) -> dict[str, FileDefault]:
    """`defaults` (a config dataclass's) as `FileDefault`s, for flags a config file may set."""
    return {name: FileDefault(value) for name, value in defaults.items()}


def resolve_flags(args: argparse.Namespace, defaults: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """Each setting of `defaults`: its flag if given, else the config file's `section`, else the default.

    `beam_options`: the options given after `--`, else the file's list. `UserError` for a setting of
    `section` that is not one of `defaults`.
    """
    unknown = set(section) - set(defaults)
    if unknown:
        raise UserError(f"unknown settings in the config file: {sorted(unknown)}")
    values = {}
    for name, default in defaults.items():
        given = beam_options(args) or None if name == "beam_options" else getattr(args, name)
        values[name] = section.get(name, default) if given is None or isinstance(given, FileDefault) else given
    return values
