"""ESC-Large, 9 kbps (the original's configs/9kbps_esc_large.yaml): depth 4, 8-dim codebooks.

  python train.py --config configs/9kbps_large.py --workdir runs/esc_large \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val
"""
from esc_jax.config_lib import ESC_BASE, base_config


def get_config(arg=None):
  del arg
  return base_config(dict(ESC_BASE, swin_depth=4, codebook_dims=[8] * 6))
