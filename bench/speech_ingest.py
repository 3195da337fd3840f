"""Benchmark: `ssip speech ingest` throughput with 1 and 2 Ray workers.

Builds a manifest (the layout ssip's default-corpus builder writes) over the Debian asterisk
prompts (``/usr/share/asterisk/sounds/en_US_f_Allison/*.g722``, 16 kHz G.722, one speaker, with
transcripts), then ingests it into a fresh output folder with an embedded Ray of ``num_cpus=1``
and of ``num_cpus=2``, one task per group of ``--files-per-group`` files.

Each worker count gets its own Ray instance and a warm-up ingest of a couple of groups (so that
worker start-up and imports are not timed); the timed run is the whole
:func:`ssip.distributed.speech_ingest.run_speech_ingest` call: listing, planning, decoding
(one ffmpeg process per file), checks, resampling, mel, parquet writes and the card. It prints
hours of audio ingested per wall second, per second per core, the real-time factor, and the
ratio 2-worker / 1-worker. It prints, never asserts: the numbers depend on the machine and on
what else runs on it.

Run: ``.venv/bin/python bench/speech_ingest.py [--files 200] [--files-per-group 20]``.
"""

from __future__ import annotations

import os

# One thread per worker, so that "per core" means one core (Ray sets this for its workers too).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ssip.data.speech import ASTERISK_LICENSE, ASTERISK_SOUNDS_DIR, asterisk_prompts  # noqa: E402
from ssip.data.speech_corpus import SpeechIngestConfig  # noqa: E402


def write_manifest(folder: Path, n_files: int | None) -> Path:
    """manifest.jsonl over the first ``n_files`` asterisk prompts (absolute .g722 paths)."""
    prompts = asterisk_prompts()
    if n_files is not None:
        prompts = prompts[:n_files]
    path = folder / "manifest.jsonl"
    with path.open("w") as fh:
        for utt_id, audio, text in prompts:
            fh.write(json.dumps({"path": str(audio), "utt_id": utt_id, "transcript": text,
                                 "speaker": "allison", "source": "asterisk-en", "language": "en",
                                 "license": ASTERISK_LICENSE}) + "\n")
    return path


def timed_run(manifest: Path, work: Path, workers: int, cfg: SpeechIngestConfig,
              warmup_manifest: Path) -> dict:
    import ray

    from ssip.distributed.runtime import init_ray
    from ssip.distributed.speech_ingest import run_speech_ingest

    init_ray(None, workers)
    try:
        run_speech_ingest(str(warmup_manifest), str(work / f"warmup-{workers}"), cfg)
        t0 = time.perf_counter()
        card = run_speech_ingest(str(manifest), str(work / f"out-{workers}"), cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"workers": workers, "files": card["n_utterances"] + card["n_quarantined"],
            "hours": card["hours"], "wall": wall, "groups": card["n_groups"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200, help="asterisk prompts to ingest (0 = all)")
    ap.add_argument("--files-per-group", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not ASTERISK_SOUNDS_DIR.is_dir():
        raise SystemExit(f"{ASTERISK_SOUNDS_DIR} is missing: install asterisk-core-sounds-en-g722")

    cfg = SpeechIngestConfig(files_per_group=args.files_per_group)
    with tempfile.TemporaryDirectory(prefix="ssip-bench-speech-") as tmp:
        work = Path(tmp)
        (work / "corpus").mkdir()
        (work / "warmup").mkdir()
        manifest = write_manifest(work / "corpus", args.files or None)
        warmup = write_manifest(work / "warmup", 2 * args.files_per_group)
        results = [timed_run(manifest, work, w, cfg, warmup) for w in args.workers]

    print(f"\nspeech ingest of {results[0]['files']} asterisk G.722 prompts "
          f"({results[0]['hours'] * 60:.1f} min of audio) in {results[0]['groups']} group(s) "
          f"of {args.files_per_group}; embedded Ray on {os.cpu_count()} core(s)")
    print(f"{'workers':>7} {'wall s':>8} {'audio h/s':>10} {'h/s/core':>10} {'x realtime':>11}")
    for r in results:
        hps = r["hours"] / r["wall"]
        print(f"{r['workers']:>7} {r['wall']:>8.2f} {hps:>10.5f} {hps / r['workers']:>10.5f} "
              f"{hps * 3600:>11.1f}")
    by = {r["workers"]: r for r in results}
    if 1 in by and 2 in by:
        print(f"ratio 2-worker / 1-worker throughput: {by[1]['wall'] / by[2]['wall']:.2f}")


if __name__ == "__main__":
    main()
