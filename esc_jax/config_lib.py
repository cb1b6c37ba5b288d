"""Shared pieces of the ml_collections configs in `configs/`.

`base_config(model)` returns every section with the original recipe's values
(SPEC: AdamW 1e-4, clip 0.5, quantisation dropout 0.75, first 15 of 80 epochs
pre-training, batch 36 of 3 s clips); config files only set what differs.
"""
from __future__ import annotations

import ml_collections

# The reference's clip: 3 s minus one hop (x[:-80]) so T = 600 frames, W = 300 patches.
CLIP_SAMPLES = 47920

ESC_BASE = dict(  # configs/9kbps_esc_base.yaml of the original
    backbone="transformer", in_dim=2, in_freq=192, h_dims=[45, 72, 96, 144, 192, 384],
    max_streams=6, win_len=20, hop_len=5, sr=16000, patch_size=[3, 2],
    swin_heads=[3, 6, 12, 24, 24], swin_depth=2, window_size=4, mlp_ratio=4.0,
    overlap=2, group_size=3, codebook_size=1024, codebook_dims=[32, 32, 16, 12, 8, 6],
    l2norm=True)

# configs/ablations/9kbps_*.yaml of the original: the four `make_model` variants at 9 kbps,
# all with 8-dimensional codebooks (train.py needs BatchNorm support for the convolution ones).
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


def base_config(model: dict, model_name: str = "csvq+swinT") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.train_dir = ""  # folder of wav/flac (recursive); required for training
  c.data.val_dir = ""  # held-out folder for validation; empty = no validation
  c.data.clip_samples = CLIP_SAMPLES
  c.data.sample_rate = 16000
  c.data.num_workers = 2  # grain worker processes; 0 = in the main process
  c.data.val_max_files = 64  # validation cost grows with PESQ on the host

  c.model_name = model_name  # esc_jax.codec.MODEL_NAMES
  c.model = ml_collections.ConfigDict(dict(model))

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 36  # global batch (9 per device x 4 GPUs in the paper)
  c.train.num_steps = 250_000  # ~80 epochs of the paper's data
  c.train.pretrain_steps = 46_875  # first 15 of 80 epochs: codebooks bypassed
  c.train.quant_dropout = 0.75  # P(num_streams ~ U{1..6}); else all 6 streams
  c.train.compute_dtype = "float32"  # "bfloat16" for accelerators; params stay float32

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
  c.eval.every_steps = 5000
  c.eval.num_streams = 6
  c.eval.batch_size = 4

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 1000
  c.ckpt.keep = 3  # most recent checkpoints kept (plus the best by PESQ)

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.tensorboard = True
  c.log.wandb = False
  return c
