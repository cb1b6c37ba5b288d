"""The tiny ESC of the golden fixture (tests/fixtures/esc_tiny): fast tests and CPU experiments.

  python train.py --config configs/tiny.py --workdir /tmp/tiny --config.data.train_dir=DIR
"""
from esc_jax.config_lib import ESC_TINY, base_config


def get_config(arg=None):
  del arg
  c = base_config(ESC_TINY)
  c.train.batch_size = 4
  c.train.num_steps = 2000
  c.train.pretrain_steps = 200
  c.eval.every_steps = 500
  c.ckpt.every_steps = 250
  c.log.every_steps = 10
  return c
