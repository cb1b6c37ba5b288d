"""Shared pieces of the ml_collections configs in `configs/`.

`base_config(model)` returns every section with the original recipe's values
(SPEC: AdamW 1e-4, clip 0.5, quantisation dropout 0.75, first 15 of 80 epochs
pre-training, batch 36 of 3 s clips); `add_adversarial(c)` turns it into the
ESC-Base(adv) recipe; config files only set what differs.
"""
from __future__ import annotations

import pathlib

import ml_collections

ASSETS = str(pathlib.Path(__file__).parent / "assets")  # the two bundled speech clips

# The reference's clip: 3 s minus one hop (x[:-80]) so T = 600 frames, W = 300 patches.
CLIP_SAMPLES = 47920

ESC_BASE = dict(  # configs/9kbps_esc_base.yaml of the original
    backbone="transformer", in_dim=2, in_freq=192, h_dims=[45, 72, 96, 144, 192, 384],
    max_streams=6, win_len=20, hop_len=5, sr=16000, patch_size=[3, 2],
    swin_heads=[3, 6, 12, 24, 24], swin_depth=2, window_size=4, mlp_ratio=4.0,
    overlap=2, group_size=3, codebook_size=1024, codebook_dims=[32, 32, 16, 12, 8, 6],
    l2norm=True)

# configs/ablations/9kbps_*.yaml of the original: the four `make_model` variants at 9 kbps,
# all with 8-dimensional codebooks (the convolution ones train with BatchNorm statistics).
_ABLATION = dict(
    in_dim=2, in_freq=192, h_dims=[45, 72, 96, 144, 192, 384], max_streams=6, win_len=20, hop_len=5,
    sr=16000, patch_size=[3, 2], overlap=2, group_size=3, codebook_size=1024, l2norm=True)
_SWIN = dict(backbone="transformer", swin_heads=[3, 6, 12, 24, 24], swin_depth=2, window_size=4, mlp_ratio=4.0)
_CONV = dict(backbone="convolution", kernel_size=[5, 2], conv_depth=1)
ABLATIONS = {
    "csvq+swinT": dict(_ABLATION, **_SWIN, codebook_dims=[8] * 6),
    # The yaml spells this `codebook_dim: [8, ...]`, which the original ESC constructor rejects.
    "csvq+conv": dict(_ABLATION, **_CONV, codebook_dims=[8] * 6),
    "rvq+swinT": dict(_ABLATION, **_SWIN, num_rvqs=6, codebook_dim=8),
    # The yaml lists `codebook_dim: [8] * 6`; RVQCodecs takes one integer.
    "rvq+conv": dict(_ABLATION, **_CONV, num_rvqs=6, codebook_dim=8),
}

ESC_TINY = dict(  # the golden fixture's model (tests/fixtures/esc_tiny/config.json)
    ESC_BASE, h_dims=[8, 8, 12, 12, 16, 20], swin_heads=[1, 2, 2, 2, 2], mlp_ratio=2.0,
    codebook_size=64, codebook_dims=[4, 4, 3, 3, 2, 2])


DISCRIMINATOR = dict(  # the `discriminator:` section of 9kbps_esc_base_adv.yaml (DAC's, without MSD)
    periods=[2, 3, 5, 7, 11], fft_sizes=[2048, 1024, 512],
    bands=[[0.0, 0.1], [0.1, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]],
    mpd_channels=[32, 128, 512, 1024, 1024], mrd_channels=32)  # widths of the original (42.5M params)


def base_config(model: dict, model_name: str = "csvq+swinT") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.train_dir = ""  # folder of wav/flac (recursive); required for training
  c.data.val_dir = ""  # held-out folder: every file, full length (minus 80 samples); "" = no validation
  c.data.clip_samples = CLIP_SAMPLES
  c.data.sample_rate = 16000
  c.data.num_workers = 2  # grain worker processes; 0 = in the main process
  c.data.val_max_files = 0  # 0 = every file of val_dir; N caps validation at the first N files

  c.model_name = model_name  # esc_jax.codec.MODEL_NAMES
  c.model = ml_collections.ConfigDict(dict(model))

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 36  # global batch (9 per device x 4 GPUs in the paper)
  c.train.num_steps = 250_000  # ~80 epochs of the paper's data
  c.train.pretrain_steps = 46_875  # first 15 of 80 epochs: codebooks bypassed
  c.train.quant_dropout = 0.75  # P(num_streams ~ U{1..6}); else all 6 streams
  c.train.compute_dtype = "float32"  # "bfloat16" for accelerators; params stay float32
  c.train.init_from = ""  # codec directory to start from (params only, fresh optimizer), as --pretrain_ckp

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"  # constant | warmup_cosine | exponential
  c.optim.warmup_steps = 0
  c.optim.decay_rate = 0.999996  # per step, for "exponential"
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay = 0.01  # torch.optim.AdamW default
  c.optim.clip_norm = 0.5

  c.loss = ml_collections.ConfigDict(dict(cm_weight=0.25, cb_weight=1.0, mel_weight=0.25,
                                          stft_weight=1.0))

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0 = once per epoch of the training set (as the original), after pre-training
  c.eval.num_streams = 6
  c.eval.batch_size = 4

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 1000
  c.ckpt.keep = 3  # most recent checkpoints kept (plus the best by PESQ)

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.tensorboard = True
  c.log.wandb = False  # needs `pip install esc-jax[wandb]`
  c.log.wandb_project = "esc_jax"
  return c


def add_adversarial(c: ml_collections.ConfigDict, discriminator: dict = DISCRIMINATOR) -> ml_collections.ConfigDict:
  """The ESC-Base(adv) recipe (9kbps_esc_base_adv.yaml + scripts/trainer_adv.py) on top of `c`.

  Loss weights mel 15, complex STFT 0, commitment .25, codebook 1, generator 1,
  feature matching 2; generator clip 1e3; the discriminator's AdamW at the
  generator's learning rate with clip 10. The adversarial terms and the
  discriminator start after pre-training.
  """
  c.discriminator = ml_collections.ConfigDict(dict(discriminator))
  c.disc_optim = ml_collections.ConfigDict(c.optim.to_dict())
  c.disc_optim.schedule = "constant"  # the original's discriminator optimizer has no scheduler
  c.disc_optim.warmup_steps = 0
  c.disc_optim.clip_norm = 10.0
  c.optim.clip_norm = 1e3
  c.loss = ml_collections.ConfigDict(dict(cm_weight=0.25, cb_weight=1.0, mel_weight=15.0, stft_weight=0.0,
                                          gen_weight=1.0, feat_weight=2.0))
  return c


def smoke(c: ml_collections.ConfigDict, num_steps: int, pretrain_steps: int) -> ml_collections.ConfigDict:
  """A quick CPU run of `c` on the bundled clips: batch 2 of 1 s crops, validation at the end."""
  c.data.train_dir = ASSETS
  c.data.val_dir = ASSETS
  c.data.clip_samples = 15920  # 1 s (T = 200 frames)
  c.data.num_workers = 0
  c.train.batch_size = 2
  c.train.num_steps = num_steps
  c.train.pretrain_steps = pretrain_steps
  c.eval.every_steps = num_steps
  c.eval.batch_size = 2
  c.ckpt.every_steps = max(1, num_steps // 2)
  c.ckpt.keep = 2
  c.log.every_steps = max(1, num_steps // 4)
  return c
