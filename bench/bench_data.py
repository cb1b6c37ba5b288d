"""Throughput of the training input pipeline (esc_jax.data.train_iterator): clips per second.

  python bench/bench_data.py                              # /work/shared/data/speech_dev or --data DIR
  python bench/bench_data.py --synthetic 200 --json       # 16 / 44.1 kHz wav files of 4-10 s
  python bench/bench_data.py --profile                    # per-stage cost of one clip

Times the grain pipeline the trainer uses (scan, shuffle, random 3 s crops at
16 kHz with soxr resampling, batches of 36) with the default worker count
(config data.num_workers) and with 0, 1 and 4 workers. Worker start-up and the
first batches are not timed. cpu-ms/clip is the CPU time of the main process
and its workers per delivered clip (load-independent, unlike clips/s on a
shared machine). With --json, one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).absolute().parents[1]
sys.path.insert(0, str(ROOT))
from esc_jax import data  # noqa: E402
from esc_jax.config_lib import ESC_BASE, base_config  # noqa: E402

DEFAULT_DATA = "/work/shared/data/speech_dev"


def synthetic_folder(n: int, seed: int = 0) -> str:
  """n mono 16-bit wav files of 4-10 s, alternately 16 kHz and 44.1 kHz (speech-like noise bursts)."""
  import soundfile as sf
  rng = np.random.default_rng(seed)
  folder = tempfile.mkdtemp(prefix="esc_bench_data_")
  for i in range(n):
    sr = (16000, 44100)[i % 2]
    length = int(rng.uniform(4.0, 10.0) * sr)
    t = np.arange(length) / sr
    x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) * (1 + np.sin(2 * np.pi * 3 * t))
    x += 0.02 * rng.standard_normal(length)
    sf.write(os.path.join(folder, f"clip{i:04d}.wav"), x.astype(np.float32), sr, subtype="PCM_16")
  return folder


def cpu_seconds() -> float:
  """CPU time (user + system) of this process and its worker processes so far (NaN without psutil)."""
  try:
    import psutil
  except ImportError:
    return float("nan")
  me = psutil.Process()
  total = 0.0
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def throughput(files, clip: int, batch: int, workers: int, batches: int, warmup: int) -> dict:
  """clips/s over `batches` batches after `warmup` ones, and CPU ms per clip (all processes)."""
  it = data.train_iterator(files, clip, batch, seed=0, num_workers=workers, process_index=0, process_count=1)
  try:
    for _ in range(warmup):
      next(it)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
      x = next(it)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  finally:
    it.close()
  assert x.shape == (batch, clip) and x.dtype == np.float32
  clips = batches * batch
  return {"clips_per_s": clips / dt, "ms_per_batch": 1e3 * dt / batches, "cpu_ms_per_clip": 1e3 * cpu / clips}


def profile(files, clip: int, batch: int, batches: int = 10) -> list[tuple[str, float]]:
  """Microseconds per clip of each stage of the pipeline, run on one thread.

  Batches of the real dataset (`data.train_dataset`, random access) with the
  stages timed by wrapping grain's index_shuffle, soundfile.SoundFile.read,
  data.to_mono, soxr.resample and np.stack; "rest" is everything else (grain's
  bookkeeping and per-element RNG, crop choice, file open, padding).
  """
  import soundfile as sf
  import soxr
  from grain._src.python.experimental.index_shuffle.python import index_shuffle_module as shuffle_lib
  spent = dict.fromkeys(("shuffle (grain index_shuffle)", "soundfile read", "mono mix", "soxr resample",
                         "batching (np.stack)"), 0.0)
  patches = [(shuffle_lib, "index_shuffle", "shuffle (grain index_shuffle)"),
             (sf.SoundFile, "read", "soundfile read"), (data, "to_mono", "mono mix"),
             (soxr, "resample", "soxr resample"), (np, "stack", "batching (np.stack)")]
  saved = [getattr(obj, attr) for obj, attr, _ in patches]

  def timed(name, fn):
    def wrapper(*a, **k):
      t = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        spent[name] += time.perf_counter() - t
    return wrapper

  ds = data.train_dataset(files, clip, batch, seed=0)
  ds[0]
  for (obj, attr, name), fn in zip(patches, saved):
    setattr(obj, attr, timed(name, fn))
  try:
    t0 = time.perf_counter()
    for k in range(1, batches + 1):
      ds[k]
    total = time.perf_counter() - t0
  finally:
    for (obj, attr, _), fn in zip(patches, saved):
      setattr(obj, attr, fn)
  n = batches * batch
  rows = [(k, 1e6 * v / n) for k, v in spent.items()]
  rows.append(("rest", 1e6 * (total - sum(spent.values())) / n))
  rows.append(("total", 1e6 * total / n))
  return rows


def run(args, folder) -> None:
  """The throughput table (and the stage profile) for the files of `folder`."""
  unique = data.scan_audio_files(folder)
  files = unique * args.repeat
  rates = sorted({f.sample_rate for f in files})
  seconds = sum(f.frames / f.sample_rate for f in unique)
  default = int(base_config(ESC_BASE).data.num_workers)
  load = os.getloadavg()[0]
  if not args.json:
    print(f"{folder}: {len(unique)} files x {args.repeat}, {seconds / 60:.1f} min, rates {rates}; "
          f"batch {args.batch_size} x {args.clip_samples}; {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'workers':>12} {'clips/s':>9} {'ms/batch':>9} {'cpu-ms/clip':>12}")
  for w in args.workers.split(","):
    n = default if w == "default" else int(w)
    r = throughput(files, args.clip_samples, args.batch_size, n, args.batches, args.warmup)
    name = f"{n} (default)" if w == "default" else str(n)
    if args.json:
      print(json.dumps({"work": "data_pipeline", "num_workers": n, "default": w == "default",
                        "folder": str(folder), "files": len(unique), "repeat": args.repeat,
                        "sample_rates": rates, "batch_size": args.batch_size, "clip_samples": args.clip_samples,
                        "load_average": round(load, 2), **{k: round(v, 4) for k, v in r.items()}}), flush=True)
    else:
      print(f"{name:>12} {r['clips_per_s']:>9.0f} {r['ms_per_batch']:>9.1f} {r['cpu_ms_per_clip']:>12.3f}",
            flush=True)
  if args.profile:
    rows = profile(files, args.clip_samples, args.batch_size)
    if args.json:
      for k, v in rows:
        print(json.dumps({"work": "data_stage", "stage": k, "us_per_clip": round(v, 1)}))
    else:
      print(f"\n{'stage (one thread)':<32} {'us/clip':>9}")
      for k, v in rows:
        print(f"{k:<32} {v:>9.0f}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=DEFAULT_DATA, help="folder of audio files (recursive)")
  p.add_argument("--synthetic", type=int, default=0, help="generate N wav files (16 / 44.1 kHz, 4-10 s) instead")
  p.add_argument("--repeat", type=int, default=1,
                 help="list every file R times (grain's shuffle costs ~2e4/len(list) us per clip: "
                      "a list of thousands, as in real training, makes it negligible)")
  p.add_argument("--workers", default="default,0,1,4", help="comma-separated worker counts ('default': config)")
  p.add_argument("--batch_size", type=int, default=36)
  p.add_argument("--clip_samples", type=int, default=47920)  # 3 s, the training crop
  p.add_argument("--batches", type=int, default=40, help="timed batches per row")
  p.add_argument("--warmup", type=int, default=4, help="untimed batches first (worker start-up)")
  p.add_argument("--profile", action="store_true", help="also print the per-stage cost of one clip")
  p.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
  args = p.parse_args()

  folder = synthetic_folder(args.synthetic) if args.synthetic else args.data
  try:
    run(args, folder)
  finally:
    if args.synthetic:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  main()
