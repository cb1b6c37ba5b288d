"""Ablation rvq+conv: convolution backbone with a product residual VQ at the
bottleneck only (the original's configs/ablations/9kbps_rvq_conv.yaml,
non-adversarial).

  python train.py --config configs/ablations/rvq_conv.py --workdir runs/rvq_conv \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

Recipe as ESC-Base (batch 36 = 9 per device x 4). 8,907,752 parameters plus
8,622 BatchNorm running statistics ("batch_stats"), which the training step
must carry (mutable=["batch_stats"]).
"""
from esc_jax.config_lib import ABLATIONS, base_config


def get_config(arg=None):
  del arg
  return base_config(ABLATIONS["rvq+conv"], "rvq+conv")
