"""`ray job submit -- python jobs/sweep_guidance.py INGEST --prior DIR --likelihood-root DIR
--subject S [--subject S2 ...] --name NAME [--set k=v] [--decode-set k=v] [--dry-run]`.

Runs `ssip sweep` inside the job's driver on the cluster it was submitted to: a Ray Tune grid
over the DPS guidance per subject on its validation trials (ASHA stops bad settings early), the
winner saved as preset NAME for `ssip decode --preset NAME`. Tune's storage can be local or
s3:// (--set storage_path=...). The configs are printed; --dry-run stops there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run

if __name__ == "__main__":
    sys.exit(run(["sweep", *sys.argv[1:]]))
