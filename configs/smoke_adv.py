"""Smoke test of the adversarial recipe: the tiny ESC and a narrow discriminator, bundled clips.

  python train.py --config configs/smoke_adv.py --workdir /tmp/smoke_adv

Pre-training for 4 steps, then 6 adversarial steps (generator + discriminator),
batch 2 of 1 s crops, validation and a checkpoint at the end (a few minutes on
2 CPU cores, most of it compiling). The discriminator has the original's
structure (5 periods, 3 STFT windows, 5 bands) at narrower widths.
"""
from esc_jax.config_lib import DISCRIMINATOR, ESC_TINY, add_adversarial, base_config, smoke

NARROW = dict(DISCRIMINATOR, mpd_channels=[4, 8, 16, 32, 32], mrd_channels=4)


def get_config(arg=None):
  del arg
  return smoke(add_adversarial(base_config(ESC_TINY), NARROW), num_steps=10, pretrain_steps=4)
