"""One table of esc-jax's speed on this machine, beside the original PyTorch ESC's.

  python bench/bench.py                                   # ours only
  python bench/bench.py --reference /tmp/esc_ref          # and the original, back to back
  python bench/bench.py --reference /tmp/esc_ref --rounds 3   # the median of 3 paired ratios
  python bench/bench.py --json                            # one JSON line per row

Rows (ESC-Base shapes, float32, random weights; the first, compiling call is
never timed):
  dot_peak         a 2048 x 2048 float32 jnp.dot: the machine's matmul peak
  fma_peak         the CPU's float32 multiply-add peak on all cores (bench/fma_peak.c, built
                   with the system C compiler; the row is left out without one)
  infer            encode + decode of 10 s at 9 and 1.5 kbps, and of 60 s whole
  infer_chunked    60 s through the CLI path (compress_file + decompress_file:
                   files, chunks of 10 s with exact context)
  train_step       one step at batch 4 x 3 s (loss, grads, clip, AdamW), with the
                   compile time cold and from a warm persistent cache (a restart)
  train_step_adv   the same with the adversarial discriminator (configs/9kbps_adv.py;
                   skipped by default on CPU: ~30 s per step there, ~8 min for the row)
  data_pipeline    clips/s from the grain pipeline (bench_data.py, default workers)
  accelerator      on a GPU/TPU, bench_gpu.py's rows: the card's ceilings, train clips/s at
                   batch 36 and the largest batch per compute dtype, batched inference
                   (there they replace the batch-4 train rows; --skip accel leaves them out)
GFLOP come from XLA's cost analysis of the programs before optimisation; "% dot" is
achieved GFLOP/s over dot_peak, "% FMA" over fma_peak.
The original is timed with ../shared/tools/reference (and bench/reference_streams.py
for 1.5 kbps), each of its rows right after the same row of ours: absolute times drift
on shared machines, so the ratio is of two measurements minutes apart at most. With
--rounds N every row and its original are measured N times over; the table gives the
medians and the median of the N ratios, with their range.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
KIT = os.path.join(ROOT, "..", "shared", "tools", "reference")


def dot_peak(n: int = 2048, repeats: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    r = f(a, a)
  r.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def fma_peak(threads: int) -> float | None:
  """GFLOP/s of bench/fma_peak.c on `threads` threads, or None without a C compiler."""
  cc = os.environ.get("CC", "cc")
  with tempfile.TemporaryDirectory() as tmp:
    exe = os.path.join(tmp, "fma_peak")
    try:
      subprocess.run([cc, "-O3", "-march=native", "-pthread", os.path.join(ROOT, "bench", "fma_peak.c"), "-o", exe],
                     check=True, capture_output=True, timeout=120)
      out = subprocess.run([exe, str(threads)], check=True, capture_output=True, text=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError):
      return None
  return float(out.split()[0])


def infer_rows(codec, repeats: int, reference=None) -> list[dict]:
  """encode + decode, whole signal, at (10 s, 9 kbps), (10 s, 1.5 kbps), (60 s, 9 kbps);
  each row followed by `reference(row)` (the original's seconds), where given."""
  from bench_codec import speech, timed
  from esc_jax import api, kernels
  from esc_jax.train_lib import xla_cost
  rows = []
  for seconds, streams in ((10, 6), (10, 1), (60, 6)):
    x = speech(seconds)[None]
    xp, _ = codec.pad(x)
    codes = codec.encode(x, streams)
    with kernels.disabled():  # XLA's count of fresh traces: it sees no work in the kernels' custom calls
      encode, decode, _ = api._compiled.__wrapped__(codec.model)  # pylint: disable=protected-access
      gflop = (xla_cost(encode.lower(codec.variables, xp, streams)) + xla_cost(decode.lower(codec.variables, codes))) / 1e9
    _, wall, cpu, _ = timed(lambda: codec.decode(codec.encode(x, streams)), repeats)
    rows.append(dict(work="infer", audio_s=seconds, kbps=codec.kbps(streams), s=wall, rtf=wall / seconds,
                     cpu_s=cpu, gflop=gflop, gflop_per_s=gflop / wall, streams=streams))
    if reference:
      rows[-1]["original_s"] = reference(rows[-1])
  return rows


def chunked_row(codec, repeats: int) -> dict:
  """60 s through compress_file + decompress_file (the CLI's chunked path), 9 kbps."""
  import soundfile as sf
  from bench_codec import speech, timed
  from esc_jax import compress
  with tempfile.TemporaryDirectory() as tmp:
    wav, esc, out = (os.path.join(tmp, n) for n in ("in.wav", "x.esc", "out.wav"))
    sf.write(wav, speech(60), 16000, subtype="PCM_16")
    run = lambda: (compress.compress_file(codec, wav, esc, codec.max_streams),  # noqa: E731
                   compress.decompress_file(codec, esc, out))
    _, wall, cpu, _ = timed(run, repeats)
  return dict(work="infer_chunked", audio_s=60, kbps=codec.kbps(6), s=wall, rtf=wall / 60, cpu_s=cpu)


def _json_run(cmd: list[str], what: str, **kw) -> dict:
  """Runs cmd and parses its last stdout line as JSON; SystemExit with its stderr if it fails."""
  p = subprocess.run(cmd, capture_output=True, text=True, **kw)
  if p.returncode or not p.stdout.strip():
    raise SystemExit(f"{what} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def train_rows(config: str, cache: str, reference=None) -> list[dict]:
  """bench_train.py in fresh processes: cold compile (empty cache), then a restart (warm cache);
  the row is followed by `reference(row)` (the original's seconds per step), where given."""
  rows = []
  for kind in ("cold", "warm"):
    r = _json_run([sys.executable, os.path.join(ROOT, "bench", "bench_train.py"), f"--config={config}",
                   f"--compile_cache={cache}", "--json", "--steps=3" if kind == "cold" else "--steps=5"],
                  "bench_train", cwd=ROOT)
    r["compile"] = kind
    rows.append(r)
  cold, warm = rows
  warm["compile_cold_s"], warm["compile_warm_s"] = cold["compile_s"], warm["compile_s"]
  if reference:
    warm["original_s"] = reference(warm)
  return [warm]


def data_row() -> dict:
  from bench_data import DEFAULT_DATA, synthetic_folder, throughput
  from esc_jax import data
  from esc_jax.config_lib import base_config, ESC_BASE
  folder = DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else synthetic_folder(40)
  files = data.scan_audio_files(folder) * 100  # a realistic list length (grain's shuffle costs ~1/length)
  workers = int(base_config(ESC_BASE).data.num_workers)
  r = throughput(files, 47920, 36, workers, batches=20, warmup=4)
  return dict(work="data_pipeline", num_workers=workers, batch=36, **r)


def accel_rows(extra: tuple[str, ...] = ()) -> list[dict]:
  """bench_gpu.py's rows (one JSON line each), run in a fresh process; failed rows are kept."""
  cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--json", *extra]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  rows = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
  if p.returncode or not rows:
    raise SystemExit(f"bench_gpu failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
  return [{**r, "accel": True} for r in rows]


def reference_key(row: dict) -> tuple | None:
  """The original's measurement that matches one of our rows: (work, audio_s, streams or batch)."""
  if row["work"] == "infer":
    return ("infer", row["audio_s"], row["streams"])
  if row["work"] == "train_step" and row.get("batch") == 4:
    return ("train_step", 3, 4)
  return None


def reference_time(ref: str, key: tuple) -> float:
  """The original's median seconds for `key` (see reference_key), timed now in its own venv.

  Its processes inherit our environment, LD_PRELOAD included: the same allocator
  as ours (see runtime.preload_allocator), so the ratios compare code.
  """
  py, src = os.path.join(ref, "venv", "bin", "python"), os.path.join(ref, "src")
  work, audio_s, n = key
  if work == "infer" and n != 6:  # the kit times 9 kbps only
    return _json_run([py, os.path.join(ROOT, "bench", "reference_streams.py"), src, str(audio_s), str(n)],
                     "reference_streams", env={**os.environ, "ESC_REFERENCE_KIT": KIT})["median_s"]
  args = ["infer", str(audio_s)] if work == "infer" else ["train", str(n)]
  r = _json_run([py, os.path.join(KIT, "bench_reference.py"), src, *args], "the reference's " + " ".join(args))
  return r.get("median_s", r.get("median_step_s"))


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
  """One row per row of the first round: the round whose time (s or s_per_step) is the
  median, with the median of the original's times and of the per-round ratios (the
  original's time over ours, each pair measured back to back) and their range."""
  merged = []
  for i, row in enumerate(rounds[0]):
    same = [r[i] for r in rounds]
    time_key = next((k for k in ("s", "s_per_step") if k in row), None)
    if time_key is None:  # e.g. the data pipeline's row: the first round's
      merged.append(row)
      continue
    out = dict(sorted(same, key=lambda r: r[time_key])[(len(same) - 1) // 2], rounds=len(same))
    if all("original_s" in r for r in same):
      ratios = [r["original_s"] / r[time_key] for r in same]
      out["original_s"] = float(np.median([r["original_s"] for r in same]))
      out["ratio"] = float(np.median(ratios))
      out["ratio_min"], out["ratio_max"] = min(ratios), max(ratios)
    merged.append(out)
  return merged


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reference", default=None, help="the reference kit's folder (venv/ and src/), e.g. /tmp/esc_ref")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=1,
                 help="measure the rows (and with --reference the original's, each right after ours) this "
                      "many times; the table gives medians and the range of the paired ratios")
  p.add_argument("--skip", default=None,
                 help="comma-separated: infer,chunked,train,adv,data,accel (default: adv on CPU, where "
                      "its 2,857-GFLOP step takes ~30 s and the row ~8 min; train,adv elsewhere, where "
                      "the accel rows time training at real batch sizes)")
  p.add_argument("--json", action="store_true", help="one JSON line per row instead of the table")
  args = p.parse_args()
  if args.rounds < 1:
    raise SystemExit("--rounds must be at least 1")
  from esc_jax import runtime
  runtime.preload_allocator()
  import jax
  cpu = jax.default_backend() == "cpu"
  if args.skip is None:
    args.skip = "adv" if cpu else "train,adv"
  skip = set(filter(None, args.skip.split(",")))
  from bench_codec import make_codec
  runtime.enable_compile_cache(tempfile.mkdtemp(prefix="esc_bench_xla_"))
  peak, fma = dot_peak(), fma_peak(os.cpu_count() or 1) if cpu else None
  codec = make_codec("random") if not {"infer", "chunked"} <= skip else None
  reference = None
  if args.reference:
    reference = lambda row: reference_time(args.reference, reference_key(row))  # noqa: E731
  rounds = []
  for _ in range(args.rounds):
    cache = tempfile.mkdtemp(prefix="esc_bench_train_xla_")  # a cold compile per round, then a warm one
    rows = []
    if "infer" not in skip:
      rows += infer_rows(codec, args.repeats, reference)
    if "chunked" not in skip:
      rows.append(chunked_row(codec, args.repeats))
    if "train" not in skip:
      rows += train_rows(os.path.join(ROOT, "configs", "9kbps.py"), cache, reference if cpu else None)
    if "adv" not in skip:
      rows += train_rows(os.path.join(ROOT, "configs", "9kbps_adv.py"), cache)
    if "data" not in skip:
      rows.append(data_row())
    rounds.append(rows)
  rows = [dict(work="dot_peak", gflop_per_s=peak)] + ([dict(work="fma_peak", gflop_per_s=fma)] if fma else [])
  rows += merge_rounds(rounds)
  if not cpu and "accel" not in skip:
    rows += accel_rows()
  for r in rows:
    if r.get("accel"):  # the original's times are CPU times: no ratio against an accelerator
      continue
    if "gflop_per_s" in r and not r["work"].endswith("_peak"):
      r["pct_peak"] = 100 * r["gflop_per_s"] / peak
      if fma:
        r["pct_fma"] = 100 * r["gflop_per_s"] / fma
    if "ratio" in r and fma and r.get("gflop_per_s"):  # the same FLOP in the original's time
      r["original_pct_fma"] = r["pct_fma"] / r["ratio"]
  device = f"{len(jax.devices())} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs"
  load = os.getloadavg()[0]
  malloc = os.path.basename(runtime.preloaded_allocator() or "system malloc")  # the original's as well
  if args.json:
    for r in rows:
      print(json.dumps({**r, "device": device, "load": load, "malloc": malloc}))
    return
  import esc_jax
  print(f"esc-jax {esc_jax.__version__}, jax {jax.__version__} on {device}, load average {load:.1f}, "
        f"malloc: {malloc} (ours and the original's)")
  print(f"{'work':<15} {'setting':<24} {'ours':>10} {'original':>9} {'ratio':>6} {'GFLOP/s':>8} {'% dot':>6} {'% FMA':>6}  notes")
  for r in rows:
    w = r["work"]
    if r.get("accel"):
      from bench_gpu import fmt_row
      print(fmt_row(r))
      continue
    if w == "dot_peak":
      setting, ours, note = "2048^2 float32", "", ""
    elif w == "fma_peak":
      setting, ours, note = f"{os.cpu_count()} threads", "", "12 FMA chains per thread"
    elif w.startswith("infer"):
      setting = f"{r['audio_s']:g} s, {r['kbps']:g} kbps" + (", CLI chunks" if w == "infer_chunked" else "")
      ours, note = f"{r['s']:.3f} s", f"RTF {r['rtf']:.3f}, {r['cpu_s']:.2f} CPU-s"
    elif w.startswith("train"):
      setting = f"batch {r['batch']} x 3 s"
      ours = f"{r['s_per_step']:.2f} s"
      note = (f"{r['clips_per_s']:.2f} clips/s, {r['cpu_s_per_step']:.1f} CPU-s, compile {r['compile_cold_s']:.0f} s "
              f"cold / {r['compile_warm_s']:.1f} s warm cache")
    else:
      setting, ours = f"{r['num_workers']} workers, batch 36", f"{r['clips_per_s']:.0f}/s"
      note = f"{r['cpu_ms_per_clip']:.2f} CPU-ms per clip"
    if "original_pct_fma" in r:
      note += f"; original {r['original_pct_fma']:.0f}% FMA"
    orig = f"{r['original_s']:.3f} s" if "original_s" in r else ""
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
    if r.get("rounds", 1) > 1 and "ratio" in r:
      note += f"; ratio {r['ratio_min']:.2f}-{r['ratio_max']:.2f}x over {r['rounds']} rounds"
    gf = f"{r['gflop_per_s']:.0f}" if "gflop_per_s" in r else ""
    pct = f"{r['pct_peak']:.0f}%" if "pct_peak" in r else ""
    pct_fma = f"{r['pct_fma']:.0f}%" if "pct_fma" in r else ""
    print(f"{w:<15} {setting:<24} {ours:>10} {orig:>9} {ratio:>6} {gf:>8} {pct:>6} {pct_fma:>6}  {note}")


if __name__ == "__main__":
  main()
