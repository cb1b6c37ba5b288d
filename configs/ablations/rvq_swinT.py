"""Ablation rvq+swinT: Swin encoder/decoder with a product residual VQ at the
bottleneck only (3 groups x 6 residual codebooks; the original's
configs/ablations/9kbps_rvq_swinT.yaml, non-adversarial).

  python train.py --config configs/ablations/rvq_swinT.py --workdir runs/rvq_swinT \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

The original trains it with 18 clips per device (batch 72 on 4 GPUs); the rest
as ESC-Base. 8,177,477 parameters.
"""
from esc_jax.config_lib import ABLATIONS, base_config


def get_config(arg=None):
  del arg
  c = base_config(ABLATIONS["rvq+swinT"], "rvq+swinT")
  c.train.batch_size = 72  # train_bs_per_device 18 x 4 devices in the yaml
  return c
