"""Smoke test: the tiny ESC for 20 steps on the bundled clips (~1-2 min on 2 CPU cores).

  python train.py --config configs/smoke.py --workdir /tmp/smoke_run

Pre-training for 5 steps, batch 2 of 1 s crops, checkpoints every 10 steps,
validation (PESQ etc.) on the bundled clips at the end. Rerun to see it resume.
"""
from esc_jax.config_lib import ESC_TINY, base_config, smoke


def get_config(arg=None):
  del arg
  return smoke(base_config(ESC_TINY), num_steps=20, pretrain_steps=5)
