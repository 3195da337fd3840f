"""The ``ssip`` entry point (``python -m ssip.cli``): the command line of :mod:`ssip.commands`."""

from __future__ import annotations

import sys

from ssip.commands import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
