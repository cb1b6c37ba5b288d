"""ESC-Base on an accelerator: training clips/s and inference real-time factor.

  python bench/bench_gpu.py                      # the rows of issue 10 on the default device
  python bench/bench_gpu.py --json --out rows.jsonl
  python bench/bench_gpu.py --train_batches 8 --infer_batches 1 --dtypes float32   # a quick look

Rows (random weights, the first, compiling call never timed):
  peak         the card's ceilings measured here: an 8192^3 matmul in float32 (XLA's
               default precision: TF32 on NVIDIA tensor cores), float32 at "highest",
               bfloat16, and a device-to-device copy (bytes read + written)
  train_step   the real compiled step (train_lib.build: loss, grads, clip, AdamW,
               quantisation dropout) at batch 36 of 3 s clips and at the largest batch
               that fits (predicted from the compiled step's memory analysis at 36, then
               lowered until it runs), per compute dtype
  infer        encode + decode of B x 10 s at 9 kbps on device arrays (jitted, as
               Codec.encode/decode run them) and, at B = 1, through the numpy API
               (host transfers included); bfloat16 rows give the share of codes equal
               to float32's
FLOP come from XLA's cost analysis of the programs before optimisation (the
compiled GPU programs' counts leave out their cuBLAS/cuDNN calls); "% peak"
compares achieved FLOP/s with the measured matmul rate of the dtype (TF32 for
float32). Bytes are XLA's count for the compiled programs, which leaves the
library calls out too: "% BW" (over the measured copy bandwidth) is a lower bound.
Each row is printed (and appended to --out) as soon as it is measured; a row
that fails prints its error and the others still run. A compile cannot be
interrupted from Python: where time is short, run the bfloat16 train rows in a
process of their own under `timeout`, e.g.
  timeout 300 python bench/bench_gpu.py --dtypes bfloat16 --skip peak,infer --out rows.jsonl
A process given only bfloat16 turns XLA:GPU's Triton matmuls off as train.py does
for bfloat16 compute (`runtime.gpu_gemm_flags`): on an H200 with jax 0.11.2 the
bf16 step compiled in ~95 s that way, and had not compiled after ~5 min with them;
the float32 step takes ~2 min at batch 36 and over ~4 min at the largest batch.
bench/gpu_sitting.sh runs every row in one time-boxed sitting: --compile_only processes
compile all programs in parallel into one --cache, then timing processes load them
one at a time (--peaks_from carries the first one's ceilings to the others).
--planned lets a later process find the largest batch from an earlier run's
planned memory without compiling a fixed batch again:
  python bench/bench_gpu.py --dtypes float32 --skip infer --train_batches max --planned float32:36:39.1
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import traces  # noqa: E402  (bench/ on the path above)
from bench_codec import random_params, speech  # noqa: E402
from esc_jax.train_lib import xla_cost  # noqa: E402

flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to time.")
flags.DEFINE_list("train_batches", ["36", "max"], "Train batch sizes; 'max': the largest that fits.")
flags.DEFINE_list("infer_batches", ["1", "64"], "Inference batch sizes (clips of --infer_seconds).")
flags.DEFINE_float("infer_seconds", 10.0, "Length of each inference clip.")
flags.DEFINE_integer("steps", 10, "Timed train steps (after 2 untimed).")
flags.DEFINE_integer("repeats", 10, "Timed inference calls (median).")
flags.DEFINE_float("mem_fill", 0.9, "Share of the device memory limit that the 'max' batch may plan for.")
flags.DEFINE_integer("max_batch_multiple", 4, "The 'max' batch is a multiple of this.")
flags.DEFINE_list("planned", [], "DTYPE:BATCH:GB, the planned memory of a train batch from an earlier run, "
                  "so that 'max' needs no fixed batch of that dtype timed first (e.g. float32:36:39.1).")
flags.DEFINE_string("out", "", "Append each row as a JSON line to this file.")
flags.DEFINE_bool("json", False, "Print JSON lines only (no table).")
flags.DEFINE_string("skip", "", "Comma-separated: peak,train,infer.")
flags.DEFINE_string("cache", "", "Persistent compilation cache folder (default: off, so that every compile_s is cold). "
                    "With --compile_only, lets parallel processes compile the programs that a later timing "
                    "process loads.")
flags.DEFINE_bool("compile_only", False, "Compile the selected programs (and run each inference program once) "
                  "without timing them; prints one 'compile' row per program.")
flags.DEFINE_string("peaks_from", "", "A JSONL file of an earlier run's rows: take the 'peak' rows from it "
                    "instead of measuring them (for '% peak' in a process that skips peak).")
flags.DEFINE_string("trace", "", "Write a jax.profiler trace of two steps of the first train row here and print "
                    "its kernel summary (kernels per step, busy share, top kernels); the trace is copied to "
                    "DIR/train_step.trace.json.gz (opens in Perfetto).")
FLAGS = flags.FLAGS

_T0 = time.perf_counter()
CLIP_SAMPLES = 47920  # 3 s, the reference's training clip
_traced = False  # --trace covers the first train row only


def _stage(what: str) -> None:
  """One line on stderr per stage of a row, with the process's age: where a row that
  never printed stopped (a GPU sitting's logs keep stderr)."""
  print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)


def _emit(row: dict) -> dict:
  import jax
  row = {**row, "device": f"{jax.devices()[0].device_kind}", "platform": jax.default_backend()}
  line = json.dumps(row)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(line + "\n")
  print(line if FLAGS.json else fmt_row(row), flush=True)
  return row


def fmt_row(r: dict) -> str:
  """One row as a line of the table."""
  if "error" in r:
    return f"{r['work']:<11} {r.get('setting', ''):<28} FAILED: {r['error']}"
  if r["work"] == "compile":
    return f"compile     {r['setting']:<28} {r['compile_s']:>8.1f} s" + (
        f", {r['mem_gb']:.1f} GB planned" if "mem_gb" in r else "")
  if r["work"] == "peak":
    return (f"peak        {r['setting']:<28} {r['value']:>10.1f} {r['unit']}")
  if r["work"] == "train_step":
    return (f"train_step  {r['dtype']:<9} batch {r['batch']:<4} x 3 s    {r['s_per_step'] * 1e3:>8.1f} ms/step "
            f"{r['clips_per_s']:>8.1f} clips/s  {r['tflop_per_s']:>6.1f} TFLOP/s ({r['pct_peak']:.1f}% peak) "
            f">={r['gb_per_s']:.0f} GB/s ({r['pct_bw']:.0f}% BW)  compile {r['compile_s']:.0f} s, "
            f"{r['mem_gb']:.1f} GB")
  extra = f", codes equal to float32 {100 * r['codes_equal_f32']:.2f}%" if "codes_equal_f32" in r else ""
  if "api_s" in r:
    extra += f", numpy API {r['api_s'] * 1e3:.1f} ms ({r['api_x_realtime']:.0f}x)"
  return (f"infer       {r['dtype']:<9} {r['setting']:<18} {r['s'] * 1e3:>8.1f} ms  {r['x_realtime']:>8.0f}x real time  "
          f"{r['tflop_per_s']:>6.1f} TFLOP/s ({r['pct_peak']:.1f}% peak) >={r['gb_per_s']:.0f} GB/s  "
          f"compile {r['compile_s']:.0f} s{extra}")


def _median_time(fn, repeats: int) -> float:
  """Median wall seconds of fn() (which must block until its work is done)."""
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def peaks() -> dict:
  """{"float32", "highest", "bfloat16": FLOP/s of an 8192^3 matmul, "copy": bytes/s of a 2 GiB copy}."""
  import jax
  import jax.numpy as jnp
  n, out = 8192, {}
  key = jax.random.key(0)
  for name, dtype, precision in (("float32", jnp.float32, None), ("highest", jnp.float32, "highest"),
                                 ("bfloat16", jnp.bfloat16, None)):
    a = jax.random.normal(key, (n, n), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
    f = jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p))
    f(a, b).block_until_ready()
    out[name] = 2 * n ** 3 / _median_time(lambda: f(a, b).block_until_ready(), 10)
  x = jax.random.normal(key, (1 << 29,), jnp.float32)  # 2 GiB
  g = jax.jit(lambda v: v + 1.0)
  g(x).block_until_ready()
  out["copy"] = 2 * x.nbytes / _median_time(lambda: g(x).block_until_ready(), 10)
  return out


PEAK_SETTINGS = {"float32": "matmul f32 (default prec.)", "highest": "matmul f32 (highest)",
                 "bfloat16": "matmul bf16", "copy": "device copy (r + w)"}


def read_peaks(path: str) -> dict:
  """The 'peak' rows of an earlier run's JSONL file, as peaks() returns them (FLOP/s, bytes/s)."""
  names = {v: k for k, v in PEAK_SETTINGS.items()}
  out = {}
  with open(path) as f:
    for r in map(json.loads, filter(str.strip, f)):
      if r.get("work") == "peak" and r.get("setting") in names:
        out[names[r["setting"]]] = r["value"] * (1e9 if r["unit"] == "GB/s" else 1e12)
  return out


def _config(batch: int, dtype: str):
  spec = importlib.util.spec_from_file_location("cfg_9kbps", os.path.join(ROOT, "configs", "9kbps.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.batch_size, c.train.compute_dtype, c.train.pretrain_steps = batch, dtype, 0
  c.data.clip_samples = CLIP_SAMPLES
  return c


def _mem_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)


def train_row(batch: int, dtype: str, peak: dict) -> tuple[dict, float]:
  """Times the real train step; returns (row, bytes of device memory the step plans for)."""
  global _traced
  import jax
  from esc_jax import train_lib
  _stage(f"train {dtype} batch {batch}: building the step")
  program = train_lib.build(_config(batch, dtype))
  mem = _mem_bytes(program.step)
  _stage(f"train {dtype} batch {batch}: built (compile {program.compile_s:.1f} s)")
  if FLAGS.compile_only:
    return dict(work="compile", setting=f"train_step {dtype} batch {batch}", dtype=dtype, batch=batch,
                compile_s=program.compile_s, mem_gb=mem / 1e9), mem
  state = train_lib.init_state(program)
  rng = np.random.default_rng(0)
  batches = [train_lib.global_batch(program, (0.1 * rng.standard_normal((batch, CLIP_SAMPLES))).astype(np.float32))
             for _ in range(2)]
  _stage(f"train {dtype} batch {batch}: state and batches on the device")
  for i in range(2):
    state, m = program.step(state, batches[i])
    jax.block_until_ready(m)
    _stage(f"train {dtype} batch {batch}: warm-up step {i + 1} done")
  t = time.perf_counter()
  for i in range(FLAGS.steps):  # as train_lib's loop: each step's metrics are fetched
    state, m = program.step(state, batches[i % 2])
    m = jax.device_get(m)
  dt = (time.perf_counter() - t) / FLAGS.steps
  if FLAGS.trace and not _traced:
    _traced = True
    with jax.profiler.trace(FLAGS.trace):
      for i in range(2):
        state, m = program.step(state, batches[i])
        m = jax.device_get(m)
    try:
      print(kernel_summary(FLAGS.trace, steps=2, step_s=dt), flush=True)
    except Exception as e:  # noqa: BLE001 - the row stands without its summary
      print(f"trace summary failed: {_one_line(e)}", flush=True)
  if not np.isfinite(float(m["loss"])):
    raise FloatingPointError(f"train loss is {float(m['loss'])}")
  flop, nbytes = program.step_flops, xla_cost(program.step, "bytes accessed")
  ref = peak.get("float32" if dtype == "float32" else "bfloat16", float("nan"))
  row = dict(work="train_step", dtype=dtype, batch=batch, clip_samples=CLIP_SAMPLES, s_per_step=dt,
             clips_per_s=batch / dt, tflop_per_step=flop / 1e12, tflop_per_s=flop / dt / 1e12,
             pct_peak=100 * flop / dt / ref, gb_per_s=nbytes / dt / 1e9,
             pct_bw=100 * nbytes / dt / peak.get("copy", float("nan")), compile_s=program.compile_s,
             mem_gb=mem / 1e9, loss=float(m["loss"]))
  del state, batches, program
  gc.collect()
  return row, mem


def kernel_summary(trace_dir: str, steps: int, step_s: float, top: int = 12) -> str:
  """Reads the newest jax.profiler trace under `trace_dir`, copies it to
  `trace_dir/train_step.trace.json.gz` (a flat path) and summarises its kernels per step:
  their count and summed time against the step's wall time (a busy share well under
  100% means the device waits between kernels), the time in matmul/convolution library
  calls, and the `top` kernels by time. Kernels: the device's stream lines (GPU), else
  XLA:CPU's thunks on its worker threads (which run in parallel: shares can pass 100%)."""
  import collections
  import shutil
  path = traces.newest(trace_dir)
  if path is None:
    return f"no trace under {trace_dir}"
  shutil.copyfile(path, os.path.join(trace_dir, "train_step.trace.json.gz"))
  events = traces.events(path)
  meta = {(e["pid"], e.get("tid"), e["name"]): e["args"]["name"] for e in events
          if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
  device_pids = {pid for (pid, _, n), v in meta.items() if n == "process_name" and v.startswith("/device:")}
  if device_pids:  # the stream lines, else every device line but XLA's op/module/step annotations
    device = {(pid, tid): v for (pid, tid, n), v in meta.items() if n == "thread_name" and pid in device_pids}
    lines = {k for k, v in device.items() if v.startswith("Stream")} or {
        k for k, v in device.items() if not v.startswith(("XLA", "Steps", "Framework"))}
    kernels = [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in lines]
  else:
    kernels = traces.xla_cpu_thunks(events)
  per_name = collections.defaultdict(lambda: [0.0, 0])
  for e in kernels:
    per_name[e["name"]][0] += e["dur"]
    per_name[e["name"]][1] += 1
  total = sum(t for t, _ in per_name.values())
  lib = sum(t for n, (t, _) in per_name.items()
            if any(k in n.lower() for k in ("gemm", "xmma", "nvjet", "cutlass", "cublas", "conv", "cudnn", "dot")))
  ms = 1e-3 / steps  # trace microseconds -> ms per step
  out = [f"trace: {len(kernels) / steps:.0f} kernels per step, {total * ms:.1f} ms of kernel time per step "
         f"({100 * total * ms / (step_s * 1e3):.0f}% of the {step_s * 1e3:.1f} ms step), "
         f"{100 * lib / max(total, 1):.0f}% of it in matmul/convolution calls; top kernels:"]
  for name, (t, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]:
    out.append(f"  {t * ms:8.2f} ms {100 * t / max(total, 1):5.1f}% {n / steps:5.0f}x  {name[:110]}")
  return "\n".join(out)


def max_batch(mem36: float, batch36: int, limit: float) -> int:
  """The largest multiple of --max_batch_multiple whose planned memory fits --mem_fill of `limit`,
  assuming memory linear in the batch (the params and optimizer state are a few hundred MB)."""
  per_clip = mem36 / batch36
  k = FLAGS.max_batch_multiple
  return max(k, int(FLAGS.mem_fill * limit / per_clip) // k * k)


def train_rows(peak: dict, planned: dict, largest: bool, dtypes) -> None:
  """The fixed train batches (largest=False; fills planned[dtype][batch] = planned bytes), or
  the largest batch per dtype (largest=True; needs a fixed batch of that dtype timed first)."""
  import jax
  limit = float((jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0))
  for dtype in dtypes:
    if not largest:
      for b in (int(b) for b in FLAGS.train_batches if b != "max"):
        try:
          row, mem = train_row(b, dtype, peak)
          planned.setdefault(dtype, {}).setdefault(b, mem)  # --planned's figure stands (same 'max' batch)
          _emit(row)
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          _emit(dict(work="train_step", dtype=dtype, setting=f"batch {b}", error=_one_line(e)))
      continue
    if not planned.get(dtype) or not limit:
      _emit(dict(work="train_step", dtype=dtype, setting=f"{dtype} max batch",
                 error="needs a timed fixed batch of this dtype and the device's memory limit"))
      continue
    b0, mem0 = max(planned[dtype].items())
    batch = max_batch(mem0, b0, limit)
    while batch > b0:
      try:
        row, _ = train_row(batch, dtype, peak)
        _emit({**row, "largest": True, "mem_limit_gb": limit / 1e9})
        break
      except Exception as e:  # noqa: BLE001 - out of memory: try a smaller batch
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
          traceback.print_exc()
          _emit(dict(work="train_step", dtype=dtype, setting=f"batch {batch}", error=_one_line(e)))
          break
        print(f"batch {batch} ({dtype}) does not fit: {_one_line(e)[:200]}", flush=True)
        gc.collect()
        batch = int(batch * 0.85) // FLAGS.max_batch_multiple * FLAGS.max_batch_multiple
    else:  # no batch above the timed one fits
      _emit(dict(work="train_step", dtype=dtype, setting=f"{dtype} max batch",
                 error=f"no multiple of {FLAGS.max_batch_multiple} above batch {b0} fits"))


def infer_rows(peak: dict) -> None:
  import jax.numpy as jnp
  from esc_jax.api import Codec
  from esc_jax.codec import make_model
  from esc_jax.config_lib import ESC_BASE
  seconds = FLAGS.infer_seconds
  params = random_params(make_model(ESC_BASE))
  f32_codes = {}
  for dtype in FLAGS.dtypes:
    codec = Codec(make_model(ESC_BASE, dtype=jnp.dtype(dtype).type), params, {"model": ESC_BASE})
    for b in map(int, FLAGS.infer_batches):
      try:
        # distinct clips per batch row: start each at another offset of the tiled speech
        long = speech(seconds + b * 0.37)
        x_np = np.stack([long[int(i * 0.37 * 16000):][:int(seconds * 16000)] for i in range(b)])
        x = jnp.asarray(codec.pad(x_np)[0])
        _stage(f"infer {dtype} {b} x {seconds:g} s: building")
        t = time.perf_counter()
        enc_lowered = codec._encode.lower(codec.variables, x, 6)  # pylint: disable=protected-access
        enc = enc_lowered.compile()
        codes = enc(codec.variables, x)
        dec_lowered = codec._decode.lower(codec.variables, codes)  # pylint: disable=protected-access
        dec = dec_lowered.compile()
        dec(codec.variables, codes).block_until_ready()
        compile_s = time.perf_counter() - t
        _stage(f"infer {dtype} {b} x {seconds:g} s: built and run once ({compile_s:.1f} s)")
        if FLAGS.compile_only:  # the numpy API's call too, so that a cache holds every program timed
          if b == 1:
            codec.decode(codec.encode(x_np, 6))
          _emit(dict(work="compile", setting=f"infer {dtype} {b} x {seconds:g} s", dtype=dtype, batch=b,
                     compile_s=compile_s))
          continue
        run = lambda: dec(codec.variables, enc(codec.variables, x)).block_until_ready()  # noqa: E731
        run()
        s = _median_time(run, FLAGS.repeats)
        flop = xla_cost(enc_lowered) + xla_cost(dec_lowered)
        nbytes = xla_cost(enc, "bytes accessed") + xla_cost(dec, "bytes accessed")
        ref = peak.get("float32" if dtype == "float32" else "bfloat16", float("nan"))
        row = dict(work="infer", dtype=dtype, batch=b, audio_s=seconds, kbps=codec.kbps(6),
                   setting=f"{b} x {seconds:g} s, 9 kbps", s=s, x_realtime=b * seconds / s,
                   tflop_per_s=flop / s / 1e12, pct_peak=100 * flop / s / ref, gb_per_s=nbytes / s / 1e9,
                   compile_s=compile_s)
        c = np.asarray(codes)
        if dtype == "float32":
          f32_codes[b] = c
        elif b in f32_codes:
          row["codes_equal_f32"] = float(np.mean(c == f32_codes[b]))
        if b == 1:  # the user-facing path: numpy in, numpy out
          row["api_s"] = _median_time(lambda: codec.decode(codec.encode(x_np, 6)), FLAGS.repeats)
          row["api_x_realtime"] = seconds / row["api_s"]
        _emit(row)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        _emit(dict(work="infer", dtype=dtype, setting=f"{b} x {seconds:g} s", error=_one_line(e)))
      gc.collect()


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def main(argv):
  del argv
  import jax
  from esc_jax import runtime
  runtime.enable_compile_cache(FLAGS.cache or None)  # off by default: every compile_s is a cold compile
  if FLAGS.dtypes == ["bfloat16"]:  # as train.py does for bfloat16 compute
    runtime.gpu_gemm_flags("bfloat16")
  skip = set(filter(None, FLAGS.skip.split(",")))
  d = jax.devices()[0]
  print(f"jax {jax.__version__} on {len(jax.devices())} x {d.device_kind} ({jax.default_backend()}), "
        f"memory limit {(d.memory_stats() or {}).get('bytes_limit', 0) / 1e9:.1f} GB, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  peak = read_peaks(FLAGS.peaks_from) if FLAGS.peaks_from else {}
  if "peak" not in skip and not FLAGS.compile_only:
    peak = peaks()
    for name, setting in PEAK_SETTINGS.items():
      unit, scale = ("GB/s", 1e9) if name == "copy" else ("TFLOP/s", 1e12)
      _emit(dict(work="peak", setting=setting, value=peak[name] / scale, unit=unit))
  # The quickest and surest rows first: the first dtype's fixed batches, inference, the other
  # dtypes' fixed batches (XLA:GPU took over 5 min to compile the bf16 step on an H200), "max".
  planned = {}  # dtype -> {batch: planned bytes}
  for item in FLAGS.planned:
    dtype, batch, gb = item.split(":")
    planned.setdefault(dtype, {})[int(batch)] = float(gb) * 1e9
  train = "train" not in skip
  if train:
    train_rows(peak, planned, False, FLAGS.dtypes[:1])
  if "infer" not in skip:
    infer_rows(peak)
  if train:
    train_rows(peak, planned, False, FLAGS.dtypes[1:])
  if train and "max" in FLAGS.train_batches:
    train_rows(peak, planned, True, FLAGS.dtypes)


if __name__ == "__main__":
  app.run(main)
