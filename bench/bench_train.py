"""Training throughput of ESC: seconds per step and audio-seconds per second.

  python bench/bench_train.py                       # ESC-Base, batch 4 x 3 s, all devices
  python bench/bench_train.py --batch_size=36 --config.train.compute_dtype=bfloat16
  python bench/bench_train.py --config configs/9kbps_adv.py      # the adversarial step
  python bench/bench_train.py --trace /tmp/esc_trace              # + where the step's time goes

Runs the real compiled train step (`train_lib.build`: loss, grads, clip, AdamW,
quantisation dropout) on random audio sharded over a mesh of all devices;
compilation is reported separately and warm-up steps are not timed.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).absolute().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import traces  # noqa: E402  (bench/ on the path above)

config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "9kbps.py"), "Training config (model, recipe).")
flags.DEFINE_integer("batch_size", 4, "Global batch.")
flags.DEFINE_float("seconds", 3.0, "Clip length in seconds (rounded to a valid length; 3 s -> 47920 samples).")
flags.DEFINE_integer("warmup", 2, "Untimed warm-up steps.")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_bool("pretrain", False, "Time a pre-training step (codebooks bypassed) instead.")
flags.DEFINE_bool("json", False, "Print one JSON line instead of the table.")
flags.DEFINE_string("trace", "", "Also trace two steps with jax.profiler into this folder and print where "
                    "their time goes on XLA:CPU (kernels, forward / backward of each module).")
flags.DEFINE_string("compile_cache", "default",
                    "Persistent XLA compilation cache folder ('default': ~/.cache/esc_jax/xla; '' disables).")
FLAGS = flags.FLAGS


def _page_faults() -> int:
  """Minor page faults of this process so far (0 where getrusage is missing)."""
  try:
    import resource
  except ImportError:
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _module_of(op_name: str, depth: int = 4) -> str:
  """'jit(step_fn)/transpose(jvp(ESC))/ESC.cross_scale/decoder.up/blocks_0/swint_blocks_1/mlp/dot'
  -> 'ESC.cross_scale/decoder.up/blocks_i/swint_blocks_i': the module path (the program, the
  transformations, a module named again by its child and the primitive left out)."""
  parts = [re.sub(r"^(?:\w+\()+|\)+$", "", p) for p in op_name.split("/")[1:]]
  parts = [p for i, p in enumerate(parts[:-1]) if p and not parts[i + 1].startswith(p + ".")]
  return "/".join(re.sub(r"_\d+$", "_i", p) for p in parts[:depth]) or "(top level)"


def cpu_step_breakdown(trace_dir: str, hlo_text: str, steps: int, step_s: float, top: int = 12) -> str:
  """Where a traced XLA:CPU program's time goes: the newest jax.profiler trace under
  `trace_dir` (`steps` runs of the program compiled to `hlo_text`), its thunks on XLA's
  worker threads grouped by what the compiled HLO says they are: a custom call by its
  target, anything else by the model module it came from (op_name metadata, layer
  indices folded) and whether it is forward or backward (under `transpose(`), library
  (YNN/XNN) matmul and convolution fusions apart. Thunks of one step can overlap in time,
  so the shares of the `step_s` step can add up to more than 100%."""
  path = traces.newest(trace_dir)
  if path is None:
    return f"no trace under {trace_dir}"
  lines = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M)}
  groups = collections.defaultdict(lambda: [0.0, 0])
  for e in traces.xla_cpu_thunks(traces.events(path)):
    line = lines.get(e["name"], "")
    target = re.search(r'custom_call_target="([^"]+)"', line)
    op = re.search(r'op_name="([^"]*)"', line)
    op = op.group(1) if op else ""
    if target:
      key = f"custom call {target.group(1)}"
    else:
      module = _module_of(op)
      kind = " [library]" if e["name"].startswith(("ynn_fusion", "xnn_fusion")) else ""
      key = f"{'backward' if 'transpose(' in op else 'forward '} {module}{kind}"
    groups[key][0] += e["dur"] / 1e3 / steps
    groups[key][1] += 1
  total = sum(t for t, _ in groups.values())
  out = [f"XLA:CPU thunks: {total:.0f} ms per step of the {step_s * 1e3:.0f} ms step (threads overlap)"]
  for key, (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
    out.append(f"  {t:8.1f} ms {100 * t / (step_s * 1e3):5.1f}% {n / steps:5.0f}x  {key[:110]}")
  return "\n".join(out)


def main(argv):
  del argv
  from esc_jax import runtime
  runtime.preload_allocator()
  import jax
  import numpy as np

  from esc_jax import train_lib

  runtime.enable_compile_cache(FLAGS.compile_cache)
  c = FLAGS.config
  c.unlock()
  c.train.pretrain_steps = 1 << 30 if FLAGS.pretrain else 0
  c.train.batch_size = FLAGS.batch_size
  c.data.clip_samples = int(round(FLAGS.seconds * 16000)) // 320 * 320 - 80  # 3 s -> 47920 (the reference clip)
  t0 = time.perf_counter()
  program = train_lib.build(c)  # the real compiled step: loss, grads, clip, AdamW, quantisation dropout
  build_s = time.perf_counter() - t0
  state = train_lib.init_state(program)
  rng = np.random.default_rng(0)
  length = int(c.data.clip_samples)
  batches = [train_lib.global_batch(program, (0.1 * rng.standard_normal((FLAGS.batch_size, length))).astype(np.float32))
             for _ in range(2)]
  for i in range(FLAGS.warmup):
    state, m = program.step(state, batches[i % 2])
    jax.block_until_ready(m)
  f0 = _page_faults()
  t0, c0 = time.perf_counter(), time.process_time()
  for i in range(FLAGS.steps):  # as train_lib's loop: the metrics of each step are fetched
    state, m = program.step(state, batches[i % 2])
    m = jax.device_get(m)
  dt = (time.perf_counter() - t0) / FLAGS.steps
  cpu = (time.process_time() - c0) / FLAGS.steps  # all threads of this process
  faults = (_page_faults() - f0) / FLAGS.steps
  if FLAGS.trace:
    with jax.profiler.trace(FLAGS.trace):
      for i in range(2):
        state, m = program.step(state, batches[i])
        jax.device_get(m)
    print(cpu_step_breakdown(FLAGS.trace, program.step.as_text(), steps=2, step_s=dt), flush=True)
  gflop = program.step_flops / 1e9
  dev = f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  row = dict(work="train_step_adv" if program.adversarial else "train_step", device=dev,
             batch=FLAGS.batch_size, clip_samples=length, dtype=c.train.compute_dtype, s_per_step=dt,
             clips_per_s=FLAGS.batch_size / dt, cpu_s_per_step=cpu, gflop_per_step=gflop,
             gflop_per_s=gflop / dt, page_faults_per_step=faults, build_s=build_s,
             compile_s=program.compile_s, load=load)
  if FLAGS.json:
    print(json.dumps(row), flush=True)
    return
  print(f"build {build_s:.1f} s, of which compiling the step {program.compile_s:.1f} s "
        f"(persistent cache: {FLAGS.compile_cache or 'off'})")
  print(f"{'device':<22} {'batch':>5} {'clip':>7} {'s/step':>8} {'clips/s':>8} {'audio-s/s':>10} "
        f"{'cpu-s/step':>10} {'GFLOP/s':>8} {'faults/step':>11} {'load':>5}")
  print(f"{dev:<22} {FLAGS.batch_size:>5} {length:>7} {dt:>8.3f} {FLAGS.batch_size / dt:>8.3f} "
        f"{FLAGS.batch_size * length / 16000 / dt:>10.2f} {cpu:>10.2f} {gflop / dt:>8.1f} {faults:>11.0f} "
        f"{load:>5.1f}")
  print("(cpu-s/step: CPU time of this process per step, all threads; on a shared machine "
        "s/step depends on the load average, cpu-s/step much less)")


if __name__ == "__main__":
  app.run(main)
