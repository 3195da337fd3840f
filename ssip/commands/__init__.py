"""`ssip` command line: each command is a few lines over the library.

Commands live in ssip/commands/<name>.py, each exposing ``register(subparsers)`` that adds its
parser and sets ``func`` to a callable taking the parsed args and returning an exit code.
:func:`main` parses an argv and runs its command (the ``ssip`` entry point, :mod:`ssip.cli`, and
what ``ssip pipeline`` runs each stage with).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil

from ssip import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ssip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)
