"""Command-line flags generated from config dataclasses, so CLI defaults cannot drift from them."""

import argparse
import dataclasses


def parse_bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` flag per field of the dataclass `cls`, typed and defaulted from it.
    A bool field takes `--name`, `--name BOOL` or `--no-name`."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=f.default, metavar="BOOL")
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
