"""`ray job submit -- python jobs/train_likelihood.py INGEST OUT --subject S --workers N [options]`.

Runs `ssip train likelihood` inside the job's driver, connected to the cluster the job was
submitted to: the subject's train trials stream through Ray Data into N Ray Train workers running
DeepSpeed. Options: --config (LikelihoodConfig YAML) and --set k=v; --ray-config (RayTrainConfig
YAML) and --ray-set k=v; --storage-path (local or s3://) and --name: submitting again with the
same name resumes from the newest checkpoint. Both configs are printed; --dry-run stops there.
Several subjects train as parallel jobs: submit one per subject (docs/distributed.md, "Training on Ray Train + DeepSpeed").
Without --workers it trains in the driver process.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run

if __name__ == "__main__":
    sys.exit(run(["train", "likelihood", *sys.argv[1:]]))
