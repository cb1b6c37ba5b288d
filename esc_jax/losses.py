"""Training losses of ESC (esc/modules/loss/generator_loss.py, gan_loss.py).

All functions are batched, jit-able and differentiable; each returns a
per-item loss of shape (B,).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from esc_jax.audio import SAMPLE_RATE, mel_spectrogram

MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_BINS = (5, 10, 20, 40, 80, 160, 320)
CLAMP_EPS = 1e-5
POWER = 0.3


def _log_mel(m: jnp.ndarray, clamp_eps: float) -> jnp.ndarray:
  """log10(clamp(m, eps)^2); like torch.clamp the gradient passes at m == eps."""
  return jnp.log10(jnp.square(jnp.where(m >= clamp_eps, m, clamp_eps)))


def mel_loss(x: jnp.ndarray, y: jnp.ndarray, windows=MEL_WINDOWS, n_mels=MEL_BINS,
             sr: int = SAMPLE_RATE, clamp_eps: float = CLAMP_EPS) -> jnp.ndarray:
  """Multi-scale L1 mel + L1 log10-mel-power loss (MelSpectrogramLoss).

  Args:
    x, y: (B, L) reference and reconstructed audio.
  Returns:
    (B,) sum over the scales of mean|mx - my| + mean|log10 mx^2 - log10 my^2|.
    (The mel distance metric, the log term alone, is `esc_jax.metrics.mel_distance`.)
  """
  lin = jnp.zeros(x.shape[0], jnp.float32)
  log = jnp.zeros(x.shape[0], jnp.float32)
  for w, nm in zip(windows, n_mels):
    kw = dict(sr=sr, n_fft=w, win_length=w, hop=w // 4, n_mels=nm, power=1.0)
    mx, my = mel_spectrogram(x, **kw), mel_spectrogram(y, **kw)  # (B, n_mels, T)
    lin = lin + jnp.mean(jnp.abs(mx - my), axis=(1, 2))
    log = log + jnp.mean(jnp.abs(_log_mel(mx, clamp_eps) - _log_mel(my, clamp_eps)), axis=(1, 2))
  return lin + log


def power_law(s: jnp.ndarray, power: float = POWER, eps: float = 1e-10) -> jnp.ndarray:
  """sign(s) * (|s| + eps)^power elementwise (sign(0) = 0)."""
  return jnp.sign(s) * (jnp.abs(s) + eps) ** power


def stft_loss(raw_feat: jnp.ndarray, recon_feat: jnp.ndarray, power: float = POWER) -> jnp.ndarray:
  """MSE of power-law compressed complex STFT features (ComplexSTFTLoss).

  Args:
    raw_feat, recon_feat: (B, 2, F, T) real/imag features.
  Returns:
    (B,) mean over all non-batch axes.
  """
  d = power_law(raw_feat, power) - power_law(recon_feat, power)
  return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


# ---- adversarial losses (esc/modules/loss/gan_loss.py, least-squares GAN) ----
# `d_fake`, `d_real` are a discriminator's outputs: per sub-discriminator the list of
# feature maps (B, ...), the last being the logits (esc_jax.discriminator).

def _item_mean(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over all non-batch axes, in float32: (B, ...) -> (B,)."""
  return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def discriminator_adv_loss(d_fake: Sequence[Sequence[jnp.ndarray]],
                           d_real: Sequence[Sequence[jnp.ndarray]]) -> jnp.ndarray:
  """LSGAN discriminator loss (GANLoss.discriminator_loss).

  The original runs the discriminator on detached fake audio: pass
  D(stop_gradient(fake)) when differentiating a joint function.
  Returns:
    (B,) sum over sub-discriminators of mean(D(fake)^2) + mean((1 - D(real))^2).
  """
  loss = 0.0
  for f, r in zip(d_fake, d_real, strict=True):
    loss = loss + _item_mean(jnp.square(f[-1])) + _item_mean(jnp.square(1.0 - r[-1]))
  return loss


def generator_adv_loss(d_fake: Sequence[Sequence[jnp.ndarray]]) -> jnp.ndarray:
  """LSGAN generator loss (GANLoss.generator_loss, first output).

  Returns: (B,) sum over sub-discriminators of mean((1 - D(fake))^2).
  """
  loss = 0.0
  for f in d_fake:
    loss = loss + _item_mean(jnp.square(1.0 - f[-1]))
  return loss


def feature_matching_loss(d_fake: Sequence[Sequence[jnp.ndarray]],
                          d_real: Sequence[Sequence[jnp.ndarray]]) -> jnp.ndarray:
  """L1 feature matching (GANLoss.generator_loss, second output); real maps are detached.

  Returns: (B,) sum over sub-discriminators and their feature maps except the
  logits of mean|f_fake - f_real|.
  """
  loss = 0.0
  for f, r in zip(d_fake, d_real, strict=True):
    if len(f) != len(r):
      raise ValueError(f"feature map counts differ: {len(f)} vs {len(r)}")
    for a, b in zip(f[:-1], r[:-1]):
      loss = loss + _item_mean(jnp.abs(a.astype(jnp.float32) - jax.lax.stop_gradient(b).astype(jnp.float32)))
  return loss
