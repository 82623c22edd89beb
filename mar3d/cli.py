"""Command-line flags generated from config dataclasses, so CLI defaults cannot drift from them."""

import argparse
import dataclasses


def parse_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` flag per field of the dataclass `cls`, typed and defaulted from it."""
    for f in dataclasses.fields(cls):
        kind = parse_bool if f.type is bool else type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            metavar="BOOL" if f.type is bool else None)


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
