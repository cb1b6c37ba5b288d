"""Smoke test of the adversarial recipe: the tiny ESC and a narrow discriminator, bundled clips.

  python train.py --config configs/smoke_adv.py --workdir /tmp/smoke_adv

Pre-training for 4 steps, then 6 adversarial steps (generator + discriminator),
batch 2 of 1 s crops, validation and a checkpoint at the end (a few minutes on
2 CPU cores, most of it compiling). The discriminator has the original's
structure (5 periods, 3 STFT windows, 5 bands) at narrower widths.
"""
import pathlib

import esc_jax
from esc_jax.config_lib import DISCRIMINATOR, ESC_TINY, add_adversarial, base_config

ASSETS = str(pathlib.Path(esc_jax.__file__).parent / "assets")


def get_config(arg=None):
  del arg
  c = add_adversarial(base_config(ESC_TINY), dict(DISCRIMINATOR, mpd_channels=[4, 8, 16, 32, 32],
                                                  mrd_channels=4))
  c.data.train_dir = ASSETS
  c.data.val_dir = ASSETS
  c.data.clip_samples = 15920  # 1 s (T = 200 frames)
  c.data.num_workers = 0
  c.train.batch_size = 2
  c.train.num_steps = 10
  c.train.pretrain_steps = 4
  c.eval.every_steps = 10
  c.eval.batch_size = 2
  c.ckpt.every_steps = 5
  c.ckpt.keep = 2
  c.log.every_steps = 2
  return c
