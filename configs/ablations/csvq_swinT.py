"""Ablation csvq+swinT: ESC with 8-dimensional codebooks at every scale
(the original's configs/ablations/9kbps_csvq_swinT.yaml, non-adversarial).

  python train.py --config configs/ablations/csvq_swinT.py --workdir runs/csvq_swinT \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

Recipe as ESC-Base (batch 36 = 9 per device x 4). 8,386,373 parameters (the
paper's "ESC-Base 8.39M").
"""
from esc_jax.config_lib import ABLATIONS, base_config


def get_config(arg=None):
  del arg
  return base_config(ABLATIONS["csvq+swinT"], "csvq+swinT")
