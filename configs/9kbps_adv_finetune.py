"""Post-adversarial fine-tuning of a non-adversarial ESC-Base (the original's --pretrain_ckp route).

  python train.py --config configs/9kbps_adv_finetune.py --workdir runs/esc_base_adv_ft \
      --config.train.init_from=runs/esc_base_8dim \
      --config.data.train_dir=/data/dns/train --config.data.val_dir=/data/dns/val

Starts from the params of a codec directory (a converted release or a train.py
run of the same model: ESC-Base with codebook_dims [8]*6) with fresh
optimizers, and trains with the adversarial losses on from the first step
(no pre-training) at the generator learning rate / 10 (1e-5; the
discriminator keeps 1e-4), as scripts/trainer_adv.py does when given a
pre-trained checkpoint. train.init_from is required.
"""
from ml_collections import config_dict

from esc_jax.config_lib import ESC_BASE, add_adversarial, base_config


def get_config(arg=None):
  del arg
  c = add_adversarial(base_config(dict(ESC_BASE, codebook_dims=[8] * 6)))
  c.train.init_from = config_dict.placeholder(str)  # required: --config.train.init_from=CODEC_DIR
  c.train.pretrain_steps = 0  # the codec is trained already: adversarial from step 0
  c.train.num_steps = 50_000  # fine-tuning length; the original trains for its configured epochs
  c.optim.lr = c.disc_optim.lr / 10  # generator lr / 10, discriminator at the original lr
  return c
