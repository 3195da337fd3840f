"""`ray job submit -- python jobs/build_corpus.py OUT [--config F] [--set k=v] [--dry-run]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run

if __name__ == "__main__":
    sys.exit(run(["corpus", "build", *sys.argv[1:]]))
