"""ESC-Base, 9 kbps (the original's configs/9kbps_esc_base.yaml, non-adversarial).

  python train.py --config configs/9kbps.py --workdir runs/esc_base \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

Paper recipe: batch 36 of 3 s clips, ~250k steps, first 15/80 epochs pre-training
(4 RTX 4090s, ~16 h in the paper).

Parameter count: 8,736,581, the original's yaml (codebook_dims [32,32,16,12,8,6]).
The original README's table lists ESC-Base at 8.39M, which is the same model with
codebook_dims [8]*6 (8,386,373 parameters; as the adversarial and Large configs):
pass --config.model.codebook_dims="[8,8,8,8,8,8]" to train that one.
"""
from esc_jax.config_lib import ESC_BASE, base_config


def get_config(arg=None):
  del arg
  return base_config(ESC_BASE)
