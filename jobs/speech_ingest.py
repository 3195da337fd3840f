"""`ray job submit -- python jobs/speech_ingest.py SRC OUT [--config F] [--set k=v] [--dry-run]`.

Runs `ssip speech ingest` inside the job's driver, connected to the cluster the job was
submitted to (Ray sets RAY_ADDRESS for job drivers).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run

if __name__ == "__main__":
    sys.exit(run(["speech", "ingest", *sys.argv[1:]]))
