"""`ray job submit -- python jobs/decode_corpus.py INGEST --prior DIR --likelihood-root DIR
--out DECODED.parquet --actors N [--baselines-root DIR] [--report DIR] [--set k=v] [--dry-run]`.

Runs `ssip decode` with N decode actors inside the job's driver, on the cluster the job was
submitted to: Ray Data reads the ingest shards (local or s3://), an actor pool runs DPS (one GPU
per actor with --gpu), each unit of trials is written whole as it finishes; submitting the same
command again resumes (trials already written are skipped). The configs are printed; --dry-run
stops there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--actors" not in argv:
        argv += ["--actors", "2"]
    sys.exit(run(["decode", *argv]))
