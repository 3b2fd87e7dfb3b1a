"""Thin command-line layers over the package's functions.

Two helpers keep every command small and alike:

    add_config_options(parser, Config)   one --option per field of a config dataclass (name, type, default
                                         and help taken from the dataclass), so options are never declared
                                         twice
    config_from_args(Config, args)       the dataclass back from the parsed options
    run(main)                            the error contract of every command: bad input ends in one line
                                         "error: ..." on stderr and exit status 2, never a Python traceback

Commands: `cgm-train` (pre-train, fine-tune, curvature, evaluate the miniatures), `cgm-provenance` (ship and
verify a checkpoint), `cgm-experiment` (the merge experiment's runs, sweeps and results table).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, Sequence

# What counts as bad input (a message for the user) rather than a bug (a traceback for the developer).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(text):
        text = f"{err.strerror or text}: {err.filename}"
    return " ".join(str(text).split())          # one line


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; bad input becomes "error: <one line>" on stderr and exit status 2."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parse_tuple(inner: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(inner(v) for v in text.split(",") if v != "")
    return parse


def _option_type(hint: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(parser of one option string, is_bool) for a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):     # X | None
        inner = [a for a in args if a is not type(None)]
        return _option_type(inner[0]) if len(inner) == 1 else (str, False)
    if hint is bool:
        return None, True
    if origin is tuple:
        inner = args[0] if args and args[0] is not Ellipsis else str
        return _parse_tuple(inner if inner in (int, float, str) else str), False
    if hint is tuple:
        return _parse_tuple(str), False
    if hint in (int, float, str):
        return hint, False
    return str, False


def add_config_options(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = (),
                       required: Sequence[str] = (), **defaults) -> None:
    """One `--field-name` option per field of dataclass `cls` (except `skip`): its type from the annotation
    (tuples as comma-separated lists, bools as --x / --no-x), its default from the dataclass (or
    `defaults`), its help from the field's `metadata["help"]` when given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else
                               f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        parse, is_bool = _option_type(hints[f.name])
        text = f.metadata.get("help", "")
        if is_bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=text or None)
        elif f.name in required:
            parser.add_argument(flag, dest=f.name, type=parse, required=True, help=text or None)
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            parser.add_argument(flag, dest=f.name, type=parse, default=default,
                                help=f"{text} (default: {shown})".strip())


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass `cls` from parsed options (fields that have no option keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
