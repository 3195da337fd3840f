"""Shared shape of the `ray job submit` entry points: resolve config, print it, call the library."""

from __future__ import annotations

import logging
import sys

from ssip.cli import main as ssip_main


def run(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ssip_main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
