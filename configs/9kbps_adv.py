"""ESC-Base(adv), 9 kbps: the original's configs/9kbps_esc_base_adv.yaml with the DAC discriminator.

  python train.py --config configs/9kbps_adv.py --workdir runs/esc_base_adv \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

The model is ESC-Base with 8-dim codebooks (codebook_dims [8]*6, 8,386,373
parameters); the discriminator has 42,519,760. Recipe (scripts/trainer_adv.py):
loss weights mel 15, complex STFT 0, commitment .25, codebook 1, generator 1,
feature matching 2; generator step then discriminator step; the adversarial
terms and the discriminator start after pre-training; discriminator AdamW at
the generator's learning rate; gradient clipping 1e3 (generator), 10
(discriminator). Batch 36 of 3 s clips as the paper.
"""
from esc_jax.config_lib import ESC_BASE, add_adversarial, base_config


def get_config(arg=None):
  del arg
  return add_adversarial(base_config(dict(ESC_BASE, codebook_dims=[8] * 6)))
