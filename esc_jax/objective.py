"""The training objective of ESC (non-adversarial recipe).

loss = mean_B(cm_weight * cm + cb_weight * cb + mel_weight * mel + stft_weight * stft)
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from esc_jax import losses

DEFAULT_WEIGHTS = dict(cm_weight=0.25, cb_weight=1.0, mel_weight=0.25, stft_weight=1.0)


def codec_loss(out: Mapping[str, jnp.ndarray], x: jnp.ndarray, weights: Mapping[str, float] | None = None):
  """Loss of one training forward.

  Args:
    out: the dict returned by `ESC.__call__(..., train=True)`.
    x: (B, L) input audio (L equals the reconstruction's length).
    weights: cm/cb/mel/stft weights (the original's `loss:` section).
  Returns: (scalar loss, dict of per-item terms cm_loss, cb_loss, mel_loss, stft_loss).
  """
  w = dict(DEFAULT_WEIGHTS, **(weights or {}))
  recon = out["recon_audio"]
  if recon.shape != x.shape:
    raise ValueError(f"reconstruction {recon.shape} and input {x.shape} differ: use a valid length")
  terms = dict(cm_loss=out["cm_loss"], cb_loss=out["cb_loss"],
               mel_loss=losses.mel_loss(x, recon),
               stft_loss=losses.stft_loss(out["raw_feat"], out["recon_feat"]))
  total = (w["cm_weight"] * terms["cm_loss"] + w["cb_weight"] * terms["cb_loss"]
           + w["mel_weight"] * terms["mel_loss"] + w["stft_weight"] * terms["stft_loss"])
  return jnp.mean(total), terms
