"""The training objective of ESC: codec terms, and the adversarial terms of ESC-Base(adv).

  generator loss = mean_B(cm_weight * cm + cb_weight * cb + mel_weight * mel + stft_weight * stft
                          + gen_weight * gen + feat_weight * feat)
  discriminator loss = mean_B(disc)

(`scripts/trainer_no_adv.py` / `trainer_adv.py` of the original; the GAN terms are
least-squares GAN and L1 feature matching, `esc_jax.losses`.)
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from esc_jax import losses

DEFAULT_WEIGHTS = dict(cm_weight=0.25, cb_weight=1.0, mel_weight=0.25, stft_weight=1.0,
                       gen_weight=1.0, feat_weight=2.0)


def codec_loss(out: Mapping[str, jnp.ndarray], x: jnp.ndarray, weights: Mapping[str, float] | None = None):
  """Loss of one training forward without adversarial terms.

  Args:
    out: the dict returned by `ESC.__call__(..., train=True)`.
    x: (B, L) input audio (L equals the reconstruction's length).
    weights: cm/cb/mel/stft weights (the original's `loss:` section; other keys ignored).
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


def generator_adv_terms(disc, disc_params, x: jnp.ndarray, recon: jnp.ndarray) -> dict:
  """Per-item generator adversarial and feature-matching losses: {"gen_loss", "feat_loss"} (B,)."""
  d_fake = disc.apply({"params": disc_params}, recon)
  d_real = disc.apply({"params": disc_params}, x)
  return dict(gen_loss=losses.generator_adv_loss(d_fake), feat_loss=losses.feature_matching_loss(d_fake, d_real))


def discriminator_loss(disc, disc_params, x: jnp.ndarray, recon: jnp.ndarray) -> jnp.ndarray:
  """Scalar discriminator loss on real `x` and (detached) reconstructed audio."""
  d_fake = disc.apply({"params": disc_params}, jax.lax.stop_gradient(recon))
  d_real = disc.apply({"params": disc_params}, x)
  return jnp.mean(losses.discriminator_adv_loss(d_fake, d_real))
