"""ESC-Base, 9 kbps (the original's configs/9kbps_esc_base.yaml, non-adversarial).

  python train.py --config configs/9kbps.py --workdir runs/esc_base \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

Paper recipe: batch 36 of 3 s clips, ~250k steps, first 15/80 epochs pre-training.
8,736,581 parameters.
"""
from esc_jax.config_lib import ESC_BASE, base_config


def get_config(arg=None):
  del arg
  return base_config(ESC_BASE)
