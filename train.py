"""Train ESC (the original's recipe; adversarial with configs/9kbps_adv.py) on a folder of audio.

  python train.py --config configs/9kbps.py --workdir runs/esc_base \
      --config.data.train_dir=/data/train --config.data.val_dir=/data/val \
      --config.train.batch_size=36

Rerunning the same command resumes from WORKDIR/checkpoints (no lost or repeated
steps). WORKDIR is a codec directory: `esc_jax.load(WORKDIR)` (latest step) or
`esc_jax.load(WORKDIR, step="best")` (best validation PESQ).
`--config.train.init_from=CODEC_DIR` starts a new run from a codec directory's
params (a converted release or another run) with a fresh optimizer.

Multi-process (multi-host) runs: start one process per host with
JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i, or under
SLURM / Open MPI (detected automatically); every process runs this same command
with the same --workdir on a shared filesystem and reads its own share of the data.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, esc_config.json).")
flags.DEFINE_string("compile_cache", "default",
                    "Persistent XLA compilation cache folder ('default': $ESC_JAX_CACHE or "
                    "~/.cache/esc_jax/xla; '' or 'off' disables): reruns and resumes skip compiling.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _quiet_libraries():
  """Keep orbax's per-save INFO chatter out of the console (warnings still show)."""
  import logging as std_logging

  class Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname

  logging.get_absl_handler().addFilter(Filter())


def main(argv):
  del argv
  _quiet_libraries()
  from esc_jax import runtime  # after flag parsing; imports jax lazily
  runtime.preload_allocator()
  runtime.gpu_gemm_flags(FLAGS.config.train.compute_dtype)
  runtime.maybe_initialize_distributed()
  runtime.enable_compile_cache(FLAGS.compile_cache)
  import jax
  from esc_jax import checkpoint, data, train_lib
  logging.info("devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count())
  try:
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train_lib.NonFiniteLossError, train_lib.ConfigError, data.DataError,
          checkpoint.CheckpointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"done: {FLAGS.workdir} (load it with esc_jax.load({FLAGS.workdir!r}))")
  return 0


if __name__ == "__main__":
  app.run(main)
