"""Ablation csvq+conv: cross-scale product VQ with the convolution backbone
(residual units of Conv2d -> BatchNorm -> PReLU; the original's
configs/ablations/9kbps_csvq_conv.yaml, non-adversarial).

  python train.py --config configs/ablations/csvq_conv.py --workdir runs/csvq_conv \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

Recipe as ESC-Base (batch 36 = 9 per device x 4). 9,116,648 parameters plus
8,622 BatchNorm running statistics ("batch_stats"), which the training step
must carry (mutable=["batch_stats"]).
"""
from esc_jax.config_lib import ABLATIONS, base_config


def get_config(arg=None):
  del arg
  return base_config(ABLATIONS["csvq+conv"], "csvq+conv")
