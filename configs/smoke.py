"""Smoke test: the tiny ESC for 20 steps on the bundled clips (~1-2 min on 2 CPU cores).

  python train.py --config configs/smoke.py --workdir /tmp/smoke_run

Pre-training for 5 steps, batch 2 of 1 s crops, checkpoints every 10 steps,
validation (PESQ etc.) on the bundled clips at the end. Rerun to see it resume.
"""
import pathlib

import esc_jax
from esc_jax.config_lib import ESC_TINY, base_config

ASSETS = str(pathlib.Path(esc_jax.__file__).parent / "assets")


def get_config(arg=None):
  del arg
  c = base_config(ESC_TINY)
  c.data.train_dir = ASSETS
  c.data.val_dir = ASSETS
  c.data.clip_samples = 15920  # 1 s (T = 200 frames)
  c.data.num_workers = 0
  c.train.batch_size = 2
  c.train.num_steps = 20
  c.train.pretrain_steps = 5
  c.eval.every_steps = 20
  c.eval.batch_size = 2
  c.ckpt.every_steps = 10
  c.ckpt.keep = 2
  c.log.every_steps = 5
  return c
