"""`ray job submit -- python jobs/train_prior.py DATA... OUT --workers N [options] [--dry-run]`.

Runs `ssip train prior` inside the job's driver, connected to the cluster the job was submitted
to (Ray sets RAY_ADDRESS for job drivers): the speech shards stream through Ray Data into N Ray
Train workers running DeepSpeed. Options: --config (PriorConfig YAML) and --set k=v;
--ray-config (RayTrainConfig YAML: ZeRO stage, precision, checkpoints, failures) and
--ray-set k=v; --storage-path (local or s3://) and --name: submitting again with the same name
resumes from the newest checkpoint. Both configs are printed; --dry-run stops there. Without
--workers it trains in the driver process.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run

if __name__ == "__main__":
    sys.exit(run(["train", "prior", *sys.argv[1:]]))
