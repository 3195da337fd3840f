"""`ray job submit -- python jobs/pipeline.py ROOT [--config F] [--set k=v] [--force STAGE] [--dry-run]`.

Runs `ssip pipeline` (corpus -> ingest -> train -> decode -> evaluate, resumable) inside the job's
driver; its ingest runs on the cluster the job was submitted to (Ray sets RAY_ADDRESS).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run

if __name__ == "__main__":
    sys.exit(run(["pipeline", *sys.argv[1:]]))
