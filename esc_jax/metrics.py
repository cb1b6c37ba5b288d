"""Evaluation metrics of ESC (scripts/metrics.py).

`si_sdr` and `mel_distance` are jax.numpy (batched, jit-able); PESQ, STOI
and bitrate utilisation run in numpy on the host.
"""
from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np

from esc_jax.losses import mel_distance

__all__ = ["si_sdr", "mel_distance", "pesq_wb", "stoi", "bitrate_utilization"]


def si_sdr(ref: jnp.ndarray, est: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
  """Zero-mean scale-invariant SDR in dB (DAC/ESC formulation).

  Args:
    ref, est: (B, L) (or (B, ...), flattened per item) audio.
  Returns:
    (B,) 10 log10(|a r|^2 / |e - a r|^2 + eps) with a = (<e, r> + eps) / (|r|^2 + eps)
    on mean-removed r, e.
  """
  ref = jnp.asarray(ref, jnp.float32)
  est = jnp.asarray(est, jnp.float32)
  r = ref.reshape(ref.shape[0], -1)
  e = est.reshape(est.shape[0], -1)
  r = r - jnp.mean(r, axis=1, keepdims=True)
  e = e - jnp.mean(e, axis=1, keepdims=True)
  scale = (jnp.sum(e * r, axis=1, keepdims=True) + eps) / (jnp.sum(r * r, axis=1, keepdims=True) + eps)
  e_true = scale * r
  e_res = e - e_true
  signal = jnp.sum(e_true ** 2, axis=1)
  noise = jnp.sum(e_res ** 2, axis=1)
  return 10.0 * jnp.log10(signal / noise + eps)


def _as_batch(a) -> np.ndarray:
  a = np.asarray(a, dtype=np.float64)
  return a[None] if a.ndim == 1 else a


def pesq_wb(ref, est, sr: int = 16000) -> np.ndarray:
  """Wide-band PESQ per item (`pesq(16000, ref, deg, 'wb')`).

  Items the pesq package rejects (e.g. no utterance detected, too short)
  give NaN with a warning.

  Args:
    ref, est: (B, L) or (L,) audio at 16 kHz.
  Returns:
    (B,) float64 MOS-LQO in [1.04, 4.64] (NaN where undefined).
  """
  from pesq import PesqError, pesq

  if sr != 16000:
    raise ValueError(f"wide-band PESQ needs 16 kHz audio, got sr={sr}")
  ref, est = _as_batch(ref), _as_batch(est)
  if ref.shape != est.shape:
    raise ValueError(f"ref and est shapes differ: {ref.shape} vs {est.shape}")
  out = np.full(ref.shape[0], np.nan)
  for b in range(ref.shape[0]):
    try:
      with np.errstate(divide="ignore", invalid="ignore"):  # pesq divides by max|x|
        out[b] = pesq(sr, ref[b], est[b], "wb")
    except PesqError as e:
      warnings.warn(f"PESQ undefined for item {b} ({type(e).__name__}: {e}); using NaN", RuntimeWarning)
  return out


def stoi(ref, est, sr: int = 16000, extended: bool = False) -> np.ndarray:
  """Short-time objective intelligibility per item (pystoi).

  Args:
    ref, est: (B, L) or (L,) audio at `sr`.
  Returns:
    (B,) float64.
  """
  from pystoi import stoi as _stoi

  ref, est = _as_batch(ref), _as_batch(est)
  if ref.shape != est.shape:
    raise ValueError(f"ref and est shapes differ: {ref.shape} vs {est.shape}")
  return np.array([_stoi(ref[b], est[b], sr, extended=extended) for b in range(ref.shape[0])])


def bitrate_utilization(codes, codebook_size: int, decimals: int | None = None) -> float:
  """Bitrate utilisation (EntropyCounter.compute_utilization's total).

  For each codebook (stream, group) the code histogram over the whole set
  (all items and time steps) gives p; its entropy -sum p log2(p + 1e-10) is
  summed over streams x groups and divided by streams * groups * log2(K).

  Args:
    codes: (N, streams, groups, T...) int code indices in [0, codebook_size).
    decimals: round the result like the original (which uses 4); None = exact.
  Returns:
    utilisation in [0, 1].
  """
  codes = np.asarray(codes)
  if codes.ndim < 3:
    raise ValueError(f"codes must be (N, streams, groups, T...), got shape {codes.shape}")
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes must be integers, got {codes.dtype}")
  if codes.size == 0:
    raise ValueError("no codes to count")
  if codes.min() < 0 or codes.max() >= codebook_size:
    raise ValueError(f"codes outside [0, {codebook_size})")
  n, s, g = codes.shape[:3]
  per_book = np.moveaxis(codes.reshape(n, s, g, -1), 0, 2).reshape(s * g, -1)  # (S*G, N*T)
  total = 0.0
  for book in per_book:
    p = np.bincount(book, minlength=codebook_size) / book.size
    total += float(-np.sum(p * np.log2(p + 1e-10)))
  util = total / (s * g * math.log2(codebook_size))
  return round(util, decimals) if decimals is not None else util
