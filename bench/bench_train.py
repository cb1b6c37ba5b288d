"""Training throughput of ESC: seconds per step and audio-seconds per second.

  python bench/bench_train.py                       # ESC-Base, batch 4 x 3 s, all devices
  python bench/bench_train.py --batch_size=36 --config.train.compute_dtype=bfloat16

Runs the real compiled train step (`train_lib.make_train_step`: loss, grads, clip,
AdamW, quantisation dropout) on random audio sharded over a mesh of all devices;
warm-up steps (compilation included) are not timed.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).absolute().parents[1]
sys.path.insert(0, str(ROOT))

config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "9kbps.py"), "Training config (model, recipe).")
flags.DEFINE_integer("batch_size", 4, "Global batch.")
flags.DEFINE_float("seconds", 3.0, "Clip length in seconds (rounded to a valid length; 3 s -> 47920 samples).")
flags.DEFINE_integer("warmup", 2, "Untimed steps (the first compiles).")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_bool("pretrain", False, "Time a pre-training step (codebooks bypassed) instead.")
flags.DEFINE_string("compile_cache", os.path.expanduser("~/.cache/esc_jax/xla"),
                    "Persistent XLA compilation cache ('' disables).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from esc_jax import train_lib
  from esc_jax.codec import make_model

  if FLAGS.compile_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  c = FLAGS.config
  c.unlock()
  c.train.pretrain_steps = 1 << 30 if FLAGS.pretrain else 0
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.train.compute_dtype]
  model = make_model(c.model, c.model_name, dtype=dtype)
  length = int(round(FLAGS.seconds * 16000)) // 320 * 320 - 80  # 3 s -> 47920 (the reference clip)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  tx = train_lib.make_optimizer(c.optim)
  step = jax.jit(train_lib.make_train_step(model, tx, train_lib.make_schedule(c.optim, c.train.num_steps), c),
                 in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, length)))["params"])(
      jax.random.key(0, impl="unsafe_rbg"))
  state = jax.device_put(train_lib.TrainState(jnp.int32(0), params, tx.init(params)), rep)
  rng = np.random.default_rng(0)
  batches = [jax.device_put((0.1 * rng.standard_normal((FLAGS.batch_size, length))).astype(np.float32), shard)
             for _ in range(2)]
  t0 = time.perf_counter()
  for i in range(FLAGS.warmup):
    state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    if i == 0:
      print(f"compile + first step: {time.perf_counter() - t0:.1f} s", flush=True)
  t0, c0 = time.perf_counter(), time.process_time()
  for i in range(FLAGS.steps):
    state, m = step(state, batches[i % 2])
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / FLAGS.steps
  cpu = (time.process_time() - c0) / FLAGS.steps  # all threads of this process
  assert step._cache_size() == 1  # pylint: disable=protected-access
  dev = f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"{'device':<22} {'batch':>5} {'clip':>7} {'s/step':>8} {'steps/s':>8} {'audio-s/s':>10} "
        f"{'cpu-s/step':>10} {'load':>5}")
  print(f"{dev:<22} {FLAGS.batch_size:>5} {length:>7} {dt:>8.3f} {1 / dt:>8.3f} "
        f"{FLAGS.batch_size * length / 16000 / dt:>10.2f} {cpu:>10.2f} {load:>5.1f}")
  print("(cpu-s/step: CPU time of this process per step, all threads; on a shared machine "
        "s/step depends on the load average, cpu-s/step much less)")


if __name__ == "__main__":
  app.run(main)
